"""Pre-tokenised data: prepare a local corpus in The Pile's format (JSONL, meta.pile_set_name) with the real
`datasets` builders, train from it, kill and resume at the exact batch, refuse a budget beyond it."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from remoe.data.datamodule import LMDataModule, read_prepared
from remoe.data.tokenizer import train_bpe

DOMAINS = ("Pile-CC", "Github", "ArXiv")


def pile_jsonl(folder: Path) -> tuple[dict, str]:
    """Train/validation JSONL shards in the Pile's record format, and a tokenizer file made from them."""
    import random

    rng = random.Random(0)
    words = [f"w{i}" for i in range(300)]
    texts = {}
    for split, n_files, n_docs in (("train", 2, 300), ("validation", 1, 40)):
        texts[split] = []
        for f in range(n_files):
            path = folder / f"{split}_{f:02d}.jsonl"
            with open(path, "w") as fh:
                for d in range(n_docs):
                    dom = DOMAINS[d % 3]
                    text = f"{dom} " + " ".join(rng.choice(words) for _ in range(rng.randint(20, 120)))
                    texts[split].append(text)
                    fh.write(json.dumps({"text": text, "meta": {"pile_set_name": dom}}) + "\n")
    tok = train_bpe(texts["train"], 512)
    tok_path = folder / "tokenizer.json"
    tok.save(str(tok_path))
    files = {"train": sorted(str(p) for p in folder.glob("train_*.jsonl")),
             "validation": [str(folder / "validation_00.jsonl")]}
    return files, str(tok_path)


def prepare(tmp_path, *overrides, check=True):
    env = {**os.environ, "REMOE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "src" / "prepare_data.py"), *overrides], capture_output=True,
                       text=True, timeout=600, env=env, cwd=tmp_path)
    if check:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def pile(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pile")
    files, tok = pile_jsonl(tmp)
    out = tmp / "prepared"
    overrides = ["data=pile", "data.path=json", f"data.data_files={{train: [{','.join(files['train'])}], "
                 f"validation: [{files['validation'][0]}]}}", f"data.tokenizer={tok}", "size=tiny",
                 "size.seq_len=32", f"out={out}", "num_proc=2", "load_check_batches=5"]
    p = prepare(tmp, *overrides)
    return tmp, out, overrides, p


def test_prepare_packs_a_pile_format_corpus_with_domains(pile):
    tmp, out, _, p = pile
    rec = read_prepared(str(out))
    assert rec["num_proc"] == 2 and rec["seq_len"] == 32 and rec["vocab_size"] == 512
    assert rec["tokens_per_s_per_process"] > 0 and rec["loading_tokens_per_s"] > 0
    assert "tokenizing" in p.stderr + p.stdout
    dm = LMDataModule(source="prepared", dir=str(out), seq_len=32, micro_batch_size=4)
    dm.setup("fit")
    assert len(dm.train_ds) == rec["sequences"]["train"] and len(dm.val_ds) == rec["sequences"]["validation"] > 0
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 33) and set(batch["domain"]) <= set(DOMAINS)
    assert set(dm.train_ds["domain"]) == set(DOMAINS)  # one domain per sequence, all three kept
    # each sequence packs one domain's documents (each document starts with its domain's name)
    tok = dm.prepare_tokenizer()
    for row in dm.train_ds.select(range(40)):
        text = tok.decode(row["input_ids"].tolist())
        assert not [d for d in DOMAINS if d in text and d != row["domain"]], (row["domain"], text)
    # with one process, the prepared packing is exactly the streamed hub path's (same documents, same order)
    val = {"train": str(tmp / "validation_00.jsonl"), "validation": str(tmp / "validation_00.jsonl")}
    kw = dict(source="hf", path="json", data_files=val, tokenizer=str(tmp / "tokenizer.json"),
              domain_field="meta.pile_set_name", seq_len=32, micro_batch_size=4)
    one = LMDataModule(**kw).prepare_to(str(tmp / "one_process"), num_proc=1)
    streamer = LMDataModule(**kw)
    streamer.prepare_tokenizer()
    streamed = [row["input_ids"].tolist() for row in streamer._streams()[1]]
    prepared = LMDataModule(source="prepared", dir=str(tmp / "one_process"), seq_len=32, micro_batch_size=4)
    prepared.setup("fit")
    assert one["sequences"]["validation"] == len(streamed) > 10
    assert [x.tolist() for x in prepared.val_ds["input_ids"]] == streamed


def test_prepare_refuses_bad_values_with_one_line_and_never_overwrites(pile):
    tmp, out, overrides, _ = pile
    before = sorted(os.listdir(out))
    p = prepare(tmp, *overrides, check=False)  # out exists
    assert p.returncode == 2 and "out:" in p.stderr + p.stdout and sorted(os.listdir(out)) == before
    p = prepare(tmp, "data=pile", "data.path=json", "data.data_files={train: [/nonexistent.jsonl], validation: "
                "[/nonexistent.jsonl]}", f"data.tokenizer={tmp / 'tokenizer.json'}", f"out={tmp / 'x'}", check=False)
    assert p.returncode == 2 and not (tmp / "x").exists()
    p = prepare(tmp, f"out={tmp / 'y'}", "num_proc=0", check=False)
    assert p.returncode == 2 and "num_proc" in p.stderr + p.stdout and not (tmp / "y").exists()
    p = prepare(tmp, "data=prepared", f"data.dir={out}", f"out={tmp / 'z'}", check=False)
    assert p.returncode == 2 and "already a prepared folder" in p.stderr + p.stdout and not (tmp / "z").exists()


def test_train_from_prepared_resumes_at_the_exact_batch_and_refuses_a_larger_budget(pile, train, tmp_path, cache_dir):
    from remoe.train.record import read_summary
    from test_pipeline import metric_series
    from test_reliability import wait_for_checkpoint

    _, out, _, _ = pile
    rec = read_prepared(str(out))
    args = ["data=prepared", f"data.dir={out}", "size.seq_len=32", "size.global_batch_size=8",
            "size.micro_batch_size=4", "model=remoe", "logger=csv", "eval=none", "trainer.max_steps=12",
            "size.val_interval=6", "size.val_batches=2", "size.ckpt_interval=2", "trainer.enable_progress_bar=false"]
    env = {**os.environ, "REMOE_CACHE": cache_dir, "WANDB_SILENT": "true"}

    def start(run_dir, *extra):
        return subprocess.Popen([sys.executable, str(ROOT / "src" / "train.py"), *args, f"hydra.run.dir={run_dir}",
                                 *extra], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    p = start(ref)
    assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
    q = start(cut)
    wait_for_checkpoint(cut, q)
    q.send_signal(signal.SIGKILL)
    q.wait()
    killed_at = torch.load(cut / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["global_step"]
    r = start(cut, "resume=true")
    assert r.wait(timeout=600) == 0, r.stderr.read()[-3000:]
    a, b = read_summary(ref), read_summary(cut)
    assert a["status"] == b["status"] == "completed" and a["corpus"] == rec["corpus_fingerprint"]
    assert killed_at < 12 and b["val_loss"] == a["val_loss"] and b["lambda"] == a["lambda"]  # bitwise
    assert metric_series(cut, "train/loss")[-1] == metric_series(ref, "train/loss")[-1]
    # a budget beyond the prepared sequences: refused before anything is built
    too_many = rec["sequences"]["train"] // 8 + 1
    p, root = train(*args, f"trainer.max_steps={too_many}", out=tmp_path / "big", check=False)
    assert p.returncode == 2 and "trainer.max_steps" in p.stderr + p.stdout
    assert not list(Path(root).rglob("summary.json"))


def test_prepare_text_files_given_as_a_list(tmp_path):
    """data.files as a YAML list (a ListConfig inside the data module): prepared, recorded as plain JSON, and
    no temporary folder left beside the output."""
    corpus = tmp_path / "corpus" / "docs"
    corpus.mkdir(parents=True)
    words = [f"w{i}" for i in range(200)]
    for i in range(24):  # 24 documents: a 30% split by path hash is empty with probability 0.7^24 (was 0.7^4 = 24%)
        (corpus / f"{i}.txt").write_text(" ".join(words[(i * 7 + j) % 200] for j in range(600)))
    files = sorted(str(p) for p in corpus.glob("*.txt"))
    out = tmp_path / "prepared"
    prepare(tmp_path, "data=text_files", f"data.files=[{','.join(files)}]", "data.vocab_size=300",
            "data.val_percent=30", "size.seq_len=32", f"out={out}", "load_check_batches=2")
    assert read_prepared(str(out))["files"] == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "corpus", "prepared"]
