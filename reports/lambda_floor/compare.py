"""Replication's ReMoE G=4 seed 2 at 897bd36 vs the same run at 64fb89e (λ floor)."""
import json, sys
import numpy as np, pandas as pd
A = sys.argv[1]; B = sys.argv[2]
def load(d):
    m = pd.read_csv(f"{d}/metrics.csv")
    t = m[m["train/lambda"].notna()][["step", "train/lambda", "train/sparsity", "train/loss"]].set_index("step")
    s = m[m["sparsity/layer_0"].notna()][["step", "sparsity/layer_0", "sparsity/layer_1"]].set_index("step")
    return t, s, json.load(open(f"{d}/summary.json"))
ta, sa, ja = load(A); tb, sb, jb = load(B)
n = min(len(ta), len(tb))
same = (ta["train/lambda"].values[:n] == tb["train/lambda"].values[:n]) & (ta["train/loss"].values[:n] == tb["train/loss"].values[:n])
first = int(np.argmin(same)) if not same.all() else n
print("identical λ and loss through step", ta.index[first - 1], "first difference at", ta.index[first] if first < n else None)
fl = tb[tb["train/lambda"] <= 1.2e-38]
print("floor steps in B:", len(fl), "first", fl.index.min(), "last", fl.index.max())
for lo, hi in ((1000, 1999), (2000, 2999), (3000, 3999), (3600, 3999)):
    for name, t in (("897bd36", ta), ("64fb89e", tb)):
        w = t.loc[lo:hi]
        print(f"{lo}-{hi} {name}: sparsity mean {w['train/sparsity'].mean():.4f} below-target share {(w['train/sparsity'] < 0.875).mean():.2f} λ median {w['train/lambda'].median():.3g} max {w['train/lambda'].max():.3g}")
for name, j in (("897bd36", ja), ("64fb89e", jb)):
    print(name, {k: j.get(k) for k in ("val_loss", "sparsity", "layer_sparsity", "lambda", "settling_step", "collapsed_layers", "fit_time_s")}, "downstream", j.get("downstream"))
