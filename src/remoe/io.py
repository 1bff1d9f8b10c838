"""Small file-system helpers every part shares: atomic writes (readers never see half a file), deterministic xz
compression, leftovers of killed processes, and a folder owned by one process at a time (RunLock)."""

from __future__ import annotations

import fcntl
import json
import lzma
import os
import re
import shutil
import socket
import tempfile
import time


def default_cache_dir() -> str:
    """Where tokenizers, packed corpora and machine measurements are cached: $REMOE_CACHE, else ~/.cache/remoe."""
    return os.environ.get("REMOE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "remoe"))


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


def compress_file(src: str, dest: str) -> None:
    """xz-compress `src` into `dest` (deterministic: the same bytes give the same file), written beside it and
    renamed into place."""
    tmp = dest + ".partial"
    with open(src, "rb") as f, lzma.open(tmp, "wb", preset=9 | lzma.PRESET_EXTREME) as out:
        shutil.copyfileobj(f, out)
    os.replace(tmp, dest)


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine is still running (for leftovers named by their writer's pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(folder: str, pattern: str) -> list[str]:
    """Remove the entries of `folder` whose name matches `pattern` (a regex with a `pid` group: the process
    that wrote it) when that process is gone: the temporary file or folder of a save, export, preparation or
    report build that was killed midway. Returns what was removed."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for entry in sorted(os.listdir(folder)):
        m = re.fullmatch(pattern, entry)
        if m and not pid_alive(int(m.group("pid"))):
            path = os.path.join(folder, entry)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
            removed.append(path)
    return removed


class RunFolderBusy(RuntimeError):
    """Another live process owns the run folder."""


class RunLock:
    """Ownership of a run folder for one training process: `run.lock` holds an exclusive flock (released
    by the kernel when the process dies, however it dies) and names its owner (pid, host, start time). A
    second process gets RunFolderBusy naming the owner; a lock file left by a dead process is taken over
    with a warning."""

    NAME = "run.lock"

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, self.NAME)
        self._f = None

    def acquire(self) -> str | None:
        """Returns a warning to log when a stale lock was taken over, else None."""

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            owner = f.read().strip() or "another process"
            f.close()
            raise RunFolderBusy(f"{os.path.dirname(self.path)} is in use by {owner}; wait for it to end, or "
                                "give this run another name or folder") from None
        f.seek(0)
        previous = f.read().strip()
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self._f = f
        return f"took over a stale {self.NAME} ({previous}: no longer running)" if previous else None

    def release(self) -> None:
        if self._f is not None:

            self._f.seek(0)
            self._f.truncate()  # an empty lock file: nobody owns the folder
            fcntl.flock(self._f, fcntl.LOCK_UN)
            self._f.close()
            self._f = None
