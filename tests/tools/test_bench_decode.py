"""tools/bench_decode.py: runs on CPU at tiny shapes and reports bytes and bandwidth; peaks and the preset."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import ROOT, child_env
from tools import bench_decode

TINY = ["model.num_layers=1", "model.hidden_size=32", "model.head_dim=16"]


def test_reports_tokens_bytes_and_bandwidth_on_cpu(tmp_path):
    cmd = [sys.executable, "tools/bench_decode.py", "--contexts", "8", "21", "--batch", "2", "3", "--steps", "2",
           "--types", "gqa", "gla", "--json", "--save", str(tmp_path / "rows.json"), "--", *TINY]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    assert json.loads((tmp_path / "rows.json").read_text()) == rows  # --save: the rows so far, after each one
    assert {(r["attention"], r["batch"], r["context"]) for r in rows} == {
        (t, b, c) for t in ("gqa", "gla") for b in (2, 3) for c in (8, 21)}
    kv = {r["attention"]: r["kv_bytes_per_token"] for r in rows}
    assert kv == {"gqa": 2 * 1 * 16 * 4, "gla": (2 * 32 + 8) * 4}  # fp32, one layer: 2 heads, h_kv 1
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["hbm_share"] is None and r["device_name"] == "cpu"
        assert r["cache_bytes_per_step"] == r["kv_bytes_per_token"] * r["batch"] * r["context"]
        assert r["weight_bytes_per_step"] == 4 * r["params"]  # tied embeddings: the output layer reads the table
        moved = (r["cache_bytes_per_step"] + r["weight_bytes_per_step"]) / (r["step_ms"] / 1e3)
        assert abs(r["bandwidth_GBps"] * 1e9 - moved) <= 1e-6 * moved
        assert r["ratio_to_gqa"] == 1.0 if r["attention"] == "gqa" else r["ratio_to_gqa"] > 0


def test_peak_bandwidth_by_device_name(capsys):
    assert bench_decode.peak_bandwidth("NVIDIA H200") == pytest.approx(4.8e12)
    assert bench_decode.peak_bandwidth("NVIDIA H100 80GB HBM3") == pytest.approx(3.35e12)
    assert bench_decode.peak_bandwidth("NVIDIA H100 PCIe") == pytest.approx(2.0e12)
    assert bench_decode.peak_bandwidth("NVIDIA A100-SXM4-80GB") == pytest.approx(2.039e12)
    assert bench_decode.peak_bandwidth("NVIDIA A100-SXM4-40GB") == pytest.approx(1.555e12)
    assert bench_decode.peak_bandwidth("NVIDIA L40S") == pytest.approx(0.864e12)
    assert capsys.readouterr().err == ""
    assert bench_decode.peak_bandwidth(None) is None and capsys.readouterr().err == ""  # CPU: no share, no warning
    assert bench_decode.peak_bandwidth("Imaginary GPU 9000") is None
    assert capsys.readouterr().err.count("warning") == 1


def test_memory_bound_preset_holds_the_issue_shapes():
    args = SimpleNamespace(preset="memory-bound", contexts=None, batch=None, overrides=["model.norm_eps=1e-6"])
    contexts, batches, overrides = bench_decode.resolve(args)
    assert contexts == [4096, 8192, 16384, 32768] and batches == [32, 64]
    assert overrides == ["model.num_layers=4", "model.hidden_size=2048", "model.head_dim=128", "model.norm_eps=1e-6"]
    args.contexts, args.batch = [16384], [32]  # explicit flags win
    assert bench_decode.resolve(args)[:2] == ([16384], [32])



def test_reports_which_kernel_attended(megatron_world):
    """The PyTorch path, or torch's SDPA with the backend it dispatched to (seen by the profiler)."""
    from models.inference import forward_cached, new_cache
    from tests.helpers import build_tiny_gpt

    _, gpt = build_tiny_gpt(["attention=gqa"])
    tok = torch.zeros(2, 1, dtype=torch.long)
    for kernel, expected in ((None, "pytorch"), ("sdpa", "sdpa: flash (CPU)")):
        cache = new_cache(gpt, 2, 4, kernel=kernel)
        forward_cached(gpt, tok, cache)
        assert bench_decode._attention_kernel(gpt, cache, tok) == expected
