"""Runs entry scripts exactly as `python src/<script>.py ARGS` runs them (`runpy` as __main__, the script's own
argv), many in one process, so that a table of bad inputs pays Python's and torch's start-up once.

stdin: JSON [[script path, [args ...], cwd], ...]; stdout (last line): JSON [{"rc", "stdout", "stderr"}, ...].
File descriptors 1 and 2 are redirected per call, so whatever a call prints (Python, logging, C code) is
captured. An exception that escapes a script (none should: remoe.cli.guard) is reported as rc "uncaught".
"""

import json
import os
import runpy
import sys
import tempfile
import traceback


def run_one(script: str, args: list[str], cwd: str) -> dict:
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
    argv, here = sys.argv, os.getcwd()
    sys.argv = [script, *args]
    rc = 0
    try:
        os.chdir(cwd)
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        rc = "uncaught"
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        sys.argv = argv
        os.chdir(here)
    texts = []
    for f in (out, err):
        f.seek(0)
        texts.append(f.read().decode("utf-8", "replace"))
        f.close()
    return {"rc": rc, "stdout": texts[0], "stderr": texts[1]}


def main() -> None:
    calls = json.loads(sys.stdin.read())
    results = [run_one(script, args, cwd) for script, args, cwd in calls]
    sys.stdout.write("\n" + json.dumps(results) + "\n")


if __name__ == "__main__":
    main()
