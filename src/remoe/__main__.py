"""`remoe <verb> [args]` (or `python -m remoe <verb>`): one command for the entry scripts, litgpt-style.

Each verb runs `src/<verb>.py` with the same arguments, exactly as `python src/<verb>.py args` would (Hydra
overrides or flags; the same exit codes): the scripts stay the documented way in, this is a shorter one. The
scripts and conf/ live in the repository, so the command works from an editable install (`pip install -e .`).
"""

from __future__ import annotations

import ast
import os
import runpy
import sys

from .cli import guard

SRC = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository's src/
VERBS = {"train": "train.py", "evaluate": "evaluate.py", "report": "report.py", "bench": "bench.py",
         "export": "export.py", "plan": "plan.py", "prepare-data": "prepare_data.py"}


def _summary(script: str) -> str:
    """The first line of a script's docstring (its usage)."""
    try:
        with open(script, encoding="utf-8") as f:
            doc = ast.get_docstring(ast.parse(f.read())) or ""
    except OSError:
        return "(not found: remoe runs the scripts of an editable install's src/)"
    return doc.splitlines()[0] if doc else ""


def usage() -> str:
    lines = ["usage: remoe <verb> [args]   (the same arguments as python src/<verb>.py)", "", "verbs:"]
    lines += [f"  {verb:<13} {_summary(os.path.join(SRC, script))}" for verb, script in VERBS.items()]
    return "\n".join(lines)


def main() -> None:
    guard(_main, "remoe")  # e.g. `remoe --help | head`: no traceback


def _main() -> None:
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return
    verb, rest = args[0], args[1:]
    if verb not in VERBS:
        print(f"remoe: no verb {verb!r}; one of {', '.join(VERBS)} (remoe --help)", file=sys.stderr)
        raise SystemExit(2)
    script = os.path.join(SRC, VERBS[verb])
    if not os.path.isfile(script):
        print(f"remoe: {script} not found: the verbs run the repository's scripts (pip install -e .)", file=sys.stderr)
        raise SystemExit(2)
    sys.argv = [script, *rest]  # what the script, Hydra and Lightning's DDP relaunch read
    sys.path.insert(0, SRC)
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
