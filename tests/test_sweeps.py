"""Sweeps: every experiment file composes at both scales (every grid point validates), and a sweep with
a failing run records it, finishes the others, and a rerun skips what completed."""

import glob
import itertools
import os
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import FAST, ROOT
from remoe.resolvers import register_resolvers
from remoe.train.record import keep_records, read_summary
from remoe.train.spec import validate

register_resolvers()
SWEEPS = sorted(f"{p.parent.name}/{p.stem}" for p in (ROOT / "sweeps").glob("*/*.yaml"))


def test_every_experiment_has_both_scales():
    names = {s.split("/")[1] for s in SWEEPS if s.split("/")[0] in ("cpu", "paper")}  # powered/: one study
    assert {"routing_methods", "scale_size", "scale_experts", "scale_granularity", "lb_ablation", "lambda0", "alpha",
            "topk_warmup"} <= names
    for n in names:
        assert f"cpu/{n}" in SWEEPS and f"paper/{n}" in SWEEPS


@pytest.mark.parametrize("sweep", SWEEPS)
def test_sweep_composes_and_every_point_validates(sweep):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"+sweep={sweep}"], return_hydra_config=True)
        params = cfg.hydra.sweeper.params
        assert params and cfg.skip_completed and cfg.resume
        scale = "182m" if sweep.startswith("paper") else "study" if "topk_warmup" in sweep else "study4k"
        assert cfg.size.name == scale or "scale_size" in sweep
        if cfg.size.name == "study4k":  # the replication's one scale carries its recipe (the W2 LR rule)
            assert cfg.optim.ffn_down_lr == "fan_in" and cfg.trainer.max_steps == 4000
        grid = [[f"{k}={v}" for v in str(vals).split(",")] for k, vals in params.items()]
        for point in itertools.product(*grid):
            extra = ["eval=none"] if sweep.startswith("paper") else []  # the paper suite needs the hub
            point_cfg = compose("config", overrides=[f"+sweep={sweep}", *point, *extra])
            validate(point_cfg)
    if sweep.startswith("paper"):
        assert cfg.data.path == "monology/pile-uncopyrighted" and cfg.eval.suite == "paper"


def test_failing_run_is_recorded_and_rerun_skips_completed(train, tmp_path):
    args = ["-m", "+sweep=cpu/routing_methods", "hydra.sweeper.params.seed=1", "hydra.sweeper.params.model=topk",
            "size.lr=2.0e-3,1.0e30", "trainer.gradient_clip_val=null", "eval=none", "report_on_multirun_end=false",
            *FAST]  # lr 1e30: a run that fails in training (non-finite loss), after validation
    def summaries(root):
        return {Path(s).parent.name: read_summary(Path(s).parent)
                for s in glob.glob(str(root / "sweeps" / "routing_methods_cpu" / "*" / "summary.json"))}

    p, out = train(*args, check=False)
    assert p.returncode != 0  # Hydra re-raises the first failure after the other jobs ran
    runs = summaries(out)
    assert len(runs) == 2
    failed = [r for r in runs.values() if r["status"] == "failed"]
    done = [r for r in runs.values() if r["status"] == "completed"]
    assert len(failed) == 1 and len(done) == 1 and "non-finite" in failed[0]["error"]
    finished_at = done[0]["wall_time_s"]
    p2, _ = train(*args, check=False)  # rerun: the completed point is skipped, the failed one retried
    assert p2.returncode != 0
    again = summaries(out)
    [done2] = [r for r in again.values() if r["status"] == "completed"]
    assert done2["wall_time_s"] == finished_at  # untouched
    assert "skip_completed" in p2.stdout + p2.stderr
    # a fresh machine (issue 20's replication spans sittings): the committed compact records, restored by
    # `replicate_cpu.sh restore`, are skipped the same way; only the failed point trains again
    assert len(keep_records(str(out / "sweeps"), str(tmp_path / "records"))) == 1
    fresh = tmp_path / "fresh"
    r = subprocess.run(["bash", str(ROOT / "sweeps" / "replicate_cpu.sh"), "restore"], capture_output=True, text=True,
                       env={**os.environ, "REMOE_RECORDS": str(tmp_path / "records"), "REMOE_OUTPUT": str(fresh)})
    assert r.returncode == 0, r.stderr
    p3, _ = train(*args, out=fresh, check=False)
    assert p3.returncode != 0 and "is already complete" in p3.stdout + p3.stderr
    kept = summaries(fresh)
    assert sorted(r["status"] for r in kept.values()) == ["completed", "failed"]
    assert [r["wall_time_s"] for r in kept.values() if r["status"] == "completed"] == [finished_at]
