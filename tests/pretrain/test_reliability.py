"""Checkpoints that cannot lie, preemption, resharding on resume, no leftovers, and the run folder's
hard edges: each promise of docs/reliability.md, tried the way a user meets it."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import MAIN, ROOT, child_env, losses, run_keel, tiny_overrides

pytestmark = pytest.mark.slow


def _error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("keel: error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def six_steps(tiny_data, tmp_path_factory):
    """A finished 6-step run with checkpoints at steps 3 and 6 (copied, never changed, by the tests)."""
    run = tmp_path_factory.mktemp("six") / "run"
    run_keel(tiny_overrides(tiny_data, run, steps=6))
    return run


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def _crashed(run: Path, to: Path) -> Path:
    """A copy of `run` as a run killed after its last checkpoint left it: without result.json (a run that
    completed would end at once when launched again, its checkpoints untouched)."""
    (_copy(run, to) / "result.json").unlink()
    return to


# ---- every kind of damage, on every kind of checkpoint file -----------------------------------------
FILES = {"a model/optimizer shard": "*.distcp", "the shard index": ".metadata", "megatron's metadata": "metadata.json",
         "keel's state": "keel_rank00000.safetensors", "meta.json": "meta.json", "the manifest": "manifest.json"}


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "overwrite":  # same size, different bytes: only the checksum can tell
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 8]) + data[middle + 8:])
    else:
        path.unlink()


@pytest.mark.parametrize("how", ["truncate", "overwrite", "delete"])
@pytest.mark.parametrize("what", list(FILES))
def test_verification_catches_every_damage(six_steps, tmp_path, what, how):
    from pretrain import checkpoint

    folder = _copy(six_steps / "checkpoints" / "step_00000006", tmp_path / "step_00000006")
    assert checkpoint.verify(folder, collective=False) is None
    _damage(sorted(folder.glob(FILES[what]))[0], how)
    assert checkpoint.verify(folder, collective=False) is not None


def test_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_resumes_exactly(six_steps, tiny_data, tmp_path):
    run = _crashed(six_steps, tmp_path / "run")
    _damage(sorted((run / "checkpoints" / "step_00000006").glob("*.distcp"))[0], "overwrite")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # and a kill in the middle of a metrics line
    out = run_keel(tiny_overrides(tiny_data, run, steps=6) + ["init_from=/nowhere"])
    assert "step_00000006 failed verification" in out.stdout and "moved to step_00000006.bad" in out.stdout
    assert "dropped the last line" in out.stdout
    assert "init_from=/nowhere is ignored" in out.stdout and "resumed from" in out.stdout
    assert (run / "checkpoints" / "step_00000006.bad").is_dir()  # set aside, not deleted
    assert losses(run) == losses(six_steps)  # steps 4-6 re-run from step 3, bit for bit
    result = json.loads((run / "result.json").read_text())
    assert result["resumed_from"].endswith("step_00000003") and any("failed verification" in n for n in result["notes"])
    assert (run / "run_info_history.jsonl").read_text().count("\n") == 1  # the first start's info is kept


def test_no_good_checkpoint_stops_instead_of_starting_over(six_steps, tiny_data, tmp_path):
    run = _crashed(six_steps, tmp_path / "run")
    for step in ("step_00000003", "step_00000006"):
        (run / "checkpoints" / step / "keel_rank00000.safetensors").write_bytes(b"not a keel state file")
    before = (run / "metrics.jsonl").read_text()
    line = _error_line(run_keel(tiny_overrides(tiny_data, run, steps=6), check=False))
    assert "passes verification" in line and "step_00000003.bad" in line and "new run_dir" in line
    assert (run / "metrics.jsonl").read_text() == before  # nothing trained


def test_ckpt_tool_verifies_offline(six_steps, tmp_path, capsys):
    from tools.ckpt import main  # its command line, in this process

    run = _copy(six_steps, tmp_path / "run")
    assert main(["verify", str(run)]) == 0 and capsys.readouterr().out.count(": OK") == 2
    _damage(run / "checkpoints" / "step_00000003" / "meta.json", "truncate")
    assert main(["verify", str(run)]) == 1 and "step_00000003: FAILED: meta.json has" in capsys.readouterr().out
    assert (run / "checkpoints" / "step_00000003").is_dir()  # verifying moves nothing


# ---- preemption ------------------------------------------------------------------------------------------
def _start(overrides: list[str], nproc: int = 1) -> subprocess.Popen:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
                if nproc > 1 else [sys.executable])
    return subprocess.Popen([*launcher, str(MAIN), *overrides], cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _workers(agent_pid: int) -> list[int]:
    """The processes torchrun started (its direct children)."""
    children = Path(f"/proc/{agent_pid}/task/{agent_pid}/children")
    return [int(p) for p in children.read_text().split()] if children.exists() else []


STOP = 12  # where the reference stops; every preemption lands before it


@pytest.fixture(scope="module")
def long_schedule(tiny_data, tmp_path_factory):
    """A 40-step schedule stopped after step 12: the reference of the preemption tests."""
    run = tmp_path_factory.mktemp("long") / "run"
    run_keel(tiny_overrides(tiny_data, run, steps=40) + [f"trainer.stop_at={STOP}"])
    return run


EVERY_STEP = ["checkpoint.interval=1"]  # a save per step: the run is slow enough to be preempted before STOP


def _wait_for_first_checkpoint(run: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Until step 1's checkpoint is published: the run is past its start and saving every step."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (run / "checkpoints" / "step_00000001").is_dir():
            return
        time.sleep(0.02)
    raise AssertionError(f"the run never checkpointed step 1: {proc.communicate()[1][-2000:]}")


def _preempted_at(run: Path) -> int:
    step = max(losses(run))
    assert step < STOP and json.loads((run / "result.json").read_text())["status"] == "preempted"
    assert (run / "checkpoints" / f"step_{step:08d}" / "manifest.json").exists()
    return step


def test_sigterm_to_the_process_group_twice_checkpoints_and_resumes_exactly(long_schedule, tiny_data, tmp_path):
    # what systemd does (kill -TERM -- -PGID): every process of the group gets it; then a second signal
    # 50 ms later
    run = tmp_path / "run"
    proc = _start(tiny_overrides(tiny_data, run, steps=40) + EVERY_STEP)
    _wait_for_first_checkpoint(run, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    # and a third once the result is written, while the process shuts down (it once died of such a signal)
    while proc.poll() is None and not (run / "result.json").exists():
        time.sleep(0.01)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    step = _preempted_at(run)
    assert f"preempted by SIGTERM at step {step}" in out
    assert "keel: already stopping (SIGTERM ignored)" in err and "Traceback" not in err, err[-3000:]
    run_keel(tiny_overrides(tiny_data, run, steps=40) + [f"trainer.stop_at={STOP}"])
    assert losses(run) == losses(long_schedule)


def test_one_run_per_run_dir_and_sigterm_to_the_torchrun_agent(long_schedule, tiny_data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # 1. a run folder another live run holds: every rank stops with one line naming the holder
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pretrain.rundir import RunLock\n"
                               f"RunLock({str(run)!r}).acquire()\nprint('held', flush=True)\ntime.sleep(600)"],
                              cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    refused = run_keel(tiny_overrides(tiny_data, run, steps=40), nproc=2, check=False)
    lines = {line for line in refused.stderr.splitlines() if line.startswith("keel: error:")}
    assert refused.returncode != 0 and len(lines) == 1, refused.stderr[-3000:]
    assert f"{run} is in use by another keel run (host {socket.gethostname()}, pid {holder.pid}" in lines.pop()
    assert not (run / "metrics.jsonl").exists()
    # 2. the holder dies without releasing (kill -9): the next run takes the lock over and says whose it was
    holder.kill()
    holder.wait()
    # 3. what Kubernetes does: SIGTERM to the agent, which sends it to each worker's process group
    agent = _start(tiny_overrides(tiny_data, run, steps=40) + EVERY_STEP, nproc=2)
    _wait_for_first_checkpoint(run, agent)
    agent.send_signal(signal.SIGTERM)
    out, err = agent.communicate(timeout=120)
    assert agent.returncode != 0 and f"pid {holder.pid}" in out and "took over" in out
    step = _preempted_at(run)
    assert f"preempted by SIGTERM at step {step}" in out
    assert "Broken pipe" not in err and "Connection reset" not in err, err[-3000:]
    run_keel(tiny_overrides(tiny_data, run, steps=40) + [f"trainer.stop_at={STOP}"], nproc=2)
    for s, loss in losses(long_schedule).items():  # DP=2 against one process: the usual float tolerance
        assert losses(run)[s] == pytest.approx(loss, rel=1e-5)


def test_a_run_lock_is_held_once_and_taken_over_from_a_dead_holder(tmp_path):
    from pretrain.rundir import RunLock

    first = RunLock(tmp_path)
    assert first.acquire() is None
    held = f"in use by another keel run \\(host {socket.gethostname()}, pid {os.getpid()}"
    with pytest.raises(ValueError, match=held):
        RunLock(tmp_path).acquire()  # a second descriptor of the same file: flock refuses it, in one process too
    first.release()
    again = RunLock(tmp_path)
    assert again.acquire() is None  # released cleanly: nothing to say
    os.close(again._fd)  # closed without a release, as when its process dies: the lock drops, the record stays
    again._fd = None
    taken = RunLock(tmp_path)
    assert f"pid {os.getpid()}" in taken.acquire()
    taken.release()


# ---- no leftovers ------------------------------------------------------------------------------------------
def _session_alive(sid: int) -> list[str]:
    """Processes still running in session `sid` (zombies awaiting their parent do not count)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields: state, ppid, pgrp, session
            alive.append((stat.parent / "cmdline").read_text().replace("\0", " ")[:120])
    return alive


@pytest.mark.parametrize("nproc", [1, 2])
def test_kill_9_leaves_no_process_behind(tiny_data, tmp_path, nproc):
    run = tmp_path / "run"
    proc = _start(tiny_overrides(tiny_data, run, steps=40) + ["checkpoint.interval=1"], nproc=nproc)
    deadline = time.time() + 240
    while not (run / "checkpoints" / "step_00000001").exists() and time.time() < deadline:
        time.sleep(0.05)  # the first save starts megatron's writer helpers
    time.sleep(0.5)
    for pid in ([proc.pid] if nproc == 1 else _workers(proc.pid)):
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=120)
    deadline = time.time() + 20
    while _session_alive(proc.pid) and time.time() < deadline:
        time.sleep(0.2)
    assert _session_alive(proc.pid) == []


# ---- resharding on resume ----------------------------------------------------------------------------------
LAYOUTS = {"tp1->tp2": ((1, []), (2, ["parallel.tensor=2"])),
           "dp2->dp1": ((2, ["optim.distributed=true"]), (1, ["optim.distributed=true"])),
           "pp2->pp1": ((2, ["parallel.pipeline=2"]), (1, []))}


@pytest.mark.parametrize("change", list(LAYOUTS))
def test_resume_at_another_layout_matches_the_same_layout(tiny_data, tmp_path, change):
    (n_from, from_extra), (n_to, to_extra) = LAYOUTS[change]
    steps = ["trainer.max_steps=13", "checkpoint.interval=3", "checkpoint.keep_last=10"]
    same, other = tmp_path / "same", tmp_path / "other"
    run_keel(tiny_overrides(tiny_data, same, steps=13) + steps + from_extra, nproc=n_from)
    (other / "checkpoints").mkdir(parents=True)
    shutil.copytree(same / "checkpoints" / "step_00000003", other / "checkpoints" / "step_00000003")
    out = run_keel(tiny_overrides(tiny_data, other, steps=13) + steps + to_extra, nproc=n_to)
    assert "resharded" in out.stdout and "RNG re-derived" in out.stdout
    resharded, reference = losses(other), losses(same)
    assert sorted(resharded) == list(range(4, 14))  # ten steps after the checkpoint
    for step, loss in resharded.items():
        assert loss == pytest.approx(reference[step], rel=1e-5), step


def test_layouts_keel_cannot_reshard_into_are_refused_from_meta_alone(tmp_path):
    from pretrain import checkpoint

    saved = {"layout": {"tp": 1, "pp": 1, "dp": 1, "ep": 1, "distributed_optimizer": False}}
    assert checkpoint.check_layout(saved, dict(saved["layout"]), tmp_path)
    assert not checkpoint.check_layout(saved, {**saved["layout"], "tp": 2}, tmp_path)  # resharded on load
    with pytest.raises(checkpoint.CheckpointError, match="saved with optim.distributed=false.*init_from"):
        checkpoint.check_layout(saved, {**saved["layout"], "distributed_optimizer": True}, tmp_path)


# ---- the run folder and its files --------------------------------------------------------------------------
def test_read_only_run_dir_is_one_line_before_anything_starts(tiny_data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    if subprocess.run(["chattr", "+i", str(run)], capture_output=True).returncode:
        pytest.skip("this filesystem has no immutable folders (chattr +i) to stand in for a read-only one")
    try:
        line = _error_line(run_keel(tiny_overrides(tiny_data, run), check=False))
    finally:
        subprocess.run(["chattr", "-i", str(run)], check=True)
    assert f"{run} is not writable" in line and "choose a writable run_dir" in line


def test_a_checkpoints_folder_that_cannot_be_written_is_found_first(tmp_path):
    from pretrain.checkpoint import CheckpointError
    from pretrain.run import check_writable

    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("a file where the checkpoints folder goes")
    with pytest.raises(CheckpointError, match=f"{run / 'checkpoints'} cannot be a folder: a file is in the way"):
        check_writable(run, rank=0)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(CheckpointError, match="a file is in the way.*choose another run_dir"):
        check_writable(tmp_path / "a-file" / "run", rank=0)


def test_file_size_limit_names_the_cause_and_the_path_and_a_failing_plot_masks_nothing(tiny_data, tmp_path):
    import resource

    run = tmp_path / "run"
    limit = 64 * 1024  # below a checkpoint shard of the tiny model, above every log file

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    # the loss plot cannot be written either (its temporary name is taken by a folder), as on a full disk
    (run / "loss.tmp.png").mkdir(parents=True)
    proc = subprocess.run([sys.executable, str(MAIN), *tiny_overrides(tiny_data, run), "logging.plot=true"], cwd=ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    line = _error_line(proc)
    assert "file-size limit" in line and "step_00000003.tmp" in line
    assert "keel: the loss_plot callback could not finish (IsADirectoryError" in proc.stderr
    assert "Traceback" not in proc.stderr
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "failed" and "file-size limit" in result["error"] and result["step"] == 3


def test_a_malformed_metrics_row_is_one_line_naming_file_and_line(tmp_path):
    from types import SimpleNamespace

    from models.config import ConfigError
    from pretrain.callbacks.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, interval=1)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n\n{}\n{"step": 2, "loss": 1.9}\n')
    with pytest.raises(ConfigError, match=f"^{tmp_path / 'metrics.jsonl'} line 3 is not a metrics row .*; repair or "
                                         "remove that line to resume$"):
        logger.on_train_start(SimpleNamespace(step=2))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n[1, 2]\n')  # a torn or bad last line
    logger.on_train_start(SimpleNamespace(step=2))
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'


def test_async_save_publishes_verified_checkpoints_that_resume_exactly(six_steps, tiny_data, tmp_path):
    from pretrain import checkpoint

    run = tmp_path / "run"
    background = ["checkpoint.async_save=true"]
    run_keel(tiny_overrides(tiny_data, run, steps=6) + background + ["trainer.stop_at=3"])
    assert checkpoint.verify(run / "checkpoints" / "step_00000003", collective=False) is None
    out = run_keel(tiny_overrides(tiny_data, run, steps=6) + background)
    assert "resumed from" in out.stdout and losses(run) == losses(six_steps)
    assert checkpoint.verify(run / "checkpoints" / "step_00000006", collective=False) is None
    assert not list((run / "checkpoints").glob("*.tmp"))
