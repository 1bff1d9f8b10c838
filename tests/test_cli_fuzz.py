"""Bad input on every entry point: a table of hostile or mistaken inputs (paths, numbers, files) driven through
the real scripts (tests/cli_driver.py runs them as `python src/<script>.py ARGS` does, many per process),
each answered by exit code 2 and one line on stderr naming the key or file — no traceback, no hang — and a
baseline run folder byte-identical afterwards. Then the ways a command could lose a run: an export into
the run it reads, evaluation into a read-only folder, leftovers of killed commands, damaged records."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT

SRC = ROOT / "src"


@pytest.fixture(scope="module")
def base(fast_run, tmp_path_factory):
    """A finished tiny run (csv metrics, no evaluation: a copy of conftest's fast_run), plus files to feed the
    scripts."""
    root = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(fast_run, root / "run")
    files = root / "files"
    files.mkdir()
    ckpt = (root / "run" / "checkpoints" / "last.ckpt").read_bytes()
    (files / "empty.ckpt").write_bytes(b"")
    (files / "truncated.ckpt").write_bytes(ckpt[: len(ckpt) // 3])
    (files / "text.ckpt").write_text("not a checkpoint\n")
    (files / "empty.txt").write_bytes(b"")
    (files / "binary.txt").write_bytes(bytes(range(256)) * 64)
    (files / "long.txt").write_text("ab" * 150_000 + "\n")  # one 300,000-character word
    (files / "ok.txt").write_text("a few words of text\n" * 500)
    other = torch.load(root / "run" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    other["hyper_parameters"]["model"]["n_layer"] = 3  # its config and its weights disagree
    big = dict(other, hyper_parameters={**other["hyper_parameters"],
                                       "model": {**other["hyper_parameters"]["model"], "d_model": 1 << 20}})
    for name, state in (("other_arch", other), ("huge_config", big)):  # the latter: never built (too big)
        (files / name / "checkpoints").mkdir(parents=True)
        torch.save(state, files / name / "checkpoints" / "last.ckpt")
        shutil.copy(root / "run" / "config_resolved.yaml", files / name / "config_resolved.yaml")
    (files / "folder").mkdir()
    (files / "notes.md").write_bytes(b"\xff\xfe\x00 not utf-8")
    return root


def _cases(b: Path) -> list[tuple[str, list[str], str]]:
    """(script, args, a word the one line must hold: the key or file it names)."""
    run, f = b / "run", b / "files"
    ckpt = run / "checkpoints" / "last.ckpt"
    train = [
        (["model=nope"], "model/nope"), (["foo=1"], "foo"), (["+foo=1"], "foo"), (["experts=0"], "experts"),
        (["experts=abc"], "experts"), (["topk=9"], "topk"), (["granularity=3"], "granularity"),
        (["seed=-1"], "seed"), (["seed=1.5"], "seed"), (["trainer.max_steps=0"], "trainer.max_steps"),
        (["trainer.max_steps=abc"], "trainer.max_steps"), (["size.lr=abc"], "size.lr"), (["size.lr=-1"], "size.lr"),
        (["size.warmup=-3"], "size.warmup"), (["size.seq_len=0"], "size.seq_len"),
        (["size.micro_batch_size=0"], "size.micro_batch_size"), (["size.global_batch_size=-32"], "size.global_batch_size"),
        (["optim.betas=[0.9]"], "optim.betas"), (["optim.eps=0"], "optim.eps"),
        (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val"), (["trainer.precision=99"], "trainer.precision"),
        (["trainer.devices=abc"], "trainer.devices"), (["trainer.devices=0"], "trainer.devices"),
        (["cluster.nodes=-2"], "cluster.nodes"), (["cluster.mfu=2"], "cluster.mfu"),
        (["moe_recompute_above=-1"], "moe_recompute_above"), (["eval.batch_size=0"], "eval.batch_size"),
        (["eval.tasks=[nope]"], "eval.tasks"), (["routing_log_interval=-1"], "routing_log_interval"),
        (["name=../../x"], "name"), (["name=a/b"], "name"), (["name=.hidden"], "name"),
        (["model.lambda0=0"], "model.lambda0"), (["model.alpha=1"], "model.alpha"),
        (["data=text_files", f"data.files=[{f / 'empty.txt'}]"], "empty.txt"),
        (["data=text_files", f"data.files=[{f / 'binary.txt'}]"], "binary.txt"),
        (["data=text_files", f"data.files=[{f / 'long.txt'}]"], "long.txt"),
        (["data=text_files", f"data.files=[{f / 'folder'}]"], "folder"),
        (["data=text_files", "data.files=/nonexistent/*.txt"], "nonexistent"),
        (["data=prepared", f"data.dir={f}"], "data.dir"),
        (["trainer.max_steps=[1"], "[1"),
        ([f"hydra.run.dir={run}", "resume=true", "size.lr=5e-3"], "optim.lr"),
        ([f"hydra.run.dir={run}", "resume=true", "experts=16"], "experts"),
    ]
    evaluate = [
        ([f"checkpoint={f / 'empty.ckpt'}"], "empty.ckpt"), ([f"checkpoint={f / 'truncated.ckpt'}"], "truncated.ckpt"),
        ([f"checkpoint={f / 'text.ckpt'}"], "text.ckpt"),
        ([f"checkpoint={f / 'other_arch/checkpoints/last.ckpt'}"], "other_arch"),
        ([f"checkpoint={f / 'huge_config/checkpoints/last.ckpt'}"], "huge_config"),
        (["checkpoint=/nonexistent.ckpt"], "nonexistent"), ([f"checkpoint={f / 'folder'}"], "folder"),
        ([f"checkpoint={f / 'ok.txt'}"], "ok.txt"), ([f"checkpoint={ckpt}", "eval=nope"], "eval/nope"),
        ([f"checkpoint={ckpt}", "dtype=int8"], "dtype"), ([f"checkpoint={ckpt}", "seed=-1"], "seed"),
        ([f"checkpoint={ckpt}", "device=tpu"], "device"), ([f"checkpoint={ckpt}", "eval.n_docs=0"], "eval.n_docs"),
        ([f"checkpoint={ckpt}", "eval.tasks=[nope]"], "eval.tasks"), (["checkpoint=1", "bogus=2"], "bogus"),
        ([], "checkpoint"),
    ]
    export = [
        ([f"checkpoint={ckpt}", f"out={run}", "overwrite=true"], "out"),
        ([f"checkpoint={ckpt}", f"out={run / 'checkpoints'}", "overwrite=true"], "out"),
        ([f"checkpoint={ckpt}", f"out={run / 'hf'}"], "out"),
        ([f"checkpoint={ckpt}", f"out={b}", "overwrite=true"], "out"),  # holds the run
        ([f"checkpoint={ckpt}", f"out={f}", "overwrite=true"], "not an earlier remoe export"),
        ([f"checkpoint={ckpt}", f"out={f / 'ok.txt'}"], "out"),
        ([f"checkpoint={f / 'truncated.ckpt'}", f"out={b}/x"], "truncated.ckpt"),
        ([f"checkpoint={f / 'other_arch/checkpoints/last.ckpt'}", f"out={b}/x"], "other_arch"),
        ([f"checkpoint={ckpt}"], "out"), ([f"checkpoint={ckpt}", "out="], "out"),
    ]
    prepare = [
        ([f"out={b}/p", "data=text_files", f"data.files=[{f / 'empty.txt'}]"], "empty.txt"),
        ([f"out={b}/p", "data=text_files", f"data.files=[{f / 'binary.txt'}]"], "binary.txt"),
        ([f"out={b}/p", "data=text_files", f"data.files=[{f / 'long.txt'}]"], "long.txt"),
        ([f"out={b}/p", "num_proc=0"], "num_proc"), ([f"out={b}/p", "num_proc=abc"], "num_proc"),
        ([f"out={run}"], "out"), ([f"out={b}/p", "data=prepared"], "data"), (["data=stdlib"], "out"),
        ([f"out={b}/p", "load_check_batches=-1"], "load_check_batches"),
    ]
    plan = [(["cluster.nodes=0"], "cluster.nodes"), (["cluster.nodes=-2"], "cluster.nodes"),
            (["cluster.gpus_per_node=abc"], "cluster.gpus_per_node"), (["cluster.gpu_memory_gb=0"], "cluster.gpu_memory_gb"),
            (["cluster.peak_tflops=-1"], "cluster.peak_tflops"), (["cluster.mfu=abc"], "cluster.mfu"),
            (["cluster.mfu=0"], "cluster.mfu"), (["experts=0"], "experts"), (["model=nope"], "model/nope")]
    bench = [(["layer", "--E", "0"], "--E"), (["layer", "--E", "8", "--k", "9"], "--k"), (["layer", "--G", "3"], "--G"),
             (["layer", "--tokens", "0"], "--tokens"), (["model", "--batch", "0"], "--batch"),
             (["model", "--size", "nope"], "--size"), (["model", "--experts", "4", "--topk", "5"], "--topk"),
             (["model", "--seq", "4096"], "--seq"), (["model", "--reps", "abc"], "--reps"), (["gpu"], "cuda"),
             (["gpu", "--device", "cpu", "--configs", "8:1"], "--configs"), (["step", "--config", "experts=0"], "experts"),
             (["step", "--steps", "0"], "--steps"), (["nope"], "nope"), ([], "cmd")]
    report = [(["--runs", "/nonexistent"], "--runs"), (["--bogus"], "--bogus"), (["--runs"], "--runs"),
              (["--runs", str(b), "--out", str(f / "ok.txt")], "--out"),
              (["--runs", str(b), "--notes", str(f / "notes.md")], "--notes"),
              (["--runs", str(b), "--notes", "/nonexistent.md"], "--notes"),
              (["--keep-records", "/nonexistent", str(b / "k")], "--keep-records")]
    table = {"train.py": train, "evaluate.py": evaluate, "export.py": export, "prepare_data.py": prepare,
             "plan.py": plan, "bench.py": bench, "report.py": report}
    return [(script, args, word) for script, rows in table.items() for args, word in rows]


def _ids(cases) -> list[str]:
    """script:row within its script's table."""
    seen: dict[str, int] = {}
    out = []
    for script, _, _ in cases:
        out.append(f"{script}:{seen.get(script, 0)}")
        seen[script] = seen.get(script, 0) + 1
    return out


CASE_IDS = _ids(_cases(Path("/base")))


def _snapshot(folder: Path) -> dict:
    """Every file's bytes; Hydra's own records aside (train.py composing into the folder rewrites .hydra/
    and appends to the job log before any code of ours runs, README: Reliability)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".hydra" not in p.parts and p.name != "train.log"}


@pytest.fixture(scope="module")
def results(base, cache_dir):
    cases = _cases(base)
    assert _ids(cases) == CASE_IDS
    before = _snapshot(base / "run")
    env = {**os.environ, "REMOE_CACHE": cache_dir, "REMOE_OUTPUT": str(base / "outputs"), "WANDB_SILENT": "true",
           "REMOE_MALLOC": "default"}  # the driver process stays itself (remoe.cpu: no re-exec)
    env.pop("HYDRA_FULL_ERROR", None)
    calls = [[str(SRC / script), args, str(base)] for script, args, _ in cases]
    t = time.time()
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "cli_driver.py")], input=json.dumps(calls), env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-5000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    print(f"{len(cases)} bad inputs in {time.time() - t:.0f} s")
    return {cid: (case, r) for cid, case, r in zip(CASE_IDS, cases, out)}, before


@pytest.mark.parametrize("cid", CASE_IDS)
def test_bad_input_is_one_line_and_exit_2(results, cid):
    (script, args, word), r = results[0][cid]
    lines = [x for x in r["stderr"].splitlines() if x.strip()]
    name = script.removesuffix(".py")
    assert r["rc"] == 2, (args, r["stderr"][-3000:], r["stdout"][-1000:])
    assert "Traceback" not in r["stderr"] + r["stdout"], r["stderr"][-3000:]
    mine = [x for x in lines if x.startswith(f"{name}: ")]
    assert len(mine) == 1 and word in mine[0], (args, lines)
    assert len(lines) == 1, (args, lines)  # nothing else on stderr either


def test_the_baseline_run_is_byte_identical_after_every_bad_input(results, base):
    assert _snapshot(base / "run") == results[1]
    assert not (base / "outputs").exists() or not any((base / "outputs").rglob("summary.json"))
    assert not list(base.glob("x*")) and not (base / "p").exists() and not (base / "o").exists()


# ---- commands that could lose a run ---------------------------------------------------------------------
def test_an_export_never_lands_in_the_run_it_reads_and_cleans_the_leftovers_of_a_killed_one(base, tmp_path):
    """The cases above refuse out= inside or around the run; here: a killed export's *_partial_<pid>_* folder
    is removed by the next export into the same place (its process is gone), and the export itself works."""
    pytest.importorskip("transformers")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = tmp_path / f"hf_partial_{dead.pid}_abc"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    p = subprocess.run([sys.executable, str(SRC / "export.py"), f"checkpoint={base / 'run/checkpoints/last.ckpt'}",
                        f"out={tmp_path / 'hf'}"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert not leftover.exists() and (tmp_path / "hf" / "config.json").exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["hf"]


def test_evaluate_refuses_a_read_only_run_folder_before_evaluating(base, tmp_path, cache_dir):
    """A run folder on a read-only file system (root ignores permission bits, not this): refused in one
    line, at once, instead of evaluating for minutes and failing to store the results."""
    from test_reliability import _in_tmpfs

    script = f"""
mkdir $T/run && cp -r {base / 'run'}/. $T/run/ && mount -o remount,ro $T
set +e
cd {tmp_path} && REMOE_CACHE={cache_dir} {sys.executable} {SRC / 'evaluate.py'} checkpoint=$T/run/checkpoints/last.ckpt \\
  > {tmp_path}/out.txt 2> {tmp_path}/err.txt; echo $? > {tmp_path}/rc.txt
"""
    t = time.time()
    p = _in_tmpfs(script, 64, tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    err = (tmp_path / "err.txt").read_text()
    assert int((tmp_path / "rc.txt").read_text()) == 2 and "Traceback" not in err
    assert [x for x in err.splitlines() if x.strip()] == [x for x in err.splitlines() if "cannot write the results" in x]
    assert time.time() - t < 120  # refused before any evaluation (the local suite alone takes longer)


def test_a_full_disk_at_start_is_one_line(tmp_path, cache_dir):
    from test_reliability import _in_tmpfs

    script = f"""
set +e
{sys.executable} -c "import os; s = os.statvfs('$T'); open('$T/filler', 'wb').write(b'x' * (s.f_bavail * s.f_frsize))"
cd {tmp_path} && REMOE_OUTPUT=$T REMOE_CACHE={cache_dir} {sys.executable} {SRC / 'train.py'} logger=none eval=none \\
  trainer.max_steps=2 > {tmp_path}/out.txt 2> {tmp_path}/err.txt; echo $? > {tmp_path}/rc.txt
"""
    p = _in_tmpfs(script, 4, tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    err = [x for x in (tmp_path / "err.txt").read_text().splitlines() if x.strip()]
    assert int((tmp_path / "rc.txt").read_text()) == 2 and len(err) == 1 and "No space left" in err[0], err


# ---- the report: damaged records, link loops, a killed build ---------------------------------------------
def _damage(runs: Path) -> dict[str, str]:
    """Copies of the baseline run, each damaged one way; {folder: what the index must say of it}."""
    damage = {
        "cut_jsonl": lambda d: (d / "routing.jsonl").write_text((d / "routing.jsonl").read_text()[:-40]),
        "empty_metrics": lambda d: (d / "metrics.csv").write_text(""),
        "bad_json": lambda d: (d / "summary.json").write_text((d / "summary.json").read_text()[:-30]),
        "text_loss": lambda d: (d / "summary.json").write_text(json.dumps(
            {**json.loads((d / "summary.json").read_text()), "val_loss": "low"})),
        "text_metric": lambda d: (d / "metrics.csv").write_text(  # a number turned into a word
            (d / "metrics.csv").read_text().replace("\n,0.", "\n,zero", 1)),
    }
    why = {"cut_jsonl": "routing.jsonl", "empty_metrics": "metrics.csv", "bad_json": "corrupt summary.json",
           "text_loss": "val_loss", "text_metric": "metrics.csv"}
    return damage, why


def test_the_report_skips_damaged_records_with_a_reason_and_never_walks_a_link_loop(base, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(base / "run", runs / "good", ignore=shutil.ignore_patterns("checkpoints"))
    damage, why = _damage(runs)
    for name, fn in damage.items():
        shutil.copytree(runs / "good", runs / name)
        fn(runs / name)
    (runs / "loop").symlink_to(runs, target_is_directory=True)  # a link back to its own root
    (runs / "good" / "up").symlink_to(tmp_path, target_is_directory=True)
    p = subprocess.run([sys.executable, str(SRC / "report.py"), "--runs", str(runs), "--out", str(tmp_path / "rep")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    index = (tmp_path / "rep" / "README.md").read_text()
    skipped = index.split("## Missing, failed or duplicate runs")[1]
    for name in damage:
        line = next(x for x in skipped.splitlines() if x.startswith(f"- {name}:"))
        assert why[name] in line, line
    assert "| good |" in index


def test_a_report_killed_while_building_leaves_the_previous_report_as_it_was(tmp_path):
    """The report is built in a staging folder and swapped in at the end: killed midway, the output folder
    holds the previous index and tables, byte for byte; the next build removes the stale staging folder."""
    out = tmp_path / "rep"
    runs = ROOT / "reports" / "study1k" / "runs"  # enough runs that the build takes seconds
    cmd = [sys.executable, str(SRC / "report.py"), "--runs", str(runs), "--out", str(out)]
    assert subprocess.run(cmd, capture_output=True, timeout=600).returncode == 0
    (out / "tables" / "mine.md").write_text("a table the next build does not make\n")
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    q = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t = time.time()
    while not list(out.glob(".report-partial-*/*")) and time.time() - t < 120:  # the build has begun writing
        time.sleep(0.02)
    q.send_signal(signal.SIGKILL)
    q.wait()
    after = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()
             if ".report-" not in str(p)}
    assert after == before
    assert subprocess.run(cmd, capture_output=True, timeout=600).returncode == 0
    assert not list(out.glob(".report-*")) and not (out / "tables" / "mine.md").exists()


def test_help_lists_every_public_option_and_no_private_one():
    """Issue 42: `train.py --help` lists each config group's public options (the yaml files of conf/<group>/),
    not the presets' shared base (size/_paper.yaml)."""
    p = subprocess.run([sys.executable, str(SRC / "train.py"), "--help"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    listed = {line.split(":")[0]: {o.strip() for o in line.split(":", 1)[1].split(",")}
              for line in p.stdout.split("== Config (")[0].splitlines()
              if ":" in line and not line.startswith(("python", "==", "+sweep"))}
    conf = ROOT / "conf"
    for group in ("model", "size", "data", "trainer", "logger", "eval"):
        public = {f.stem for f in (conf / group).glob("*.yaml") if not f.stem.startswith("_")}
        assert listed[group] == public, group
    assert "_paper" not in p.stdout.split("== Config (")[0]
