"""From the composed Hydra config to one checked RunSpec, before any data or model is built.

The model is `size.arch` (the backbone's numbers) plus `model` (conf/model/<method>.yaml: `name` is the
routing method; its other keys are ModelConfig fields, e.g. experts: ${experts}, or the method's
training knobs, e.g. lambda0). Every bad value becomes a ConfigError whose message starts with the key a
user would type: a field set through an interpolation (`experts: ${experts}`) is named by its source.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from functools import cache
from typing import get_args

from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT
from omegaconf import DictConfig, OmegaConf, open_dict

from ..cli import UsageError
from ..data.corpus import check_text_file, expand_files
from ..data.datamodule import SOURCES, read_prepared
from ..eval.run import HubUnavailable, check_eval, check_tasks
from ..model import ModelConfig, RoutingMethod, build_method, method_of
from ..model.config import ConfigFieldError
from ..model.presets import CONF_DIR
from .optim import FFN_DOWN_LR, RECIPE

ARCH_FIELDS = frozenset(f.name for f in fields(ModelConfig))
GROUPS = ("model", "size", "data", "trainer", "logger", "eval", "hydra")
# what Lightning's Trainer accepts as `precision` (its own Literal types)
PRECISIONS = frozenset(str(v) for t in get_args(_PRECISION_INPUT) for v in get_args(t))


@cache
def known_keys() -> frozenset[str]:
    """Top-level keys of the composed config: conf/config.yaml's own and the config groups."""
    primary = OmegaConf.load(CONF_DIR / "config.yaml")
    return frozenset(primary) - {"defaults"} | set(GROUPS)


class ConfigError(UsageError):
    """A bad config value; the message starts with the offending key (entry scripts: one line, exit 2)."""


MOE_DISPATCH = ("auto", "exact", "bounded")  # model.moe.PairCapacity
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=,-]*")  # an experiment name: one folder under paths.root


def _key(cfg: DictConfig, field: str) -> str:
    """The config key that set a ModelConfig field or a method knob."""
    if field == "routing":
        return "model"
    raw = OmegaConf.to_container(cfg.model, resolve=False)
    if field not in raw:
        return f"size.arch.{field}"
    m = re.fullmatch(r"\$\{([\w.]+)\}", str(raw[field]))
    return m.group(1) if m else f"model.{field}"


def _split_model(cfg: DictConfig) -> tuple[dict, dict]:
    """(architecture fields, routing-method knobs) of cfg.model."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    name = model.pop("name")
    arch = {k: v for k, v in model.items() if k in ARCH_FIELDS}
    return {**arch, "routing": name}, {k: v for k, v in model.items() if k not in ARCH_FIELDS}


def routing_knobs(cfg: DictConfig) -> dict:
    """The routing method's training knobs (plain values: stored in checkpoints)."""
    return _split_model(cfg)[1]


def model_config(cfg: DictConfig, vocab_size: int = 50257) -> ModelConfig:
    """The architecture: size.arch, then the model's own fields (the vocabulary comes from the data)."""
    arch, _ = _split_model(cfg)
    size_arch = OmegaConf.to_container(cfg.size.arch, resolve=True)
    unknown = sorted(set(size_arch) - ARCH_FIELDS)
    if unknown:
        raise ConfigError(f"size.arch.{unknown[0]}: not a model architecture field")
    try:
        mcfg = ModelConfig(**{**size_arch, **arch, "vocab_size": vocab_size})
        method_of(mcfg)  # the routing method's checks of its router options
        return mcfg
    except ConfigFieldError as e:
        raise ConfigError(f"{_key(cfg, e.field)}: {e.msg}") from None


def routing_method(cfg: DictConfig, mcfg: ModelConfig) -> RoutingMethod:
    try:
        return build_method(mcfg, **routing_knobs(cfg))
    except ConfigFieldError as e:
        raise ConfigError(f"{_key(cfg, e.field)}: {e.msg}") from None


def world_size(cfg: DictConfig) -> int:
    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if devices in ("auto", None) and cfg.trainer.get("accelerator") == "cpu":
        devices = 1
    if not isinstance(devices, int):
        n = len(devices) if OmegaConf.is_list(devices) or isinstance(devices, list) else None
        if n is None:
            raise ConfigError(f"trainer.devices: give a number of devices, not {devices!r}, "
                              "so the gradient accumulation can be derived from the global batch")
        devices = n
    if devices <= 0 or nodes <= 0:
        raise ConfigError("trainer.devices/trainer.num_nodes: must be positive")
    return devices * nodes


def batch_split(cfg: DictConfig) -> tuple[int, int]:
    """(micro-batch per device, accumulation steps) from the global batch and the device count.
    size.micro_batch_size is the most one device holds; fewer devices -> more accumulation."""
    gb, mb, ws = cfg.size.global_batch_size, cfg.size.micro_batch_size, world_size(cfg)
    if mb <= 0 or gb <= 0 or gb % ws != 0:
        raise ConfigError(f"size.global_batch_size: {gb} is not divisible by devices x nodes ({ws})")
    micro = min(mb, gb // ws)
    if (gb // ws) % micro != 0:
        raise ConfigError(f"size.global_batch_size: {gb} / (devices x nodes = {ws}) is not divisible by "
                          f"size.micro_batch_size ({mb})")
    return micro, gb // ws // micro


def check_prepared(cfg: DictConfig) -> None:
    """data=prepared: the folder's sequences have this run's length, and the token budget fits in them (a
    prepared corpus is not repeated: a larger budget is a config error, not a silent second epoch)."""
    try:
        rec = read_prepared(str(cfg.data.dir))
    except ValueError as e:
        raise ConfigError(f"data.dir: {e}") from None
    if rec["seq_len"] != cfg.size.seq_len:
        raise ConfigError(f"data.dir: prepared for seq_len {rec['seq_len']}, this run has size.seq_len "
                          f"{cfg.size.seq_len}; prepare it again for this length")
    need = cfg.trainer.max_steps * cfg.size.global_batch_size
    have = rec["sequences"]["train"]
    if need > have:
        raise ConfigError(f"trainer.max_steps: {cfg.trainer.max_steps} steps x {cfg.size.global_batch_size} "
                          f"sequences = {need} > the {have} training sequences prepared in {cfg.data.dir} "
                          f"({have * cfg.size.seq_len:,} tokens); prepare more data or train fewer steps")


def _typed_at(cfg: DictConfig, key: str) -> str:
    """The key a user types for `key`: the source of an interpolation (`optim.lr: ${size.lr}` -> size.lr)."""
    node, _, leaf = key.rpartition(".")
    raw = OmegaConf.select(cfg, node) if node else cfg
    value = OmegaConf.to_container(raw, resolve=False).get(leaf) if OmegaConf.is_dict(raw) else None
    m = re.fullmatch(r"\$\{([\w.]+)\}", str(value))
    return m.group(1) if m else key


def check_numbers(cfg: DictConfig) -> None:
    """The schedule's, batch's and logging's numbers: the right type and range, or a ConfigError naming the
    key a user types (before anything compares or divides by them)."""
    def need(key: str, ok, what: str, kinds=(int, float)) -> None:
        v = OmegaConf.select(cfg, key)
        if isinstance(v, bool) or not isinstance(v, kinds) or (isinstance(v, float) and not math.isfinite(v)) \
                or not ok(v):
            raise ConfigError(f"{_typed_at(cfg, key)}: must be {what} (got {v!r})")

    for key in ("size.seq_len", "size.global_batch_size", "size.micro_batch_size", "size.val_interval",
                "size.ckpt_interval", "size.val_batches", "trainer.max_steps"):
        need(key, lambda v: v >= 1, "an int >= 1", int)
    for key in ("routing_log_interval", "analysis.flip_interval", "analysis.batches"):
        if OmegaConf.select(cfg, key) is not None:
            need(key, lambda v: v >= 0, "an int >= 0", int)
    need("optim.lr", lambda v: v > 0, "a number > 0")
    need("optim.min_lr", lambda v: v >= 0, "a number >= 0")
    need("optim.warmup", lambda v: v >= 0, "a number >= 0 (< 1: a share of max_steps; >= 1: steps)")
    need("optim.weight_decay", lambda v: v >= 0, "a number >= 0")
    need("optim.eps", lambda v: v > 0, "a number > 0")
    betas = OmegaConf.select(cfg, "optim.betas")
    if not (OmegaConf.is_list(betas) and len(betas) == 2 and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        raise ConfigError(f"optim.betas: must be two numbers in [0, 1) (got {betas!r})")
    if OmegaConf.select(cfg, "trainer.gradient_clip_val") is not None:
        need("trainer.gradient_clip_val", lambda v: v >= 0, "a number >= 0, or null")


def check_cluster(cluster) -> None:
    """The `cluster` a plan is sized for (plan.json, src/plan.py): counts are ints >= 1, sizes and rates > 0,
    the MFU in (0, 1]."""
    def number(key: str, integer: bool = False, most: float | None = None) -> None:
        v = cluster.get(key)
        kind = int if integer else (int, float)
        if isinstance(v, bool) or not isinstance(v, kind) or not 0 < v < math.inf or (most is not None and v > most):
            bound = f" and <= {most:g}" if most is not None else ""
            raise ConfigError(f"cluster.{key}: must be {'an int' if integer else 'a number'} > 0{bound} (got {v!r})")

    number("nodes", integer=True)
    number("gpus_per_node", integer=True)
    number("gpu_memory_gb")
    number("peak_tflops")
    number("mfu", most=1.0)


@dataclass(frozen=True)
class RunSpec:
    """One training run as validate() checked it, built once before any data or model."""

    model: ModelConfig  # the architecture (its vocabulary a placeholder until the tokenizer is known)
    knobs: dict  # the routing method's training knobs, plain values (they go into checkpoints)
    method: RoutingMethod  # built from both: the summary's setting, then the LightningModule's (rebound)


def validate(cfg: DictConfig) -> RunSpec:
    """Every check that needs no data and no model; raises ConfigError naming the key."""
    check_top_level(cfg)
    check_numbers(cfg)
    check_cluster(cfg.get("cluster") or {})
    mcfg = model_config(cfg)
    method = routing_method(cfg, mcfg)
    if cfg.size.seq_len > mcfg.max_seq_len:
        raise ConfigError(f"size.seq_len: {cfg.size.seq_len} exceeds the model context {mcfg.max_seq_len}")
    batch_split(cfg)
    check_data(cfg)
    check_downstream(cfg)
    return RunSpec(mcfg, routing_knobs(cfg), method)


def check_top_level(cfg: DictConfig) -> None:
    """The keys and the switches of conf/config.yaml, the precision and the optimizer recipe."""
    unknown = sorted(set(cfg) - known_keys())
    if unknown:
        raise ConfigError(f"{unknown[0]}: not a setting of this pipeline (a typo? see conf/config.yaml)")
    if not isinstance(cfg.get("name"), str) or not NAME.fullmatch(cfg.name) or len(cfg.name) > 128:
        raise ConfigError(f"name: {cfg.get('name')!r} is not a plain folder name (letters, digits and _ . + = , -, "
                          "not starting with a dot, at most 128 characters): runs must stay inside paths.root")
    for key in ("seed", "experts", "topk", "granularity"):
        if not isinstance(cfg.get(key), int):
            raise ConfigError(f"{key}: must be an int (got {cfg.get(key)!r})")
    if not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"seed: must be in [0, 2^32) (got {cfg.seed})")
    if str(cfg.trainer.precision) not in PRECISIONS | {"auto"}:
        raise ConfigError(f"trainer.precision: {cfg.trainer.precision!r} is not one of "
                          f"{sorted(PRECISIONS | {'auto'})} (auto: chosen from the machine, remoe.train.precision)")
    if not isinstance(cfg.get("compile", False), bool):
        raise ConfigError(f"compile: must be true or false (got {cfg.compile!r})")
    if cfg.optim.get("fused", "auto") not in ("auto", True, False):
        raise ConfigError(f"optim.fused: must be auto, true or false (got {cfg.optim.fused!r})")
    rls = cfg.optim.get("router_lr_scale", RECIPE["router_lr_scale"])
    if isinstance(rls, bool) or not isinstance(rls, (int, float)) or not rls > 0:
        raise ConfigError(f"optim.router_lr_scale: must be a number > 0 (got {rls!r})")
    if cfg.optim.get("ffn_down_lr", RECIPE["ffn_down_lr"]) not in FFN_DOWN_LR:
        raise ConfigError(f"optim.ffn_down_lr: must be one of {', '.join(FFN_DOWN_LR)} (got {cfg.optim.ffn_down_lr!r})")
    mra = cfg.get("moe_recompute_above")
    if mra is not None and (isinstance(mra, bool) or not isinstance(mra, (int, float)) or not mra > 0):
        raise ConfigError(f"moe_recompute_above: a number of experts per token > 0, or null (got {mra!r})")
    if cfg.get("moe_dispatch", "auto") not in MOE_DISPATCH:
        raise ConfigError(f"moe_dispatch: one of {', '.join(MOE_DISPATCH)} (got {cfg.get('moe_dispatch')!r})")


def check_data(cfg: DictConfig) -> None:
    """The data source, and the files or prepared folder it reads."""
    if cfg.data.source not in SOURCES:
        raise ConfigError(f"data.source: unknown source {cfg.data.source!r}")
    if cfg.data.source == "prepared":
        check_prepared(cfg)
    if cfg.data.source == "text_files":
        try:
            for path in expand_files(cfg.data.files):
                check_text_file(path)
        except (OSError, TypeError, ValueError) as e:
            raise ConfigError(f"data.files: {str(e).removeprefix('data.files: ')}") from None


def check_downstream(cfg: DictConfig) -> None:
    """The downstream evaluation's suite and tasks (lm-eval loads only when one is configured)."""
    if cfg.eval.suite == "none":
        return
    try:
        check_eval(cfg.eval)
        check_tasks(cfg.eval.suite, cfg.eval.tasks)
    except HubUnavailable as e:
        raise ConfigError(f"eval: {e}") from None
    except ValueError as e:
        raise ConfigError(str(e)) from None


def derive(cfg: DictConfig) -> None:
    """Fill the values that follow from others: micro-batch and accumulation from the global batch,
    validation interval in micro-batches."""
    micro, accumulate = batch_split(cfg)
    with open_dict(cfg):
        cfg.data.micro_batch_size = micro
        cfg.trainer.accumulate_grad_batches = accumulate
        cfg.trainer.val_check_interval = cfg.size.val_interval * accumulate
        strategy = cfg.trainer.get("strategy")
        if OmegaConf.is_dict(strategy) and strategy.get("data_parallel_size") == "auto":
            strategy.data_parallel_size = world_size(cfg)  # trainer=fsdp: shard over every rank
