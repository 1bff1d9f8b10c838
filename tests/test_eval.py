"""lm-eval integration: the adapter's numbers against the model's own, the local suite through
simple_evaluate, standalone evaluation, the CLI through lm-eval's registry, and the offline paper suite."""

import glob
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from conftest import FAST, ROOT
from remoe.checkpoint import load_checkpoint
from remoe.data.corpus import stdlib_documents
from remoe.data.tokenizer import train_bpe
from remoe.eval.adapter import RemoeLM
from remoe.model import Transformer, preset
from remoe.train.record import read_summary


@pytest.fixture(scope="module")
def lm():
    tok = train_bpe([d["text"] for d in stdlib_documents(max_chars=200_000)], 512)
    torch.manual_seed(0)
    model = Transformer(preset("tiny", "remoe", vocab_size=512, experts=4))
    for p in model.parameters():  # larger weights than the 0.01 init: peaked, distinct distributions
        torch.nn.init.normal_(p, std=0.2)
    return RemoeLM(model=model, tokenizer=tok, batch_size=3)


def logprobs(model, ids):
    with torch.no_grad():
        return F.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def by_hand(model, ctx_ids, cont_ids):
    lp = logprobs(model, (ctx_ids + cont_ids)[:-1])
    n = len(ctx_ids)
    return sum(lp[n - 1 + j, t].item() for j, t in enumerate(cont_ids))


def req(kind, args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_loglikelihood_equals_model_logprobs(lm):
    pairs = [("def add(a, b):\n    return", " a + b"), ("import", " os"), ("class Foo(object):\n    \"\"\"", "A foo."),
             ("x = [i for i in range(10)]\nprint(", "x)"), ("# comment\n", "pass")]
    got = lm.loglikelihood([req("loglikelihood", p) for p in pairs])
    for (ctx, cont), (ll, _) in zip(pairs, got):
        if ctx != ctx.rstrip():  # lm-eval's convention: trailing whitespace moves to the continuation
            ctx, cont = ctx.rstrip(), ctx[len(ctx.rstrip()):] + cont
        whole = lm.tok_encode(ctx + cont)
        c = lm.tok_encode(ctx)
        assert ll == pytest.approx(by_hand(lm.model, c, whole[len(c):]), abs=1e-4)


def test_is_greedy_exactly_when_argmax(lm):
    ctx = lm.tok_encode("def main():\n    ")
    greedy = []
    for _ in range(4):
        greedy.append(int(logprobs(lm.model, ctx + greedy)[-1].argmax()))
    other = greedy[:2] + [(greedy[2] + 1) % 512] + greedy[3:]
    (ll_g, is_g), (ll_o, is_o) = lm._loglikelihood_tokens([(None, ctx, greedy), (None, ctx, other)])
    assert is_g is True and is_o is False
    assert ll_g == pytest.approx(by_hand(lm.model, ctx, greedy), abs=1e-4)
    assert ll_o == pytest.approx(by_hand(lm.model, ctx, other), abs=1e-4)


def test_long_context_is_left_truncated(lm):
    L = lm.max_length
    ctx = [(7 * i) % 500 + 1 for i in range(L + 40)]
    cont = [5, 9, 11]
    [(ll, _)] = lm._loglikelihood_tokens([(None, ctx, cont)])
    window = (ctx + cont)[-(L + 1):]  # what fits: the last L inputs
    assert ll == pytest.approx(by_hand(lm.model, window[:-3], window[-3:]), abs=1e-4)


def test_loglikelihood_rolling_is_the_document_loglikelihood(lm):
    doc = "def square(x):\n    return x * x\n\nprint(square(3))\n"
    ids = lm.tok_encode(doc)
    assert len(ids) < lm.max_length
    lp = logprobs(lm.model, [lm.eot_token_id] + ids[:-1])
    expect = sum(lp[i, t].item() for i, t in enumerate(ids))
    [got] = lm.loglikelihood_rolling([req("loglikelihood_rolling", (doc,))])
    assert got == pytest.approx(expect, abs=1e-4)


def test_loglikelihood_rolling_long_document_uses_disjoint_windows(lm):
    doc = "\n".join(f"value_{i} = compute({i}, {i * i})" for i in range(60))
    ids = lm.tok_encode(doc)
    L = lm.max_length
    assert len(ids) > L
    # by hand: the first window predicts ids[:L] from [EOT] + ids[:L-1]; each later window predicts the next
    # block, conditioned on the L tokens right before it
    total, start = 0.0, 0
    while start < len(ids):
        end = min(start + L, len(ids))
        if start == 0:
            lp = logprobs(lm.model, [lm.eot_token_id] + ids[: end - 1])
            total += sum(lp[i, ids[i]].item() for i in range(end))
        else:
            inp = ids[end - L - 1: end - 1]
            lp = logprobs(lm.model, inp)
            off = len(inp) - (end - start)
            total += sum(lp[off + j, ids[start + j]].item() for j in range(end - start))
        start = end
    [got] = lm.loglikelihood_rolling([req("loglikelihood_rolling", (doc,))])
    assert got == pytest.approx(total, abs=1e-3)


def test_generate_until_is_greedy_decoding_cut_at_the_stop_string(lm):
    """Against a greedy loop written here on the model's logits: the same text, cut before the first stop
    string; an empty answer passes only where the reference is empty too, and not every answer may be."""
    contexts = ["def f(x):\n", "import os\nimport", "class Foo:\n    def", "# a comment about", "x = [1, 2,"]
    outs = lm.generate_until([req("generate_until", (c, {"until": ["\n"], "max_gen_toks": 8})) for c in contexts])

    def reference(ctx):
        ids, new = lm.tok_encode(ctx), []
        for _ in range(8):
            with torch.no_grad():
                nxt = int(lm.model(torch.tensor([ids + new]))[0][0, -1].argmax())
            if nxt == lm.eot_token_id:
                break
            new.append(nxt)
            if "\n" in lm.tok_decode(new):
                break
        return lm.tok_decode(new).split("\n")[0]

    refs = [reference(c) for c in contexts]
    assert outs == refs and any(refs)


# ---- on a trained checkpoint -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(cache_dir, tmp_path_factory):
    """A tiny ReMoE trained by the real entry point with the default eval=local."""
    out = tmp_path_factory.mktemp("evalrun")
    env = {**os.environ, "REMOE_OUTPUT": str(out), "REMOE_CACHE": cache_dir, "WANDB_SILENT": "true",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "src" / "train.py"), *FAST, "trainer.max_steps=30",
                        "logger=csv", "eval.n_docs=60"], cwd=out, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-5000:]
    [summary] = glob.glob(str(out / "runs" / "**" / "summary.json"), recursive=True)
    return Path(summary).parent, env


def test_training_stores_local_suite_results(trained):
    run, _ = trained
    s = read_summary(run)
    assert s["status"] == "completed"
    assert set(s["downstream"]) == {"remoe_cloze", "remoe_choice"}
    ch, cl = s["downstream"]["remoe_choice"], s["downstream"]["remoe_cloze"]
    assert 0 <= ch["acc"] <= 1 and 0 <= ch["acc_norm"] <= 1 and ch["acc_stderr"] > 0
    assert 0 <= cl["acc"] <= 1 and math.isfinite(cl["perplexity"]) and cl["perplexity"] > 1
    full = json.loads((run / "lm_eval_results.json").read_text())
    assert full["results"]["remoe_choice"]["acc,none"] == ch["acc"]
    assert s["downstream_meta"]["suite"] == "local" and s["downstream_meta"]["source"] == "training"


def test_checkpoint_is_self_contained(trained):
    run, _ = trained
    model, tok, hp = load_checkpoint(str(run / "checkpoints" / "last.ckpt"))
    assert hp["model"]["routing"] == "remoe" and tok.get_vocab_size() == model.cfg.vocab_size
    assert hp["routing"] == {"load_balancing": True, "regularizer": "lb_l1", "lambda0": 1e-8, "alpha": 1.2,
                             "lambda_per_layer": False}


def test_standalone_evaluate_matches_training_eval(trained, tmp_path):
    run, env = trained
    before = read_summary(run)["downstream"]
    p = subprocess.run([sys.executable, str(ROOT / "src" / "evaluate.py"),
                        f"checkpoint={run / 'checkpoints' / 'last.ckpt'}", "eval.n_docs=60"],
                       cwd=tmp_path, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-4000:]
    after = read_summary(run)["downstream"]
    for task in before:  # same weights, same tasks, fp32 both times
        assert after[task]["acc"] == before[task]["acc"]


def test_a_run_stopped_during_evaluation_is_evaluated_by_skip_completed_not_retrained(trained, tmp_path):
    """summary.json (completed) is on disk before evaluation starts; a process stopped during evaluation
    leaves it without `downstream` and wall_time_s. A rerun with skip_completed evaluates the final
    checkpoint: the same numbers as the in-training evaluation, nothing trained again, and the loggers get
    them as training's would have (metrics.csv's downstream row; a W&B run of the same name)."""
    import csv
    import shutil

    from remoe.wandb_offline import offline_runs, read_history

    def rows(path):
        return list(csv.DictReader(path.open(newline="")))

    run, env = trained
    original = read_summary(run)
    stopped = tmp_path / "run"
    shutil.copytree(run, stopped)
    cut = {k: v for k, v in original.items() if k not in ("downstream", "downstream_meta")}
    (stopped / "summary.json").write_text(json.dumps({**cut, "wall_time_s": None}))
    (stopped / "lm_eval_results.json").unlink()
    logged = rows(stopped / "metrics.csv")  # training's, with its downstream row at step 30
    training = [r for r in ({k: v for k, v in r.items() if not k.startswith("downstream/")} for r in logged)
                if any(v for k, v in r.items() if k != "step")]
    assert len(training) == len(logged) - 1
    with (stopped / "metrics.csv").open("w", newline="") as f:  # as a process stopped before it logged them
        w = csv.DictWriter(f, fieldnames=list(training[0]))
        w.writeheader()
        w.writerows(training)
    args = [sys.executable, str(ROOT / "src" / "train.py"), *FAST, "trainer.max_steps=30", "logger=wandb",
            "eval.n_docs=60", "skip_completed=true", f"hydra.run.dir={stopped}"]
    p = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "evaluating its final checkpoint (step 30)" in p.stdout + p.stderr
    after = read_summary(stopped)
    assert after["downstream"] == original["downstream"]  # same weights, tasks and seed, fp32 both times
    assert after["downstream_meta"]["source"] == str(stopped / "checkpoints" / "last.ckpt")
    assert {k: v for k, v in after.items() if k not in ("downstream", "downstream_meta")} == \
        {**cut, "wall_time_s": None}  # the training record as it was: not trained again
    assert (stopped / "lm_eval_results.json").exists()
    assert rows(stopped / "metrics.csv") == logged  # the downstream row back, the same numbers
    [wb] = offline_runs(stopped)
    history = read_history(wb)
    assert history["downstream/remoe_choice/acc"] == [original["downstream"]["remoe_choice"]["acc"]]
    assert history["trainer/global_step"] == [30]
    # without a checkpoint of the final step there is nothing to evaluate: the record is kept, a warning says so
    (stopped / "summary.json").write_text(json.dumps({**cut, "wall_time_s": None}))
    shutil.rmtree(stopped / "checkpoints")
    p = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert p.returncode == 0 and "no checkpoint of its final step" in p.stdout + p.stderr
    assert read_summary(stopped) == {**cut, "wall_time_s": None}
    assert offline_runs(stopped) == [wb] and rows(stopped / "metrics.csv") == logged  # nothing logged


def test_lm_eval_cli_with_remoe_model(trained, tmp_path):
    run, env = trained
    [include] = [d for d in glob.glob(os.path.join(env["REMOE_CACHE"], "eval", "eval-tasks-*"))
                 if os.path.isdir(d) and not d.endswith(".tmp")][:1]
    p = subprocess.run(["remoe-lm-eval", "--model", "remoe", "--model_args",
                        f"checkpoint={run / 'checkpoints' / 'last.ckpt'}", "--tasks", "remoe_choice",
                        "--include_path", include, "--limit", "20", "--batch_size", "4",
                        "--output_path", str(tmp_path / "res")], cwd=tmp_path, env=env, capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr[-4000:]
    [res] = glob.glob(str(tmp_path / "res" / "**" / "results_*.json"), recursive=True)
    acc = json.loads(Path(res).read_text())["results"]["remoe_choice"]["acc,none"]
    # the same checkpoint, tasks and limit evaluated in this process through lm-eval's Python API
    import lm_eval
    from lm_eval.tasks import TaskManager

    mine = lm_eval.simple_evaluate(model=RemoeLM(checkpoint=str(run / "checkpoints" / "last.ckpt"), batch_size=4),
                                   tasks=["remoe_choice"], task_manager=TaskManager(include_path=include), limit=20,
                                   bootstrap_iters=0)
    assert acc == mine["results"]["remoe_choice"]["acc,none"]


def test_paper_suite_offline_fails_clearly(train):
    p, out = train("eval=paper", *FAST, check=False)
    assert p.returncode == 2
    msg = p.stdout + p.stderr
    assert "eval=local" in msg and "hub" in msg
    assert not glob.glob(str(out / "**" / "checkpoints"), recursive=True)


def test_unknown_eval_task_is_a_config_error(train):
    p, _ = train("eval.tasks=[no_such_task]", *FAST, check=False)
    assert p.returncode == 2 and "eval.tasks" in p.stdout + p.stderr
