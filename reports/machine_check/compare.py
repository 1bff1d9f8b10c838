"""One run of the study4k replication trained on two machines from the same commit, config and seed.
Usage: python reports/machine_check/compare.py <run on machine A> <run on machine B>"""
import json
import sys

import pandas as pd


def load(run_dir):
    m = pd.read_csv(f"{run_dir}/metrics.csv")
    return m[m["train/loss"].notna()].set_index("step"), json.load(open(f"{run_dir}/summary.json"))


(ta, ja), (tb, jb) = load(sys.argv[1]), load(sys.argv[2])
for k in ("git_commit", "seed", "precision", "versions"):
    assert ja[k] == jb[k], f"the two runs differ in {k}: {ja[k]} vs {jb[k]}"
print("machines:", ja["cpu"]["model"], ja["cpu"]["flags"], "|", jb["cpu"]["model"], jb["cpu"]["flags"])
steps = ta.index.intersection(tb.index)
d = (ta.loc[steps, "train/loss"] - tb.loc[steps, "train/loss"]).abs()
first = d[d > 0].index.min() if (d > 0).any() else None
print(f"train loss identical through step {first - 1 if first is not None else steps.max()}, "
      f"first difference at {first}")
for lo, hi in ((0, 99), (100, 999), (1000, 1999), (2000, 2999), (3000, 3999)):
    w = d.loc[lo:hi]
    print(f"steps {lo}-{hi}: |Δ train loss| median {w.median():.2e}, max {w.max():.2e}; mean train loss "
          f"{ta.loc[lo:hi, 'train/loss'].mean():.4f} vs {tb.loc[lo:hi, 'train/loss'].mean():.4f}")
print(f"val loss {ja['val_loss']:.4f} vs {jb['val_loss']:.4f} (Δ {jb['val_loss'] - ja['val_loss']:+.4f})")
for t in ("remoe_choice", "remoe_cloze"):
    print(t, "acc", round(ja["downstream"][t]["acc"], 3), "vs", round(jb["downstream"][t]["acc"], 3))
