"""Untrusted checkpoints: a pickle payload planted in place of any file keel owns never runs."""

import pickle
import shutil

import pytest

from tests.helpers import run_keel, tiny_overrides

KEEL_FILES = ["keel_rank00000.safetensors", "meta.json", "manifest.json"]


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


def _plant(folder, name: str, marker, rehash: bool) -> None:
    """Replace `name` by the payload; with `rehash`, also forge the manifest so that it matches."""
    from pretrain import checkpoint

    (folder / name).write_bytes(pickle.dumps(Payload(marker)))
    if rehash and name != "manifest.json":
        checkpoint.write_manifest(folder)


@pytest.mark.parametrize("rehash", [False, True], ids=["manifest-kept", "manifest-forged"])
@pytest.mark.parametrize("name", KEEL_FILES)
def test_each_loader_refuses_a_planted_pickle(run_with_checkpoints, tmp_path, name, rehash):
    from pretrain import checkpoint

    folder = shutil.copytree(run_with_checkpoints / "checkpoints" / "step_00000006", tmp_path / "step_00000006")
    marker = tmp_path / "marker"
    _plant(folder, name, marker, rehash)
    problem = checkpoint.verify(folder, collective=False)
    if name == "keel_rank00000.safetensors":
        if rehash:
            assert problem is None  # a forged manifest passes, so the loader itself must refuse
        with pytest.raises(checkpoint.CheckpointError, match="is not a keel state file"):
            checkpoint.load_state(folder / name)
    elif name == "meta.json":
        with pytest.raises(checkpoint.CheckpointError, match="is not valid JSON"):
            checkpoint.read_meta(folder)
    else:
        assert problem is not None and "manifest.json is unreadable" in problem
    assert not marker.exists()


def test_resuming_a_forged_checkpoint_stops_in_one_line_and_runs_nothing(run_with_checkpoints, tiny_data, tmp_path):
    run = shutil.copytree(run_with_checkpoints, tmp_path / "run")
    marker = tmp_path / "marker"
    _plant(run / "checkpoints" / "step_00000006", "keel_rank00000.safetensors", marker, rehash=True)
    proc = run_keel(tiny_overrides(tiny_data, run, steps=8), check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("keel: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "is not a keel state file" in errors[0]
    assert not marker.exists()
