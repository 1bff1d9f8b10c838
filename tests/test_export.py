"""Hugging Face export of real checkpoints: the folder loads with transformers alone (remoe not importable),
its logits and greedy decoding equal the checkpoint's, lm-eval's own `hf` model scores the local suite
exactly as the remoe adapter does, load_hf gives the weights back bit for bit, bad input is refused."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAST, ROOT
from remoe.checkpoint import load_checkpoint
from remoe.eval.adapter import greedy_decode
from remoe.export import export, load_hf

METHODS = ["dense", "topk", "remoe", "hash", "ec", "auxfree"]


@pytest.fixture(scope="module")
def runs(cache_dir, tmp_path_factory):
    """One short real run per routing method at E=4, k=2, G=2 (k > 1 and G > 1), and Dense×2."""
    out = tmp_path_factory.mktemp("export_runs")
    env = {**os.environ, "REMOE_OUTPUT": str(out), "REMOE_CACHE": cache_dir, "WANDB_SILENT": "true"}
    args = [
        "experts=4",
        "topk=2",
        "granularity=2",
        "eval=none",
        "logger=none",
        "report_on_multirun_end=false",
        *FAST,
    ]
    for extra in ([f"model={','.join(METHODS)}"], ["model=dense", "model.ffn_mult=2"]):
        p = subprocess.run(
            [sys.executable, str(ROOT / "src" / "train.py"), "-m", *extra, *args],
            cwd=out,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert p.returncode == 0, p.stderr[-4000:]
    ckpts = {}
    for c in sorted(out.rglob("last.ckpt")):
        s = json.loads((c.parent.parent / "summary.json").read_text())
        ckpts[s["model"] if s["ffn_mult"] == 1 else "dense_x2"] = c
    assert sorted(ckpts) == sorted(METHODS + ["dense_x2"])
    return ckpts


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("exported")
    return {m: Path(export(str(c), str(root / m))) for m, c in runs.items()}


CLEAN_LOAD = r"""
import json, sys, torch
for name in ("remoe", "omegaconf", "hydra", "lightning", "lm_eval", "wandb"):  # as if not installed: import
    sys.modules[name] = None  # raises ModuleNotFoundError, importlib.util.find_spec returns None
from transformers import AutoModelForCausalLM, AutoTokenizer
folders, ids, out = json.loads(sys.argv[1]), torch.tensor(json.loads(sys.argv[2])), {}
# AutoTokenizer without trust_remote_code: transformers reads the model config first and, for a folder
# with custom code, asks on stdin (here: none, so it declines and still loads the tokenizer)
for name, folder in folders.items():
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        o = model(ids, output_router_logits=True) if name != "dense" else model(ids)
        gen = model.generate(ids[:1, :8], max_new_tokens=20, do_sample=False)
    gates = getattr(o, "router_logits", None)
    out[name] = {"logits": o.logits.tolist(), "generated": gen[0, 8:].tolist(), "class": type(model).__name__,
                 "eos": tok.eos_token_id, "text": tok.decode(ids[0, :8]),
                 "gates_nonzero": [int((g != 0).sum()) for g in gates] if gates else None}
open(sys.argv[3], "w").write(json.dumps(out))
"""


def test_exported_folders_load_with_transformers_alone_and_match_the_checkpoints(runs, exported, tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(0, 200, (2, 24))
    result = tmp_path / "result.json"
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            CLEAN_LOAD,
            json.dumps({m: str(d) for m, d in exported.items()}),
            json.dumps(ids.tolist()),
            str(result),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert p.returncode == 0, p.stderr[-4000:]
    got = json.loads(result.read_text())
    for name, ckpt in runs.items():
        model, tokenizer, _ = load_checkpoint(str(ckpt))
        with torch.no_grad():
            ref = model(ids)
        r = got[name]
        assert r["class"] == ("LlamaForCausalLM" if name.startswith("dense") else "RemoeForCausalLM"), name
        diff = (torch.tensor(r["logits"]) - ref.logits).abs().max().item()
        assert diff <= 1e-5, (name, diff)
        ours = greedy_decode(
            lambda t, model=model: model(t).logits, ids[0, :8].tolist(), 20, model.cfg.max_seq_len, eos=r["eos"]
        )
        gen = r["generated"]
        assert gen[: len(ours)] == ours and (len(gen) == len(ours) or gen[len(ours)] == r["eos"]), name
        assert r["text"] == tokenizer.decode(ids[0, :8].tolist())
        if name != "dense" and not name.startswith("dense"):  # the routing is visible outside remoe
            assert r["gates_nonzero"] == [int((g.gates != 0).sum()) for g in ref.routing], name
        print(f"{name}: max |logit diff| {diff:.2e}; greedy {len(ours)} tokens equal")


def test_load_hf_gives_the_weights_back_bit_for_bit(runs, exported):
    for name, folder in exported.items():
        model, _, config = load_hf(str(folder))
        ref, _, _ = load_checkpoint(str(runs[name]))
        a, b = ref.state_dict(), model.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert model.cfg == ref.cfg
    card = (exported["remoe"] / "README.md").read_text()
    assert "| routing | remoe |" in card and "experts E" in card and "validation loss" in card
    assert (exported["remoe"] / "training_config.yaml").exists() and (
        exported["dense"] / "generation_config.json"
    ).exists()
    mask = os.umask(0)  # issue 42: as readable as the user's umask says (was 0700/0600 from a temp folder)
    os.umask(mask)
    for folder in exported.values():
        assert folder.stat().st_mode & 0o777 == 0o777 & ~mask
        assert all(f.stat().st_mode & 0o777 == 0o666 & ~mask for f in folder.rglob("*") if f.is_file())


def test_sharding_follows_max_shard_size(runs, tmp_path):
    folder = Path(export(str(runs["topk"]), str(tmp_path / "sharded"), max_shard_size="100KB"))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model, _, _ = load_hf(str(folder))
    ref, _, _ = load_checkpoint(str(runs["topk"]))
    assert all(torch.equal(x, y) for x, y in zip(ref.state_dict().values(), model.state_dict().values()))


def test_lm_evals_hf_model_scores_the_local_suite_as_the_remoe_adapter(
    runs, exported, cache_dir, monkeypatch
):
    from hydra.utils import instantiate
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from omegaconf import OmegaConf

    from remoe.eval.adapter import RemoeLM
    from remoe.eval.run import evaluate, flatten
    from remoe.eval.tasks import LOCAL_TASKS, build_local_tasks

    monkeypatch.setenv("REMOE_CACHE", cache_dir)
    for name in ("dense", "remoe"):
        run_dir = runs[name].parent.parent
        dm = instantiate(OmegaConf.load(run_dir / "config_resolved.yaml").data)
        include = build_local_tasks(dm.validation_texts(), os.path.join(dm.cache_dir, "eval"), n=20)
        model, tokenizer, _ = load_checkpoint(str(runs[name]))
        ours = flatten(
            evaluate(
                RemoeLM(model=model, tokenizer=tokenizer, batch_size=8),
                list(LOCAL_TASKS),
                include_path=include,
            )
        )
        hf = HFLM(
            pretrained=str(exported[name]),
            trust_remote_code=True,
            batch_size=8,
            device="cpu",
            dtype="float32",
        )
        theirs = flatten(evaluate(hf, list(LOCAL_TASKS), include_path=include))
        assert ours.keys() == theirs.keys()
        for task in ours:
            assert ours[task]["acc"] == theirs[task]["acc"], (name, task, ours[task], theirs[task])
            print(f"{name} {task}: acc {ours[task]['acc']:.4f} both")
        # and request by request: the log-likelihoods both models give (a 6-step model's accuracies are
        # near chance, so equal accuracies alone would say little)
        texts = [t for t in dm.validation_texts() if len(t) > 400][:10]
        reqs = [Instance("loglikelihood", {}, (t[:300], t[300:400]), i) for i, t in enumerate(texts)]
        a = RemoeLM(model=model, tokenizer=tokenizer, batch_size=4).loglikelihood(reqs)
        b = hf.loglikelihood(reqs)
        assert len(a) == len(b) == 10
        for (la, ga), (lb, gb) in zip(a, b):
            assert la == pytest.approx(lb, rel=1e-5) and ga == gb, (name, la, lb)


def _export_cli(tmp_path, *args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "src" / "export.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )


def test_cli_exports_and_an_offline_push_says_so(runs, tmp_path):
    out = tmp_path / "cli"
    p = _export_cli(
        tmp_path,
        f"checkpoint={runs['remoe']}",
        f"out={out}",
        "push_to_hub=someone/remoe-tiny",
        env_extra={"HF_HUB_OFFLINE": "1"},
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr + p.stdout
    assert f"exported {runs['remoe']} -> {out}" in p.stdout and (out / "config.json").exists()
    assert "push_to_hub: the hub is offline here" in p.stdout + p.stderr
    # the exported folder evaluates like a checkpoint (remoe adapter, local suite from training_config.yaml)
    p = subprocess.run(
        [sys.executable, str(ROOT / "src" / "evaluate.py"), f"checkpoint={out}", "eval.n_docs=20"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert set(json.loads((out / "summary.json").read_text())["downstream"]) == {
        "remoe_cloze",
        "remoe_choice",
    }


def test_bad_input_is_one_line_exit_2_and_writes_nothing(runs, tmp_path):
    not_ours = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, not_ours)
    cut = tmp_path / "cut.ckpt"
    data = runs["remoe"].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    cases = [
        (not_ours, tmp_path / "a", "is not a remoe checkpoint"),
        (cut, tmp_path / "b", "cannot read"),
        (runs["remoe"], busy, "exists and is not empty"),
    ]
    for ckpt, out, why in cases:
        before = sorted(os.listdir(tmp_path))
        p = _export_cli(tmp_path, f"checkpoint={ckpt}", f"out={out}")
        lines = [x for x in (p.stdout + p.stderr).splitlines() if x.strip()]
        assert p.returncode == 2 and len(lines) == 1 and why in lines[0], (why, p.stdout, p.stderr)
        assert sorted(os.listdir(tmp_path)) == before  # nothing written, no partial folder left
    assert os.listdir(busy) == ["keep.txt"] and (busy / "keep.txt").read_text() == "mine"
    p = _export_cli(tmp_path, f"checkpoint={runs['remoe']}", f"out={busy}", "overwrite=true")  # not an export
    assert p.returncode == 2 and "not an earlier remoe export" in p.stderr and os.listdir(busy) == ["keep.txt"]
    earlier = tmp_path / "earlier"
    assert _export_cli(tmp_path, f"checkpoint={runs['remoe']}", f"out={earlier}").returncode == 0
    (earlier / "extra.txt").write_text("from the earlier export")
    p = _export_cli(tmp_path, f"checkpoint={runs['remoe']}", f"out={earlier}", "overwrite=true")
    assert p.returncode == 0 and (earlier / "config.json").exists() and not (earlier / "extra.txt").exists()
