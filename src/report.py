"""Regenerate tables and figures from stored runs: `python src/report.py [--runs DIR ...] [--out reports]`."""

import argparse
import logging

from remoe.report import build_report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", nargs="+", default=["outputs"], help="run roots (single runs, multirun folders)")
    p.add_argument("--out", default="reports", help="output folder")
    p.add_argument("--bench", nargs="*", default=None, help="bench JSON files/globs (default: bench*.json under the roots)")
    p.add_argument("--notes", default=None, help="a Markdown file whose text heads the index")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    notes = open(a.notes).read() if a.notes else None
    res = build_report(a.runs, a.out, a.bench, notes)
    print(f"{res['runs']} runs, {len(res['skipped'])} skipped; tables: {', '.join(res['tables']) or 'none'}; "
          f"{len(res['figures'])} figures -> {a.out}/README.md")


if __name__ == "__main__":
    main()
