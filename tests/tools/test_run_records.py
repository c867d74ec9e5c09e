"""Finished runs' records carried between machines (tools/experiments/run_records.py) and the rule that ends a
launch of a finished run at once (pretrain.run.finished_result). The end-to-end relaunch of a sweep from its
records alone is tests/pretrain/test_sweep_e2e.py's."""

import json
import subprocess
import tarfile
from dataclasses import asdict
from pathlib import Path

import pytest

from pretrain.config import compose_config
from pretrain.run import finished_result
from tools.experiments import ExperimentError
from tools.experiments.run_records import ignored_by_git, main, pack, unpack

ROOT = Path(__file__).resolve().parents[2]


def _run(folder: Path, status: str | None, checkpoint: bool = True) -> Path:
    """A run folder with its record (result.json only when `status`) and a checkpoint file, which is left behind."""
    folder.mkdir(parents=True)
    (folder / "run_info.json").write_text(json.dumps({"config": {"seed": 1}, "git_revision": "abc"}))
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n')
    if status:
        (folder / "result.json").write_text(json.dumps({"status": status, "step": 1}))
    if checkpoint:
        (folder / "checkpoints" / "step_00000001").mkdir(parents=True)
        (folder / "checkpoints" / "step_00000001" / "common.pt").write_bytes(b"weights")
    return folder


@pytest.fixture
def runs(tmp_path) -> Path:
    """A repository root with runs/sweep/{a: completed, b: diverged, c: running, d: preempted}."""
    for name, status in (("a", "completed"), ("b", "diverged"), ("c", None), ("d", "preempted")):
        _run(tmp_path / "runs" / "sweep" / name, status)
    return tmp_path


def _names(archive: Path) -> list[str]:
    with tarfile.open(archive, "r:xz") as tar:
        return tar.getnames()


def test_pack_keeps_finished_runs_records_and_unpack_restores_them_byte_for_byte(runs, tmp_path):
    out = runs / "records" / "one.tar.xz"
    assert main(["pack", str(runs / "runs"), "--out", str(out), "--base", str(runs)]) == 0
    # 1. the finished runs' record files, nothing of a run still going or preempted, no checkpoint
    assert _names(out) == [f"runs/sweep/{r}/{f}" for r in "ab" for f in ("run_info.json", "result.json", "metrics.jsonl")]
    # 2. the same records pack to the same bytes (no times or owners in the archive)
    again = pack([runs / "runs"], runs / "records" / "two.tar.xz", [], runs)
    assert again == [Path("runs/sweep/a"), Path("runs/sweep/b")]
    assert (runs / "records" / "two.tar.xz").read_bytes() == out.read_bytes()
    # 3. unpacked elsewhere: the same bytes; unpacked twice: nothing more to write
    there = tmp_path / "elsewhere"
    assert unpack([out], there) == 6 and unpack([out], there) == 0
    for f in ("run_info.json", "result.json", "metrics.jsonl"):
        assert (there / "runs/sweep/a" / f).read_bytes() == (runs / "runs/sweep/a" / f).read_bytes()
    assert not (there / "runs/sweep/a/checkpoints").exists() and not (there / "runs/sweep/c").exists()
    # 4. a record that differs from what is there is refused, naming the file, and nothing is overwritten
    (there / "runs/sweep/b/metrics.jsonl").write_text("changed\n")
    with pytest.raises(ExperimentError, match=r"runs/sweep/b/metrics.jsonl differs from its record"):
        unpack([out], there)
    assert (there / "runs/sweep/b/metrics.jsonl").read_text() == "changed\n"


def test_a_later_archive_leaves_out_the_runs_earlier_ones_hold(runs):
    first = pack([runs / "runs"], runs / "first.tar.xz", [], runs)
    _run(runs / "runs" / "sweep" / "e", "completed")
    (runs / "runs/sweep/c/result.json").write_text(json.dumps({"status": "completed", "step": 1}))  # c finished
    later = pack([runs / "runs"], runs / "later.tar.xz", [runs / "first.tar.xz"], runs)
    assert first == [Path("runs/sweep/a"), Path("runs/sweep/b")]
    assert later == [Path("runs/sweep/c"), Path("runs/sweep/e")]
    with pytest.raises(ExperimentError, match="no finished run below .* that the archives lack"):
        pack([runs / "runs"], runs / "none.tar.xz", [runs / "first.tar.xz", runs / "later.tar.xz"], runs)
    with pytest.raises(ExperimentError, match="later.tar.xz exists; name a new archive"):
        pack([runs / "runs"], runs / "later.tar.xz", [], runs)


def test_an_archive_git_would_ignore_is_refused_before_it_is_written(runs, capsys):
    # the archives exist to be committed: one that .gitignore keeps out would be lost with the machine
    subprocess.run(["git", "init", "-q", str(runs)], check=True)
    (runs / ".gitignore").write_text("runs/\n")
    out = runs / "records" / "runs" / "one.tar.xz"
    assert main(["pack", str(runs / "runs"), "--out", str(out), "--base", str(runs)]) == 2
    assert f"{out} is ignored by git (.gitignore:1:runs/), so a commit would leave it out" in capsys.readouterr().err
    assert not out.parent.exists()
    (runs / ".gitignore").write_text("runs/\n!records/runs/\n")  # un-ignored, as keel's own .gitignore does
    assert main(["pack", str(runs / "runs"), "--out", str(out), "--base", str(runs)]) == 0


def test_keels_folder_of_run_records_is_kept_by_git():
    assert ignored_by_git(ROOT / "docs" / "results" / "runs" / "any-2026-12-07.tar.xz") is None
    assert ignored_by_git(ROOT / "runs" / "sweep" / "a.tar.xz").endswith(":runs/")  # the runs themselves are not


def test_an_archive_that_is_not_run_records_is_refused_before_anything_is_written(tmp_path, capsys):
    evil = tmp_path / "evil.tar.xz"
    with tarfile.open(evil, "w:xz") as tar:
        tar.add(_run(tmp_path / "x", "completed") / "result.json", arcname="runs/x/result.json")
        tar.add(tmp_path / "x" / "metrics.jsonl", arcname="../outside/metrics.jsonl")
    assert main(["unpack", str(evil), "--into", str(tmp_path / "into")]) == 2
    assert "holds '../outside/metrics.jsonl', which is not a run's record file" in capsys.readouterr().err
    assert not (tmp_path / "into").exists() and not (tmp_path / "outside").exists()
    (tmp_path / "broken.tar.xz").write_bytes(b"not xz")
    assert main(["unpack", str(tmp_path / "broken.tar.xz")]) == 2
    assert "broken.tar.xz is not a run-records archive" in capsys.readouterr().err


def _record(folder: Path, cfg, status: str, step: int, max_steps: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run_info.json").write_text(json.dumps({"config": asdict(cfg)}, default=str))
    (folder / "result.json").write_text(json.dumps({"status": status, "step": step, "max_steps": max_steps}))
    return folder


def test_a_launch_has_nothing_to_train_only_where_the_run_finished_as_this_config_asks(tmp_path):
    cfg = compose_config(["trainer.max_steps=8"])
    assert finished_result(cfg, tmp_path / "new") is None
    # 1. completed: at this config's last step (max_steps, or stop_at of the same schedule)
    assert finished_result(cfg, _record(tmp_path / "done", cfg, "completed", 8, 8))["status"] == "completed"
    assert finished_result(compose_config(["trainer.max_steps=12"]), tmp_path / "done") is None  # trained further
    stopped = _record(tmp_path / "stopped", cfg, "completed", 4, 8)
    assert finished_result(cfg, stopped) is None  # stopped early (trainer.stop_at=4): the rest is to train
    assert finished_result(compose_config(["trainer.max_steps=8", "trainer.stop_at=4"]), stopped) is not None
    # 2. diverged: under this very config only (a lower rate in the same folder resumes before the spike)
    diverged = _record(tmp_path / "diverged", cfg, "diverged", 3, 8)
    assert finished_result(cfg, diverged)["status"] == "diverged"
    assert finished_result(compose_config(["trainer.max_steps=8", "optim.lr=1e-5"]), diverged) is None
    # 3. preempted, or a record being written: train (resume) as usual
    assert finished_result(cfg, _record(tmp_path / "preempted", cfg, "preempted", 5, 8)) is None
    (tmp_path / "done" / "result.json").write_text('{"status": "comp')
    assert finished_result(cfg, tmp_path / "done") is None
