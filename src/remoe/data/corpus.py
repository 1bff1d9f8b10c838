"""Text sources -> documents {"text", "domain", "source", "doc_id"}.

The embedded default, `stdlib`, needs no network on any machine: the Python standard library's own
sources (domain "code") and their docstrings (domain "prose"), read in sorted order so the corpus is
identical wherever the same Python version runs. `source` is the top-level module, a finer domain.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import os
import sys
import sysconfig
from collections.abc import Iterator

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "_bundled"}


def _stdlib_files(root: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return sorted(out)


def _docstrings(source: str) -> str:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                docs.append(doc)
    return "\n\n".join(docs)


def stdlib_documents(max_chars: int | None = None, root: str | None = None) -> Iterator[dict]:
    """Code and prose documents from the running Python's standard library (or the .py files under `root`),
    deterministic order."""
    root = root or sysconfig.get_paths()["stdlib"]
    total = 0
    for path in _stdlib_files(root):
        rel = os.path.relpath(path, root)
        module = rel.split(os.sep)[0].removesuffix(".py")
        with open(path, encoding="utf-8", errors="replace") as f:
            code = f.read()
        for domain, text in (("code", code), ("prose", _docstrings(code))):
            if not text.strip():
                continue
            if max_chars is not None and total + len(text) > max_chars:
                return
            total += len(text)
            yield {"text": text, "domain": domain, "source": module, "doc_id": f"{rel}:{domain}"}


def stdlib_key(max_chars: int | None = None, root: str | None = None) -> str:
    """What stdlib_documents' output depends on, cheaply: this module's code, the Python version, max_chars,
    and every file's path, size and modification time (no file is read). The documents are cached under it
    (datamodule: reading and parsing the ~730 files took 3-7 s at every run start)."""
    root = root or sysconfig.get_paths()["stdlib"]
    h = hashlib.sha256()
    with open(__file__, "rb") as f:
        h.update(f.read())
    h.update(f"{sys.version}\0{os.path.realpath(root)}\0{max_chars}\0".encode())
    for path in _stdlib_files(root):
        st = os.stat(path)
        h.update(f"{os.path.relpath(path, root)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


def expand_files(patterns: list[str] | str) -> list[str]:
    """Local files/globs, sorted; a clear error when a pattern matches nothing, or only folders."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    files = []
    for p in patterns:
        matched = sorted(glob.glob(os.path.expanduser(p), recursive=True))
        if not matched:
            raise FileNotFoundError(f"data.files: {p!r} matches no readable file")
        found = [m for m in matched if os.path.isfile(m)]
        if not found:
            raise FileNotFoundError(f"data.files: {p!r} matches only folders; give files or a glob such as "
                                    f"'{os.path.join(p, '**', '*.txt')}'")
        files.extend(found)
    return files


MAX_WORD = 100_000  # characters of one pre-tokenized word: the BPE trainer's time grows ~quadratically in it


def check_text_file(path: str, sniff: int = 1 << 16, chunk: int = 1 << 22) -> None:
    """A training text file must be non-empty UTF-8-ish text that a BPE can be trained on: raises ValueError
    naming the file and what is wrong (before any data is prepared). Binary = a NUL byte, or more than 10%
    undecodable bytes, in the first 64 KiB. A "word" (what the byte-level pre-tokenizer keeps together: a run
    of letters, of digits or of punctuation) longer than MAX_WORD characters is refused: the BPE trainer
    takes ~2 s at 80,000 characters and ~20 minutes at 2 million (measured), so one such line would stall
    preparation. Whole file read once, in chunks."""
    with open(path, "rb") as f:
        head = f.read(sniff)
    if not head:
        raise ValueError(f"data.files: {path} is empty")
    if b"\0" in head or head.decode("utf-8", errors="replace").count("\ufffd") > 0.1 * len(head):
        raise ValueError(f"data.files: {path} is not text (binary content)")
    longest = _longest_word(path, chunk)
    if longest > MAX_WORD:
        raise ValueError(f"data.files: {path} holds a word of {longest:,} characters (letters, digits or "
                         f"punctuation without a break; at most {MAX_WORD:,}): training a tokenizer on it would "
                         "stall; break such lines up or leave the file out")


def _longest_word(path: str, chunk: int) -> int:
    """The longest word (over MAX_WORD characters; else 0) the byte-level pre-tokenizer makes of the file:
    whitespace-separated runs first (linear), the exact pre-tokenizer only on runs longer than MAX_WORD. A
    run still open at the end of a block is carried into the next, at most ~4 MAX_WORD characters of it."""
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str
    longest, carry = 0, ""
    with open(path, encoding="utf-8", errors="replace") as f:
        while True:
            block = f.read(chunk)
            text = carry + block
            runs = text.split()
            carry = runs.pop() if runs and block and not text[-1].isspace() else ""  # it may go on
            for run in runs:
                if len(run) > MAX_WORD:
                    longest = max(longest, max(len(w) for w, _ in split(run)))
            if len(carry) > 4 * MAX_WORD:  # a run that long: its finished words now, its last one carried
                words = [w for w, _ in split(carry)]
                longest = max(longest, max(len(w) for w in words))
                if longest > MAX_WORD:
                    return longest
                carry = words[-1]
            if not block:
                return longest


def fingerprint(parts: list[str]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def is_validation(doc_id: str, val_percent: float) -> bool:
    """Held-out split by a hash of the document id: fixed across seeds, runs and machines."""
    bucket = int(hashlib.md5(doc_id.encode()).hexdigest(), 16) % 10000
    return bucket < val_percent * 100
