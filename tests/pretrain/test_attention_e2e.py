"""Attention types end to end: TP=2 equals TP=1 and exact resume for the types with a TP path of their own,
generation from a checkpoint, decoding under TP."""

import subprocess
import sys

import pytest

from tests.helpers import ROOT, child_env, losses, metrics, resume_folder, run_keel, tiny_overrides

pytestmark = pytest.mark.slow

# The types with a tensor-parallel path of their own. GQA, the default, is tests/pretrain/test_train_e2e.py's
# (TP=2 against one process, and every resume there); MHA is the same megatron module with a KV group per head.
# MQA at TP=2 (1 KV head < 2 ranks) uses megatron's all-gather in tensor_parallel/mappings.py, which
# needs that module's CPU redirect in pretrain/cpu_compat.py
TENSOR_PARALLEL_TYPES = ["mqa", "gta", "gla", "mla"]


@pytest.mark.parametrize("attention", TENSOR_PARALLEL_TYPES)
def test_tensor_parallel_matches_one_process_and_resume_is_exact(tiny_data, tmp_path, attention):
    # one uninterrupted 4-step run, with a checkpoint after step 2, is the reference of both checks
    over = [f"attention={attention}", "checkpoint.interval=2"]
    straight = tmp_path / "straight"
    run_keel(tiny_overrides(tiny_data, straight, steps=4) + over)
    # 1. TP=2 (stop_at keeps the schedule): GTA shards KV heads (RoPE key replicated); GLA shards its 2
    #    latents; MLA replicates its latent
    run_keel(tiny_overrides(tiny_data, tmp_path / "two", steps=4) + over + ["parallel.tensor=2", "trainer.stop_at=2"],
             nproc=2)
    two = metrics(tmp_path / "two")
    assert len(two) == 2
    for a, b in zip(metrics(straight), two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    # 2. resumed from the step-2 checkpoint: steps 3 and 4 bit for bit
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
