"""The run-directory contract: summary.json (RunSummary, written atomically), provenance (git commit,
package versions).

The report stage reads only run directories, so everything it needs is written here as plain JSON.
"""

from __future__ import annotations

import json
import lzma
import math
import os
import platform
import shutil
import subprocess
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from typing import Any

from ..io import compress_file, write_json_atomic
from .optim import RECIPE

SUMMARY = "summary.json"
# A run's compact record: what the report and the studies read; committed under reports/runs/ (no
# checkpoints, no logs). expert_similarity.json exists only where the small-scale study computed it.
RECORD_FILES = (SUMMARY, "config_resolved.yaml", "metrics.csv", "routing.jsonl", "flips.jsonl",
                "routing_analysis.json", "expert_similarity.json")
# Kept records (keep_records) store these xz-compressed as <name>.xz (metrics.csv is ~90% of a record; xz: 3.8x
# on it, gzip 3.1x); the report reads either form (record_file).
COMPRESSED, PACKED = ("metrics.csv", "routing.jsonl", "flips.jsonl", "routing_analysis.json"), ".xz"


def record_file(run_dir: str, name: str) -> str | None:
    """The path of a run's record file `name`, or of its compressed copy `name`.xz; None if neither exists."""
    for path in (os.path.join(run_dir, name), os.path.join(run_dir, name + PACKED)):
        if os.path.exists(path):
            return path
    return None


def open_record(path: str):
    """A record file opened for reading text, a .xz one decompressed."""
    return lzma.open(path, "rt", encoding="utf-8") if path.endswith(PACKED) else open(path, encoding="utf-8")


PACKAGES = ("torch", "lightning", "hydra-core", "omegaconf", "wandb", "lm_eval", "datasets", "tokenizers",
            "remoe")


# The config sections that decide what a run trains (and so its numbers); logging, evaluation, paths and
# speed-only knobs (compile, moe_recompute_above, moe_dispatch: same losses) are not among them.
TRAINING_KEYS = ("model", "size", "data", "optim", "experts", "topk", "granularity", "seed", "load_balancing",
                 "trainer.max_steps")
# Leaves under TRAINING_KEYS that change when a run is checked or validated, not what it trains
NOT_TRAINING = ("size.val_interval", "size.ckpt_interval", "data.micro_batch_size")  # the last: derived


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, sub in node.items() for k, v in _leaves(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def training_changes(saved: dict, cfg: dict) -> list[str]:
    """'key: A there, B here' for each TRAINING_KEYS leaf where a run folder's config_resolved.yaml (saved)
    and this config (both resolved to plain dicts) differ. A leaf only one side has is an option added or
    removed since (not a change), except the RECIPE options: absent there means the paper's value."""
    def flat(c: dict) -> dict:
        out = {}
        for key in TRAINING_KEYS:
            node = c
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is not None:
                out.update(_leaves(node, f"{key}."))
        return out

    a, b = flat(saved), flat(cfg)
    for k in NOT_TRAINING:
        a.pop(k, None), b.pop(k, None)
    for k, v in RECIPE.items():
        a.setdefault(f"optim.{k}", v)
        b.setdefault(f"optim.{k}", v)
    return [f"{k}: {a[k]!r} there, {b[k]!r} here" for k in sorted(a.keys() & b.keys()) if a[k] != b[k]]


def _f(default=None, *, identity: bool = False, required: bool = False, key: str | None = None,
       absent=None):
    """A summary field. identity: part of a setting's identity (the report never pools runs that differ in
    one; seed aside); required: a completed run without it cannot be reported; key: its JSON name; absent:
    what a record written before the field existed meant by lacking it (what the code then always did)."""
    return field(default=default, metadata={"identity": identity, "required": required, "key": key,
                                            "absent": absent})


@dataclass
class RunSummary:
    """summary.json, the one record of a run: training writes it (remoe.train.run; the routing method adds
    its own fields, routing.RoutingMethod.summary), evaluation adds `downstream`, the report reads it
    (remoe.report.collect). A field that does not apply to a run (experts of a dense model, lambda of
    TopK) is null; so is a field that a run written before it existed lacks."""

    status: str = "running"  # running -> completed | failed | preempted
    name: str | None = None  # the experiment (W&B group)
    # the setting
    model: str | None = _f(identity=True, required=True)  # the routing method (routing.METHODS)
    size: str | None = _f(identity=True, required=True)
    experts: int | None = _f(identity=True, required=True)
    topk: int | None = _f(identity=True, required=True)
    granularity: int | None = _f(identity=True, required=True)
    seed: int | None = _f(identity=True, required=True)
    ffn_mult: int | None = _f(identity=True)
    target_sparsity: float | None = None
    regularizer: str | None = _f(identity=True)  # ReMoE
    lambda0: float | None = _f(identity=True)  # ReMoE
    alpha: float | None = _f(identity=True)  # ReMoE
    lambda_per_layer: bool | None = _f(identity=True)  # ReMoE: one controller per layer
    router_lr_scale: float | None = _f(identity=True, absent=RECIPE["router_lr_scale"])  # routers' LR / lr
    ffn_down_lr: str | None = _f(identity=True, absent=RECIPE["ffn_down_lr"])  # same (one LR) | fan_in
    aux_loss_coef: float | None = _f(identity=True)  # TopK
    warmup_topk: int | None = _f(identity=True)  # TopK near-dense warm-up: k during the first warmup_steps
    warmup_steps: int | None = _f(identity=True)
    capacity_factor: float | None = _f(identity=True)  # Expert Choice
    score_func: str | None = _f(identity=True)  # aux-loss-free: sigmoid or softmax affinities
    norm_topk_prob: bool | None = _f(identity=True)  # aux-loss-free: gates normalised over the chosen k
    bias_update_rate: float | None = _f(identity=True)  # aux-loss-free: u in b_e += u sign(mean - load_e)
    # what the report reads instead of method names (routing.RoutingMethod.record): the knobs and router
    # options set away from the method's standard setting (its Knobs defaults), and load balancing on/off
    off_standard: list | None = None
    load_balanced: bool | None = None
    precision: str | None = _f(identity=True)  # trainer.precision as trained (auto resolved)
    precision_choice: dict | None = None  # how it was chosen: requested, reason, timings (remoe.train.precision)
    cpu: dict | None = None  # CPU model, the flags that decide bf16 speed, torch's intra-op threads
    corpus: str | None = _f(identity=True)  # fingerprint of the training corpus
    seq_len: int | None = None  # tokens per sequence (each holds seq_len + 1: inputs and targets)
    train_sequences: int | None = None  # the corpus's training sequences (a pass = this many / global batch)
    vocab_size: int | None = None
    total_params: int | None = None
    active_params: int | None = None
    # the outcome
    steps: int | None = _f(identity=True, required=True)
    train_tokens: int | None = _f(identity=True, required=True)
    val_loss: float | None = _f(required=True)
    val_ppl: float | None = None
    sparsity: float | None = None  # ReMoE: mean step sparsity over the last 10% of steps (<= 50)
    sparsity_final: float | None = None  # the last step's sparsity (MoE)
    lambda_: float | None = _f(key="lambda")  # ReMoE: lambda after the last step
    settling_step: int | None = None  # ReMoE: first step from which sparsity stays within 0.05 of target
    layer_sparsity: list | None = None  # MoE: per-layer sparsity over the last 10% of steps (<= 50)
    collapsed_layers: list | None = None  # MoE: layers whose experts/token stayed < 0.1 k in that window
    layer_lambda: list | None = None  # ReMoE with lambda_per_layer: each layer's lambda after the last step
    tokens_per_s: float | None = None  # training tokens/s over the fit, validation excluded
    fit_time_s: float | None = None
    wall_time_s: float | None = None
    world_size: int | None = None
    rank_states: dict | None = None  # the routing method's end state on every rank (must agree)
    resumed_from: str | None = None
    resume_changes: list | None = None  # what resumes changed: [{step, key, before, after}] (RESUMABLE keys)
    downstream: dict | None = None  # task -> metric -> value (lm-eval, stderrs included)
    downstream_meta: dict | None = None  # suite, lm-eval versions, samples, source (training or a checkpoint)
    downstream_error: str | None = None
    error: str | None = None
    traceback: str | None = None
    # provenance
    git_commit: str | None = None
    versions: dict | None = None
    malloc: dict | None = None
    run_dir: str | None = None

    @staticmethod
    def key(f) -> str:
        return f.metadata.get("key") or f.name

    @classmethod
    def keys(cls, *, identity: bool = False, required: bool = False) -> list[str]:
        """JSON keys of the fields, optionally only those marked identity / required."""
        meta = [(f, f.metadata) for f in fields(cls)]
        return [cls.key(f) for f, m in meta
                if (m.get("identity") or not identity) and (m.get("required") or not required)]

    def update(self, **values: Any) -> RunSummary:
        """Set fields by their JSON keys; an undeclared key is an error (the contract is declared above)."""
        names = {self.key(f): f.name for f in fields(self)}
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise KeyError(f"summary.json has no field {unknown} (declare it in train.record.RunSummary)")
        for k, v in values.items():
            setattr(self, names[k], v)
        return self

    def to_json(self) -> dict:
        d = asdict(self)
        return {self.key(f): d[f.name] for f in fields(self)}

    @classmethod
    def from_json(cls, d: dict) -> RunSummary:
        """From a stored summary; keys this version does not declare are ignored, and a declared key the
        record lacks takes its `absent` meaning."""
        absent = {f.name: f.metadata["absent"] for f in fields(cls)
                  if f.metadata.get("absent") is not None and cls.key(f) not in d}
        names = {cls.key(f): f.name for f in fields(cls)}
        return cls(**absent, **{names[k]: v for k, v in d.items() if k in names})

    def write(self, run_dir: str) -> None:
        write_json_atomic(os.path.join(run_dir, SUMMARY), self.to_json())

    @classmethod
    def problem(cls, d: dict) -> str | None:
        """Why a stored summary cannot be read as this contract (a value of the wrong type, e.g. a number
        field holding text), or None. Undeclared keys are not checked (newer records)."""
        kinds = {"int": int, "float": (int, float), "str": str, "dict": dict, "list": list, "bool": bool}
        for f in fields(cls):
            v = d.get(cls.key(f))
            if v is None:
                continue
            want = tuple(kinds[t] for t in str(f.type).replace(" ", "").split("|") if t in kinds)
            wrong = not isinstance(v, want) or (isinstance(v, bool) and bool not in want)
            if not wrong and isinstance(v, float) and not math.isfinite(v) and f.metadata.get("required"):
                wrong = True
            if want and wrong:
                return f"summary.json field {cls.key(f)!r} holds {type(v).__name__} {str(v)[:40]!r}"
        return None


def read_summary(run_dir: str) -> dict | None:
    try:
        with open(os.path.join(run_dir, SUMMARY)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_config(run_dir: str) -> dict | None:
    """A run folder's config_resolved.yaml as a plain dict; None where there is none. OmegaConf reads YAML
    with a safe loader (no Python tags: nothing in the file is executed); a file that is not such YAML is
    a ValueError naming it."""
    from omegaconf import OmegaConf

    path = os.path.join(run_dir, "config_resolved.yaml")
    try:
        out = OmegaConf.to_container(OmegaConf.load(path))
    except FileNotFoundError:
        return None
    except Exception as e:
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(out, dict):
        raise ValueError(f"{path} is not a config (a YAML mapping)")
    return out


def keep_records(src_root: str, dest_root: str) -> list[str]:
    """Copy the compact record (RECORD_FILES; those in COMPRESSED as <name>.xz) of every COMPLETED run
    under src_root to the same relative folder under dest_root. A record already there is left as it is
    (never overwritten); one that trained another setting (training_changes) is a ValueError before anything
    is copied: records of two studies never mix under one name. A run that is not completed is not copied.
    Returns the folders written."""
    todo = []
    for dirpath, _, files in sorted(os.walk(src_root)):
        s = read_summary(dirpath) if SUMMARY in files else None
        if not s or s.get("status") != "completed":
            continue
        dest = os.path.join(dest_root, os.path.relpath(dirpath, src_root))
        if not os.path.exists(os.path.join(dest, SUMMARY)):
            todo.append((dirpath, files, dest))
            continue
        there, here = read_config(dest), read_config(dirpath)
        if there is not None and here is not None:
            if changes := training_changes(there, here):
                raise ValueError(f"{dest} holds a record of another setting ({changes[0]}; "
                                 f"{len(changes)} difference(s)): keep these records under another folder")
    written = []
    for dirpath, files, dest in todo:
        os.makedirs(dest, exist_ok=True)
        for name in RECORD_FILES[1:]:
            if name in COMPRESSED and name in files:
                compress_file(os.path.join(dirpath, name), os.path.join(dest, name + PACKED))
            elif name in files or name + PACKED in files:  # (a kept record kept again: as it is)
                name = name if name in files else name + PACKED
                shutil.copy2(os.path.join(dirpath, name), os.path.join(dest, name))
        shutil.copy2(os.path.join(dirpath, SUMMARY), os.path.join(dest, SUMMARY))  # last: marks it whole
        written.append(dest)
    return written


def git_commit(path: str | None = None) -> str | None:
    """Commit of the code that ran (with "-dirty" when the tree has uncommitted changes). REMOE_GIT_COMMIT,
    when set, names it instead: a copy of the tree shipped to another machine may carry no .git or a
    stale one (seen on the GPU machine: its .git said the session's first commit)."""
    if os.environ.get("REMOE_GIT_COMMIT"):
        return os.environ["REMOE_GIT_COMMIT"]
    cwd = path or os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str | None]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


