"""Architecture presets by name: the numbers live in conf/size/<name>.yaml (`arch:`), read from there.

Apart from config.py because it needs omegaconf and the source checkout's conf/ folder, which an exported
model (export.py) does not ship.
"""

from __future__ import annotations

from pathlib import Path

from .config import ModelConfig

CONF_DIR = Path(__file__).resolve().parents[3] / "conf"  # the Hydra config of this source checkout
CONF_SIZE_DIR = CONF_DIR / "size"


def preset_arch(name: str) -> dict:
    """The architecture numbers of a size preset, read from conf/size/<name>.yaml (`arch:`)."""
    from omegaconf import OmegaConf

    path = CONF_SIZE_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONF_SIZE_DIR.glob("*.yaml") if not p.stem.startswith("_"))
        raise ValueError(f"size: unknown preset {name!r}; choose one of {known}")
    conf = OmegaConf.load(path)
    arch: dict = {}
    for base in conf.get("defaults", []):  # a preset built on another (study: tiny's architecture), as Hydra
        if isinstance(base, str) and base != "_self_":  # composes it
            arch.update(preset_arch(base))
    if "arch" in conf:
        arch.update(OmegaConf.to_container(conf.arch, resolve=True))
    return arch


def preset(name: str, routing: str = "dense", **overrides) -> ModelConfig:
    """`preset("182m", "remoe", experts=8)` -> ModelConfig (the vocabulary comes from the tokenizer)."""
    return ModelConfig(**{**preset_arch(name), "routing": routing, **overrides})
