"""Faults injected into real runs: SIGKILL mid-training then resume (bitwise same metrics), SIGTERM
(checkpoint and clean exit), non-finite loss (stop, diagnose), resuming under a mismatched config."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from remoe.data.datamodule import ResumableBatchSampler
from remoe.runs import read_summary

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


def test_sigkill_then_resume_gives_bitwise_identical_metrics(tmp_path, env):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    ref.mkdir()
    cut.mkdir()
    p = start(ref, env)
    assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
    q = start(cut, env)
    wait_for_checkpoint(cut, q)
    q.send_signal(signal.SIGKILL)  # wherever it is
    q.wait()
    killed_at = torch.load(cut / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["global_step"]
    assert killed_at < 16 and read_summary(cut) is None
    r = start(cut, env, "resume=true")
    assert r.wait(timeout=600) == 0, r.stderr.read()[-3000:]
    a, b = read_summary(ref), read_summary(cut)
    assert b["resumed_from"].endswith("last.ckpt") and b["steps"] == a["steps"] == 16
    assert b["val_loss"] == a["val_loss"] and b["lambda"] == a["lambda"]  # bitwise
    loss_a, loss_b = series(ref, "train/loss"), series(cut, "train/loss")
    assert loss_b[15] == loss_a[15]  # the last training step, bitwise
    print(f"killed at step {killed_at}; resumed; final val loss {a['val_loss']} both")


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path, env):
    run = tmp_path / "run"
    run.mkdir()
    q = start(run, env, "trainer.max_steps=400", "size.ckpt_interval=1000")
    # the first validation is at step 8: wait for its metrics, then send what SLURM sends
    t = time.time()
    while not (run / "metrics.csv").exists() or "val/loss" not in (run / "metrics.csv").read_text():
        assert q.poll() is None and time.time() - t < 300
        time.sleep(0.1)
    q.send_signal(signal.SIGTERM)
    assert q.wait(timeout=120) == 0
    s = read_summary(run)
    assert s["status"] == "preempted" and "resume=true" in s["error"]
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


def test_resume_with_a_different_model_config_is_an_error(train, tmp_path):
    run = tmp_path / "r"
    base = ["logger=none", "eval=none", "trainer.max_steps=2", "size.val_interval=2", "trainer.enable_progress_bar=false",
            f"hydra.run.dir={run}"]
    train("model=remoe", "experts=8", *base)
    p, _ = train("model=remoe", "experts=16", "resume=true", *base, check=False)
    assert p.returncode == 2
    assert "different model config" in p.stdout + p.stderr and "experts=8" in p.stdout + p.stderr


def _to_legacy(ckpt_path):
    """Rewrite a checkpoint into the format written before the routing-method objects: the method as
    `router` and its training knobs inside hyper_parameters["model"], ReMoE's controller state under
    checkpoint["lambda_controller"] (as a7cf893 and earlier wrote them)."""
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    hp = ck["hyper_parameters"]
    model = dict(hp["model"])
    model["router"] = {"dense": None, "topk": "topk", "remoe": "relu"}[model.pop("routing")]
    model.update(aux_loss_coef=0.01, regularizer="lb_l1", lambda0=1e-8, alpha=1.2, warmup_topk=None, warmup_steps=0)
    ck["hyper_parameters"] = {"model": model, "optim": hp["optim"], "routing_log_interval": hp["routing_log_interval"]}
    ck["lambda_controller"] = ck.pop("routing_state")["lambda_controller"]
    torch.save(ck, ckpt_path)


def test_checkpoints_from_before_the_routing_methods_load_and_resume(train, tmp_path):
    from remoe.eval.adapter import load_checkpoint

    run = tmp_path / "r"
    base = ["model=remoe", "logger=csv", "eval=none", "size.val_interval=4", "size.ckpt_interval=4",
            "size.val_batches=2", "trainer.enable_progress_bar=false", f"hydra.run.dir={run}"]
    train(*base, "trainer.max_steps=4")
    first = read_summary(run)
    ckpt = run / "checkpoints" / "last.ckpt"
    _to_legacy(ckpt)
    model, _, hp = load_checkpoint(str(ckpt))
    assert model.cfg.routing == "remoe" and "router" in hp["model"]
    train(*base, "trainer.max_steps=6", "resume=true")
    lam = series(run, "train/lambda")
    assert min(lam) == 4 and lam[4] == pytest.approx(first["lambda"], rel=1e-6)  # lambda came back


def test_resume_may_change_a_routing_knob_but_not_the_architecture(train, tmp_path):
    """alpha is the controller's training knob, not the model: a resume may change it (it was refused as
    "a different model config" before the routing methods owned their knobs)."""
    run = tmp_path / "r"
    base = ["model=remoe", "logger=csv", "eval=none", "size.val_interval=4", "size.ckpt_interval=4",
            "size.val_batches=2", "trainer.enable_progress_bar=false", f"hydra.run.dir={run}"]
    train(*base, "trainer.max_steps=4")
    train(*base, "trainer.max_steps=8", "resume=true", "model.alpha=2.0")
    s = read_summary(run)
    assert s["status"] == "completed" and s["alpha"] == 2.0 and s["steps"] == 8
    lam = series(run, "train/lambda")
    ratios = [lam[i + 1] / lam[i] for i in range(4, 7)]
    assert all(r == pytest.approx(2.0, rel=1e-5) or r == pytest.approx(0.5, rel=1e-5) for r in ratios)
