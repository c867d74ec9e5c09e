"""Untrusted checkpoints and packed data: a pickle payload planted in any checkpoint file never runs,
through any loading path, whether or not the manifest was forged to match; the manifest lists exactly
the folder, by plain names, and is signed when a key is configured; token ids past the vocabulary stop
a run in one line."""

import dataclasses
import io
import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from tests.helpers import run_keel, tiny_overrides

CHECKPOINT_FILES = [".metadata", "__0_0.distcp", "metadata.json", "keel_rank00000.safetensors", "meta.json",
                    "manifest.json"]
CASES = [(name, forged) for name in CHECKPOINT_FILES for forged in (False, True)
         if not (name == "manifest.json" and forged)]  # forging the manifest is planting in it


class Payload:
    """Unpickling this creates `marker`: proof that loading ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def run_with_checkpoints(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("untrusted") / "run"
    run_keel(tiny_overrides(tiny_data, run, steps=6))
    return run


def _plant_in_shard(folder, marker) -> None:
    """A torch-saved payload appended to a shard, and megatron's common state pointed at it (the index
    itself stays made of allowed classes only: it passes the allowlist)."""
    with open(folder / ".metadata", "rb") as f:
        index = pickle.load(f)  # the test's own file
    key = next(k for k in index.storage_data if k.fqn.startswith("common_state"))
    payload = io.BytesIO()
    torch.save(Payload(marker), payload)
    shard = folder / index.storage_data[key].relative_path
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(payload.getvalue())
    index.storage_data[key] = dataclasses.replace(index.storage_data[key], offset=offset,
                                                  length=len(payload.getvalue()))
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(index, f)


def _plant(folder, name: str, marker, forged: bool) -> None:
    """Plant the payload in `name`; `forged`: also rewrite the manifest to match, as whoever can write the
    folder can (without the signing key)."""
    from pretrain import checkpoint

    if name.endswith(".distcp"):
        _plant_in_shard(folder, marker)
    else:
        (folder / name).write_bytes(pickle.dumps(Payload(marker)))
    if forged:
        checkpoint.write_manifest(folder)


@pytest.fixture(scope="module")
def trainer(run_with_checkpoints, tiny_data, tmp_path_factory, megatron_world):
    """A trainer of the run's shape in this process: what resume and init_from load into."""
    from pretrain.config import compose_config
    from pretrain.run import build_trainer

    run = tmp_path_factory.mktemp("trainer") / "run"
    cfg = compose_config(tiny_overrides(tiny_data, run, steps=6))
    return build_trainer(cfg, megatron_world, run)


def _resume(trainer, run, tmp_path):
    from pretrain.checkpoint import Checkpoints

    trainer.checkpoints = Checkpoints(run / "checkpoints", keep_last=2)  # what this process has not verified
    trainer.resume(trainer.checkpoints.select_resume().path)


def _init_from(trainer, run, tmp_path):
    from pretrain.run import run_checkpoints, starting_point

    cfg = dataclasses.replace(trainer.cfg, init_from=str(run))
    checkpoints = run_checkpoints(cfg, tmp_path / "fresh")
    start = starting_point(cfg, checkpoints, trainer.parts.signature)
    checkpoints.load(start.init_from, trainer.model, None, trainer.parts.signature)


def _generate_and_evaluate(trainer, run, tmp_path):
    from tools.generate import load_model  # evaluate.py's keel_model loads through it too

    load_model(str(run))


def _export(trainer, run, tmp_path):
    from tools.export_hf import export_model

    export_model(run, tmp_path / "hf", with_tokenizer=False)


LOADING_PATHS = {"resume": _resume, "init_from": _init_from, "generate/evaluate": _generate_and_evaluate,
                 "export": _export}


@pytest.mark.parametrize("name, forged", CASES, ids=[f"{n}-{'forged' if f else 'kept'}" for n, f in CASES])
def test_a_planted_payload_never_runs_through_any_loading_path(run_with_checkpoints, trainer, tmp_path, name,
                                                               forged, capsys):
    from pretrain.checkpoint import CheckpointError
    from tools import ckpt

    marker = tmp_path / "marker"
    for path, load in {"ckpt verify": None, **LOADING_PATHS}.items():
        run = shutil.copytree(run_with_checkpoints, tmp_path / path.replace("/", "-") / "run")
        shutil.rmtree(run / "checkpoints" / "step_00000003")  # the planted checkpoint is the only one
        _plant(run / "checkpoints" / "step_00000006", name, marker, forged)
        if load is None:
            # verify reads no pickle but the index, through the allowlist
            refused = not forged or name == ".metadata"
            assert ckpt.verify([run]) == int(refused), path
            assert ("FAILED" in capsys.readouterr().out) == refused
        elif forged and name.startswith("keel_rank") and path != "resume":
            load(trainer, run, tmp_path / path.replace("/", "-"))  # weights only: keel's state is never read
        else:
            with pytest.raises(CheckpointError) as e:
                load(trainer, run, tmp_path / path.replace("/", "-"))
            assert "\n" not in str(e.value), path
            if not forged or name == ".metadata":  # refused before anything was deserialised
                assert "verification" in str(e.value), (path, str(e.value))
        assert not marker.exists(), path


def test_resuming_forged_checkpoints_stops_in_one_line_and_runs_nothing(run_with_checkpoints, tiny_data, tmp_path):
    run = shutil.copytree(run_with_checkpoints, tmp_path / "run")
    marker = tmp_path / "marker"
    _plant(run / "checkpoints" / "step_00000006", ".metadata", marker, forged=True)  # refused by verification
    _plant(run / "checkpoints" / "step_00000003", "__0_0.distcp", marker, forged=True)  # passes it: refused on load
    proc = run_keel(tiny_overrides(tiny_data, run, steps=8), check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("keel: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "step_00000003" in errors[0] and "only loads by running code" in errors[0]
    assert (run / "checkpoints" / "step_00000006.bad").is_dir() and not marker.exists()


# ---- the allowlist against every layout: checkpoints written at TP, PP, DP, EP and with the distributed
#      optimizer are read through it in tests/pretrain/test_train_e2e.py and test_moe_e2e.py
#      (tests.helpers.assert_index_admitted), and every resume reads through it
def test_the_index_allowlist_refuses_any_other_class(run_with_checkpoints, tmp_path):
    from pretrain.checkpoint.safe_pickle import RefusedPickle, read_metadata
    from tests.helpers import assert_index_admitted

    assert_index_admitted(run_with_checkpoints)
    index = run_with_checkpoints / "checkpoints" / "step_00000006" / ".metadata"
    with open(index, "rb") as f:
        metadata = pickle.load(f)
    for planted, named in [(Payload(tmp_path / "marker"), "_io.open"), (dataclasses.replace, "dataclasses.replace"),
                           (np.zeros(2), "numpy")]:
        bad = tmp_path / "bad.metadata"
        metadata.planner_data = planted  # a field the index has, holding something it never holds
        bad.write_bytes(pickle.dumps(metadata))
        with pytest.raises(RefusedPickle, match=f"{bad} holds {named}.*which no checkpoint index is made of"):
            read_metadata(bad)
    metadata.planner_data = None
    key = next(iter(metadata.storage_data))
    metadata.storage_data[key] = dataclasses.replace(metadata.storage_data[key], relative_path="../../etc/passwd")
    bad.write_bytes(pickle.dumps(metadata))
    with pytest.raises(RefusedPickle, match="points at '../../etc/passwd', which is not a file name inside"):
        read_metadata(bad)
    assert not (tmp_path / "marker").exists()


def test_torch_reads_checkpoints_through_the_restricted_readers_while_keel_loads(run_with_checkpoints, trainer,
                                                                                   monkeypatch):
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    from pretrain.checkpoint import load, safe_pickle

    def readers():
        return FileSystemReader.read_metadata, DefaultLoadPlanner.__dict__["load_bytes"]

    torch_readers, during_load, megatron_load = readers(), [], dist_checkpointing.load

    def load_and_look(*args, **kwargs):
        during_load.append(readers())
        return megatron_load(*args, **kwargs)

    monkeypatch.setattr(dist_checkpointing, "load", load_and_look)
    load(run_with_checkpoints / "checkpoints" / "step_00000006", trainer.model, None, trainer.parts.signature)
    [(read_metadata, load_bytes)] = during_load
    assert read_metadata is safe_pickle._read_metadata and load_bytes.func is safe_pickle._load_bytes
    assert readers() == torch_readers  # torch's own again after the load (and importing keel changes nothing)


# ---- the manifest: exactly the folder, plain names, signed with a key -----------------------------------
def _copy(run, tmp_path):
    return shutil.copytree(run / "checkpoints" / "step_00000006", tmp_path / "step_00000006")


def _rewrite_manifest(folder, edit) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest["files"])
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_the_manifest_lists_exactly_the_folder_by_plain_names(run_with_checkpoints, tmp_path):
    from pretrain.checkpoint import verify

    folder = _copy(run_with_checkpoints, tmp_path)
    listed = json.loads((folder / "manifest.json").read_text())["files"]
    _rewrite_manifest(folder, dict.clear)  # the files emptied: verify used to say OK
    assert verify(folder, collective=False) == f"{sorted(listed)[0]} is in the folder but not in manifest.json"
    _rewrite_manifest(folder, lambda files: files.update(listed, **{"../../etc/passwd": {"size": 1, "sha256": "0"}}))
    problem = verify(folder, collective=False)
    assert "names '../../etc/passwd', which is not a file name inside the checkpoint" in problem
    _rewrite_manifest(folder, lambda files: files.pop("../../etc/passwd"))
    assert verify(folder, collective=False) is None
    (folder / "common.pt").write_bytes(pickle.dumps(Payload(tmp_path / "marker")))  # megatron's legacy torch.load
    _rewrite_manifest(folder, lambda files: files.update({"common.pt": {"size": 0, "sha256": "0"}}))
    assert verify(folder, collective=False) == "common.pt is not a file keel or megatron-core writes into a checkpoint"


def test_with_a_key_manifests_are_signed_and_a_forged_one_is_refused(run_with_checkpoints, tmp_path, monkeypatch):
    from pretrain.checkpoint import CheckpointError, verify, write_manifest
    from pretrain.checkpoint.manifest import signing_key

    folder = _copy(run_with_checkpoints, tmp_path)
    assert verify(folder, collective=False) is None  # written without a key: as before
    monkeypatch.setenv("KEEL_CHECKPOINT_KEY", "s3cret")
    assert verify(folder, collective=False) == ("manifest.json is not signed, and KEEL_CHECKPOINT_KEY asks for "
                                                "signed checkpoints")
    write_manifest(folder)
    assert verify(folder, collective=False) is None
    key_file = tmp_path / "key"
    key_file.write_text("another\n")
    monkeypatch.delenv("KEEL_CHECKPOINT_KEY")
    monkeypatch.setenv("KEEL_CHECKPOINT_KEY_FILE", str(key_file))
    assert "signature does not match the checkpoint key" in verify(folder, collective=False)
    key_file.write_text("s3cret\n")
    assert verify(folder, collective=False) is None
    # whoever writes the folder without the key forges an unsigned (or wrongly signed) manifest
    _plant(folder, "keel_rank00000.safetensors", tmp_path / "marker", forged=False)
    with monkeypatch.context() as without_key:
        without_key.delenv("KEEL_CHECKPOINT_KEY_FILE")
        write_manifest(folder)
    assert verify(folder, collective=False).startswith("manifest.json is not signed")
    monkeypatch.setenv("KEEL_CHECKPOINT_KEY", "s3cret")
    with pytest.raises(CheckpointError, match="both KEEL_CHECKPOINT_KEY and KEEL_CHECKPOINT_KEY_FILE are set"):
        signing_key()
    monkeypatch.delenv("KEEL_CHECKPOINT_KEY")
    key_file.unlink()
    with pytest.raises(CheckpointError, match="KEEL_CHECKPOINT_KEY_FILE=.* cannot be read"):
        signing_key()


# ---- packed data with token ids past the vocabulary -----------------------------------------------------------
def test_token_ids_past_the_vocabulary_stop_the_run_in_one_line_at_tp1_and_tp2(tiny_data, tmp_path):
    from data.format import dataset_files

    bad = tmp_path / "train"
    for f in dataset_files(tiny_data["train"]):
        shutil.copy(f, f"{bad}{f.name.removeprefix('train')}")
    tokens = np.memmap(f"{bad}.bin", dtype=np.uint16, mode="r+")
    tokens[::64] = 700  # every row's first token, past the 512-token vocabulary; the metadata is not told
    tokens.flush()
    for nproc, extra in ((1, []), (2, ["parallel.tensor=2"])):
        run = tmp_path / f"tp{nproc}"
        proc = run_keel(tiny_overrides({**tiny_data, "train": str(bad)}, run) + extra, nproc=nproc, check=False)
        errors = {line for line in proc.stderr.splitlines() if line.startswith("keel: error:")}
        assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]  # each rank says the same line
        assert f"{bad}.bin row" in errors.pop() and "past the 512-token vocabulary" in proc.stderr
        assert "IndexError" not in proc.stderr


def test_tools_say_a_missing_checkpoint_in_one_line(tmp_path, megatron_world, capsys):
    from tools import ckpt, evaluate, export_hf, generate

    nope = tmp_path / "nope"
    for tool, argv in [(generate, ["--checkpoint", str(nope), "--prompt", "x"]),
                       (evaluate, ["--checkpoint", str(nope), "--input", "stdlib:code:val"]),
                       (export_hf, ["--checkpoint", str(nope), "--output", str(tmp_path / "hf")]),
                       (ckpt, ["verify", str(nope)])]:
        assert tool.main(argv) == 2, tool.__name__
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(nope) in err and "Traceback" not in err, (tool.__name__, err)
    assert not (tmp_path / "hf").exists()
