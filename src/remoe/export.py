"""Hugging Face export: a training checkpoint -> a folder that `AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)` and `AutoTokenizer.from_pretrained(DIR)` load (`python src/export.py
checkpoint=PATH out=DIR`), and back (`load_hf`).

- dense -> transformers' own LlamaForCausalLM (the backbone is LLaMA exactly: RMSNorm, rotate-half RoPE,
  GQA, SwiGLU, untied, no biases; W1|W3, stored fused here, split into gate_proj/up_proj);
- every routing method -> RemoeForCausalLM (model/modeling_remoe.py), saved by transformers'
  custom-code mechanism with remoe's own model modules beside it (one source of the model math).
The folder also holds the run's tokenizer as a fast tokenizer, generation_config.json, a model card
README.md from the run's summary.json, and the run's resolved training config. Everything is written to
a temporary folder beside `out` and renamed at the end, after the exported model is loaded back and its
logits compared with the checkpoint's (max abs diff <= VERIFY_ATOL): a failed export leaves nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile

import torch

from .checkpoint import CheckpointError, check_shapes, load_checkpoint, overlaps, run_dir_of
from .cli import UsageError, guard, task, unwritable
from .console import quiet_third_party
from .data.tokenizer import EOS
from .io import remove_leftovers
from .model import ModelConfig, Transformer, method_of, param_counts
from .model.presets import CONF_DIR
from .train.record import read_summary

log = logging.getLogger("remoe")
VERIFY_ATOL = 1e-5
TRAINING_CONFIG = "training_config.yaml"  # the run's config_resolved.yaml (eval=local rebuilds from it)
TRAINING_SUMMARY = "training_summary.json"  # the run's summary.json


class ExportError(UsageError):
    """Bad input to the export: a one-line message naming the key; nothing written."""


def is_export(folder: str) -> bool:
    """Whether a folder holds a model exported by remoe (config.json with its "remoe" architecture)."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            return "remoe" in json.load(f)
    except (OSError, ValueError, TypeError):
        return False


def _check_out(checkpoint: str, out: str, overwrite: bool) -> None:
    """Refuse an output folder that would replace or sit inside what the export reads (the checkpoint, its
    run folder), an existing non-empty folder without overwrite=true, and anything but an earlier export
    with it; nothing is written before these pass."""
    for what, path in (("the checkpoint", checkpoint), ("the checkpoint's run folder", run_dir_of(checkpoint))):
        if path and os.path.exists(path) and overlaps(out, path):
            raise ExportError(f"out: {out} is, holds or lies inside {what} ({path}): an export never writes "
                              "into what it reads; choose a folder outside it")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"out: {out} exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out):
        if not overwrite:
            raise ExportError(f"out: {out} exists and is not empty; choose another folder or set overwrite=true")
        if not is_export(out):
            raise ExportError(f"out: {out} is not an earlier remoe export; overwrite=true replaces only those")
    if probe := unwritable(os.path.dirname(out)):
        raise ExportError(f"out: cannot write into {probe} (permission denied or read-only)")


def permissions_as_umask(folder: str) -> None:
    """Folder and files readable as the user's umask says (tempfile.mkdtemp creates 0700)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(folder):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~mask)


def _remove_stale_temps(parent: str, name: str) -> None:
    """Leftovers of an export killed midway (<name>_partial_<pid>_*, <name>_old_<pid>_*) whose process is gone."""
    for path in remove_leftovers(parent, re.escape(name) + r"_(partial|old)_(?P<pid>\d+)_.*"):
        log.warning("export: removed %s, left by an export that was stopped midway", path)


# ---- dense <-> LLaMA ----------------------------------------------------------------------------------
def llama_config(cfg: ModelConfig):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.padded_vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn * cfg.ffn_mult,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rope_theta=cfg.rope_base,
        rms_norm_eps=cfg.norm_eps,
        hidden_act="silu",
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        initializer_range=cfg.init_std,
        remoe=cfg.to_dict(),
    )  # kept in config.json: load_hf rebuilds the exact config


LLAMA_NAMES = {"tok_emb": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}
LLAMA_BLOCK = {
    "attn.wq": "self_attn.q_proj",
    "attn.wk": "self_attn.k_proj",
    "attn.wv": "self_attn.v_proj",
    "attn.wo": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn.w2": "mlp.down_proj",
}


def to_llama(state: dict, cfg: ModelConfig) -> dict:
    """remoe dense state dict -> LlamaForCausalLM's (the fused w13 split into gate_proj | up_proj)."""
    out = {}
    for key, value in state.items():
        name, _, leaf = key.rpartition(".")
        if name.startswith("blocks."):
            _, i, sub = name.split(".", 2)
            prefix = f"model.layers.{i}."
            if sub == "ffn.w13":
                gate, up = value.split(cfg.ffn * cfg.ffn_mult, dim=0)
                out[prefix + "mlp.gate_proj." + leaf], out[prefix + "mlp.up_proj." + leaf] = gate, up
            else:
                out[prefix + LLAMA_BLOCK[sub] + "." + leaf] = value
        else:
            out[LLAMA_NAMES[name] + "." + leaf] = value
    return out


def from_llama(state: dict, cfg: ModelConfig) -> dict:
    """The inverse of to_llama."""
    back = {v: k for k, v in LLAMA_NAMES.items()}
    block = {v: k for k, v in LLAMA_BLOCK.items()}
    out = {}
    for key, value in state.items():
        name, _, leaf = key.rpartition(".")
        if name.startswith("model.layers."):
            _, _, i, sub = name.split(".", 3)
            if sub == "mlp.up_proj":
                continue
            if sub == "mlp.gate_proj":
                up = state[f"model.layers.{i}.mlp.up_proj.{leaf}"]
                out[f"blocks.{i}.ffn.w13.{leaf}"] = torch.cat([value, up], dim=0)
            else:
                out[f"blocks.{i}.{block[sub]}.{leaf}"] = value
        else:
            out[back[name] + "." + leaf] = value
    return out


# ---- export -------------------------------------------------------------------------------------------
def hf_model(model: Transformer):
    """The transformers model holding these weights: LlamaForCausalLM for dense, RemoeForCausalLM else."""
    cfg = model.cfg
    if not cfg.is_moe:
        from transformers import LlamaForCausalLM

        hf = LlamaForCausalLM(llama_config(cfg))
        hf.load_state_dict(to_llama(model.state_dict(), cfg), strict=True)
        return hf
    from .model.configuration_remoe import RemoeConfig
    from .model.modeling_remoe import RemoeForCausalLM

    RemoeConfig.register_for_auto_class()
    RemoeForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    hf = RemoeForCausalLM(RemoeConfig(remoe=cfg.to_dict()))
    hf.model.load_state_dict(model.state_dict(), strict=True)
    return hf


def hf_tokenizer(tokenizer, cfg: ModelConfig):
    """The run's tokenizer (its own BPE, or GPT-2's for hub data: training stores whichever it used) as a
    transformers fast tokenizer; end of text is its EOS and padding token."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer.to_str()),
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=cfg.max_seq_len,
        clean_up_tokenization_spaces=False,
    )


def model_card(cfg: ModelConfig, summary: dict, repo: str | None) -> str:
    """README.md of an export: what the model is, how it was trained, how to load it."""
    name = cfg.routing if cfg.is_moe else f"Dense×{cfg.ffn_mult}" if cfg.ffn_mult > 1 else "Dense"
    tags = "tags: [mixture-of-experts, remoe]" if cfg.is_moe else "tags: [remoe]"
    lines = ["---", "library_name: transformers", tags, "---", "", f"# {repo or name} ({cfg.routing})", "",
             "Trained with remoe (a ReMoE replication pipeline); exported by its `src/export.py`.", ""]
    return "\n".join(lines + _card_table(cfg, summary) + _card_usage(cfg)) + "\n"


def _card_table(cfg: ModelConfig, summary: dict) -> list[str]:
    """The model card's table: the architecture, then the training record's numbers."""
    counts = param_counts(cfg)
    lines = ["| | |", "|---|---|", f"| routing | {cfg.routing} |"]
    if cfg.is_moe:
        lines.append(f"| experts E, top-k / target k, granularity G | {cfg.experts}, {cfg.topk}, {cfg.granularity} "
                     f"({cfg.n_experts} experts of {cfg.expert_ffn} units, {cfg.n_active} active) |")
    lines += [
        f"| layers, d_model, heads (kv) | {cfg.n_layer}, {cfg.d_model}, {cfg.n_head} ({cfg.n_kv_head}) |",
        f"| parameters: total, active | {counts['total']:,}, {counts['active']:,} |",
    ]
    for key, label in (("train_tokens", "training tokens"), ("steps", "steps"), ("val_loss", "validation loss"),
                       ("sparsity", "sparsity (last 10% of steps)"), ("seed", "seed"), ("git_commit", "code")):
        v = summary.get(key)
        if v is not None:
            shown = f"{v:,}" if isinstance(v, int) else f"{v:.4f}" if isinstance(v, float) else f"{v}"
            lines.append(f"| {label} | {shown} |")
    for name, metrics in sorted((summary.get("downstream") or {}).items()):
        if "acc" in metrics:
            lines.append(f"| {name} acc | {metrics['acc']:.4f} |")
    return lines


def _card_usage(cfg: ModelConfig) -> list[str]:
    """How to load it with transformers, and what its MoE layers give back."""
    trust = ", trust_remote_code=True" if cfg.is_moe else ""
    lines = ["", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             f"model = AutoModelForCausalLM.from_pretrained(PATH{trust})",
             f"tok = AutoTokenizer.from_pretrained(PATH{trust})", "```"]
    if cfg.is_moe:
        lines += ["", "`model(ids, output_router_logits=True).router_logits`: each MoE layer's gates (tokens, "
                  "E·G); zeros are experts a token was not routed to. No KV cache: generation recomputes the prefix."]
    if not method_of(cfg).causal:
        lines += ["", f"The `{cfg.routing}` routing is not causal across the batch: a token's experts depend on the "
                  "other tokens of its forward."]
    return lines


def _max_abs_diff(model: Transformer, hf, vocab: int) -> float:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, min(32, model.cfg.max_seq_len)), generator=g)
    with torch.no_grad():
        return (model(ids).logits.float() - hf(ids).logits.float()).abs().max().item()


def export(
    checkpoint: str, out: str, overwrite: bool = False, max_shard_size: str | int = "5GB", verify: bool = True
) -> str:
    """Write the Hugging Face folder `out` for a training checkpoint; returns its path."""
    try:
        from transformers import AutoModelForCausalLM, GenerationConfig
    except ImportError:
        raise ExportError("export needs transformers: pip install -e '.[hf]'") from None
    out = os.path.abspath(out)
    _check_out(checkpoint, out, overwrite)
    model, tokenizer, _ = load_checkpoint(checkpoint)  # CheckpointError: one line, exit 2
    cfg = model.cfg
    run_dir = run_dir_of(checkpoint)
    summary = (read_summary(run_dir) or {}) if run_dir else {}
    parent, name = os.path.dirname(out), os.path.basename(out)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_temps(parent, name)
    tmp = tempfile.mkdtemp(prefix=f"{name}_partial_{os.getpid()}_", dir=parent)
    try:
        hf = hf_model(model)
        tok = hf_tokenizer(tokenizer, cfg)
        hf.generation_config = GenerationConfig(
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, use_cache=not cfg.is_moe
        )
        hf.save_pretrained(tmp, max_shard_size=max_shard_size)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card(cfg, summary, None))
        for src, dst in (("config_resolved.yaml", TRAINING_CONFIG), ("summary.json", TRAINING_SUMMARY)):
            if run_dir and os.path.isfile(os.path.join(run_dir, src)):
                shutil.copyfile(os.path.join(run_dir, src), os.path.join(tmp, dst))
        if verify:
            back = AutoModelForCausalLM.from_pretrained(tmp, trust_remote_code=cfg.is_moe).eval()
            diff = _max_abs_diff(model.eval(), back, cfg.vocab_size)
            if not diff <= VERIFY_ATOL:
                raise RuntimeError(
                    f"export: the exported model's logits differ from the checkpoint's by {diff:.3g} "
                    f"(> {VERIFY_ATOL}); nothing written"
                )
            log.info("export: exported logits match the checkpoint's (max abs diff %.3g)", diff)
        permissions_as_umask(tmp)  # mkdtemp made it 0700: the export is shared as any folder the user makes
        if os.path.isdir(out):  # overwrite=true: the old folder goes only once the new one is complete
            old = tempfile.mkdtemp(prefix=f"{name}_old_{os.getpid()}_", dir=parent)
            os.replace(out, os.path.join(old, "x"))
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def push_to_hub(folder: str, repo: str) -> str:
    """Upload an exported folder with huggingface_hub (needs a token: `hf auth login` or HF_TOKEN)."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HfHubHTTPError

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ExportError(
            f"push_to_hub: the hub is offline here (HF_HUB_OFFLINE=1); {folder} is written — upload "
            f"it later with: hf upload {repo} {folder}"
        )
    api = HfApi()
    try:
        api.create_repo(repo, exist_ok=True)
        return api.upload_folder(repo_id=repo, folder_path=folder).commit_url
    except (HfHubHTTPError, OSError) as e:
        raise ExportError(
            f"push_to_hub: could not upload to {repo} ({type(e).__name__}: {str(e).splitlines()[0]}); "
            f"{folder} is written — upload it later with: hf upload {repo} {folder}"
        ) from None


# ---- import -------------------------------------------------------------------------------------------
def load_hf(folder: str) -> tuple[Transformer, object, dict]:
    """(model, tokenizer, config.json) from an exported folder, with the exported weights bit for bit;
    needs neither transformers nor the folder's code (safetensors and remoe only: no code from the folder
    runs). A folder that is not such an export is a CheckpointError naming it."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    def fail(why: str) -> CheckpointError:
        return CheckpointError(f"checkpoint: {folder!r} {why}")

    try:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise fail("has no config.json (not an exported model)") from None
    except (OSError, ValueError) as e:
        raise fail(f"has an unreadable config.json ({type(e).__name__})") from None
    if not isinstance(config, dict) or not isinstance(config.get("remoe"), dict):
        raise fail("was not exported by remoe (config.json has no 'remoe' architecture)")
    try:
        cfg = ModelConfig.from_dict(config["remoe"])
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = ["model.safetensors"]
        if any(not isinstance(n, str) or os.path.basename(n) != n for n in files):
            raise ValueError("its weight map names files outside the folder")
        shapes = {}
        for name in files:
            with safe_open(os.path.join(folder, name), framework="pt") as st:
                shapes.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})
        if config.get("model_type") == "llama":
            shapes = {k: tuple(v.shape) for k, v in from_llama(
                {k: torch.empty(s, device="meta") for k, s in shapes.items()}, cfg).items()}
        else:
            shapes = {k.removeprefix("model."): v for k, v in shapes.items()}
        check_shapes(cfg, {f"model.{k}": v for k, v in shapes.items()})
        state = {}
        for name in files:
            state.update(load_file(os.path.join(folder, name)))
        state = from_llama(state, cfg) if config.get("model_type") == "llama" else \
            {k.removeprefix("model."): v for k, v in state.items()}
        model = Transformer(cfg)
        model.load_state_dict(state, strict=True)
        tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    except Exception as e:  # a missing shard, a foreign architecture, a damaged file ...
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else "-"
        raise fail(f"cannot be loaded as the model its config describes ({type(e).__name__}: {why})") from None
    return model.eval(), tokenizer, config


# ---- entry point (src/export.py, console script remoe-export) -----------------------------------------
def _main(cfg) -> None:
    quiet_third_party()
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    out = export(cfg.checkpoint, cfg.out, overwrite=cfg.overwrite, max_shard_size=cfg.max_shard_size,
                 verify=cfg.verify)
    print(f"remoe: exported {cfg.checkpoint} -> {out}", flush=True)
    if cfg.push_to_hub:
        print(f"remoe: uploaded to {push_to_hub(out, cfg.push_to_hub)}", flush=True)


def main() -> None:
    """src/export.py and the remoe-export console script: Hydra composes conf/export.yaml; remoe.cli.guard
    turns bad input into one line and exit code 2."""
    import hydra

    guard(hydra.main(config_path=str(CONF_DIR), config_name="export", version_base="1.3")(task("export")(_main)),
          "export")
