"""What a person sees in the terminal: third-party noise silenced where it starts, one closing line.

Each silenced message is named exactly (not a blanket filter), with why it is noise here:
- Lightning's "💡 Tip: ... litlogger" advertisement on every Trainer;
- torch's deprecation of `isinstance(treespec, LeafSpec)`, raised inside Lightning 2.6's own
  utilities/_pytree.py (Lightning's to fix; nothing a user can act on);
- W&B's "The anonymous setting has no effect": Lightning's WandbLogger always passes `anonymous`
  (None); remoe.train.loggers.WandbLogger leaves it out.
- Lightning's CSV "Previous log files in this directory will be deleted": true of Lightning's logger;
  remoe.train.loggers.CSVLogger keeps them (resumable metrics.csv), so the warning is gone with the cause.
"""

from __future__ import annotations

import logging
import math
import warnings


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def quiet_third_party() -> None:
    """Idempotent; call once from each entry script."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in lg.filters):
            lg.addFilter(_DropMessages("💡 Tip: For seamless cloud logging"))
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def _fmt(x, spec: str) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def closing_line(summary: dict, path: str) -> str:
    """One line saying how a run ended: status, steps, val loss, routing state, downstream, the record."""
    parts = [f"remoe: {summary.get('status')}", f"steps {_fmt(summary.get('steps'), 'd')}",
             f"val loss {_fmt(summary.get('val_loss'), '.4f')}"]
    if summary.get("sparsity") is not None or summary.get("lambda") is not None:
        target, lam = _fmt(summary.get("target_sparsity"), ".4f"), _fmt(summary.get("lambda"), ".3g")
        parts.append(f"sparsity {_fmt(summary.get('sparsity'), '.4f')} (target {target}), λ {lam}")
    accs = [m["acc"] for m in (summary.get("downstream") or {}).values() if m.get("acc") is not None]
    if accs:
        parts.append(f"downstream acc {sum(accs) / len(accs):.4f} (mean of {len(accs)} tasks)")
    if summary.get("error"):
        parts.append(f"error: {str(summary['error']).splitlines()[0][:200]}")
    return " | ".join(parts + [path])
