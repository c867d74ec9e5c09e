"""The CPU redirects are written against one megatron-core version and touch nothing else."""

import megatron.core
import torch

from pretrain import cpu_compat


def test_pinned_megatron_version():
    assert megatron.core.__version__ == cpu_compat.MEGATRON_VERSION == "0.16.1"


def test_redirects_leave_real_torch_alone(megatron_world):
    import megatron.core.pipeline_parallel.schedules as schedules

    if torch.cuda.is_available():
        assert schedules.torch is torch
        return
    assert schedules.torch is not torch  # the module sees the CPU-redirecting proxy
    assert schedules.torch.zeros([], device="cuda").device.type == "cpu"
    assert schedules.torch.cuda.current_device() == torch.device("cpu")
    # the real module is untouched
    assert torch.zeros is not schedules.torch.zeros
    assert torch.randn(2).type() == "torch.FloatTensor"


def test_type_name_checks_see_cuda_names_only_inside_megatron_calls():
    with cpu_compat._cuda_type_names():
        assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    assert torch.ones(1).type() == "torch.FloatTensor"
