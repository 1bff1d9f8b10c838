"""Data: the stdlib corpus, local BPE, packing, and the text_files source through the shared code paths."""

import torch

from remoe.data import LMDataModule
from remoe.data.corpus import is_validation, stdlib_documents
from remoe.data.datamodule import pack_batch
from remoe.data.tokenizer import EOS, train_bpe


def test_stdlib_corpus_is_deterministic_with_domains():
    a = list(stdlib_documents(max_chars=400_000))
    b = list(stdlib_documents(max_chars=400_000))
    assert a == b and len(a) > 10
    assert {d["domain"] for d in a} == {"code", "prose"}
    assert sum(len(d["text"]) for d in a) <= 400_000


def test_bpe_is_deterministic_and_roundtrips():
    texts = [d["text"] for d in stdlib_documents(max_chars=300_000)]
    t1, t2 = train_bpe(texts, 512), train_bpe(texts, 512)
    assert t1.to_str() == t2.to_str()
    assert t1.get_vocab_size() == 512 and t1.token_to_id(EOS) is not None
    s = "def f(x):\n    return x ** 2  # ünïcode"
    assert t1.decode(t1.encode(s).ids) == s


def test_packing_keeps_one_domain_per_sequence():
    batch = {"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]], "domain": ["a", "b", "a", "b"]}
    out = pack_batch(batch, seq_len=3, eos=0)
    # domain a: 1 2 3 0 6 7 8 9 0 -> [1 2 3 0] [6 7 8 9] ; domain b: 4 5 0 10 0 -> [4 5 0 10]
    # (emitted in the order blocks complete)
    assert out["input_ids"] == [[1, 2, 3, 0], [6, 7, 8, 9], [4, 5, 0, 10]]
    assert out["domain"] == ["a", "a", "b"]


def test_validation_split_is_a_stable_hash():
    ids = [f"doc{i}" for i in range(2000)]
    held = [i for i in ids if is_validation(i, 5.0)]
    assert 50 < len(held) < 150 and held == [i for i in ids if is_validation(i, 5.0)]


def test_text_files_source(tmp_path):
    for dom in ("poems", "recipes"):
        (tmp_path / dom).mkdir()
        for i in range(30):
            (tmp_path / dom / f"{i}.txt").write_text(f"{dom} number {i}. " * 60)
    kw = dict(source="text_files", files=[str(tmp_path / "*" / "*.txt")], seq_len=32, micro_batch_size=4,
              vocab_size=300, val_percent=10.0, cache_dir=str(tmp_path / "cache"), seed=3)
    dm = LMDataModule(**kw)
    dm.setup()
    assert dm.vocab_size == 300
    assert set(dm.train_ds["domain"]) == {"poems", "recipes"}
    assert len(dm.val_ds) > 0
    b1 = next(iter(dm.train_dataloader()))
    assert b1["input_ids"].shape == (4, 33) and b1["input_ids"].dtype == torch.long
    dm2 = LMDataModule(**kw)  # same seed, from the cache: same order
    dm2.setup()
    assert torch.equal(next(iter(dm2.train_dataloader()))["input_ids"], b1["input_ids"])
