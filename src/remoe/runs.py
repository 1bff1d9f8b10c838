"""The run-directory contract: summary.json (written atomically), provenance (git commit, versions).

The report stage reads only run directories, so everything it needs is written here as plain JSON.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata

SUMMARY = "summary.json"
PACKAGES = ("torch", "lightning", "hydra-core", "omegaconf", "wandb", "lm_eval", "datasets", "tokenizers", "remoe")


def write_json_atomic(path: str, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_text_atomic(path: str, text: str | bytes) -> None:
    """Temp file in the same folder + os.replace: readers never see a half-written file."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode() if isinstance(text, str) else text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_summary(run_dir: str) -> dict | None:
    try:
        with open(os.path.join(run_dir, SUMMARY)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def git_commit(path: str | None = None) -> str | None:
    """Commit of the code that ran (with "-dirty" when the tree has uncommitted changes)."""
    cwd = path or os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str | None]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
