"""A replication run whose λ stuck (897bd36: ReMoE G=4 seed 2, λ0 = 1) against the same run with λ floored
(64fb89e).
Usage: python reports/lambda_floor/compare.py <run at 897bd36> <run at 64fb89e>"""
import json
import sys

import numpy as np

from remoe.model import LAMBDA_FLOOR
from remoe.report.collect import read_metrics  # metrics.csv, or a kept record's metrics.csv.xz


def load(run_dir):
    m = read_metrics(run_dir)
    steps = m[m["train/lambda"].notna()][["step", "train/lambda", "train/sparsity", "train/loss"]]
    return steps.set_index("step"), json.load(open(f"{run_dir}/summary.json"))


(ta, ja), (tb, jb) = load(sys.argv[1]), load(sys.argv[2])
target = ja["target_sparsity"]
n = min(len(ta), len(tb))
same_loss = ta["train/loss"].values[:n] == tb["train/loss"].values[:n]
same = same_loss & (ta["train/lambda"].values[:n] == tb["train/lambda"].values[:n])


def first_diff(eq):
    """Index of the first False, or n when all are equal."""
    return n if eq.all() else int(np.argmin(eq))


first = first_diff(same)
print("identical λ and loss through step", ta.index[first - 1],
      "first difference at", ta.index[first] if first < n else None)
print("identical loss through step", ta.index[first_diff(same_loss) - 1])
floor = tb[tb["train/lambda"] <= LAMBDA_FLOOR]
print("steps at the floor in the second run:", len(floor), "first", floor.index.min(),
      "last", floor.index.max())
for lo, hi in ((1000, 1999), (2000, 2999), (3000, 3999), (3600, 3999)):
    for name, t in (("first", ta), ("second", tb)):
        w = t.loc[lo:hi]
        print(f"{lo}-{hi} {name}: sparsity mean {w['train/sparsity'].mean():.4f}, below-target share "
              f"{(w['train/sparsity'] < target).mean():.2f}, λ median {w['train/lambda'].median():.3g} "
              f"max {w['train/lambda'].max():.3g}")
for name, j in (("first", ja), ("second", jb)):
    keys = ("val_loss", "sparsity", "layer_sparsity", "lambda", "settling_step", "collapsed_layers")
    print(name, {k: j.get(k) for k in keys}, "downstream", j.get("downstream"))
