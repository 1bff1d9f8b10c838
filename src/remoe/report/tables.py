"""Paper-style tables from the collected runs: each a DataFrame of display strings, written as Markdown,
LaTeX (booktabs) and CSV. Several seeds: mean ± std with the seed count n. Rows whose `source` starts
with "paper" are the paper's own numbers (a different, much larger setting), shown for comparison."""

from __future__ import annotations

import math
import os

import pandas as pd

from ..io import write_text_atomic
from ..model import METHODS
from ..train.optim import RECIPE
from ..train.record import RunSummary
from . import paper
from .collect import read_metrics

# Which lm-eval metric stands for a task in the tables (lm-eval returns acc and acc_norm; the paper's
# numbers line up with acc).
TASK_METRIC = {"remoe_cloze": "acc", "remoe_choice": "acc", **{t: "acc" for t in paper.TASKS}}
TASK_LABEL = {"remoe_cloze": "Cloze", "remoe_choice": "Choice", "arc_challenge": "ARC-c", "arc_easy": "ARC-e",
              "boolq": "BoolQ", "hellaswag": "HellaSwag", "lambada_openai": "LAMBADA", "piqa": "PIQA", "race": "RACE"}
# A run's standard setting and load balancing are its method's to say (routing.RoutingMethod.record writes
# off_standard and load_balanced into summary.json; collect fills them for older records): the report never
# names a method's knobs.

def tasks_in(df: pd.DataFrame) -> list[str]:
    order = list(TASK_LABEL)
    found = {c.split(":")[1] for c in df.columns if c.startswith("ds:")}
    return [t for t in order if t in found and f"ds:{t}:{TASK_METRIC[t]}" in df.columns]


def with_downstream(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Task accuracies in % as columns named by label, plus Avg. over the tasks a run has."""
    df = df.copy()
    labels = []
    for t in tasks_in(df):
        label = TASK_LABEL[t]
        df[label] = df[f"ds:{t}:{TASK_METRIC[t]}"] * 100
        labels.append(label)
    if labels:
        df["Avg."] = df[labels].mean(axis=1)
        labels.append("Avg.")
    return df, labels


def paper_point(df: pd.DataFrame) -> pd.Series:
    """Runs at the paper's default MoE shape: E=8, k=1, G=1."""
    return (df["experts"] == 8) & (df["topk"] == 1) & (df["granularity"] == 1)


# A run off the paper's optimizer recipe (train.optim.RECIPE) is labelled so by variant() and is never a method's
# standard row.
RECIPE_LABEL = dict(router_lr_scale=lambda v: f"router LR ×{_key(v)}", ffn_down_lr=lambda v: f"W2 LR by {v}")


def off_recipe(r) -> list[str]:
    """The labels of the recipe options a run (a row) changes from the paper's (RECIPE)."""
    return [RECIPE_LABEL[k](r.get(k)) for k, v in RECIPE.items()
            if r.get(k) is not None and r.get(k) == r.get(k) and r.get(k) != v]


def shared_recipe(df: pd.DataFrame) -> list[str]:
    """off_recipe's labels when EVERY run leaves the paper's recipe the same way (a study with its own
    recipe throughout, e.g. size=study4k's W2 LR by fan_in); [] when any run trains at the paper's, or
    runs differ."""
    labels = {tuple(off_recipe(r)) for _, r in df.iterrows()}
    return list(labels.pop()) if len(labels) == 1 else []


def method(df: pd.DataFrame) -> pd.Series:
    """A run's method: its model, or dense×N for a dense model with an N-times-wide FFN (Dense×8)."""
    mult = df["ffn_mult"].fillna(1) if "ffn_mult" in df else pd.Series(1, index=df.index)
    return df["model"].where(mult == 1, "dense×" + mult.astype(int).astype(str))


def variant(df: pd.DataFrame) -> pd.Series:
    """A run's row label: its method, then every recipe option it changes ("dense×8, W2 LR by fan_in")."""
    labels = [", ".join([b, *off_recipe(r)]) for b, (_, r) in zip(method(df), df.iterrows())]
    return pd.Series(labels, index=df.index, dtype=object)


def _standard(df: pd.DataFrame, model: str, but: tuple[str, ...] = ()) -> pd.Series:
    """Runs of `model` at its standard setting (off_standard: nothing, or only the knobs named in `but`: a
    sweep's axis) and the paper's RECIPE."""
    m = (df["model"] == model) & (variant(df) == df["model"])
    return m & at_standard(df, but)


def at_standard(df: pd.DataFrame, but: tuple[str, ...] = ()) -> pd.Series:
    """Runs whose method says they set nothing but `but` away from its standard setting (off_standard, the
    knob names joined by spaces; null where the method is unknown to this code: never standard)."""
    off = df["off_standard"] if "off_standard" in df else pd.Series(None, index=df.index, dtype=object)
    return off.map(lambda o: isinstance(o, str) and set(o.split()) <= set(but)).astype(bool)


# The knobs that turn a method's load balancing on or off (the global switch, and the summary fields it sets);
# runs with and without load balancing are compared only where every other identity field is equal
LB_KNOBS = ("load_balancing", "regularizer", "aux_loss_coef", "bias_update_rate")


def load_balanced(df: pd.DataFrame) -> pd.Series:
    """Runs with a load-balancing mechanism on, as their method says (summary.json load_balanced): ReMoE's
    LB-L1, TopK's aux loss, the aux-loss-free bias, Expert Choice by construction; not Hash routing."""
    lb = df["load_balanced"] if "load_balanced" in df else pd.Series(None, index=df.index, dtype=object)
    return lb.map(lambda v: v is True or v == 1.0).astype(bool)


def standard_moe(df: pd.DataFrame) -> pd.Series:
    """Every MoE method's runs at its standard setting."""
    moe = df["experts"].notna() if "experts" in df else pd.Series(False, index=df.index)
    return moe & (variant(df) == df["model"]) & at_standard(df)


def fmt(mean: float, std: float, n: int, digits: int) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if n > 1 and std is not None and not math.isnan(std):
        return f"{mean:.{digits}f} ± {std:.{digits}f}"
    return f"{mean:.{digits}f}"


def _key(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    # str: no 4.0 in mixed columns
    return str(int(v)) if isinstance(v, (int, float)) and float(v).is_integer() else v


def identity_keys(df: pd.DataFrame, keys: list[str]) -> list[str]:
    """`keys` plus every other field of a setting's identity (train.record.RunSummary; seed aside) that varies
    within a group of `keys`: grouping on these never pools runs that differ in anything but the seed."""
    if df.empty:
        return keys
    text = df.astype(str)
    extra = [c for c in RunSummary.keys(identity=True) if c not in keys and c != "seed" and c in df
             and (text.groupby(keys, dropna=False)[c].nunique() > 1).any()]
    return keys + extra


def aggregate(df: pd.DataFrame, keys: list[str], metrics: dict[str, int], source: str) -> pd.DataFrame:
    """Group by keys (and any other identity field that varies: a row never pools unlike runs); each
    metric -> 'mean ± std' with `digits`; n = runs (seeds) per row. attrs["runs"]: the run folders used."""
    rows = []
    keys = identity_keys(df, keys)
    for key, g in df.groupby(keys, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        row = {"source": source, **{k: _key(v) for k, v in zip(keys, key)}, "n": len(g)}
        for col, digits in metrics.items():
            vals = pd.to_numeric(g[col], errors="coerce").dropna() if col in g else pd.Series(dtype=float)
            row[col] = fmt(vals.mean() if len(vals) else float("nan"),
                           vals.std(ddof=1) if len(vals) > 1 else None,
                           len(vals), digits)
        rows.append(row)
    out = pd.DataFrame(rows)
    out.attrs["runs"] = sorted(df["run_dir"]) if "run_dir" in df else []
    return out


def _with_paper(out: pd.DataFrame, ref: list[dict]) -> pd.DataFrame:
    """Our rows, then the paper's, for comparison; keeps which runs the table rests on."""
    table = pd.concat([out, pd.DataFrame(ref)], ignore_index=True).fillna("–")
    table.attrs["runs"] = out.attrs.get("runs", [])
    return table


def _ours(df: pd.DataFrame) -> str:
    sizes = ",".join(sorted(df["size"].dropna().unique())) if len(df) else "?"
    tokens = int(df["train_tokens"].max()) if len(df) else 0
    return f"ours ({sizes}, {tokens / 1e6:.1f}M tokens)"


def routing_methods(df: pd.DataFrame) -> pd.DataFrame | None:
    """Every routing method at E=8, k=1, G=1 (standard knobs), dense and Dense×8 (the regime check's rows),
    then the paper's Table 2 rows (methods this code does not have are marked so) and its Dense×8 loss."""
    sel = df[(df["model"] == "dense") | (standard_moe(df) & paper_point(df))]
    if sel.empty:
        return None
    sel, cols = with_downstream(sel)
    sel = sel.assign(model=variant(sel))
    out = aggregate(sel, ["size", "model"], {**{c: 2 for c in cols}, "val_loss": 4}, _ours(sel))
    ref = [{"source": paper.SETTING, "size": "182m", "model": m if m in METHODS else f"{m} (not implemented)",
            "n": 1, **{TASK_LABEL[t]: f"{v:.2f}" for t, v in zip(paper.TASKS, vals)},
            "Avg.": f"{sum(vals) / 7:.2f}",
            "val_loss": f"{paper.VAL_N[m]['182m']:.3f}" if m in paper.VAL_N else "–"}
           for m, vals in paper.ROUTING.items()]
    ref.append({"source": paper.SETTING, "size": "182m", "model": "dense×8", "n": 1,  # no task scores in the paper
                "val_loss": f"{paper.VAL_DENSE_X8:.3f}"})
    return _with_paper(out, ref)


def scaling_moe(df: pd.DataFrame, axis: str) -> pd.Series:
    """The MoE runs of a scaling study along `axis` ("size", "experts", "granularity"): standard method
    settings, k=1, the other axes at the paper's E=8 / G=1."""
    moe = (_standard(df, "topk") | _standard(df, "remoe")) & (df["topk"] == 1)
    if axis == "size":
        return moe & (df["experts"] == 8) & (df["granularity"] == 1)
    return moe & (df["granularity"] == 1) if axis == "experts" else moe & (df["experts"] == 8)


def scaling(df: pd.DataFrame, axis: str) -> pd.DataFrame | None:
    """axis: "size" (N), "experts" (E) or "granularity" (G). Dense rows are the baseline."""
    moe = scaling_moe(df, axis)
    dense = (df["model"] == "dense")
    sel = df[moe | dense]
    if df[moe].empty or (df[moe][axis].nunique() < 2 and axis != "size"):
        return None
    sel, cols = with_downstream(sel)
    sel = sel.assign(variant=variant(sel))
    keys = ["variant", "size"] if axis == "size" else ["size", "variant", axis]
    out = aggregate(sel, keys, {"val_loss": 4, **({"Avg.": 2} if cols else {})}, _ours(sel))
    ref = []
    if axis == "size":
        ref = [{"source": paper.SETTING, "variant": m, "size": s, "n": 1, "val_loss": f"{v:.3f}"}
               for m, d in paper.VAL_N.items() for s, v in d.items()]
    elif axis == "experts":
        ref = [{"source": paper.SETTING, "size": "182m", "variant": m, "experts": e, "n": 1,
                "val_loss": f"{v:.3f}"}
               for m, d in paper.VAL_E.items() for e, v in d.items()]
    else:
        ref = [{"source": paper.SETTING, "size": "182m", "variant": m, "granularity": g, "n": 1,
                "val_loss": f"{v:.3f}"} for m, d in paper.VAL_G.items() for g, v in d.items()]
    return _with_paper(out, ref)


def lb_ablation(df: pd.DataFrame) -> pd.DataFrame | None:
    # ReMoE and TopK at their standard settings but the load balancing (on or off: the ablation's axis)
    remoe = (df["model"] == "remoe") & at_standard(df, but=LB_KNOBS + ("lambda_per_layer",))
    topk = df["model"] == "topk"
    sel = df[(remoe | topk) & paper_point(df)].copy()
    sel["LB"] = load_balanced(sel).map({True: "yes", False: "no"})
    if sel.empty or sel["LB"].nunique() < 2:
        return None
    sel, cols = with_downstream(sel)
    out = aggregate(sel, ["size", "model", "LB"], {"val_loss": 4, **({"Avg.": 2} if cols else {})},
                    _ours(sel))
    ref = [{"source": paper.SETTING, "size": "182m", "model": m, "LB": lb, "n": 1, "Avg.": f"{v:.2f}"}
           for (m, lb), v in paper.LB_AVG.items()]
    return _with_paper(out, ref)


def sensitivity(df: pd.DataFrame, param: str) -> pd.DataFrame | None:
    # ReMoE runs at its standard setting but `param` (the sweep's axis); lambda_per_layer and the recipe
    # are not checked (a table of the controller's knobs)
    sel = df[(df["model"] == "remoe") & at_standard(df, but=(param, "lambda_per_layer"))]
    if sel.empty or sel[param].nunique() < 2:
        return None
    out = aggregate(sel, ["size", "experts", param], {"val_loss": 4, "settling_step": 1}, _ours(sel))
    table = paper.LAMBDA0 if param == "lambda0" else paper.ALPHA
    ref = [{"source": paper.SENSITIVITY_SETTING, "size": "182m", "experts": 8, param: k, "n": 1, "val_loss": f"{v:.3f}",
            "settling_step": str(t)} for k, (v, t) in table.items()]
    return _with_paper(out, ref)


PASS_TAIL = 50  # steps of training loss averaged before a pass ends


def pass_gaps(run_dir: str, pass_steps: int, steps: int) -> list[float]:
    """Validation − training loss at the end of each full pass over the corpus: the mean train/lm_loss of the
    pass's last PASS_TAIL steps, against the last validation at or before its last step (steps count from 0,
    and a validation logged at step s ran after s + 1 steps). Positive: the model does better on text it has
    seen (memorisation)."""
    m = read_metrics(run_dir)
    if m is None or "train/lm_loss" not in m or "val/loss" not in m:
        return []
    train = m.dropna(subset=["train/lm_loss"]).set_index("step")["train/lm_loss"]
    val = m.dropna(subset=["val/loss"]).set_index("step")["val/loss"]
    out = []
    for end in range(pass_steps - 1, steps, pass_steps):  # the last step of each full pass
        tail, before = train[(train.index > end - PASS_TAIL) & (train.index <= end)], val[val.index <= end]
        out.append(float(before.iloc[-1] - tail.mean()) if len(tail) and len(before) else float("nan"))
    return out


def memorisation(df: pd.DataFrame, corpora: dict) -> pd.DataFrame | None:
    """When runs see their corpus more than once: validation − training loss at the end of each pass, per
    method and E (standard settings, k=1, G=1), mean ± std over seeds. A pass is the corpus's training
    sequences / the global batch (summary.json train_sequences and seq_len; records from before those fields:
    the roots' corpora.json, by corpus fingerprint)."""
    rows = []
    sel = df[(scaling_moe(df, "experts") | (df["model"] == "dense")) & df["train_tokens"].notna()]
    labels = variant(sel)
    for i, r in sel.iterrows():
        info = corpora.get(r.get("corpus"), {})
        n_seq = r.get("train_sequences") if pd.notna(r.get("train_sequences")) else info.get("train_sequences")
        seq_len = r.get("seq_len") if pd.notna(r.get("seq_len")) else info.get("seq_len")
        if not n_seq or not seq_len or not r["steps"]:
            continue
        batch = round(r["train_tokens"] / r["steps"] / seq_len)  # sequences per optimizer step
        pass_steps = int(n_seq) // batch
        if pass_steps < 1 or r["steps"] < 2 * pass_steps:
            continue  # one pass or less: nothing repeats
        gaps = pass_gaps(r["run_dir"], pass_steps, int(r["steps"]))
        rows.append({**{k: r[k] for k in ("size", "experts", "seed", "run_dir")}, "variant": labels[i],
                     "pass_steps": pass_steps, **{f"pass {p + 1}": g for p, g in enumerate(gaps)}})
    if not rows:
        return None
    frame = pd.DataFrame(rows)
    cols = sorted((c for c in frame if c.startswith("pass ")), key=lambda c: int(c[5:]))
    return aggregate(frame, ["size", "variant", "experts", "pass_steps"], {c: 3 for c in cols}, _ours(sel))


def throughput(bench: list[dict]) -> pd.DataFrame | None:
    """Paper Table 7 layout from benchmark JSON only: every model of a bench row timed interleaved in one
    process on an otherwise idle machine, with its repetitions and spread. Training runs' tokens/s are
    not compared: runs may have shared the CPU with other work."""
    rows = []
    for b in (b for b in bench if "model" in b):  # model-bench rows (layer-bench rows have no model)
        spread = b.get("train_spread")
        rows.append({"source": f"ours: bench ({b.get('device', '?')}, {b.get('precision', '?')})",
                     "size": b.get("size"), "experts": _key(b.get("experts")),
                     "granularity": _key(b.get("granularity")), "model": b.get("model"),
                     "train tokens/s": f"{b.get('train_tokens_per_s', float('nan')):.0f}",
                     "train TFLOPS": f"{b.get('train_tflops', float('nan')):.3f}",
                     "train diff": b.get("train_diff", ""),
                     "infer TFLOPS": f"{b.get('infer_tflops', float('nan')):.3f}",
                     "infer diff": b.get("infer_diff", ""), "reps": _key(b.get("reps")),
                     "spread": "–" if spread is None else f"±{100 * spread:.1f}%"})
    if not rows:
        return None
    for size, d in paper.THROUGHPUT.items():
        for m, (tr, inf) in d.items():
            tk = d["topk"]
            rows.append({"source": "paper: 8xA100, TP=1", "size": size, "experts": 8, "granularity": 1, "model": m,
                         "train tokens/s": "–", "train TFLOPS": f"{tr:.2f}",
                         "train diff": "" if m == "topk" else f"{100 * (tr / tk[0] - 1):+.2f}%",
                         "infer TFLOPS": f"{inf:.2f}",
                         "infer diff": "" if m == "topk" else f"{100 * (inf / tk[1] - 1):+.2f}%",
                         "reps": "–", "spread": "–"})
    table = pd.DataFrame(rows)
    table.attrs["runs"] = []
    return table


# ---- renderers --------------------------------------------------------------------------------------
def _cells(df: pd.DataFrame) -> list[list[str]]:
    return [[str(c) for c in df.columns]] + [[str(v) for v in row] for row in df.itertuples(index=False)]


def to_markdown(df: pd.DataFrame) -> str:
    head, *body = _cells(df)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"


def _tex_escape(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                 ("±", r"$\pm$"), ("×", r"$\times$"), ("–", "--")):
        s = s.replace(a, b)
    return s


def to_latex(df: pd.DataFrame) -> str:
    head, *body = _cells(df)
    lines = [r"\begin{tabular}{" + "l" * len(head) + "}", r"\toprule",
             " & ".join(_tex_escape(h) for h in head) + r" \\", r"\midrule"]
    lines += [" & ".join(_tex_escape(c) for c in r) + r" \\" for r in body]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_table(df: pd.DataFrame, out_dir: str, name: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for ext, text in (("md", to_markdown(df)), ("tex", to_latex(df)), ("csv", df.to_csv(index=False, lineterminator="\n"))):
        path = os.path.join(out_dir, f"{name}.{ext}")
        write_text_atomic(path, text)
        paths.append(path)
    return paths
