"""Benchmarks: the CLI runs on tiny and writes valid JSON; no timing assertions (shared, noisy machines).
The expert fast paths (torch._grouped_mm and the per-expert mm loop, fp32 and bf16 autocast) are checked
against the naive token x expert reference here; the float64 loop path in test_model.py."""

import copy
import json
import os
import platform
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from remoe.bench.layer import bench_layer, remoe_steady_state
from remoe.bench.model import bench_models
from remoe.cpu import MALLOC_ENV
from remoe.model import experts as experts_mod
from remoe.model import preset
from remoe.model.dispatch import group_by_expert
from remoe.train.precision import FLAGS
from test_model import make_layer, naive_moe


def _hard_case(method):
    """16 fine-grained experts, 2 of which no token is routed to; for ReLU, 6 tokens with no expert."""
    layer = make_layer(method, 8, 2, 2)
    torch.manual_seed(3)
    x = torch.randn(96, 16, dtype=torch.float64)
    x[:, 0] = 1.0
    with torch.no_grad():
        layer.router.weight[[0, 5], 0] = -100.0  # experts 0 and 5: never top-k, ReLU gate 0
        if method == "remoe":
            layer.router.weight[:, 1] = 5.0
            x[:6, 1] = -50.0  # all gates of tokens 0..5 are zero
    return layer, x


def _run(layer, x, w, method, dtype=None):
    layer.zero_grad()
    xx = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        y = layer(xx)[0] if dtype else naive_moe(layer, xx, method, 4)  # k*G = 2*2
    (y.float() * w.float()).sum().backward()
    return y.detach().double(), xx.grad.double(), [p.grad.double() for p in layer.parameters()]


@pytest.mark.parametrize("path", ["grouped_mm", "mm_loop"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("method", ["topk", "remoe"])
def test_expert_fast_paths_match_reference(path, dtype, method, monkeypatch):
    if path == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    if path == "mm_loop":  # the fallback: as if the kernel had refused these inputs
        monkeypatch.setattr(experts_mod, "_GMM_BROKEN", {("cpu", t, k) for t in (torch.float32, torch.bfloat16)
                                                          for k in ("mm", "wgrad")})
    layer, x = _hard_case(method)
    w = torch.randn(96, 16, dtype=torch.float64)
    ref = _run(layer, x, w, method)
    fast_layer = copy.deepcopy(layer).float()
    assert experts_mod._gmm_ok(x.float(), "mm") == (path == "grouped_mm")
    fast = _run(fast_layer, x.float(), w, method, dtype)

    routing = group_by_expert(fast_layer.router(x.float()).gates)
    assert routing.counts[0] == 0 and routing.counts[5] == 0  # empty experts are part of the case
    tol = 1e-5 if dtype == "fp32" else 3e-2
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(fast[0], ref[0]) < tol and rel(fast[1], ref[1]) < tol
    for (name, _), a, b in zip(layer.named_parameters(), fast[2], ref[2]):
        assert rel(a, b) < tol, name
    w13_grad = fast[2][[n for n, _ in layer.named_parameters()].index("experts.w13")]
    assert (w13_grad[[0, 5]] == 0).all()  # empty experts: exactly zero gradient
    if method == "remoe":
        assert (fast[0][:6] == 0).all()  # tokens with no active expert output 0


@pytest.mark.parametrize("method", ["topk", "remoe"])
def test_bf16_autocast_matches_reference(method):
    layer = make_layer(method, 8, 2, 2).float()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(64, 16)
    ref = naive_moe(layer.double(), x.double(), method, 4).float()
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
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV and k != "REMOE_MALLOC"}
    p = subprocess.run([sys.executable, str(ROOT / "src" / "bench.py"), "layer", "--E", "4", "--d", "64", "--ffn", "128",
                        "--tokens", "256", "--reps", "1", "--out", str(out)], capture_output=True, text=True,
                       timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert rows[0]["E"] == 4 and rows[0]["ratio_topk_vs_dense"] > 0
    if sys.platform == "linux" and platform.libc_ver()[0] == "glibc":  # the script re-executed itself once
        assert res["environment"]["malloc"] == MALLOC_ENV
    assert res["environment"]["versions"]["torch"] == torch.__version__
    assert set(res["environment"]["cpu"]["flags"]) <= set(FLAGS) and res["environment"]["cpu"]["model"]
    out2 = tmp_path / "m.json"
    p = subprocess.run([sys.executable, str(ROOT / "src" / "bench.py"), "model", "--size", "tiny", "--batch", "2",
                        "--seq", "32", "--reps", "1", "--precision", "fp32", "--out", str(out2)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "train TFLOPS" in p.stdout and len(json.loads(out2.read_text())["rows"]) == 3


def test_steady_state_threshold_uses_a_constant_feature():
    layer = make_layer("remoe", 8, 1, 1).float()
    x = torch.randn(1000, 16)
    remoe_steady_state(layer, x, 1)
    g = layer.router(x).gates
    assert abs((g > 0).float().mean().item() - 1 / 8) < 0.01


def test_flop_count_covers_grouped_experts_forward_and_backward():
    """FlopCounterMode must see the expert GEMMs whichever path runs them (grouped_mm has a registered
    formula): forward 2*N*d*3f (+ router 2*T*d*E), backward twice that (grads of x and of weights)."""
    from remoe.model.flops import count_flops

    layer = make_layer("topk", 8, 2, 1, d=32, ffn=64).float()
    x = torch.randn(100, 32, requires_grad=True)
    N, d, f, E = 100 * 2, 32, 64, 8
    fwd = count_flops(lambda: layer(x))
    assert fwd == 2 * N * d * 3 * f + 2 * 100 * d * E

    def step():
        y, _ = layer(x)
        y.sum().backward()

    assert count_flops(step) == 3 * fwd


def test_gpu_suite_runs_its_cpu_path_and_refuses_bad_arguments(tmp_path):
    """`bench.py gpu` is written for one CUDA GPU; the same code on CPU at tiny settings exercises every part:
    the grouped-GEMM check (the fast path really ran, the loop really did not), host syncs per method (none
    for fixed k), the paper setting with the HF peers at our widths and the profiles, the base, E=64 and
    compiled rows, the JSON and the table. A bad E:k:G, or CUDA where there is none, is one line and exit 2."""
    out = tmp_path / "gpu.json"
    args = [sys.executable, str(ROOT / "src" / "bench.py"), "gpu"]
    p = subprocess.run([*args, "--device", "cpu", "--size", "tiny", "--batch", "2", "--seq", "32", "--reps", "1",
                        "--configs", "4:1:2", "--checks", "4:1:1", "8:2:2", "--precision", "fp32",
                        "--paper-batch", "2", "--paper-vocab", "300", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [(c["E"], c["k"], c["G"]) for c in res["checks"]] == [(4, 1, 1), (8, 2, 2)]
    for c in res["checks"]:
        assert c["ok"] and c["loop_grouped_mm_calls"] == 0 and set(c["rel_err"]) == {
            "output", "grad x", "grad gates", "grad w13", "grad w2"}
        assert c["grouped_mm_calls"] > 0 and not c["fast_path_fell_back"]
    syncs = {r["method"]: r["host_syncs"] for r in res["syncs"]}
    assert set(syncs) == {"dense", "topk", "remoe", "hash", "ec", "auxfree"}
    # fp32: CPU bf16 buckets group sizes on the host (dispatch.pad_groups), which no GPU runs
    assert all(n == 0 for m, n in syncs.items() if m != "remoe") and syncs["remoe"] > 0  # exact on CPU
    settings = {t["setting"]: t for t in res["throughput"]}
    assert list(settings) == ["paper", "base", "e64", "compiled"]
    assert settings["base"]["config"] == {"experts": 4, "topk": 1, "granularity": 2}
    paper = {r["model"]: r for r in settings["paper"]["rows"]}
    assert list(paper) == ["dense", "topk", "remoe", "hf_llama", "hf_mixtral"]
    assert paper["hf_llama"]["params"] == paper["dense"]["params"]  # the peers have our widths
    assert paper["hf_mixtral"]["params"] == paper["topk"]["params"]
    padded = preset("tiny", "dense", vocab_size=300).padded_vocab_size
    assert all(r["batch"] == 2 and r["vocab"] == padded and r["seq"] == 32 for r in paper.values())
    assert paper["topk"]["host_syncs"] == 0 and paper["dense"]["train_vs_dense"] == 1.0
    assert all(r["compile"] for r in settings["compiled"]["rows"])
    assert [r["model"] for r in settings["e64"]["rows"]] == ["topk", "remoe"]
    assert all("train_vs_dense" in r for r in settings["e64"]["rows"])
    assert set(res["profiles"]) == {"dense", "topk", "remoe"}
    assert all(p_["top"] and p_["wall_ms"] > 0 for p_ in res["profiles"].values())
    assert "cpu" in res["environment"] and set(res["wall_s"]) == {"checks", "syncs", "paper", "base", "e64",
                                                                   "compiled"}
    assert "| E | k | G | grouped_mm calls |" in p.stdout and "train TFLOPS" in p.stdout
    assert "profile remoe:" in p.stdout and "| hf_mixtral |" in p.stdout
    for bad, why in ((["--configs", "4:x"], "is not E:k:G"), (["--device", "cuda"], "no CUDA device")):
        if why == "no CUDA device" and torch.cuda.is_available():
            continue
        q = subprocess.run([*args, *bad, "--device", "cpu"] if why != "no CUDA device" else [*args, *bad],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert q.returncode == 2 and why in q.stderr and len(q.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("reports"))  # nothing written on bad input


def test_busy_time_is_the_union_of_kernel_intervals():
    from remoe.bench.profile import busy_us

    assert busy_us([(0, 10), (5, 15), (20, 30), (21, 22)]) == 25
    assert busy_us([]) == 0


# ---- the training step: Lightning vs the bare loop the step bench measures it against ---------------------
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_step_equals_the_bare_loop_with_fused_adamw_and_clipping(precision, cache_dir, monkeypatch):
    """The bench's bare loop is the training step (same weights after 3 steps), and the Lightning path clips
    with a fused AdamW (its bf16 plugin refuses clipping with fused optimizers; LitLM clips by the logged norm)."""
    from dataclasses import replace

    import lightning as L
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from remoe.bench.step import BareLoop, compose_config
    from remoe.train.module import LitLM
    from remoe.train.spec import derive, routing_knobs, validate

    monkeypatch.setenv("REMOE_CACHE", cache_dir)
    cfg = compose_config(["size=tiny", "model=topk", "size.max_steps=3", f"trainer.precision={precision}",
                          "trainer.gradient_clip_val=0.05"])  # small: clipping acts on every step
    mcfg = validate(cfg).model
    derive(cfg)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    mcfg = replace(mcfg, vocab_size=dm.vocab_size)
    torch.manual_seed(0)
    bare = BareLoop(cfg, mcfg, routing_knobs(cfg), dm.train_dataloader(), 1)
    bare.run(3)
    torch.manual_seed(0)
    lit = LitLM(model=mcfg, routing=routing_knobs(cfg), optim=OmegaConf.to_container(cfg.optim, resolve=True))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, precision=precision, gradient_clip_val=0.05,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(lit, train_dataloaders=dm.train_dataloader())
    assert trainer.optimizers[0].defaults["fused"] is True and bare.opt.defaults["fused"] is True
    assert float(lit._grad_norm) > 0.05  # the last step's norm was above the clip value
    for (name, a), b in zip(lit.model.named_parameters(), bare.lit.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    torch.manual_seed(0)
    unclipped = LitLM(model=mcfg, routing=routing_knobs(cfg), optim=OmegaConf.to_container(cfg.optim, resolve=True))
    L.Trainer(accelerator="cpu", devices=1, max_steps=3, precision=precision, gradient_clip_val=None, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              limit_val_batches=0).fit(unclipped, train_dataloaders=dm.train_dataloader())
    assert not torch.allclose(unclipped.model.tok_emb.weight, lit.model.tok_emb.weight)  # clipping changed it


def test_fused_adamw_setting():
    from remoe.train.optim import adamw_impl

    cpu = [torch.zeros(2, 2)]
    assert adamw_impl("auto", cpu) == {"fused": True} and adamw_impl(False, cpu) == {}
    with pytest.raises(ValueError, match="optim.fused"):
        adamw_impl(True, [torch.zeros(2, 2, device="meta")])


def test_step_bench_cli_writes_a_profile_and_refuses_bad_configs(tmp_path, cache_dir):
    out = tmp_path / "s.json"
    env = {**os.environ, "REMOE_CACHE": cache_dir}
    p = subprocess.run([sys.executable, str(ROOT / "src" / "bench.py"), "step", "--config",
                        "size=tiny model=remoe size.micro_batch_size=16", "--steps", "2", "--warmup", "1",
                        "--out", str(out)], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    row = json.loads(out.read_text())["rows"][0]
    assert row["accumulate"] == 2 and row["lightning_status"] == "completed"
    assert row["bare_step_s"] > 0 and row["lightning_step_s"] > 0
    prof = row["profile_ms_per_step"]
    assert {"forward", "backward", "optimizer"} <= set(prof)
    assert prof["forward"]["expert stage (grouped GEMMs, SwiGLU)"] > 0 and prof["backward"]["attention kernel"] > 0
    assert "Lightning overhead" in p.stdout
    for bad in ("size=tiny model=nope", "size=tiny experts=0"):
        p = subprocess.run([sys.executable, str(ROOT / "src" / "bench.py"), "step", "--config", bad, "--out",
                            str(tmp_path / "x.json")], capture_output=True, text=True, timeout=300, env=env)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert not (tmp_path / "x.json").exists()


def test_attention_flops_with_grouped_kv_heads_on_a_torch_that_refuses_them(monkeypatch):
    """torch < 2.13's SDPA FLOP formulas assert equal query and K/V heads, so counting a GQA model's step
    failed there (seen on the GPU machine's torch 2.11); the counter then repeats K/V heads to the query's,
    which is what torch 2.13 computes."""
    from torch.utils import flop_counter

    from remoe.model.flops import _count_gqa_attention

    q, kv = (2, 8, 16, 4), (2, 2, 16, 4)
    want = flop_counter.sdpa_flop_count(q, kv, kv), flop_counter.sdpa_backward_flop_count(q, q, kv, kv)
    fwd, bwd = flop_counter.sdpa_flop_count, flop_counter.sdpa_backward_flop_count

    def equal_heads_only(f):
        def old(*shapes):
            assert shapes[-3][1] == shapes[-2][1], "query/key/value shapes are incompatible"
            return f(*shapes)
        return old

    monkeypatch.setattr(flop_counter, "sdpa_flop_count", equal_heads_only(fwd))
    monkeypatch.setattr(flop_counter, "sdpa_backward_flop_count", equal_heads_only(bwd))
    with pytest.raises(AssertionError):
        flop_counter.sdpa_flop_count(q, kv, kv)
    _count_gqa_attention()
    assert (flop_counter.sdpa_flop_count(q, kv, kv), flop_counter.sdpa_backward_flop_count(q, q, kv, kv)) == want
    _count_gqa_attention()  # a torch that counts GQA is left as it is
    assert flop_counter.sdpa_flop_count(q, kv, kv) == want[0]


def test_commit_of_a_copied_tree_is_named_by_remoe_git_commit(monkeypatch):
    """The GPU machine gets a copy of the tree whose .git said the session's first commit; the command
    names the real one."""
    from remoe.train.record import git_commit

    monkeypatch.delenv("REMOE_GIT_COMMIT", raising=False)
    here = git_commit()
    assert here is None or len(here.removesuffix("-dirty")) == 40
    monkeypatch.setenv("REMOE_GIT_COMMIT", "f" * 40)
    assert git_commit() == "f" * 40
