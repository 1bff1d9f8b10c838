"""Faults injected into real runs: SIGKILL mid-training then resume (bitwise same metrics), SIGTERM
(checkpoint and clean exit), non-finite loss (stop, diagnose), resuming under a mismatched config."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from remoe.data.datamodule import ResumableBatchSampler
from remoe.train.record import read_summary

COMMON = ["model=remoe", "logger=csv", "eval=none", "trainer.max_steps=16", "size.val_interval=8",
          "size.ckpt_interval=2", "size.val_batches=2", "trainer.enable_progress_bar=false",
          "size.global_batch_size=32", "size.micro_batch_size=16"]  # 2 micro-batches per step: accumulation too


def series(run_dir, key):
    with open(Path(run_dir) / "metrics.csv") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def start(run_dir, env, *extra):
    return subprocess.Popen([sys.executable, str(ROOT / "src" / "train.py"), *COMMON, f"hydra.run.dir={run_dir}", *extra],
                            env=env, cwd=run_dir.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def env(cache_dir):
    return {**os.environ, "REMOE_CACHE": cache_dir, "WANDB_SILENT": "true"}


# One completed 4-step ReMoE run (checkpoints every 2 steps) that the resume and refusal tests copy instead of
# each training their own: they pass BASE (and hydra.run.dir=<their copy>) to train.py, plus what they change.
BASE = ["model=remoe", "logger=csv", "eval=none", "size.val_interval=2", "size.ckpt_interval=2", "size.val_batches=2",
        "trainer.enable_progress_bar=false", "trainer.gradient_clip_val=null"]


@pytest.fixture(scope="module")
def base_run(cache_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("base") / "r"
    env = {**os.environ, "REMOE_CACHE": cache_dir, "WANDB_SILENT": "true"}
    p = subprocess.run([sys.executable, str(ROOT / "src" / "train.py"), *BASE, "trainer.max_steps=4",
                        f"hydra.run.dir={run}"], cwd=run.parent, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return run


@pytest.fixture
def base_copy(base_run, tmp_path):
    """A copy of base_run at tmp_path/r, and the arguments that resume it there."""
    run = tmp_path / "r"
    shutil.copytree(base_run, run)
    return run, [*BASE, f"hydra.run.dir={run}"]


def wait_for_checkpoint(run_dir, proc, timeout=300):
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    t = time.time()
    while not ckpt.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() - t < timeout
        time.sleep(0.05)
    return ckpt


def test_sampler_position_is_a_pure_function_of_the_index():
    a = ResumableBatchSampler(100, 8, seed=3, rank=1, world=2)
    it = iter(a)
    full = [next(it) for _ in range(20)]  # crosses an epoch boundary (6 batches per rank per epoch)
    b = ResumableBatchSampler(100, 8, seed=3, rank=1, world=2, start=9)
    it = iter(b)
    assert [next(it) for _ in range(11)] == full[9:]
    other = iter(ResumableBatchSampler(100, 8, seed=3, rank=0, world=2))
    first = next(other)
    assert not set(first) & set(full[0])  # ranks get disjoint samples


@pytest.mark.parametrize("model", ["auxfree", "hash"])  # the expert bias; the hash table (ReMoE's lambda: the
# fault-injection test below kills a ReMoE run five times, SIGKILL included, and compares every field)
def test_sigkill_then_resume_gives_bitwise_identical_metrics(tmp_path, env, model):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    ref.mkdir()
    cut.mkdir()
    p = start(ref, env, f"model={model}")
    assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
    q = start(cut, env, f"model={model}")
    wait_for_checkpoint(cut, q)
    q.send_signal(signal.SIGKILL)  # wherever it is
    q.wait()
    killed_at = torch.load(cut / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["global_step"]
    assert killed_at < 16 and read_summary(cut) is None
    r = start(cut, env, f"model={model}", "resume=true")
    assert r.wait(timeout=600) == 0, r.stderr.read()[-3000:]
    a, b = read_summary(ref), read_summary(cut)
    assert b["resumed_from"].endswith("last.ckpt") and b["steps"] == a["steps"] == 16
    assert b["model"] == model and b["val_loss"] == a["val_loss"] and b["lambda"] == a["lambda"]  # bitwise
    assert b["rank_states"] == a["rank_states"]  # the routing method's state (lambda, expert bias), bitwise
    loss_a, loss_b = series(ref, "train/loss"), series(cut, "train/loss")
    assert loss_b[15] == loss_a[15]  # the last training step, bitwise
    print(f"killed at step {killed_at}; resumed; final val loss {a['val_loss']} both")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])  # SLURM sends SIGUSR1 before its SIGTERM
def test_sigterm_checkpoints_and_exits_cleanly(tmp_path, env, sig):
    run = tmp_path / "run"
    run.mkdir()
    q = start(run, env, "trainer.max_steps=400", "size.ckpt_interval=1000")
    # the first validation is at step 8: wait for its metrics, then send what SLURM sends
    t = time.time()
    while not (run / "metrics.csv").exists() or "val/loss" not in (run / "metrics.csv").read_text():
        assert q.poll() is None and time.time() - t < 300
        time.sleep(0.1)
    q.send_signal(sig)
    assert q.wait(timeout=120) == 0
    s = read_summary(run)
    assert s["status"] == "preempted" and "resume=true" in s["error"] and sig.name in s["error"]
    step = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["global_step"]
    assert 8 <= step < 400


def test_nonfinite_loss_stops_with_diagnostic_checkpoint(train):
    p, out = train("model=remoe", "logger=csv", "eval=none", "size.lr=1e30", "size.min_lr=1e29",
                   "trainer.max_steps=30", "trainer.gradient_clip_val=null", "trainer.enable_progress_bar=false",
                   check=False)
    assert p.returncode != 0
    [summary] = list(out.rglob("summary.json"))
    s = read_summary(summary.parent)
    assert s["status"] == "failed" and "non-finite" in s["error"]
    assert list((summary.parent / "checkpoints").glob("nonfinite-step*.ckpt"))


def test_resume_with_a_different_model_config_is_an_error(train, base_copy):
    run, base = base_copy  # trained at experts=8
    p, _ = train("experts=16", "resume=true", "trainer.max_steps=6", *base, check=False)
    assert p.returncode == 2
    assert "different model config" in p.stdout + p.stderr and "experts=8" in p.stdout + p.stderr


def _to_format_0(ckpt_path):
    """Rewrite a checkpoint into format 0, written before the routing-method objects: the method as `router`
    and its training knobs inside hyper_parameters["model"], ReMoE's controller state under
    checkpoint["lambda_controller"] (as a7cf893 and earlier wrote them)."""
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    hp = ck["hyper_parameters"]
    model = dict(hp["model"])
    model["router"] = {"dense": None, "topk": "topk", "remoe": "relu"}[model.pop("routing")]
    model.update(aux_loss_coef=0.01, regularizer="lb_l1", lambda0=1e-8, alpha=1.2, warmup_topk=None,
                 warmup_steps=0)
    ck["hyper_parameters"] = {"model": model, "optim": hp["optim"],
                              "routing_log_interval": hp["routing_log_interval"]}
    ck["lambda_controller"] = ck.pop("routing_state")["lambda_controller"]
    del ck["remoe_format"]
    torch.save(ck, ckpt_path)


def test_checkpoints_of_an_older_format_are_refused_in_one_line(train, base_copy):
    """Issue 41: format 0 checkpoints are no longer translated: resume, evaluation and export refuse them in
    one line naming the format (exit 2), and the run folder is left as it was."""
    from remoe.checkpoint import CheckpointError, load_checkpoint

    run, base = base_copy
    ckpt = run / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["remoe_format"] == 1
    _to_format_0(ckpt)
    with pytest.raises(CheckpointError, match="format 0, this code reads format 1"):
        load_checkpoint(str(ckpt))
    before = _snapshot(run)
    p, _ = train(*base, "trainer.max_steps=6", "resume=true", check=False)
    lines = [x for x in p.stderr.splitlines() if "config error" in x]
    assert p.returncode == 2 and len(lines) == 1 and "format 0" in lines[0] and "Traceback" not in p.stderr
    assert _snapshot(run) == before


def test_resume_may_change_a_routing_knob_but_not_the_architecture(train, base_copy):
    """alpha is the controller's training knob, not the model: a resume may change it (it was refused as
    "a different model config" before the routing methods owned their knobs). The optimizer recipe (train.optim.RECIPE)
    may not change: the checkpoint's parameter groups are another optimizer's; refused in one line, exit 2,
    nothing in the folder changed."""
    run, base = base_copy
    train(*base, "trainer.max_steps=8", "resume=true", "model.alpha=2.0")
    s = read_summary(run)
    assert s["status"] == "completed" and s["alpha"] == 2.0 and s["steps"] == 8
    lam = series(run, "train/lambda")
    ratios = [lam[i + 1] / lam[i] for i in range(4, 7)]
    assert all(r == pytest.approx(2.0, rel=1e-5) or r == pytest.approx(0.5, rel=1e-5) for r in ratios)
    assert s["resume_changes"] == [{"step": 4, "key": "model.alpha", "before": "1.2", "after": "2.0"},
                                   {"step": 4, "key": "trainer.max_steps", "before": "4", "after": "8"}]
    before = _snapshot(run)
    p, _ = train(*base, "trainer.max_steps=12", "resume=true", "optim.ffn_down_lr=fan_in", check=False)
    assert p.returncode == 2 and "optim.ffn_down_lr='same' there, 'fan_in' here" in p.stdout + p.stderr
    assert _snapshot(run) == before


@pytest.mark.parametrize("change,key", [(["size.lr=5e-3"], "optim.lr"),  # typed as size.lr, trained as optim.lr
                                        (["size.global_batch_size=16"], "size.global_batch_size"),
                                        (["seed=7"], "seed"),
                                        (["trainer=ddp", "trainer.devices=2"], "trainer.devices")])
def test_a_resume_that_would_change_what_the_run_trains_is_refused(train, base_copy, change, key):
    """A resume may change trainer.max_steps and the routing method's knobs (recorded, above); any other
    training key, or the device count (each rank's batches follow from it), is refused in one line naming
    it, exit 2, before the folder is touched: config_resolved.yaml would otherwise claim the new values for
    the whole run, and train_tokens count the wrong batch."""
    run, base = base_copy
    before = _snapshot(run)
    p, _ = train(*base, "trainer.max_steps=6", "resume=true", *change, check=False)
    lines = [x for x in p.stderr.splitlines() if "config error" in x]
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert f"{key}:" in lines[0], lines[0]
    assert _snapshot(run) == before


# ---- nothing lost: failed resumes, interrupts, concurrent runs, read-only commands ------------------
def _snapshot(run_dir):
    """Every file of a run folder -> its bytes; Hydra's own records aside (.hydra/ is rewritten and the job
    log train.log appended to by every command that composes into the folder, before any code of ours)."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(Path(run_dir).rglob("*"))
            if p.is_file() and ".hydra" not in p.parts and p.name != "train.log"}


def test_a_resume_that_cannot_load_its_checkpoint_changes_nothing(train, base_copy):
    run, base = base_copy
    ckpt = run / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # truncated, as by a full disk
    before = _snapshot(run)
    p, _ = train(*base, "trainer.max_steps=8", "resume=true", check=False)
    assert p.returncode == 2
    errors = [line for line in (p.stdout + p.stderr).splitlines() if "config error" in line]
    assert len(errors) == 1 and str(ckpt) in errors[0] and "cannot be loaded" in errors[0]
    assert _snapshot(run) == before  # summary (completed), metrics.csv, hparams.yaml: all as they were
    assert read_summary(run)["status"] == "completed"


def test_a_failed_attempt_never_replaces_a_completed_record_nor_a_skip_another_setting(train, base_copy):
    run, base = base_copy
    done = read_summary(run)
    # an extension whose controller explodes (alpha is a knob a resume may change): lambda -> inf
    p, _ = train(*base, "trainer.max_steps=30", "resume=true", "model.alpha=1e30", check=False)
    assert p.returncode != 0
    assert read_summary(run) == done  # still completed, with its val_loss, steps and lambda
    [attempt] = (run / "attempts").glob("*-failed.json")
    assert "non-finite" in json.loads(attempt.read_text())["error"]
    # skip_completed skips the same setting, and refuses another one in the folder (a sweep file changed, its
    # folder names did not): one line, exit 2, the record as it was
    p, _ = train(*base, "trainer.max_steps=4", "skip_completed=true")
    assert "is already complete" in p.stdout + p.stderr and read_summary(run) == done
    p, _ = train(*base, "trainer.max_steps=4", "skip_completed=true", "size.lr=1e-3", check=False)
    errors = [line for line in (p.stdout + p.stderr).splitlines() if "config error" in line]
    assert p.returncode == 2 and len(errors) == 1 and read_summary(run) == done
    assert "optim.lr: 0.002 there, 0.001 here" in errors[0] and "size.lr" in errors[0]


def test_csv_metrics_survive_a_resume_and_a_cut_last_line(tmp_path):
    from remoe.train.loggers import CSVLogger

    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train/loss\r\n0,0,5.0\r\n0,1,4.0\r\n0,2,3.0\r\n0,3,2.")  # killed mid-line
    lg = CSVLogger(save_dir=str(tmp_path), name="", version="")
    lg.start_at(2)  # resumed from a checkpoint at step 2: rows 2, 3 will be logged again
    lg.log_metrics({"train/loss": 3.5, "train/lambda": 1e-8}, step=2)  # a new column appears too
    lg.save()
    rows = list(csv.DictReader(open(path)))
    assert [(r["step"], r["train/loss"]) for r in rows] == [("0", "5.0"), ("1", "4.0"), ("2", "3.5")]
    assert rows[2]["train/lambda"] == "1e-08" and rows[0]["train/lambda"] == ""
    CSVLogger(save_dir=str(tmp_path), name="", version="").start_at(0)  # fresh run: old file moved aside
    [aside] = tmp_path.glob("metrics-*.csv")
    assert len(list(csv.DictReader(open(aside)))) == 3 and not path.exists()


def _wait_for_step(run_dir, proc, step, timeout=300):
    """Until metrics.csv holds a train/loss row at `step` or later (polled every 10 ms)."""
    t = time.time()
    while True:
        try:
            if any(s >= step for s in series(run_dir, "train/loss")):
                return
        except (OSError, ValueError, KeyError):
            pass
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() - t < timeout
        time.sleep(0.01)


def test_ctrl_c_checkpoints_at_the_step_and_says_interrupted(tmp_path, env):
    run = tmp_path / "run"
    run.mkdir()
    q = subprocess.Popen([sys.executable, str(ROOT / "src" / "train.py"), *COMMON, f"hydra.run.dir={run}",
                          "trainer.max_steps=400", "size.ckpt_interval=1000"], env=env, cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(run, q, 3)
    q.send_signal(signal.SIGINT)
    out, err = q.communicate(timeout=120)
    assert q.returncode == 130, err[-3000:]
    s = read_summary(run)
    assert s["status"] == "interrupted" and "resume=true" in s["error"] and "SIGINT" in s["error"]
    assert "interrupted" in out.strip().splitlines()[-1]
    step = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["global_step"]
    assert 4 <= step < 400 and max(series(run, "train/loss")) == step - 1  # stopped at a step's end


def test_two_runs_in_one_folder_the_second_refuses_naming_the_owner(tmp_path, env):
    run = tmp_path / "run"
    run.mkdir()
    a = start(run, env, "trainer.max_steps=400", "size.ckpt_interval=1000")
    _wait_for_step(run, a, 1)
    b = subprocess.run([sys.executable, str(ROOT / "src" / "train.py"), *COMMON, f"hydra.run.dir={run}",
                        "trainer.max_steps=400"], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert b.returncode == 2 and f"in use by pid {a.pid}" in b.stdout + b.stderr
    a.send_signal(signal.SIGKILL)  # the owner dies without releasing anything
    a.wait()
    c = subprocess.run([sys.executable, str(ROOT / "src" / "train.py"), *COMMON, f"hydra.run.dir={run}",
                        "trainer.max_steps=2"], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert c.returncode == 0 and f"stale run.lock (pid {a.pid}" in c.stdout + c.stderr
    assert read_summary(run)["status"] == "completed"
    steps = [s for s in series(run, "train/loss")]
    assert steps == sorted(set(steps))  # no interleaved or doubled rows


def test_read_only_commands_write_nothing(base_copy, tmp_path):
    run, _ = base_copy
    before = {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "src" / "evaluate.py"), "checkpoint=checkpoints/last.ckpt",
                        "eval=paper"], cwd=run, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "eval=paper needs the HuggingFace hub" in p.stdout + p.stderr
    after = {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    assert after == before
    reports = tmp_path / "reports"
    p = subprocess.run([sys.executable, str(ROOT / "src" / "report.py"), "--runs", str(tmp_path), "--out",
                        str(reports)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0
    index = (reports / "README.md").read_text()
    for runs in (str(tmp_path / "typo"), str(tmp_path / "checkpoints_only")):
        if runs.endswith("only"):
            os.makedirs(runs)
        p = subprocess.run([sys.executable, str(ROOT / "src" / "report.py"), "--runs", runs, "--out",
                            str(reports)], capture_output=True, text=True, timeout=300)
        assert p.returncode == 2 and (reports / "README.md").read_text() == index, p.stderr


def test_fault_injection_five_random_kills_end_as_an_uninterrupted_run(tmp_path, env):
    """Kill a run at 5 random steps (SIGKILL, SIGTERM and SIGINT mixed), resume after each, and compare the
    final summary.json and every metric series with an uninterrupted run: equal, each step exactly once.
    Checkpoints every 3 steps, validation every 8 (never at a checkpoint step: see README "Faults")."""
    import random

    rng = random.Random(int(os.environ.get("REMOE_FAULT_SEED", "20261129")))
    extra = ["size.ckpt_interval=3", "size.val_interval=8"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    ref.mkdir()
    cut.mkdir()
    p = start(ref, env, *extra)
    assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
    kinds = [signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGKILL, rng.choice([signal.SIGTERM,
                                                                                         signal.SIGINT])]
    rng.shuffle(kinds)
    log = []
    for sig in kinds:
        q = start(cut, env, *extra, "resume=true")
        done = max(series(cut, "train/loss"), default=-1) if (cut / "metrics.csv").exists() else -1
        target = min(14, done + 1 + rng.randint(1, 3))
        _wait_for_step(cut, q, target)
        q.send_signal(sig)
        rc = q.wait(timeout=300)
        assert rc == {signal.SIGKILL: -9, signal.SIGTERM: 0, signal.SIGINT: 130}[sig], q.stderr.read()[-3000:]
        at = torch.load(cut / "checkpoints" / "last.ckpt", weights_only=True,
                        map_location="cpu")["global_step"]
        log.append((sig.name, target, at))
    q = start(cut, env, *extra, "resume=true")
    assert q.wait(timeout=600) == 0, q.stderr.read()[-3000:]
    print("kills (signal, step seen, checkpoint step):", log)
    a, b = read_summary(ref), read_summary(cut)
    skip = {"fit_time_s", "wall_time_s", "tokens_per_s", "resumed_from", "run_dir", "git_commit", "malloc"}
    assert {k: v for k, v in b.items() if k not in skip} == {k: v for k, v in a.items() if k not in skip}
    for key in ("train/loss", "train/lm_loss", "train/reg_loss", "train/lambda", "train/sparsity",
                "sparsity/layer_0", "sparsity/layer_1", "train/grad_norm", "val/loss"):
        with open(ref / "metrics.csv") as fa, open(cut / "metrics.csv") as fb:
            ra = [(int(r["step"]), r[key]) for r in csv.DictReader(fa) if r.get(key)]
            rb = [(int(r["step"]), r[key]) for r in csv.DictReader(fb) if r.get(key)]
        assert rb == ra, key  # the same steps, once each, with the same values


def test_signal_handlers_are_restored_after_training(tmp_path, cache_dir, monkeypatch):
    """After a fit, SIGTERM/SIGINT/SIGUSR1 behave as before it: processes forked later (lm-eval's bootstrap
    pool, ended by SIGTERM) would otherwise inherit a handler that ignores it, and hang the run."""
    from hydra import compose, initialize_config_dir

    from conftest import FAST
    from remoe.resolvers import register_resolvers
    from remoe.train.run import train

    register_resolvers()
    monkeypatch.setenv("REMOE_CACHE", cache_dir)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["eval=none", "logger=none", "analysis.batches=0", *FAST,
                                            f"trainer.default_root_dir={tmp_path / 'run'}"])
    train(cfg, str(tmp_path / "run"))
    assert {s: signal.getsignal(s) for s in before} == before


# ---- trainer=fsdp (FSDP2 through Lightning's ModelParallelStrategy) on 2 CPU processes -----------------------
FSDP_RUN = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=20", "size.ckpt_interval=2",
            "size.val_interval=10", "size.val_batches=2", "analysis.batches=2", "analysis.flip_interval=0"]


def test_fsdp_matches_ddp_and_resumes_exactly_from_sharded_checkpoints(tmp_path, env):
    """FSDP2 on 2 CPU ranks: loss, lambda and sparsity equal to DDP's (1e-5) over 20 steps; a SIGKILL of
    the whole job and a resume from the sharded last.ckpt gives the same losses and lambda; the sharded
    checkpoint loads for evaluation/export with the weights DDP's checkpoint holds."""
    from remoe.checkpoint import is_sharded, load_checkpoint

    runs = {k: tmp_path / k for k in ("ddp", "fsdp", "cut")}
    for r in runs.values():
        r.mkdir()

    def launch(run_dir, trainer, *extra):
        return subprocess.Popen([sys.executable, str(ROOT / "src" / "train.py"), *COMMON, f"trainer={trainer}",
                                 *FSDP_RUN, f"hydra.run.dir={run_dir}", *extra], env=env, cwd=run_dir.parent,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)

    for name, trainer in (("ddp", "ddp"), ("fsdp", "fsdp")):
        p = launch(runs[name], trainer)
        assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
    for key in ("train/loss", "train/lambda", "train/sparsity"):
        a, b = series(runs["ddp"], key), series(runs["fsdp"], key)
        assert len(a) == 20 and a.keys() == b.keys()
        assert all(b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-7) for s in a), key
    ckpt = runs["fsdp"] / "checkpoints" / "last.ckpt"
    assert is_sharded(str(ckpt)) and len(list(ckpt.glob("*.distcp"))) == 2  # one shard file per rank
    (fs, _, hp), (dd, _, _) = (load_checkpoint(str(runs[k] / "checkpoints" / "last.ckpt")) for k in ("fsdp", "ddp"))
    for (name, x), y in zip(fs.state_dict().items(), dd.state_dict().values()):
        # atol 1e-5: FSDP reduce-scatters where DDP all-reduces; on an Intel Xeon (AMX) one embedding entry of
        # 262,144 differed by 2.3e-6 after 20 Adam steps (a near-zero gradient's update); a wrong shard: ~1e-2
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    assert (runs["fsdp"] / "routing_analysis.json").exists()  # rank 0 analysed the gathered model
    # SIGKILL the job (both ranks) after a checkpoint, resume from the shards
    q = launch(runs["cut"], "fsdp")
    marker = runs["cut"] / "checkpoints" / "last.ckpt" / "meta.pt"
    t = time.time()
    while not marker.exists():
        assert q.poll() is None, q.stderr.read()[-3000:]
        assert time.time() - t < 300
        time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(q.pid, signal.SIGKILL)
    q.wait()
    assert read_summary(runs["cut"]) is None
    r = launch(runs["cut"], "fsdp", "resume=true")
    assert r.wait(timeout=600) == 0, r.stderr.read()[-3000:]
    a, b = read_summary(runs["fsdp"]), read_summary(runs["cut"])
    assert b["resumed_from"].endswith("last.ckpt") and b["steps"] == 20
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-6) and b["lambda"] == pytest.approx(a["lambda"], rel=1e-6)
    assert series(runs["cut"], "train/loss")[19] == pytest.approx(series(runs["fsdp"], "train/loss")[19], rel=1e-6)


# ---- a full disk during a checkpoint save -----------------------------------------------------------
def _in_tmpfs(script: str, size_mb: int, tmp_path) -> subprocess.CompletedProcess:
    """Run a bash script with $T a fresh tmpfs of size_mb (its own mount namespace: unshare, no root needed
    where user namespaces are allowed); the script may write results outside $T."""
    import shutil as _sh

    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    body = f"set -e\nmount -t tmpfs -o size={size_mb}m tmpfs {mnt}\nexport T={mnt}\n{script}"
    if _sh.which("unshare") and subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"],
                                               capture_output=True).returncode == 0:
        cmd = ["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", body]
    else:
        pytest.skip("cannot mount a tmpfs here (no user namespaces): the full-disk tests need one")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


SAVE_BOTH = """
import json, os, sys, torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from remoe.checkpoint import checkpoint_io
T, out = os.environ["T"], {}
for name, io in (("lightning", TorchCheckpointIO()), ("remoe", checkpoint_io())):
    path = os.path.join(T, name + ".ckpt")
    io.save_checkpoint({"w": torch.ones(1_000_000), "step": 1}, path)  # 4 MB
    free = os.statvfs(T).f_bavail * os.statvfs(T).f_frsize
    filler = os.path.join(T, name + ".filler")
    with open(filler, "wb") as f:
        f.write(b"x" * (free - (6 << 20)))  # 6 MB left: the next save needs 12 MB
    try:
        io.save_checkpoint({"w": torch.ones(3_000_000), "step": 2}, path)  # 12 MB: the disk fills during it
        saved = "saved"
    except (OSError, RuntimeError) as e:
        saved = type(e).__name__
    try:
        step = torch.load(path, weights_only=True)["step"]
    except Exception as e:
        step = type(e).__name__
    os.unlink(filler)
    out[name] = {"save": saved, "after": step, "left": sorted(os.listdir(T))}
print(json.dumps(out))
"""


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    """A checkpoint is written beside its target and renamed over it (remoe.checkpoint.save_atomic). Lightning's
    own save writes to $TMPDIR first and, when that is another file system (here: $TMPDIR on disk, the run on
    a tmpfs), copies over the target in place: a disk that fills during that copy leaves no checkpoint."""
    p = _in_tmpfs(f"cd {tmp_path} && TMPDIR={tmp_path} {sys.executable} -c '{SAVE_BOTH}'", 24, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["remoe"]["save"] == "OSError" and res["remoe"]["after"] == 1  # refused whole; the old one loads
    assert res["remoe"]["left"] == ["lightning.ckpt", "remoe.ckpt"]  # no partial file left beside it
    assert res["lightning"]["after"] != 1  # Lightning's in-place copy lost it (the defect this IO avoids)


def test_a_run_whose_disk_fills_during_a_save_ends_failed_with_its_last_checkpoint_whole(tmp_path, cache_dir):
    """End to end: a run on a 40 MB tmpfs; after its first checkpoint (step 10) the disk is filled to leave
    less than a checkpoint; the step-20 save fails: the run ends `failed` with one line naming the error,
    and last.ckpt is the step-10 checkpoint, whole."""
    out = tmp_path / "out"
    out.mkdir()
    read_step = "import torch; print(torch.load('$T/run/checkpoints/last.ckpt', weights_only=True)['global_step'])"
    script = f"""
cd $T
REMOE_CACHE={cache_dir} WANDB_SILENT=true {sys.executable} {ROOT / 'src' / 'train.py'} logger=csv eval=none \\
  analysis.batches=0 trainer.max_steps=60 size.ckpt_interval=10 size.val_interval=10 size.val_batches=2 \\
  trainer.enable_progress_bar=false hydra.run.dir=$T/run > {out}/stdout.txt 2> {out}/stderr.txt &
pid=$!
while [ ! -f $T/run/checkpoints/last.ckpt ]; do sleep 0.01; done
{sys.executable} -c "import os; s = os.statvfs('$T'); open('$T/filler', 'wb').write(b'x' * (s.f_bavail * s.f_frsize - (6 << 20)))"
set +e
wait $pid
echo $? > {out}/rc.txt
{sys.executable} -c "{read_step}" > {out}/step.txt
cp $T/run/summary.json {out}/summary.json
ls -a $T/run/checkpoints > {out}/ls.txt
"""
    p = _in_tmpfs(script, 40, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    rc, step = int((out / "rc.txt").read_text()), int((out / "step.txt").read_text())
    s = json.loads((out / "summary.json").read_text())
    err = [x for x in (out / "stderr.txt").read_text().splitlines() if x.startswith("train:")]
    assert rc == 1 and step == 10 and s["status"] == "failed" and "No space left" in s["error"], (rc, step, s["error"])
    assert len(err) == 1 and "No space left" in err[0] and "Traceback" not in (out / "stderr.txt").read_text()
    assert (out / "ls.txt").read_text().split() == [".", "..", "last.ckpt"]  # no partial file beside it
