"""The split-K decode kernel (models/kernels/decode.py) against the PyTorch path, for every cache layout:
odd and ragged lengths, batch 1, contexts that are not a multiple of the block, empty splits, bf16, and
whole-model decoding with kernel steps against one full forward; the same for the SDPA option of the
grouped-head layouts.

On CPU the kernel runs in Triton's interpreter, in one subprocess (tests/models/decode_kernel_cases.py);
on a GPU (tools/gpu_check.sh section 30) the compiled kernel runs in-process.
"""

import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, child_env
from tests.models import decode_kernel_cases as cases

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def results(tmp_path_factory, request):
    if CUDA:
        request.getfixturevalue("megatron_world")
        return cases.run_all("cuda")
    out = tmp_path_factory.mktemp("kernels") / "cases.pt"
    proc = subprocess.run([sys.executable, "-m", "tests.models.decode_kernel_cases", str(out)], cwd=ROOT,
                          env={**child_env(), "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out)


@pytest.mark.parametrize("shape", list(cases.SHAPES))
@pytest.mark.parametrize("layout", list(cases.LAYOUTS))
def test_kernel_equals_the_pytorch_path(results, layout, shape):
    out, ref = results[f"{layout}-{shape}"]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_kernel_reads_caches_past_two_billion_elements(results):
    """Sequence 2 starts 2^31 elements into the buffers: with 32-bit offsets the kernel read a wrapped-around
    address (a segfault in the interpreter, an illegal address or garbage on a GPU)."""
    out, ref = results["wide-offsets"]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", cases.BF16)
def test_kernel_in_bf16_is_within_rounding(results, layout):
    """bf16 cache and queries, fp32 softmax and accumulation, against the fp32 reference on the same inputs."""
    out, ref = results[f"bf16-{layout}"]
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("attention", cases.TYPES)
def test_model_decoding_with_the_kernel_equals_the_full_forward(results, attention):
    inc, full = results[f"model-{attention}"]
    assert full.std() > 0.5  # non-trivial logits
    torch.testing.assert_close(inc, full, rtol=0, atol=1e-4)


@pytest.mark.parametrize("attention", cases.QK_NORM)
def test_model_decoding_with_qk_norm_and_the_kernel_equals_the_full_forward(results, attention):
    """QK-norm: GTA's key is the normalised KV[:d - d_R] (no longer the value's dims), MLA decodes expanded."""
    inc, full = results[f"model-qk-norm-{attention}"]
    assert full.std() > 0.5
    torch.testing.assert_close(inc, full, rtol=0, atol=1e-4)


@pytest.mark.parametrize("shape", list(cases.SHAPES))
@pytest.mark.parametrize("layout", cases.GROUPED)
def test_sdpa_option_equals_the_pytorch_path(results, layout, shape):
    out, ref = results[f"sdpa-{layout}-{shape}"]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attention", ["gqa", "gta"])
def test_model_decoding_with_the_sdpa_option_equals_the_full_forward(results, attention):
    inc, full = results[f"model-sdpa-{attention}"]
    torch.testing.assert_close(inc, full, rtol=0, atol=1e-4)


@pytest.mark.skipif(CUDA, reason="CPU tensors in Triton's interpreter; a GPU run's minutes go to the compiled kernel")
def test_kernel_decoding_under_tensor_parallelism():
    """GLA (latents sharded, output all-reduced) decoded with kernel steps at TP=2 in two gloo processes
    equals one full forward at TP=1 (tools/kv_cache.py --verify; interpreted, CPU tensors)."""
    cmd = [sys.executable, str(ROOT / "tools" / "kv_cache.py"), "--verify", "--tp", "2", "--kernel", "triton",
           "--attention", "gla", "--length", "10", "model.hidden_size=64", "model.head_dim=16", "model.num_layers=2"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**child_env(), "TRITON_INTERPRET": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "gla: 10 tokens decoded with the KV cache at TP=2" in proc.stdout and "(ok" in proc.stdout
