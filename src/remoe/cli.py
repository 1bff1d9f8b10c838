"""What every entry script does with what goes wrong: bad input is one line on stderr naming the key or
file, exit code 2, before any compute; nothing prints a traceback unless the user asks for one.

- UsageError (and its subclasses: train.spec.ConfigError, export.ExportError) and Hydra's / OmegaConf's own
  errors about the command line or the config (an unknown group option, a key not in the config, bad
  override syntax) -> `<prog>: config error: <first line>`, exit 2.
- A file system that is full or read-only, a path that cannot be written -> one line naming it, exit 2.
- Ctrl-C outside training (training handles its own: it checkpoints) -> one line, exit 130.
- A run that started and failed (its record written, traceback included): one line naming it, exit 1.
- Anything else is a defect, not bad input: one line with its type and message, exit 1, and the whole
  traceback in a file whose path that line gives (nothing is lost).

HYDRA_FULL_ERROR=1 (Hydra's own switch) keeps every traceback as it is. To see Hydra's errors at all, the
guard sets HYDRA_FULL_ERROR=1 itself (Hydra then re-raises instead of printing several lines and exiting
1) and remembers in REMOE_FULL_ERROR whether the user had asked; child processes inherit both.
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import sys
import tempfile
import time
import traceback

USER_CHOICE = "REMOE_FULL_ERROR"  # "1": the user set HYDRA_FULL_ERROR=1 (show tracebacks)
DISK_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG)


class UsageError(ValueError):
    """Bad input: the message is one line that starts with the key or file a user gave."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are a UsageError (one line via guard), not usage text + error."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


class RunFailed(RuntimeError):
    """A run that started and failed, its record (status, error, traceback) already written: exit 1, one
    line naming the record."""


def unwritable(path: str) -> str | None:
    """The nearest existing folder at or above `path` when this process cannot write into it (permissions, a
    read-only file system), else None: what a command checks before it works toward writing there."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return None if os.access(probe, os.W_OK) else probe


def first_line(text: str, limit: int = 1000) -> str:
    line = next((x.strip() for x in str(text).splitlines() if x.strip()), "")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _is_config_error(e: BaseException) -> bool:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return isinstance(e, (UsageError, HydraException, OmegaConfBaseException))


def describe(e: BaseException) -> tuple[int, str]:
    """(exit code, one line) for an exception that reached an entry script."""
    if _is_config_error(e):
        msg = first_line(e)
        cause = e.__cause__ or e.__context__
        why = first_line(cause) if cause is not None and _is_config_error(cause) else ""
        if not isinstance(e, UsageError) and why and why not in msg and "$" not in why:
            msg = f"{msg} ({why})"
        return 2, msg if msg.startswith("config error") else f"config error: {msg}"
    if isinstance(e, RunFailed):
        return 1, str(e)
    if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
        where = e.filename or "the output folder"
        return 2, f"cannot write {where}: {os.strerror(e.errno)}"
    return 1, f"{type(e).__name__}: {first_line(e) or '(no message)'}"


def _save_traceback(prog: str, e: BaseException) -> str | None:
    """The whole traceback of a defect, kept in a file (the one line on the terminal names it)."""
    text = "".join(traceback.format_exception(e))
    try:
        fd, path = tempfile.mkstemp(prefix=f"remoe-{prog}-{time.strftime('%Y%m%d-%H%M%S')}-",
                                    suffix=".traceback.txt")
        with os.fdopen(fd, "w") as f:
            f.write(" ".join(sys.argv) + "\n\n" + text)
        return path
    except OSError:
        return None


def fail(e: BaseException, prog: str):
    """Report an exception that reached an entry script in one line and exit with its code (or re-raise it
    whole when the user asked for tracebacks with HYDRA_FULL_ERROR=1)."""
    if os.environ.get(USER_CHOICE) == "1":
        raise e
    if isinstance(e, KeyboardInterrupt):
        code, line = 130, "interrupted"
    else:
        code, line = describe(e)
    if code == 1 and not isinstance(e, RunFailed):
        path = _save_traceback(prog, e)
        line += f" (a defect, please report it; traceback in {path})" if path else " (a defect)"
    print(f"{prog}: {line}", file=sys.stderr, flush=True)
    raise SystemExit(code) from None


def guard(main, prog: str):
    """Run an entry script's main() under the rules above; returns what main returns."""
    if USER_CHOICE not in os.environ:
        os.environ[USER_CHOICE] = "1" if os.environ.get("HYDRA_FULL_ERROR") == "1" else "0"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises its errors; this function reports them
    try:
        return main()
    except SystemExit:
        raise
    except BrokenPipeError:  # the reader of stdout went away (`report.py --compare A B | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail again
        raise SystemExit(0) from None
    except BaseException as e:
        fail(e, prog)


def task(prog: str):
    """For a Hydra task function: report its errors here (as SystemExit, which Hydra lets through), not
    through Hydra, which would first print "Error executing job with overrides: [...]"."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(cfg):
            try:
                return fn(cfg)
            except SystemExit:
                raise
            except BaseException as e:
                fail(e, prog)
        return run
    return wrap
