"""One LightningDataModule for every corpus: documents -> tokens -> packed fixed-length sequences.

Map-style sources (`stdlib`, `packages`, `text_files`) are tokenized and packed with `datasets.map` once and cached
on disk under a key of (corpus, tokenizer, seq_len, split); hub corpora (`hf`, e.g. The Pile) stream
through the same tokenize/pack functions with `datasets`' IterableDataset. Each sequence holds seq_len+1
tokens of ONE domain (inputs = [:-1], targets = [1:]), so routing can be analysed per domain.

At scale, any source is tokenized once, in parallel processes, by `src/prepare_data.py` (`prepare_to`) into
a folder of Arrow shards (`datasets`' save_to_disk: memory-mapped, random access) that `data=prepared`
reads through the same ResumableBatchSampler, so a resumed run continues at the exact batch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import time

import lightning as L
import torch
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from datasets.distributed import split_dataset_by_node
from datasets.utils import logging as datasets_logging
from filelock import FileLock
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Sampler

from ..io import default_cache_dir, remove_leftovers
from .corpus import expand_files, fingerprint, is_validation, stdlib_documents, stdlib_key
from .packages import package_documents
from .tokenizer import cached_bpe, eos_id, load_tokenizer

SOURCES = ("stdlib", "packages", "text_files", "hf", "prepared")
PREPARED = "prepared.json"  # what a prepared folder holds (prepare_to); read before any data is built


def _get(example: dict, field: str | None, default: str = "all") -> str:
    """Dotted field lookup ("meta.pile_set_name")."""
    if not field:
        return default
    value = example
    for part in field.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return str(value) if value is not None else default


def tokenize_batch(batch: dict, tokenizer, text_field: str, domain_field: str | None) -> dict:
    n = len(batch[text_field])
    rows = [{k: batch[k][i] for k in batch} for i in range(n)]
    enc = tokenizer.encode_batch(batch[text_field])
    return {"input_ids": [e.ids for e in enc], "domain": [_get(r, domain_field) for r in rows]}


def pack_batch(batch: dict, seq_len: int, eos: int) -> dict:
    """Concatenate documents of the same domain (EOS-separated) and cut blocks of seq_len + 1 tokens."""
    out_ids, out_dom, buffers = [], [], {}
    for ids, dom in zip(batch["input_ids"], batch["domain"]):
        buf = buffers.setdefault(dom, [])
        buf.extend(ids)
        buf.append(eos)
        n = (len(buf) // (seq_len + 1)) * (seq_len + 1)
        for i in range(0, n, seq_len + 1):
            out_ids.append(buf[i : i + seq_len + 1])
            out_dom.append(dom)
        del buf[:n]
    return {"input_ids": out_ids, "domain": out_dom}


def pack_split(docs: Dataset, tokenizer, seq_len: int, text_field: str, domain_field: str | None,
               num_proc: int | None = None) -> Dataset:
    """Documents -> packed sequences of seq_len + 1 tokens (tokenize_batch, pack_batch), in num_proc processes."""
    tok = functools.partial(tokenize_batch, tokenizer=tokenizer, text_field=text_field, domain_field=domain_field)
    pack = functools.partial(pack_batch, seq_len=seq_len, eos=eos_id(tokenizer))
    docs = docs.map(tok, batched=True, remove_columns=docs.column_names, num_proc=num_proc)
    return docs.map(pack, batched=True, batch_size=1000, remove_columns=docs.column_names, num_proc=num_proc)


def read_prepared(folder: str) -> dict:
    """A prepared folder's record (prepared.json); ValueError naming what is wrong."""
    path = os.path.join(folder, PREPARED)
    if not os.path.isfile(path):
        raise ValueError(f"{folder} is not a prepared data folder (no {PREPARED}; make one with src/prepare_data.py)")
    with open(path) as f:
        return json.load(f)


def check_prepare_target(source: str, out: str) -> None:
    """Why `prepare_to` would refuse, said before any work (the CLI asks before it builds the data module)."""
    if source == "prepared":
        raise ValueError("data: already a prepared folder; choose the source to prepare (data=pile, ...)")
    if os.path.exists(out):
        raise ValueError(f"out: {out} exists; prepare into a new folder")


def _remove_stale_partials(out: str) -> None:
    """<out>.partial-<pid> folders of a preparation that was killed (its process is gone)."""

    parent, name = os.path.split(out)
    remove_leftovers(parent or ".", re.escape(name) + r"\.partial-(?P<pid>\d+)")


class ResumableBatchSampler(Sampler):
    """An endless, seeded stream of micro-batches: batch i of rank r is a pure function of (seed, i, r),
    epoch e shuffled by seed + e and dealt round-robin across ranks. A run resumed at micro-batch i sees
    exactly the batches an uninterrupted run would (the data position is global_step x accumulation)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0):
        self.n, self.batch_size, self.seed, self.rank, self.world, self.start = n, batch_size, seed, rank, world, start
        self.per_epoch = n // (batch_size * world)
        if self.per_epoch == 0:
            raise ValueError(f"data: {n} sequences cannot fill one batch of {batch_size} on {world} ranks")

    def __iter__(self):
        i, epoch, perm = self.start, None, None
        while True:
            e, j = divmod(i, self.per_epoch)
            if e != epoch:
                epoch, perm = e, torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + e))
            base = (j * self.world + self.rank) * self.batch_size
            yield perm[base : base + self.batch_size].tolist()
            i += 1


def cached_stdlib_documents(cache_dir: str, max_chars: int | None = None, root: str | None = None) -> Dataset:
    """stdlib_documents as a Dataset, kept in the cache under stdlib_key (which changes with the files, the
    Python version and the extraction code): a run start loads it instead of parsing the library again."""
    path = os.path.join(cache_dir, f"stdlib-docs-{stdlib_key(max_chars, root)}")
    os.makedirs(cache_dir, exist_ok=True)
    with FileLock(path + ".lock"):
        if not os.path.exists(os.path.join(path, "dataset_info.json")):
            for stale in (path, path + ".tmp"):  # what a killed build left
                shutil.rmtree(stale, ignore_errors=True)
            on = datasets_logging.is_progress_bar_enabled()
            datasets_logging.disable_progress_bar()  # a cache entry, not news
            try:
                Dataset.from_list(list(stdlib_documents(max_chars, root))).save_to_disk(path + ".tmp")
            finally:
                if on:
                    datasets_logging.enable_progress_bar()
            os.replace(path + ".tmp", path)
    return load_from_disk(path)


class LMDataModule(L.LightningDataModule):
    def __init__(
        self,
        source: str = "stdlib",
        seq_len: int = 128,
        micro_batch_size: int = 16,
        eval_batch_size: int | None = None,
        tokenizer: str | None = None,  # None: train a byte-level BPE on the corpus; else name or path
        vocab_size: int = 4096,  # of the locally trained BPE
        val_percent: float = 2.0,  # share of documents held out (map-style sources)
        max_chars: int | None = None,  # stdlib: cap on corpus size
        files: list[str] | str | None = None,  # text_files: paths or globs; domain = parent folder
        path: str | None = None,  # hf: dataset on the hub (or a builder: json, parquet, with data_files)
        name: str | None = None,
        data_files: dict | list | str | None = None,  # hf: local files in the hub dataset's format
        train_split: str = "train",
        val_split: str = "validation",
        text_field: str = "text",
        domain_field: str | None = None,
        streaming: bool = True,
        shuffle_buffer: int = 10_000,
        val_sequences: int = 512,  # hf: validation sequences taken from val_split
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | None = None,
        dir: str | None = None,  # prepared: the folder src/prepare_data.py wrote
    ):
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"data.source: unknown source {source!r}; choose one of {SOURCES}")
        self.source, self.seq_len = source, seq_len
        self.micro_batch_size = micro_batch_size
        self.eval_batch_size = eval_batch_size or micro_batch_size
        self.tokenizer_name, self.bpe_vocab = tokenizer, vocab_size
        self.val_percent, self.max_chars, self.files = val_percent, max_chars, files
        self.path, self.name, self.train_split, self.val_split = path, name, train_split, val_split
        if OmegaConf.is_config(data_files):  # from Hydra: datasets wants plain dicts/lists
            data_files = OmegaConf.to_container(data_files, resolve=True)
        if OmegaConf.is_config(files):  # and prepared.json records them as JSON
            self.files = OmegaConf.to_container(files, resolve=True)
        self.data_files, self.dir = data_files, dir
        self.text_field, self.domain_field = text_field, domain_field
        self.streaming, self.shuffle_buffer, self.val_sequences = streaming, shuffle_buffer, val_sequences
        self.num_workers, self.seed = num_workers, seed
        self.cache_dir = cache_dir or default_cache_dir()
        self.tokenizer = None
        self.train_ds = self.val_ds = None
        self.start_batch = 0  # micro-batches already consumed (set from a checkpoint on resume)
        self.corpus_fingerprint: str | None = None

    # ---- documents and tokenizer ---------------------------------------------------------------
    def documents(self) -> Dataset:
        if self.source == "stdlib":
            return cached_stdlib_documents(self.cache_dir, self.max_chars)
        if self.source == "packages":
            return package_documents(self.cache_dir)
        if self.source == "text_files":
            rows = []
            for path in expand_files(self.files or []):
                with open(path, encoding="utf-8", errors="replace") as f:
                    rows.append({"text": f.read(), "domain": os.path.basename(os.path.dirname(path)) or "all",
                                 "source": os.path.basename(path), "doc_id": os.path.abspath(path)})
            return Dataset.from_list(rows)
        raise ValueError("documents() is for map-style sources; hf streams")

    def prepare_tokenizer(self):
        """Load or train the tokenizer (cheap after the first time); sets self.vocab_size."""
        if self.tokenizer is not None:
            return self.tokenizer
        if self.source == "prepared":
            self.corpus_fingerprint = read_prepared(self.dir)["corpus_fingerprint"]
            self.tokenizer = load_tokenizer(os.path.join(self.dir, "tokenizer.json"))
        elif self.source == "hf" or self.tokenizer_name:
            if not self.tokenizer_name:
                raise ValueError("data.tokenizer: hub corpora need a tokenizer name (e.g. gpt2)")
            self.tokenizer = load_tokenizer(self.tokenizer_name)
        else:
            docs = self._docs = self.documents()
            self.corpus_fingerprint = fingerprint(
                [hashlib.sha256(t.encode()).hexdigest() for t in docs["text"]] + list(docs["doc_id"])
            )
            self.tokenizer = cached_bpe(
                self.cache_dir, self.corpus_fingerprint, lambda: iter(list(docs["text"])), self.bpe_vocab
            )
        return self.tokenizer

    @property
    def train_sequences(self) -> int | None:
        """The training split's sequences (None for a streamed corpus, whose length is not known)."""
        self.setup("fit")
        return len(self.train_ds) if hasattr(self.train_ds, "__len__") else None

    @property
    def vocab_size(self) -> int:
        return self.prepare_tokenizer().get_vocab_size()

    # ---- packed splits --------------------------------------------------------------------------
    def _packed_cache_path(self) -> str:
        tok_hash = hashlib.sha256(self.tokenizer.to_str().encode()).hexdigest()[:12]
        key = fingerprint([self.source, self.corpus_fingerprint or "", tok_hash, str(self.seq_len),
                           str(self.val_percent)])
        return os.path.join(self.cache_dir, f"packed-{self.source}-{key}")

    def prepare_data(self) -> None:
        self.prepare_tokenizer()
        if self.source in ("hf", "prepared"):
            return
        path = self._packed_cache_path()
        os.makedirs(self.cache_dir, exist_ok=True)
        with FileLock(path + ".lock"):
            if os.path.exists(os.path.join(path, "dataset_dict.json")):
                return
            self._packed_splits().save_to_disk(path + ".tmp")
            os.replace(path + ".tmp", path)

    def _packed_splits(self, num_proc: int | None = None) -> DatasetDict:
        """Both splits packed: map-style sources split by document (is_validation); hub corpora read train_split
        and the first val_sequences of val_split, whole (not streamed)."""
        self.prepare_tokenizer()
        splits = {}
        if self.source == "hf":
            for split, name in (("train", self.train_split), ("validation", self.val_split)):
                docs = load_dataset(self.path, self.name, split=name, data_files=self.data_files)
                splits[split] = pack_split(docs, self.tokenizer, self.seq_len, self.text_field, self.domain_field,
                                           num_proc)
            val = splits["validation"]
            splits["validation"] = val.select(range(min(len(val), self.val_sequences)))
        else:
            docs = getattr(self, "_docs", None) or self.documents()
            is_val = [is_validation(d, self.val_percent) for d in docs["doc_id"]]
            for split, keep in (("train", False), ("validation", True)):
                part = docs.select([i for i, v in enumerate(is_val) if v == keep])
                splits[split] = pack_split(part, self.tokenizer, self.seq_len, "text", "domain", num_proc)
        for split, ds in splits.items():
            if len(ds) == 0:
                raise ValueError(f"data: the {split} split holds no sequence of {self.seq_len + 1} tokens")
        return DatasetDict(splits)

    def prepare_to(self, out: str, num_proc: int = 1) -> dict:
        """Tokenize and pack this source once into `out` (Arrow shards + tokenizer.json + prepared.json), in
        num_proc processes; returns the record. `out` must not exist (nothing is overwritten)."""
        check_prepare_target(self.source, out)
        t0 = time.perf_counter()
        splits = self._packed_splits(num_proc)
        tokenize_s = time.perf_counter() - t0
        out = out.rstrip("/")
        _remove_stale_partials(out)
        tmp = f"{out}.partial-{os.getpid()}"
        try:
            record = self._write_prepared(splits, tmp, num_proc, t0, tokenize_s)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return record

    def _write_prepared(self, splits: DatasetDict, tmp: str, num_proc: int, t0: float, tokenize_s: float) -> dict:
        splits.save_to_disk(tmp, num_proc=num_proc)
        self.tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        n = {k: len(v) for k, v in splits.items()}
        tokens = n["train"] * (self.seq_len + 1)
        record = {"source": self.source, "path": self.path, "name": self.name, "data_files": self.data_files,
                  "files": self.files, "seq_len": self.seq_len, "sequences": n, "train_tokens": tokens,
                  "vocab_size": self.vocab_size, "corpus_fingerprint": self.corpus_fingerprint or fingerprint(
                      [self.source, str(self.path), str(self.name), json.dumps(self.data_files, sort_keys=True)]),
                  "num_proc": num_proc, "seconds": time.perf_counter() - t0,
                  "tokens_per_s_per_process": (tokens + n["validation"] * (self.seq_len + 1)) / tokenize_s / num_proc}
        with open(os.path.join(tmp, PREPARED), "w") as f:
            json.dump(record, f, indent=1)
        return record

    def setup(self, stage: str | None = None) -> None:
        if self.train_ds is not None:
            return
        self.prepare_data()
        if self.source == "hf":
            self.train_ds, self.val_ds = self._streams()
            return
        dd = load_from_disk(self.dir if self.source == "prepared" else self._packed_cache_path())
        dd.set_format("torch", columns=["input_ids"], output_all_columns=True)
        self.train_ds, self.val_ds = dd["train"], dd["validation"]

    def _streams(self):
        tok = functools.partial(tokenize_batch, tokenizer=self.tokenizer, text_field=self.text_field,
                                domain_field=self.domain_field)
        pack = functools.partial(pack_batch, seq_len=self.seq_len, eos=eos_id(self.tokenizer))

        def stream(split):
            ds = load_dataset(self.path, self.name, split=split, data_files=self.data_files, streaming=True)
            if self.trainer is not None and self.trainer.world_size > 1:
                ds = split_dataset_by_node(ds, rank=self.trainer.global_rank, world_size=self.trainer.world_size)
            cols = ds.column_names or [self.text_field]
            return ds.map(tok, batched=True, remove_columns=cols).map(pack, batched=True)

        train = stream(self.train_split).shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        val = stream(self.val_split).take(self.val_sequences)
        return train.with_format("torch"), val.with_format("torch")

    def validation_texts(self, max_docs: int = 2000) -> list[str]:
        """Held-out documents as text (for the offline evaluation suite), in a fixed order."""
        if self.source == "hf":
            ds = load_dataset(self.path, self.name, split=self.val_split, data_files=self.data_files, streaming=True)
            return [str(x[self.text_field]) for x in ds.take(max_docs)]
        if self.source == "prepared":  # the documents are not kept: the held-out sequences, decoded
            self.setup()
            tok = self.prepare_tokenizer()
            return [tok.decode(list(map(int, ids))) for ids in self.val_ds[:max_docs]["input_ids"]]
        docs = getattr(self, "_docs", None) or self.documents()
        return [t for t, i in zip(docs["text"], docs["doc_id"]) if is_validation(i, self.val_percent)][:max_docs]

    # ---- loaders --------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        if self.source == "hf":  # streamed: shuffled by a buffer, split by node; restarts from the top on resume
            return DataLoader(self.train_ds, batch_size=self.micro_batch_size, num_workers=self.num_workers,
                              collate_fn=collate)
        t = self.trainer
        rank, world = (t.global_rank, t.world_size) if t is not None else (0, 1)
        sampler = ResumableBatchSampler(len(self.train_ds), self.micro_batch_size, self.seed, rank, world,
                                        self.start_batch)
        return DataLoader(self.train_ds, batch_sampler=sampler, num_workers=self.num_workers, collate_fn=collate)

    # the data position travels in Lightning checkpoints (saved at optimizer-step boundaries)
    def state_dict(self) -> dict:
        t = self.trainer
        return {"micro_batches": t.global_step * t.accumulate_grad_batches} if t is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self.start_batch = int(state.get("micro_batches", 0))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_ds, batch_size=self.eval_batch_size, shuffle=False,
                          num_workers=self.num_workers, collate_fn=collate)


def collate(rows: list[dict]) -> dict:
    ids = [r["input_ids"] if torch.is_tensor(r["input_ids"]) else torch.tensor(r["input_ids"]) for r in rows]
    return {"input_ids": torch.stack(ids).long(), "domain": [r["domain"] for r in rows]}
