"""Run megatron-core 0.16.1 on CPU: every CUDA redirect keel needs, in one place.

megatron-core hard-codes CUDA in a few primitives (``torch.cuda.current_device()``,
``device="cuda"`` factories, ``torch.cuda.synchronize()``, ``.cuda()`` and CUDA tensor-type name
checks). When CUDA is available, `apply()` does nothing and megatron-core runs untouched. Without
CUDA it redirects exactly the call sites listed in ``shared/reference/megatron-cpu.md``:

1. Modules whose *own* code builds CUDA tensors see a ``torch`` whose tensor factories map
   ``device="cuda"`` to the CPU and whose ``torch.cuda`` namespace answers with the CPU. The real
   ``torch`` module is never modified for anyone else.
2. ``Tensor.cuda()`` becomes the identity (on a machine without CUDA it could only raise).
3. CUDA type-name checks (``param.type() == 'torch.cuda.FloatTensor'``) see CUDA-style names, but
   only while the few megatron functions that check them run.
4. MLA: megatron believes TransformerEngine is present when it is mocked out; tell it the truth.

The redirects are pinned to megatron-core 0.16.1, which `tests/test_cpu_compat.py` asserts.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import types
import warnings

import torch

MEGATRON_VERSION = "0.16.1"

# Modules whose own code calls CUDA factories, current_device() or synchronize().
_MODULES_WITH_CUDA_CALLS = (
    "megatron.core.utils",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.transformer.moe.experts",
    "megatron.core.tensor_parallel.mappings",  # expert-parallel all-gather buffers
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.multi_latent_attention",
)

# (module, qualified attribute) of the functions that compare tensor type names with CUDA ones.
_TYPE_NAME_CHECKERS = (
    ("megatron.core.optimizer.clip_grads", "get_grad_norm_fp32"),
    ("megatron.core.optimizer.optimizer", "get_grad_norm_fp32"),
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.__init__"),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__"),
)

_applied = False


def _to_cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda":
        return torch.device("cpu")
    return device


def _redirect_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    return wrapper


class _CpuCuda(types.SimpleNamespace):
    """What ``torch.cuda`` answers inside redirected modules."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


def _cpu_torch() -> types.ModuleType:
    proxy = types.ModuleType("torch")
    proxy.__dict__.update(torch.__dict__)
    for name in ("zeros", "ones", "empty", "tensor", "full", "arange", "empty_like", "zeros_like", "randn", "rand"):
        setattr(proxy, name, _redirect_factory(getattr(torch, name)))
    proxy.cuda = _CpuCuda(
        current_device=lambda: torch.device("cpu"),
        synchronize=lambda *a, **k: None,
        is_available=lambda: False,
        empty_cache=lambda: None,
        default_stream=lambda *a, **k: None,
        current_stream=lambda *a, **k: None,
    )
    return proxy


@contextlib.contextmanager
def _cuda_type_names():
    original = torch.Tensor.type

    def cuda_style(self, *args, **kwargs):
        name = original(self, *args, **kwargs)
        if not args and not kwargs and isinstance(name, str) and not name.startswith("torch.cuda."):
            return name.replace("torch.", "torch.cuda.", 1)
        return name

    torch.Tensor.type = cuda_style
    try:
        yield
    finally:
        torch.Tensor.type = original


def _with_cuda_type_names(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cuda_type_names():
            return fn(*args, **kwargs)

    return wrapper


def _patch_attr(module_name: str, qualname: str, wrap) -> None:
    owner = importlib.import_module(module_name)
    *path, attr = qualname.split(".")
    for p in path:
        owner = getattr(owner, p)
    setattr(owner, attr, wrap(getattr(owner, attr)))


def silence_import_warnings() -> None:
    """megatron-core warns at import about missing apex/TransformerEngine; keel needs neither."""
    for pattern in (".*Apex is not installed.*", ".*Transformer Engine.*", ".*transformer_engine.*",
                    ".*apex.*", ".*deprecated.*", ".*TorchNorm.*"):
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="megatron")
    warnings.filterwarnings("ignore", category=FutureWarning, module="megatron")
    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
    logging.getLogger("megatron").setLevel(logging.WARNING)


def apply() -> None:
    """Apply the CPU redirects once; a no-op when CUDA is available."""
    global _applied
    silence_import_warnings()
    if _applied or torch.cuda.is_available():
        return
    import megatron.core

    if megatron.core.__version__ != MEGATRON_VERSION:
        raise RuntimeError(f"keel's CPU redirects target megatron-core {MEGATRON_VERSION}, found "
                           f"{megatron.core.__version__}; install megatron-core=={MEGATRON_VERSION}")
    proxy = _cpu_torch()
    for name in _MODULES_WITH_CUDA_CALLS:
        importlib.import_module(name).torch = proxy
    torch.Tensor.cuda = lambda self, *a, **k: self
    for module_name, qualname in _TYPE_NAME_CHECKERS:
        _patch_attr(module_name, qualname, _with_cuda_type_names)
    import megatron.core.transformer.multi_latent_attention as mla

    mla.HAVE_TE = False
    _applied = True


silence_import_warnings()
