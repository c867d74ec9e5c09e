"""Attention types end to end: exact resume for the types with modules of their own, generation from a
checkpoint, decoding under TP."""

import subprocess
import sys

import pytest

from tests.helpers import ROOT, child_env, losses, resume_folder, run_keel, tiny_overrides

pytestmark = pytest.mark.slow

# The types with modules (and so checkpoint shards) of their own. GQA, the default, is
# tests/pretrain/test_train_e2e.py's (every resume there); MHA and MQA are the same megatron module with a KV
# group per head or one in all. Each type's tensor-parallel path against one process is
# tests/models/test_attention.py's (loss, gradient norm and replicated gradients on every rank); the trainer
# at TP=2 is test_train_e2e.py's.
OWN_MODULE_TYPES = ["gta", "gla", "mla"]


@pytest.mark.parametrize("attention", OWN_MODULE_TYPES)
def test_resume_is_exact(tiny_data, tmp_path, attention):
    # one uninterrupted 4-step run with a checkpoint after step 2; resumed from it, steps 3 and 4 bit for bit
    over = [f"attention={attention}", "checkpoint.interval=2"]
    straight = tmp_path / "straight"
    run_keel(tiny_overrides(tiny_data, straight, steps=4) + over)
    split = resume_folder(straight, 2, tmp_path / "split")
    out = run_keel(tiny_overrides(tiny_data, split, steps=4) + over)
    assert "resumed from" in out.stdout
    resumed = losses(split)
    assert sorted(resumed) == [3, 4]
    assert resumed == {step: loss for step, loss in losses(straight).items() if step > 2}


def test_generate_from_a_checkpoint(tiny_data, tmp_path):
    run = tmp_path / "run"
    run_keel(tiny_overrides(tiny_data, run, steps=3) + ["attention=gla"])
    cmd = [sys.executable, str(ROOT / "tools" / "generate.py"), "--checkpoint", str(run), "--prompt", "def f(",
           "--max-new-tokens", "8"]
    first, second = (subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
                     for _ in range(2))
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.startswith("def f(") and first.stdout == second.stdout  # greedy is deterministic
    assert "step_00000003" in first.stderr


@pytest.mark.parametrize("attention", ["gta", "gla"])
def test_kv_cache_tool_verifies_decoding(attention):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "kv_cache.py"), "--attention", attention, "--verify",
                           "--length", "24", "model.hidden_size=64", "model.head_dim=16", "model.num_layers=2"],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "max |logit diff|" in proc.stdout and "ok" in proc.stdout


def test_qk_norm_decoding_under_tensor_parallelism():
    """MLA with QK-norm (decoded expanded, its normalised RoPE key cached) at TP=2 against a TP=1 forward."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "kv_cache.py"), "--verify", "--tp", "2", "--attention",
                           "mla", "--length", "12", "model.hidden_size=64", "model.head_dim=16", "model.num_layers=2",
                           "attention.qk_norm=true"], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "mla: 12 tokens decoded" in proc.stdout and "(ok, tolerance 0.001)" in proc.stdout


def test_kv_cache_decoding_under_tensor_parallelism():
    """Every type decoded with the cache at TP=2 (two gloo processes) gives the TP=1 full forward's logits."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "kv_cache.py"), "--verify", "--tp", "2", "--length", "12",
                           "model.hidden_size=64", "model.head_dim=16", "model.num_layers=2"],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if "at TP=2 vs a full forward at TP=1" in line]
    assert [line.split(":")[0] for line in lines] == ["mha", "gqa", "mqa", "gta", "gla", "mla"]
    assert all(line.endswith("(ok, tolerance 0.001)") for line in lines)
