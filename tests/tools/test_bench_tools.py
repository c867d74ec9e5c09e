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


def test_bench_step_prints_keel_against_plain_eager_and_compiled():
    out = _run("bench_step.py", "--steps", "2", "--warmup", "1", *TINY)
    rows = {line.split("  ")[0].strip(): line for line in out.splitlines()}
    for name in ("keel", "plain eager", "plain compiled"):
        assert "tokens/s" in rows[name] and "MFU      -" in rows[name], out  # no MFU without a known GPU
    for line in ("ratio keel/compiled", "monitored step", "keel freed before the baselines: yes"):
        assert line in out, out


def test_bench_step_presets_name_the_issue_shapes():
    import importlib

    bench = importlib.import_module("tools.bench_step")
    shape = {name: {o.split("=")[0]: o.split("=")[1] for o in preset if not o.startswith("+")}
             for name, preset in bench.PRESETS.items()}
    assert shape["286M"]["model.num_layers"] == "24" and shape["286M"]["model.hidden_size"] == "1024"
    assert shape["755M"]["model.num_layers"] == "16" and shape["755M"]["data.seq_len"] == "2048"
    assert int(shape["1.5B"]["model.num_layers"]) * int(shape["1.5B"]["model.hidden_size"]) ** 2 * 11 > 1.4e9


def test_profile_monitor_times_each_part():
    out = _run("profile_monitor.py", *TINY)
    assert "monitored step" in out and "_matrix_stats" in out and "SVD of 384" in out


def test_bench_checkpoint_compares_synchronous_and_background_saves():
    out = _run("bench_checkpoint.py", "--saves", "1", "--after", "1", *TINY)
    assert "synchronous save holds training up" in out and "background save holds training up" in out
