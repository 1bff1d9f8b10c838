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


def stdlib_documents(max_chars: int | None = None) -> Iterator[dict]:
    """Code and prose documents from the running Python's standard library, deterministic order."""
    root = sysconfig.get_paths()["stdlib"]
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


def check_text_file(path: str, sniff: int = 1 << 16) -> None:
    """A training text file must be non-empty UTF-8-ish text: raises ValueError naming the file and what is
    wrong (before any data is prepared). Binary = a NUL byte, or more than 10% undecodable bytes, in the
    first 64 KiB."""
    with open(path, "rb") as f:
        head = f.read(sniff)
    if not head:
        raise ValueError(f"data.files: {path} is empty")
    if b"\0" in head or head.decode("utf-8", errors="replace").count("\ufffd") > 0.1 * len(head):
        raise ValueError(f"data.files: {path} is not text (binary content)")


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
