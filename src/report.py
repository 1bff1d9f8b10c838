"""Tables and figures from stored runs: `python src/report.py [--runs DIR ...] [--out outputs/report]`.

A folder holding a report made from other runs is never replaced without --force (its report.json says
which runs it was made from; the same runs, or the same plus new ones, may update it).

`python src/report.py --keep-records SRC DEST` copies the compact record of every completed run under SRC
(summary, resolved config, metrics, routing logs; no checkpoints) to DEST, e.g. reports/runs.

`python src/report.py --compare RUN_A RUN_B [--windows 0-99,100-999]` prints two runs of one setting side by
side (remoe/report/compare.py): provenance, the first step where they part, |Δ train loss| per window, λ and
sparsity where the method has a controller, the outcome."""

import logging
import os
import sys

from remoe.cli import ArgumentParser, UsageError, guard
from remoe.report.build import build_report


def main() -> None:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--runs", nargs="+", default=["outputs"], help="run roots (single runs, multirun folders)")
    p.add_argument("--out", default=os.path.join("outputs", "report"), help="output folder")
    p.add_argument("--bench", nargs="*", default=None,
                   help="bench JSON files/globs (default: bench*.json under the roots)")
    p.add_argument("--notes", default=None, help="a Markdown file whose text heads the index")
    p.add_argument("--keep-records", nargs=2, metavar=("SRC", "DEST"), default=None,
                   help="copy completed runs' compact records from SRC to DEST (existing ones are kept), then stop")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), default=None,
                   help="print two runs of one setting side by side (run folders or kept records), then stop")
    p.add_argument("--windows", default=None, help="with --compare: step windows FIRST-LAST,... (default: the first "
                   "100 steps, then quarters of the run)")
    p.add_argument("--force", action="store_true",
                   help="replace the report in --out even if it was made from other runs, or no run is usable")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if a.windows is not None and not a.compare:
        raise UsageError("--windows: only with --compare")
    if a.compare:
        from remoe.report.compare import compare_runs, parse_windows

        print("\n".join(compare_runs(*a.compare, parse_windows(a.windows) if a.windows else None)))
        return
    if a.keep_records:
        from remoe.train.record import keep_records

        src, dest = a.keep_records
        if not os.path.isdir(src):
            raise UsageError(f"--keep-records: no such folder {src!r}")
        try:
            written = keep_records(src, dest)
        except ValueError as e:
            raise UsageError(f"--keep-records: {e}") from None
        print(f"{len(written)} run records copied to {dest}")
        return
    missing = [r for r in a.runs if not os.path.isdir(r)]
    if missing:
        raise UsageError(f"--runs: no such folder {missing[0]!r}")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        raise UsageError(f"--out: {a.out!r} exists and is not a folder")
    try:
        notes = open(a.notes, encoding="utf-8").read() if a.notes else None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--notes: cannot read {a.notes!r} ({type(e).__name__})") from None
    res = build_report(a.runs, a.out, a.bench, notes, force=a.force)
    if res is None:
        print(f"report: no usable run under {', '.join(a.runs)}; {a.out}/README.md left as it is "
              "(--force writes an empty report)", file=sys.stderr)
        sys.exit(2)
    print(f"{res['runs']} runs, {len(res['skipped'])} skipped; tables: {', '.join(res['tables']) or 'none'}; "
          f"{len(res['figures'])} figures -> {a.out}/README.md")


if __name__ == "__main__":
    guard(main, "report")
