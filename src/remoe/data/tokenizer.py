"""Tokenizers: a byte-level BPE trained locally with `tokenizers` (cached by corpus fingerprint), or a
named pretrained one (e.g. "gpt2", fetched by `tokenizers` from the HF hub)."""

from __future__ import annotations

import os
from collections.abc import Iterable

from filelock import FileLock
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def cached_bpe(cache_dir: str, key: str, texts_fn, vocab_size: int) -> Tokenizer:
    """Train once per (corpus, vocab size); later runs and other ranks load the same file."""
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"bpe-{key}-{vocab_size}.json")
    with FileLock(path + ".lock"):
        if not os.path.exists(path):
            tok = train_bpe(texts_fn(), vocab_size)
            tmp = path + ".tmp"
            tok.save(tmp)
            os.replace(tmp, path)
    return Tokenizer.from_file(path)


def load_tokenizer(name_or_path: str) -> Tokenizer:
    if os.path.exists(name_or_path):
        return Tokenizer.from_file(name_or_path)
    return Tokenizer.from_pretrained(name_or_path)


def eos_id(tok: Tokenizer) -> int:
    i = tok.token_to_id(EOS)
    if i is None:
        raise ValueError(f"tokenizer has no {EOS!r} token")
    return i
