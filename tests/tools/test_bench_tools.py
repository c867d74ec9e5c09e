"""The benchmark tools run on CPU at tiny shapes, so CI exercises them."""

import subprocess
import sys

from tests.helpers import ROOT, child_env

TINY = ["+experiment=smoke", "model.hidden_size=32", "model.head_dim=16", "data.seq_len=32", "model.max_seq_len=64",
        "trainer.global_batch_size=2", "trainer.micro_batch_size=2"]


def _run(tool: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, f"tools/{tool}", *args], cwd=ROOT, env=child_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_bench_step_prints_keel_against_plain():
    out = _run("bench_step.py", "--steps", "2", "--warmup", "1", *TINY)
    for line in ("keel step", "plain PyTorch step", "ratio keel/plain", "monitored step"):
        assert line in out, out


def test_profile_monitor_times_each_part():
    out = _run("profile_monitor.py", *TINY)
    assert "monitored step" in out and "_matrix_stats" in out and "SVD of 384" in out


def test_bench_checkpoint_compares_synchronous_and_background_saves():
    out = _run("bench_checkpoint.py", "--saves", "1", "--after", "1", *TINY)
    assert "synchronous save holds training up" in out and "background save holds training up" in out
