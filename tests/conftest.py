import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Under pytest-xdist (pyproject: -n 2) each worker, and every run it starts, gets its share of the cores: two
# workers whose torch each spun on every core took as long as one process (commit 2f3a21b).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    _share = _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _share)))
# Tests never use the HF hub: make every hub check answer "offline" at once, without network traffic.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Fast settings for end-to-end runs: a handful of optimizer steps, short validation.
FAST = ["trainer.max_steps=6", "size.val_interval=3", "size.val_batches=2", "size.ckpt_interval=3",
        "trainer.enable_progress_bar=false"]


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (--dist loadgroup) a test that uses a fixture built once per module (a trained run)
    or the session's tiny_sweep runs on the worker that built it: one group per module, one for tiny_sweep.
    The other tests go to whichever worker is free."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        scopes = {n: defs[-1].scope for n, defs in (info.name2fixturedefs.items() if info else ()) if defs}
        group = "tiny_sweep" if "tiny_sweep" in scopes else item.path.stem if "module" in scopes.values() else None
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
            _suffix_nodeid(item, group)


def _suffix_nodeid(item, group: str) -> None:
    """xdist's loadgroup scheduler reads a test's group from its nodeid ("...::test@group"), which xdist 3.8
    writes into `item._nodeid`; pytest 9 builds nodeid from `item._id` instead, so every group was silently
    spread over both workers and each module fixture (and tiny_sweep) built twice (issue 43: measured, 2 x 30-110 s
    each). Set it where pytest 9 reads it, in the workers only (the controller schedules by what they send)."""
    if not os.environ.get("PYTEST_XDIST_WORKER") or "@" in item.nodeid:
        return
    try:
        from _pytest.nodeid import coerce_node_id
    except ImportError:  # pytest < 9: xdist's own `_nodeid` rewrite works
        return
    item._id = coerce_node_id(f"{item.nodeid}@{group}")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One tokenizer/packed-data cache for the whole session (built by the first run)."""
    d = os.environ.get("REMOE_TEST_CACHE") or str(tmp_path_factory.mktemp("remoe_cache"))
    return d


@pytest.fixture
def train(cache_dir, tmp_path):
    """Run `python src/train.py ARGS` as a user would; returns (CompletedProcess, output root)."""

    def run(*args, out=None, timeout=600, check=True):
        out = Path(out or tmp_path / "out")
        env = {**os.environ, "REMOE_OUTPUT": str(out), "REMOE_CACHE": cache_dir, "WANDB_SILENT": "true",
               "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # errors as a user sees them (remoe.cli)
        p = subprocess.run([sys.executable, str(ROOT / "src" / "train.py"), *args], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"train.py {' '.join(args)} exited {p.returncode}\n{p.stdout[-3000:]}\n"
                                 f"{p.stderr[-6000:]}")
        return p, out

    return run


@pytest.fixture(scope="session")
def fast_run(cache_dir, tmp_path_factory):
    """One finished tiny run (`logger=csv eval=none` + FAST) for every worker of the session: built once, by the
    first worker that asks, under a file lock in the folder the workers share; tests read or copy it, never
    change it."""
    import fcntl

    uid = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    shared = tmp_path_factory.getbasetemp().parent / f"shared-{uid}" if uid else tmp_path_factory.getbasetemp()
    shared.mkdir(exist_ok=True)
    run = shared / "fast_run" / "run"
    with open(shared / "fast_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (run / "summary.json").exists():
            env = {**os.environ, "REMOE_CACHE": cache_dir, "WANDB_SILENT": "true"}
            p = subprocess.run([sys.executable, str(ROOT / "src" / "train.py"), "logger=csv", "eval=none", *FAST,
                                f"hydra.run.dir={run}"], cwd=shared, env=env, capture_output=True, text=True,
                               timeout=600)
            assert p.returncode == 0, p.stderr[-3000:]
    return run


@pytest.fixture(scope="session")
def tiny_sweep(cache_dir, tmp_path_factory):
    """One real multirun shared by the pipeline and report tests: dense/topk/remoe x seeds 1,2."""
    out = tmp_path_factory.mktemp("sweep")
    env = {**os.environ, "REMOE_OUTPUT": str(out), "REMOE_CACHE": cache_dir, "WANDB_SILENT": "true"}
    p = subprocess.run([sys.executable, str(ROOT / "src" / "train.py"), "-m", "model=dense,topk,remoe", "seed=1,2",
                        "eval.n_docs=30", "name=tiny_sweep", "analysis.flip_interval=2", *FAST], cwd=out, env=env,
                       capture_output=True, text=True,
                       timeout=1200)
    assert p.returncode == 0, p.stderr[-5000:]
    return out
