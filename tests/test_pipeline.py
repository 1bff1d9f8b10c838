"""The training pipeline end to end: real Hydra composition, real Lightning Trainer, real W&B offline runs."""

import csv
import glob
import json
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import FAST, ROOT
from remoe.resolvers import register_resolvers
from remoe.train.record import read_summary
from remoe.train.spec import ConfigError, batch_split, validate
from remoe.wandb_offline import offline_runs, read_history

register_resolvers()
CONF = str(ROOT / "conf")
REQUIRED = ["status", "model", "size", "experts", "topk", "granularity", "seed", "total_params", "active_params",
            "steps", "train_tokens", "val_loss", "val_ppl", "sparsity", "lambda", "tokens_per_s", "downstream",
            "git_commit", "versions"]


def composed(*overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def summaries(root):
    return sorted(glob.glob(str(Path(root) / "**" / "summary.json"), recursive=True))


def metric_series(run_dir, key):
    with open(Path(run_dir) / "metrics.csv") as f:
        return [(int(r["step"]), float(r[key])) for r in csv.DictReader(f) if r.get(key)]


# ---- composition and validation (no compute) -------------------------------------------------------
DATA = {"stdlib": [], "text_files": [f"data.files=[{ROOT / 'pyproject.toml'}]"], "hf": ["data.path=x/y", "data.tokenizer=gpt2"],
        "pile": []}


@pytest.mark.parametrize("size", ["tiny", "small", "182m", "469m", "978m"])
@pytest.mark.parametrize("model", ["dense", "hash", "ec", "topk", "auxfree", "remoe"])
def test_every_size_and_model_composes_and_validates(size, model):
    cfg = composed(f"model={model}", f"size={size}")
    mcfg = validate(cfg).model
    assert mcfg.routing == model and mcfg.is_moe == (model != "dense")
    assert mcfg.n_layer == cfg.size.arch.n_layer  # conf/size holds the architecture
    assert cfg.trainer.precision == cfg.size.precision


@pytest.mark.parametrize("data", sorted(DATA))
@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp", "fsdp"])
@pytest.mark.parametrize("logger", ["wandb", "csv", "none"])
@pytest.mark.parametrize("eval_", ["none", "local", "paper"])
def test_every_group_composes(data, trainer, logger, eval_):
    cfg = composed(f"data={data}", f"trainer={trainer}", f"logger={logger}", f"eval={eval_}", *DATA[data])
    if eval_ == "paper":  # needs the hub: validated in test_eval
        assert len(cfg.eval.tasks) == 7
    else:
        validate(cfg)
    assert cfg.data._target_ == "remoe.data.LMDataModule"
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    if data == "pile":
        assert cfg.data.path == "monology/pile-uncopyrighted" and cfg.data.tokenizer == "gpt2"


def test_paper_recipe_defaults():
    cfg = composed("size=182m", "model=remoe", "trainer=gpu")
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup) == (5e-4, 5e-5, 0.01)
    assert (cfg.size.global_batch_size, cfg.size.seq_len, cfg.trainer.max_steps) == (512, 1024, 60000)
    assert cfg.trainer.gradient_clip_val == 1.0 and cfg.trainer.precision == "auto"  # bf16-mixed on a bf16 GPU
    assert (cfg.model.lambda0, cfg.model.alpha) == (1e-8, 1.2)
    assert batch_split(cfg) == (8, 64)  # one GPU: 512 = 8 x 64 accumulation
    assert batch_split(composed("size=182m", "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=4")) == (8, 2)


BAD = [
    (["experts=0"], "experts"),
    (["topk=0"], "topk"),
    (["topk=9"], "topk"),
    (["granularity=3"], "granularity"),  # tiny ffn_hidden 256
    (["model.lambda0=0"], "model.lambda0"),
    (["model.alpha=1.0"], "model.alpha"),
    (["model.regularizer=l2"], "model.regularizer"),
    (["+model.foo=1"], "model.foo"),  # not a knob of the routing method
    (["model=topk", "model.aux_loss_coef=-1"], "model.aux_loss_coef"),
    (["model=topk", "model.warmup_topk=9"], "model.warmup_topk"),
    (["model=dense", "model.ffn_mult=0"], "model.ffn_mult"),
    (["model.name=nope"], "model"),
    (["size.arch.n_head=5"], "size.arch.n_head"),
    (["+size.arch.foo=1"], "size.arch.foo"),
    (["size.seq_len=4096"], "size.seq_len"),
    (["trainer=ddp", "trainer.devices=3"], "size.global_batch_size"),
    (["data=text_files", "data.files=[/nonexistent/*.txt]"], "data.files"),
    (["trainer.max_steps=0"], "trainer.max_steps"),
    (["seed=-5"], "seed"),
    (["trainer.precision=bogus"], "trainer.precision"),
    (["optim.fused=yes"], "optim.fused"),
    (["optim.router_lr_scale=0"], "optim.router_lr_scale"),
    (["optim.router_lr_scale=fast"], "optim.router_lr_scale"),
    (["optim.ffn_down_lr=wide"], "optim.ffn_down_lr"),
    (["compile=1"], "compile"),
    (["+foo=bar"], "foo"),  # a typo is not silently a new setting (nor a folder name)
]


@pytest.mark.parametrize("overrides,key", BAD)
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=rf"^{key}:"):
        validate(composed(*overrides))


@pytest.mark.parametrize("content,why", [(None, "only folders"), (b"", "is empty"),
                                         (bytes(range(256)) * 64, "not text")])
def test_bad_text_files_are_config_errors_naming_the_file(tmp_path, content, why):
    path = tmp_path / "corpus" / "a.txt"
    path.parent.mkdir()
    target = path.parent if content is None else path
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=rf"^data.files: .*{why}") as e:
        validate(composed("data=text_files", f"data.files=[{target}]"))
    assert str(target) in str(e.value)


def test_a_run_builds_its_routing_method_once(cache_dir, tmp_path, monkeypatch):
    """Issue 41: validation builds the method object (train.spec.RunSpec); the summary's setting and the
    LightningModule use that same object, rebound to the vocabulary the data gave; a method built for another
    architecture, or with other knobs than the hyperparameters, is refused."""
    from dataclasses import replace

    from remoe.model import build_method
    from remoe.train import run as train_run
    from remoe.train.module import LitLM
    from remoe.train.resume import Resume
    from remoe.train.spec import derive

    monkeypatch.setenv("REMOE_CACHE", cache_dir)
    cfg = composed("model=remoe", "logger=csv", "eval=none", f"logger.csv.save_dir={tmp_path}",
                   f"trainer.default_root_dir={tmp_path}", f"paths.root={tmp_path}", *FAST)
    spec = validate(cfg)
    derive(cfg)
    attempt = train_run.begin(cfg, str(tmp_path), spec, Resume())
    assert attempt.summary.load_balanced is True and attempt.summary.off_standard == []
    train_run.prepare(cfg, attempt)
    assert attempt.lit.routing is spec.method  # one object: no second build
    assert spec.method.cfg == attempt.lit.cfg and spec.method.cfg.vocab_size == attempt.dm.vocab_size
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    other = build_method(replace(spec.model, experts=16))
    with pytest.raises(ValueError, match="routing method built for"):
        LitLM(model=spec.model, optim=optim, routing=spec.knobs, method=other)
    with pytest.raises(ValueError, match="knobs"):
        LitLM(model=spec.model, optim=optim, routing={**spec.knobs, "alpha": 2.0}, method=build_method(spec.model))


def test_bad_data_exits_2_before_anything_is_built(train):
    p, out = train("data=text_files", "data.files=[/bin/ls]", *FAST, check=False)
    assert p.returncode == 2 and "data.files: /bin/ls is not text" in p.stdout + p.stderr
    assert summaries(out) == []


def test_bad_override_exits_nonzero_before_building_anything(train, tmp_path):
    p, out = train("topk=9", *FAST, check=False)
    assert p.returncode == 2
    assert "config error: topk:" in p.stdout + p.stderr
    assert summaries(out) == []  # nothing ran: no summary, no data, no checkpoints
    assert not glob.glob(str(out / "**" / "checkpoints"), recursive=True)
    p, _ = train("model=nope", check=False)  # unknown group option: Hydra's own error
    assert p.returncode != 0 and "model" in p.stderr


# ---- end to end ------------------------------------------------------------------------------------
def test_default_run_end_to_end(train):
    p, out = train(*FAST)
    [path] = summaries(out)
    run = Path(path).parent
    s = read_summary(run)
    missing = [k for k in REQUIRED if k not in s]
    assert not missing, missing
    assert s["status"] == "completed" and s["model"] == "remoe" and s["size"] == "tiny" and s["steps"] == 6
    assert s["train_tokens"] == 6 * 32 * 128
    assert s["val_loss"] > 0 and abs(s["val_ppl"] - 2.718281828 ** s["val_loss"]) < 1e-6 * s["val_ppl"]
    assert 0 <= s["sparsity"] <= 1 and s["lambda"] > 0 and s["tokens_per_s"] > 0
    assert s["versions"]["torch"] and s["versions"]["lightning"]
    for f in (".hydra/config.yaml", "config_resolved.yaml", "metrics.csv", "checkpoints/last.ckpt", "routing.jsonl"):
        assert (run / f).exists(), f
    assert OmegaConf.load(run / "config_resolved.yaml").data.source == "stdlib"
    # W&B offline run with the per-step sparsity and lambda series
    [wb] = offline_runs(run)
    hist = read_history(wb)
    assert len(hist["train/sparsity"]) == 6 and len(hist["train/lambda"]) == 6
    lam = hist["train/lambda"]
    assert lam[0] == pytest.approx(1e-8, rel=1e-6)
    ratios = [b / a for a, b in zip(lam, lam[1:])]
    assert all(r == pytest.approx(1.2, rel=1e-5) or r == pytest.approx(1 / 1.2, rel=1e-5) for r in ratios)
    # the controller followed the logged sparsity: x alpha below target, / alpha otherwise
    for s_i, r in zip(hist["train/sparsity"], ratios):
        assert (r > 1) == (s_i < 0.875)
    assert len(hist["sparsity/layer_0"]) == 6 and "val/loss" in hist
    # the default pipeline evaluates offline: downstream numbers in the summary and in W&B
    assert set(s["downstream"]) == {"remoe_cloze", "remoe_choice"}
    assert "downstream/remoe_choice/acc" in hist
    # the run ends with one line saying what happened, and where the record is
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("remoe: completed | steps 6 | val loss ") and "sparsity" in last and "λ" in last
    assert "downstream acc" in last and last.endswith(str(run / "summary.json"))


def test_console_has_no_third_party_noise(cache_dir, tmp_path):
    """The default run's console, W&B not silenced: none of the known third-party noise."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "WANDB_SILENT"}
    env.update(REMOE_OUTPUT=str(tmp_path / "out"), REMOE_CACHE=cache_dir)
    p = subprocess.run([sys.executable, str(ROOT / "src" / "train.py"), "eval=none", *FAST], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    text = p.stdout + p.stderr
    for noise in ("litlogger", "LeafSpec", "anonymous setting"):
        assert noise not in text, noise
    assert p.stdout.strip().splitlines()[-1].startswith("remoe: completed | steps 6")


def test_multirun_grid_makes_one_run_and_one_wandb_run_per_point(tiny_sweep):
    out = tiny_sweep  # -m model=dense,topk,remoe seed=1,2
    assert len(glob.glob(str(out / "multirun" / "tiny_sweep" / "*"))) == 1  # one sweep folder
    paths = summaries(out)
    assert len(paths) == 6
    got = sorted((read_summary(Path(p).parent)["model"], read_summary(Path(p).parent)["seed"]) for p in paths)
    assert got == [(m, s) for m in ("dense", "remoe", "topk") for s in (1, 2)]
    assert all(read_summary(Path(p).parent)["status"] == "completed" for p in paths)
    wandb_runs = [w for p in paths for w in offline_runs(Path(p).parent)]
    assert len(wandb_runs) == 6 and len({os.path.basename(w)[-8:] for w in wandb_runs}) == 6
    for w in wandb_runs:  # each W&B run holds exactly one job's steps
        assert len(read_history(w)["train/loss"]) == 6
    groups = {json.loads(json.dumps(read_summary(Path(p).parent)["name"])) for p in paths}
    assert groups == {"tiny_sweep"}


EAGER = ["model=remoe", "logger=csv", "eval=none", *FAST]


@pytest.fixture(scope="module")
def eager_remoe(cache_dir, tmp_path_factory):
    """One default-seed eager ReMoE run, the reference of the same-seed and the compile tests."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("eager")
    env = {**os.environ, "REMOE_OUTPUT": str(out), "REMOE_CACHE": cache_dir, "WANDB_SILENT": "true"}
    p = subprocess.run([sys.executable, str(ROOT / "src" / "train.py"), *EAGER], cwd=out, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return Path(summaries(out)[0]).parent


def test_same_seed_same_losses_other_seed_differs(train, tmp_path, eager_remoe):
    _, b = train(*EAGER, out=tmp_path / "b")
    _, c = train(*EAGER, "seed=7", out=tmp_path / "c")
    la, lb, lc = (metric_series(r, "train/loss") for r in (eager_remoe, *(Path(summaries(o)[0]).parent for o in (b, c))))
    # identical trajectories; a logged value may differ in the 7th digit between processes (CPU reductions
    # on 2 threads), never the training state: lambda (from integer routing counts) must match exactly
    assert len(la) == 6 and [s for s, _ in la] == [s for s, _ in lb]
    assert all(x == pytest.approx(y, rel=1e-6) for (_, x), (_, y) in zip(la, lb))
    sa, sb = read_summary(eager_remoe), read_summary(Path(summaries(b)[0]).parent)
    assert sa["lambda"] == sb["lambda"] and sa["val_loss"] == pytest.approx(sb["val_loss"], rel=1e-6)
    assert any(abs(x - y) > 1e-4 for (_, x), (_, y) in zip(la, lc))


def test_compiled_blocks_train_the_same_losses_and_checkpoint_keys(train, tmp_path, eager_remoe):
    """compile=true (torch.compile per block; ReMoE's routing has data-dependent shapes) gives eager's
    losses to fp32 tolerance, the same lambda, and a checkpoint an eager run can load (same names)."""
    import torch

    _, b = train(*EAGER, "compile=true", out=tmp_path / "compiled")
    ra, (rb,) = eager_remoe, [Path(p).parent for p in summaries(b)]
    la, lb = (metric_series(r, "train/lm_loss") for r in (ra, rb))
    assert len(la) == len(lb) == 6 and all(x == pytest.approx(y, rel=1e-4) for (_, x), (_, y) in zip(la, lb))
    sa, sb = read_summary(ra), read_summary(rb)
    assert sa["lambda"] == pytest.approx(sb["lambda"], rel=1e-6) and sa["sparsity"] == sb["sparsity"]
    ka, kb = (torch.load(r / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"].keys() for r in (ra, rb))
    assert list(ka) == list(kb)


def test_resume_continues_with_saved_lambda(train, tmp_path):
    run_dir = tmp_path / "run"
    common = ["model=remoe", "logger=csv", "eval=none", f"hydra.run.dir={run_dir}", "size.val_interval=4", "size.val_batches=2",
              "size.ckpt_interval=4", "trainer.enable_progress_bar=false"]
    train(*common, "trainer.max_steps=8")
    first = read_summary(run_dir)
    assert first["steps"] == 8
    train(*common, "trainer.max_steps=12", "resume=true")
    second = read_summary(run_dir)
    assert second["steps"] == 12 and second["resumed_from"].endswith("last.ckpt")
    series = metric_series(run_dir, "train/lambda")
    assert [s for s, _ in series] == list(range(12))  # metrics.csv keeps the first part: each step once
    lam = dict(series)
    assert lam[8] == pytest.approx(first["lambda"], rel=1e-6)  # the resumed run starts with the saved lambda


def test_multirun_with_ddp_runs_each_point_once_and_ranks_share_routing_state(train):
    """Hydra -m + DDP: each grid point runs once (not again in the child rank). Both ranks hold the same
    lambda and sparsity (ReMoE) and move their own copy of the expert bias identically from the
    all-reduced counts (aux-loss-free)."""
    _, out = train("-m", "trainer=ddp", "trainer.devices=2", "logger=csv", "eval=none", "model=remoe,auxfree",
                   *FAST)
    assert len(glob.glob(str(out / "multirun" / "default" / "*"))) == 1
    runs = {s["model"]: s for s in (read_summary(Path(p).parent) for p in summaries(out))}
    assert set(runs) == {"remoe", "auxfree"}
    for s in runs.values():
        assert s["status"] == "completed" and s["world_size"] == 2
    lam, sp = runs["remoe"]["rank_states"]["lambda"], runs["remoe"]["rank_states"]["sparsity"]
    assert len(lam) == 2 and lam[0] == lam[1] and sp[0] == sp[1]
    assert lam[0] == pytest.approx(runs["remoe"]["lambda"])
    bias = runs["auxfree"]["rank_states"]["expert_bias_checksum"]
    assert len(bias) == 2 and bias[0] == bias[1] != 0


def test_ddp_ranks_agree_on_lambda_where_their_local_sparsity_straddles_the_target(train):
    """Issue 43: lambda must come from the all-reduced counts. At k=7 of E=16 (target 0.5625) the sparsity of the
    default recipe climbs through the target around step 17 and then sits within ~0.005 of it (0.5626-0.5699
    single-process), closer than two half-batches' sparsities agree, so two ranks updating from their own
    counts would step lambda apart and the end-of-training check (rank_states) would fail the run; with the
    all-reduce both ranks hold one lambda. (The FAST setting's six steps all below target could not tell.)"""
    _, out = train("trainer=ddp", "trainer.devices=2", "logger=csv", "eval=none", "model=remoe", "experts=16",
                   "topk=7", "trainer.max_steps=24", "size.val_interval=24", "size.val_batches=1",
                   "size.ckpt_interval=24", "trainer.enable_progress_bar=false")
    [path] = summaries(out)
    s = read_summary(Path(path).parent)
    assert s["status"] == "completed" and s["world_size"] == 2
    lam = s["rank_states"]["lambda"]
    assert len(lam) == 2 and lam[0] == lam[1]
    with open(Path(path).parent / "metrics.csv") as f:
        series = [float(r["train/lambda"]) for r in csv.DictReader(f) if r.get("train/lambda")]
    ups = sum(b > a for a, b in zip(series, series[1:]))
    downs = sum(b < a for a, b in zip(series, series[1:]))
    assert ups and downs, series  # the target was crossed both ways: a setting where ranks could disagree


def test_routing_log_file(train):
    _, out = train("routing_log_interval=2", "logger=none", "eval=none", *FAST)
    run = Path(summaries(out)[0]).parent
    lines = [json.loads(x) for x in open(run / "routing.jsonl")]
    assert [x["step"] for x in lines] == [0, 2, 4]
    for x in lines:
        assert len(x["counts"]) == 2 and len(x["counts"][0]) == 8
        nnz = sum(map(sum, x["counts"]))
        assert x["sparsity"] == pytest.approx(1 - nnz / (sum(x["tokens"]) * 8))


def test_rerunning_a_plain_grid_skips_its_completed_points(tiny_sweep, cache_dir):
    """Issue 42: `train.py -m ...` lands in a folder derived from the experiment name and the overrides, so the
    same command finds its points again: completed ones are skipped (nothing retrained or rewritten), and the
    grid says how many points it has, its time estimate, and each point started/finished."""
    import subprocess
    import sys

    summaries_before = {p: os.path.getmtime(p) for p in summaries(tiny_sweep)}
    assert len(summaries_before) == 6
    grid = {Path(p).parent.parent for p in summaries_before}
    assert len(grid) == 1 and grid.pop().parent.name == "tiny_sweep"  # multirun/<name>/<grid>/<point>
    env = {**os.environ, "REMOE_OUTPUT": str(tiny_sweep), "REMOE_CACHE": cache_dir, "WANDB_SILENT": "true"}
    p = subprocess.run([sys.executable, str(ROOT / "src" / "train.py"), "-m", "model=dense,topk,remoe", "seed=1,2",
                        "eval.n_docs=30", "name=tiny_sweep", "analysis.flip_interval=2", *FAST], cwd=tiny_sweep,
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert {p_: os.path.getmtime(p_) for p_ in summaries(tiny_sweep)} == summaries_before  # nothing retrained
    lines = [line for line in p.stderr.splitlines() if line.startswith("grid: ")]
    assert lines[0].startswith("grid: 6 points -> ") and "about " in lines[0]
    assert sum(" started " in line for line in lines) == 6 and sum(" finished " in line for line in lines) == 6
    assert (p.stdout + p.stderr).count("is already complete") == 6  # the job log (stdout)


def test_grid_points_and_folder_follow_the_command():
    from remoe.hydra_callbacks import grid_points
    from remoe.resolvers import grid_slug

    excluded = OmegaConf.load(ROOT / "conf" / "config.yaml").hydra.job.config.override_dirname.exclude_keys

    assert grid_points(["model=remoe", "experts=4,16", "seed=range(1,3)"]) == [
        ["model=remoe", "experts=4", "seed=1"], ["model=remoe", "experts=4", "seed=2"],
        ["model=remoe", "experts=16", "seed=1"], ["model=remoe", "experts=16", "seed=2"]]
    assert grid_slug(excluded, ["model=remoe", "experts=4,16,64,128"]) == "experts-4+16+64+128__model-remoe"
    assert grid_slug(excluded, ["experts=4,16", "model=remoe", "resume=false", "name=x"]) == \
        grid_slug(excluded, ["model=remoe", "experts=4,16"])


def test_a_single_run_ends_with_its_closing_line_and_no_third_party_summary(train):
    """Issue 42: W&B's run history/summary (~40 lines) stays in the run (settings.quiet), the grid's progress
    lines belong to -m grids only, and the closing line comes last."""
    p, _ = train("eval=none", "trainer.max_steps=2", "size.val_interval=2", "size.val_batches=1",
                 "trainer.enable_progress_bar=false")
    lines = [x for x in (p.stdout + p.stderr).splitlines() if x.strip()]
    assert p.stdout.strip().splitlines()[-1].startswith("remoe: completed |"), p.stdout[-2000:]
    assert not any(x.startswith("grid: ") or "Callback" in x or "Run history" in x or "Run summary" in x
                   for x in lines), lines[-20:]
