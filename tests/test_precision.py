"""precision=auto: chosen from the machine (timed once, cached per machine), recorded in summary.json,
kept by a resumed run and by DDP ranks."""

import json
from pathlib import Path

import pytest

from conftest import FAST
from remoe.train import precision
from remoe.train.record import read_summary


def test_the_rule_needs_bf16_clearly_faster():
    assert precision.decide(fp32_s=10.0, bf16_s=2.7) == "bf16-mixed"  # an AMX machine: 3.7x
    assert precision.decide(fp32_s=10.0, bf16_s=9.0) == "32-true"  # barely faster: casts would eat it
    assert precision.decide(fp32_s=1.0, bf16_s=4.5) == "32-true"  # no avx512_bf16: 4.5x slower


def test_cpu_info_lists_the_flags_that_decide():
    info = precision.cpu_info()
    assert info["model"] and set(info["flags"]) <= set(precision.FLAGS)


def test_choice_is_cached_per_machine_and_kept_on_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("REMOE_CACHE", str(tmp_path))
    monkeypatch.delenv(precision.ENV, raising=False)
    first = precision.resolve("auto", "cpu", 64, 256)
    assert first["precision"] in ("32-true", "bf16-mixed") and first["fp32_ms"] > 0 and first["bf16_ms"] > 0
    assert first["precision"] == precision.decide(first["fp32_ms"], first["bf16_ms"])
    cached = json.loads((tmp_path / "precision.json").read_text())
    assert [c["precision"] for c in cached.values()] == [first["precision"]]
    again = precision.resolve("auto", "cpu", 64, 256)
    assert again["precision"] == first["precision"] and "cached for this machine" in again["reason"]
    other = "bf16-mixed" if first["precision"] == "32-true" else "32-true"
    resumed = precision.resolve("auto", "cpu", 64, 256, previous=other)
    assert resumed["precision"] == other and "resumed" in resumed["reason"]
    assert precision.resolve("auto", "cpu", 64, 256, rank=1)["precision"] == other  # rank 0's, by env
    assert precision.resolve("32-true", "cpu", 64, 256)["reason"] == "set in the config"


def test_a_run_records_its_choice(train, tmp_path, monkeypatch):
    monkeypatch.delenv(precision.ENV, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torch's intra-op threads: they change a CPU run's numbers
    _, out = train("size.precision=auto", "logger=none", "eval=none", *FAST)
    [path] = list(Path(out).rglob("summary.json"))
    s = read_summary(path.parent)
    assert s["status"] == "completed" and s["precision"] in ("32-true", "bf16-mixed")
    c = s["precision_choice"]
    assert c["requested"] == "auto" and c["precision"] == s["precision"] and "bf16" in c["reason"]
    assert set(s["cpu"]["flags"]) <= set(precision.FLAGS) and s["cpu"]["threads"] == 1
    resolved = (path.parent / "config_resolved.yaml").read_text()
    assert f"precision: {s['precision']}" in resolved and "precision: auto" in resolved  # size: auto


@pytest.mark.parametrize("value", ["auto", "32-true"])
def test_auto_is_a_valid_precision(value):
    from hydra import compose, initialize_config_dir

    from conftest import ROOT
    from remoe.resolvers import register_resolvers
    from remoe.train.spec import validate

    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        validate(compose("config", overrides=[f"trainer.precision={value}", "eval=none"]))
