"""Benchmarks: the CLI runs on tiny and writes valid JSON; no timing assertions (shared, noisy machines).
The dispatch fast path is checked against the naive reference in bf16 here (float64: test_model.py)."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from remoe.bench.layer import bench_layer, remoe_steady_state
from remoe.bench.model import bench_models
from test_model import make_layer, naive_moe


@pytest.mark.parametrize("router", ["topk", "relu"])
def test_bf16_autocast_matches_reference(router):
    layer = make_layer(router, 8, 2, 2).float()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(64, 16)
    ref = naive_moe(layer.double(), x.double()).float()
    layer.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = layer(x)
    assert ((y.float() - ref).norm() / ref.norm()).item() < 2e-2


def test_remoe_steady_state_router_hits_target():
    r = bench_layer(d=64, ffn=128, E=16, k=2, tokens=512, reps=1, mixtral=False)
    assert abs(r["remoe_sparsity"] - (1 - 2 / 16)) < 0.01
    assert set(r["seconds"]) >= {"topk", "remoe", "dense"} and all(v > 0 for v in r["seconds"].values())


def test_model_bench_counts_flops_and_reaches_steady_state():
    res = bench_models("tiny", experts=8, precision="fp32", batch=2, seq=64, reps=1)
    rows = {r["model"]: r for r in res["rows"]}
    assert res["peak_tflops"] > 0
    assert abs(rows["remoe"]["remoe_sparsity"] - 0.875) < 0.02
    for r in rows.values():
        assert r["train_tflops"] > 0 and r["infer_tflops"] > 0 and 0 < r["train_mfu"] < 1.5
    assert rows["remoe"]["train_diff"].endswith("%")


def test_bench_cli_writes_json(tmp_path):
    out = tmp_path / "b.json"
    p = subprocess.run([sys.executable, str(ROOT / "src" / "bench.py"), "layer", "--E", "4", "--d", "64", "--ffn", "128",
                        "--tokens", "256", "--reps", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["E"] == 4 and rows[0]["ratio_topk_vs_dense"] > 0
    out2 = tmp_path / "m.json"
    p = subprocess.run([sys.executable, str(ROOT / "src" / "bench.py"), "model", "--size", "tiny", "--batch", "2",
                        "--seq", "32", "--reps", "1", "--precision", "fp32", "--out", str(out2)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "train TFLOPS" in p.stdout and len(json.loads(out2.read_text())["rows"]) == 3


def test_steady_state_threshold_uses_a_constant_feature():
    layer = make_layer("relu", 8, 1, 1).float()
    x = torch.randn(1000, 16)
    remoe_steady_state(layer, x, 1)
    g, _ = layer.router(x)
    assert abs((g > 0).float().mean().item() - 1 / 8) < 0.01
