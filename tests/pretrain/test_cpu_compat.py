"""The CPU redirects: pinned to one megatron-core release, each one still needed, each one working,
and nothing patched outside the functions they cover.

The redirected call sites are also exercised end to end: every training test runs the schedules, DDP
buffers, optimizer and gradient clipping; the pipeline tests the P2P exchange; the expert-parallel test
the all-gather buffers; the resume tests dist_checkpointing's writer.
"""

import inspect
import re
import tomllib
from pathlib import Path

import pytest
import torch

from models import megatron_release
from pretrain import cpu_compat

ROOT = Path(__file__).resolve().parents[2]
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="the redirects exist only without CUDA")
CUDA_CALL = re.compile(r"torch\.cuda\.|device=['\"]cuda['\"]|\.cuda\(\)|'torch\.cuda\.")


def _resolve(module_name: str, qualname: str):
    import importlib

    owner = importlib.import_module(module_name)
    for part in qualname.split("."):
        owner = getattr(owner, part)
    return inspect.unwrap(owner)


def test_pinned_megatron_version():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"megatron-core=={megatron_release.PINNED}" in deps
    assert megatron_release.installed() == megatron_release.PINNED


SITES = [(m, q) for m, qs in cpu_compat.CUDA_CALL_SITES.items() for q in qs]
SITES += list(cpu_compat.CUDA_TYPE_NAME_CHECKS) + list(cpu_compat.CUDA_MOVES) + list(cpu_compat.CUDA_RNG_STATE)


@pytest.mark.parametrize("module_name, qualname", SITES, ids=[q for _, q in SITES])
def test_each_redirected_function_still_calls_cuda(module_name, qualname):
    """A redirect whose function no longer touches CUDA in this release would be dead code."""
    assert CUDA_CALL.search(inspect.getsource(_resolve(module_name, qualname)))


@CPU_ONLY
def test_redirects_leave_real_torch_alone(megatron_world):
    import megatron.core.pipeline_parallel.schedules as schedules

    assert schedules.torch is not torch  # the module sees the CPU-redirecting proxy
    assert schedules.torch.zeros([], device="cuda").device.type == "cpu"
    assert schedules.torch.cuda.current_device() == torch.device("cpu")
    assert torch.zeros is not schedules.torch.zeros and torch.randn(2).type() == "torch.FloatTensor"
    with pytest.raises((RuntimeError, AssertionError)):
        torch.ones(1).cuda()  # Tensor.cuda is the identity only inside CUDA_MOVES


@CPU_ONLY
def test_rotary_embedding_on_cpu(megatron_world, monkeypatch):
    import megatron.core.models.common.embeddings.rotary_pos_embedding as rope

    emb = rope.RotaryEmbedding(kv_channels=16, rotary_percent=1.0, use_cpu_initialization=True)
    assert emb(8).device.type == "cpu" and emb(8).shape == (8, 1, 1, 16)
    monkeypatch.setattr(rope, "torch", torch)  # without the redirect it needs a GPU
    with pytest.raises((RuntimeError, AssertionError)):
        rope.RotaryEmbedding(kv_channels=16, rotary_percent=1.0, use_cpu_initialization=True)(8)


@CPU_ONLY
def test_grad_norm_and_memory_buffer_on_cpu(megatron_world):
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
    from megatron.core.utils import GlobalMemoryBuffer, local_multi_tensor_l2_norm

    grads = [torch.full((3,), 2.0), torch.full((4,), 1.0)]
    assert get_grad_norm_fp32(grads) == pytest.approx(4.0)
    norm, _ = local_multi_tensor_l2_norm(1, None, [grads], False)
    assert norm.device.type == "cpu" and float(norm) == pytest.approx(4.0)
    assert GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "x").device.type == "cpu"


@CPU_ONLY
def test_type_name_checks_see_cuda_names_only_inside_megatron_calls(megatron_world):
    from megatron.core.optimizer import optimizer

    with cpu_compat._cuda_type_names():
        assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    assert torch.ones(1).type() == "torch.FloatTensor"
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 3.0)
    optimizer.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=6.0)  # asserts a CUDA grad type
    assert torch.allclose(p.grad, torch.full((4,), 0.5), atol=1e-5)


@CPU_ONLY
def test_training_step_and_checkpoint_in_process(megatron_world, tmp_path):
    """DDP buffers, the no-pipelining schedule, FP32Optimizer, clipping and the checkpoint writer."""
    from megatron.core import dist_checkpointing
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from pretrain.checkpoint.megatron_private import use_results_queue
    from tests.helpers import build_tiny_gpt

    cfg, gpt = build_tiny_gpt()
    gpt.train()
    ddp = DistributedDataParallel(config=gpt.config, ddp_config=DistributedDataParallelConfig(), module=gpt)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1.0), [ddp])
    tokens = torch.randint(0, 128, (2, 16))

    def step(data, model):
        out = model(tokens, torch.arange(16).expand(2, 16), None, labels=tokens)
        return out, lambda o: (o.float().mean(), {"loss": o.float().mean().detach()})

    ddp.zero_grad_buffer()
    get_forward_backward_func()(forward_step_func=step, data_iterator=iter([None]), model=[ddp], num_microbatches=1,
                                seq_length=16, micro_batch_size=2, forward_only=False)
    ok, grad_norm, _ = opt.step()
    assert ok and grad_norm > 0
    # the writer's results queue in this process, as the trainer's synchronous save has it: megatron's own
    # Manager would outlive this xdist worker, which exits without running finalizers
    use_results_queue(background=False)
    dist_checkpointing.save({"model": gpt.sharded_state_dict()}, str(tmp_path))
    assert (tmp_path / ".metadata").exists()
