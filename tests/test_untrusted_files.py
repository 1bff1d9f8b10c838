"""No file a user is handed runs code when read (README: Reliability, "What reads files"): for each loader, a
crafted file whose unpickling (or instantiation) would create a marker file, read through the real command or
the loader itself; the command refuses in one line and the marker never appears."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAST, ROOT


class Payload:
    """Unpickling this runs a shell command (it creates the file `marker`)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def trained(fast_run):
    """One tiny trained run (conftest's fast_run; its checkpoint is the template every crafted file is made
    from; tests copy it before changing anything)."""
    return fast_run


def _cli(script, *args, cwd, env=None):
    env = {**os.environ, **(env or {})}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, str(ROOT / "src" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _one_line_refusal(p, *words):
    assert p.returncode == 2, (p.stdout[-2000:], p.stderr[-3000:])
    assert "Traceback" not in p.stdout + p.stderr
    lines = [x for x in p.stderr.splitlines() if "config error" in x]
    assert len(lines) == 1 and all(w in lines[0] for w in words), p.stderr[-2000:]


def _run_copy(trained, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run


def test_a_checkpoint_file_holding_code_is_refused_by_evaluate_export_and_resume(trained, tmp_path):
    run = _run_copy(trained, tmp_path)
    marker = tmp_path / "PWNED"
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    state["routing_state"] = {"x": Payload(marker)}  # torch.save pickles it; only an unpickler can run it
    torch.save(state, ckpt)
    _one_line_refusal(_cli("evaluate.py", f"checkpoint={ckpt}", cwd=tmp_path), "cannot read", str(ckpt))
    _one_line_refusal(_cli("export.py", f"checkpoint={ckpt}", f"out={tmp_path / 'hf'}", cwd=tmp_path), str(ckpt))
    p = _cli("train.py", "logger=csv", "eval=none", *FAST, f"hydra.run.dir={run}", "resume=true", cwd=tmp_path)
    _one_line_refusal(p, "cannot be loaded")
    assert not marker.exists() and not (tmp_path / "hf").exists()


def _sharded_from(trained, tmp_path) -> Path:
    """A sharded checkpoint folder (trainer=fsdp's layout: meta.pt + .metadata + shards) holding the trained
    run's weights, written by torch.distributed.checkpoint itself in one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    run = _run_copy(trained, tmp_path)
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    ckpt.unlink()
    ckpt.mkdir()
    dcp.save({"state_dict": state.pop("state_dict")}, storage_writer=FileSystemWriter(str(ckpt)), no_dist=True)
    state.pop("optimizer_states")
    torch.save(state, ckpt / "meta.pt")
    return ckpt


def test_a_sharded_checkpoint_is_read_without_pickle_and_a_crafted_one_is_refused(trained, tmp_path):
    """torch.distributed.checkpoint's FileSystemReader unpickles .metadata; remoe.checkpoint reads it with an
    unpickler that knows only the checkpoint-metadata classes. The honest folder loads (evaluate reads it);
    the same folder with a crafted .metadata is refused by evaluate and export, and the code never runs."""
    from remoe.checkpoint import load_checkpoint, read_sharded_metadata

    ckpt = _sharded_from(trained, tmp_path)
    model, _, _ = load_checkpoint(str(ckpt))
    ref, _, _ = load_checkpoint(str(trained / "checkpoints" / "last.ckpt"))
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
    assert read_sharded_metadata(str(ckpt)).state_dict_metadata  # the honest metadata reads
    marker = tmp_path / "PWNED"
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(Payload(marker), f)
    _one_line_refusal(_cli("evaluate.py", f"checkpoint={ckpt}", cwd=tmp_path), str(ckpt))
    _one_line_refusal(_cli("export.py", f"checkpoint={ckpt}", f"out={tmp_path / 'hf'}", cwd=tmp_path), str(ckpt))
    assert not marker.exists()


def test_a_sharded_meta_pt_holding_code_is_refused(trained, tmp_path):
    ckpt = _sharded_from(trained, tmp_path)
    marker = tmp_path / "PWNED"
    meta = torch.load(ckpt / "meta.pt", weights_only=True)
    meta["loops"] = Payload(marker)
    torch.save(meta, ckpt / "meta.pt")
    _one_line_refusal(_cli("evaluate.py", f"checkpoint={ckpt}", cwd=tmp_path), str(ckpt))
    assert not marker.exists()


def test_non_tensor_shard_items_load_without_code(tmp_path):
    """The optimizer's param_groups are non-tensor items of a shard, which torch's DefaultLoadPlanner unpickles
    with weights_only=False (the FSDP resume path reads them): remoe.checkpoint's planner loads honest ones,
    and refuses a crafted one before it runs."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    from remoe.checkpoint import CheckpointError, dcp_load

    honest, crafted, marker = tmp_path / "honest", tmp_path / "crafted", tmp_path / "PWNED"
    group = {"lr": 2e-3, "betas": (0.9, 0.999), "weight_decay": 0.01, "fused": True}  # one non-tensor item
    dcp.save({"w": torch.ones(3), "group": group}, storage_writer=FileSystemWriter(str(honest)), no_dist=True)
    dcp.save({"w": torch.ones(3), "group": Payload(marker)}, storage_writer=FileSystemWriter(str(crafted)),
             no_dist=True)
    state = {"w": torch.zeros(3), "group": dict.fromkeys(group)}  # the layout; torch flattens dicts by key
    dcp_load(state, str(honest), no_dist=True)
    assert torch.equal(state["w"], torch.ones(3)) and state["group"] == group
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        dcp_load({"w": torch.zeros(3), "group": None}, str(crafted), no_dist=True)
    assert not marker.exists()


def test_a_recorded_data_config_is_never_instantiated(trained, tmp_path):
    """eval=local rebuilds the run's data module from its config_resolved.yaml (or an export's
    training_config.yaml): a `_target_` naming other code is refused, not called."""
    run = _run_copy(trained, tmp_path)
    marker = tmp_path / "PWNED"
    text = (run / "config_resolved.yaml").read_text()
    (run / "config_resolved.yaml").write_text(text.replace(
        "_target_: remoe.data.LMDataModule", f"_target_: os.system\n  _args_: ['touch {marker}']"))
    p = _cli("evaluate.py", f"checkpoint={run / 'checkpoints' / 'last.ckpt'}", "eval.n_docs=10", cwd=tmp_path)
    _one_line_refusal(p, "no remoe data section")
    assert not marker.exists()


def test_yaml_records_are_read_without_python_tags(trained, tmp_path):
    """Records' YAML goes through OmegaConf's safe loader: a Python tag in a run's config_resolved.yaml is an
    unreadable record for resume and for keep-records, never a call."""
    run = _run_copy(trained, tmp_path / "runs")
    marker = tmp_path / "PWNED"
    (run / "config_resolved.yaml").write_text(f"seed: !!python/object/apply:os.system ['touch {marker}']\n")
    p = _cli("train.py", "logger=csv", "eval=none", *FAST, f"hydra.run.dir={run}", "resume=true", cwd=tmp_path)
    _one_line_refusal(p, "config_resolved.yaml cannot be read")
    (tmp_path / "kept" / "run").mkdir(parents=True)
    shutil.copy(run / "summary.json", tmp_path / "kept" / "run" / "summary.json")
    (tmp_path / "kept" / "run" / "config_resolved.yaml").write_text("seed: 1\n")
    p = _cli("report.py", "--keep-records", str(tmp_path / "runs"), str(tmp_path / "kept"), cwd=tmp_path)
    _one_line_refusal(p, "cannot be read")
    assert not marker.exists()


def test_an_exported_folder_is_read_from_safetensors_and_json_only(trained, tmp_path):
    """load_hf (evaluate.py on an exported folder) reads config.json, safetensors and tokenizer.json: no
    custom code from the folder runs (its modeling file is never imported), and a weight map naming a file
    outside the folder is refused."""
    pytest.importorskip("transformers")
    from remoe.export import export, load_hf

    folder = Path(export(str(trained / "checkpoints" / "last.ckpt"), str(tmp_path / "hf"), verify=False))
    marker = tmp_path / "PWNED"
    for py in folder.glob("*.py"):
        py.write_text(f"import os\nos.system('touch {marker}')\n")
    model, _, _ = load_hf(str(folder))
    assert model.cfg.routing == "remoe" and not marker.exists()
    index = {"weight_map": {k: "../../outside.safetensors" for k in model.state_dict()}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    p = _cli("evaluate.py", f"checkpoint={folder}", cwd=tmp_path)
    _one_line_refusal(p, "outside the folder")
    assert not marker.exists()
