"""Which code and which machine a report's runs come from: commits, whether their model/data code differs,
the CPUs they trained on, and the pairing key of the report's paired tests (same seed, CPU model and
model/data code: only then do two runs see the same batches along the same float path)."""

from __future__ import annotations

import os
import subprocess
from functools import cache

import pandas as pd

CODE_PATHS = ("src/remoe/model", "src/remoe/data")  # the code that decides a run's numbers at a seed


def code_differs(commits: list[str | None], paths: tuple[str, ...] = CODE_PATHS) -> bool | None:
    """Whether the model or data code differs between these commits; None when it cannot be told (a
    commit unknown here, a run from a dirty tree, no git)."""
    found = sorted(set(commits), key=str)
    if any(c is None or c.endswith("-dirty") for c in found):
        return None  # a dirty tree's code is not known from its commit
    if len(found) == 1:
        return False
    here = os.path.dirname(os.path.abspath(__file__))
    top = [f":(top){p}" for p in paths]  # pathspecs from the repository's top, whatever the working folder
    try:
        rcs = [subprocess.run(["git", "diff", "--quiet", found[0], c, "--", *top], cwd=here,
                              capture_output=True, timeout=30).returncode for c in found[1:]]
    except (OSError, subprocess.SubprocessError):
        return None
    return None if any(rc not in (0, 1) for rc in rcs) else any(rc == 1 for rc in rcs)


def provenance(df, runs: list[str]) -> str:
    """Which commits a table's runs were trained with, whether their model/data code differs, and whether
    same-seed runs saw the same batches (same corpus and data code)."""
    if not runs:
        return "Rests on benchmark JSON and the paper only (no training run)."
    sel = df[df["run_dir"].isin(runs)]
    commits = [c if isinstance(c, str) else None for c in sel["git_commit"]]
    short = lambda c: "unknown" if c is None else c[:12] + ("-dirty" if c.endswith("-dirty") else "")  # noqa: E731
    names = ", ".join(f"{short(c)} ({commits.count(c)})" for c in sorted(set(commits), key=str))
    differs = code_differs(commits)
    note = {False: "one model/data code", True: "**warning: the model/data code differs between these "
            "commits — rows may not be comparable**", None: "whether the model/data code differs cannot be "
            "checked here (unknown or dirty commits)"}[differs]
    same_batches = differs is False and sel["corpus"].nunique(dropna=False) == 1
    batches = ("runs at the same seed saw the same batches" if same_batches else
               "same-seed runs are not known to have seen the same batches")
    cpus = [c if isinstance(c, str) else None for c in sel["cpu_model"]]
    machines = ", ".join(f"{m or 'unknown'} ({cpus.count(m)})" for m in sorted(set(cpus), key=str))
    mixed = (" **Trained on different CPUs (or thread counts): their float kernels round differently, and a routed model's run "
             "takes another path at the same seed (docs/reproducibility.md).**" if len(set(cpus)) > 1 else "")
    return f"Runs: {len(sel)}, trained at commit(s) {names} on {machines}; {note}; {batches}.{mixed}"


@cache
def _same_code(a: str, b: str) -> bool:
    return code_differs([a, b]) is False  # unknown (a dirty tree, no git): not the same


def code_classes(commits: pd.Series) -> pd.Series:
    """Each run's model/data code as a class: commits whose CODE_PATHS are identical share one (the first
    such commit names it); an unknown or dirty commit is a class of its own."""
    reps: list[str] = []
    out = {}
    for c in sorted({c for c in commits if isinstance(c, str)}):
        out[c] = next((r for r in reps if _same_code(r, c)), None) or c
        if out[c] == c:
            reps.append(c)
    return commits.map(lambda c: out.get(c, "unknown") if isinstance(c, str) else "unknown")


def pair_key(df: pd.DataFrame) -> pd.Series:
    """(seed, CPU model, code class) of each run: the report pairs two runs only when all three are equal."""
    cpu = df["cpu_model"].where(df["cpu_model"].notna(), "unknown") if "cpu_model" in df else "unknown"
    code = code_classes(df["git_commit"]) if "git_commit" in df else "unknown"
    keys = pd.DataFrame({"seed": df["seed"], "cpu": cpu, "code": code}, index=df.index)
    return pd.Series(list(keys.itertuples(index=False, name=None)), index=df.index, dtype=object)


def with_pairs(df: pd.DataFrame) -> pd.DataFrame:
    """df with each run's pairing key as column "pair": computed over the whole frame, so that commits of
    one model/data code share one class."""
    return df if "pair" in df else df.assign(pair=pair_key(df))


def by_pair(g: pd.DataFrame, col: str = "val_loss") -> pd.Series:
    """A column indexed by each run's pairing key (g from with_pairs): the tests pair two runs only where
    the whole key is equal."""
    return pd.Series(g[col].to_numpy(), index=pd.Index(g["pair"], tupleize_cols=False))
