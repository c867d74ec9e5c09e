"""Run megatron-core 0.19.2 on CPU: every CUDA redirect keel needs, in one place.

megatron-core hard-codes CUDA in a few primitives (``torch.cuda.current_device()``, ``device="cuda"``
factories, ``torch.cuda.synchronize()``/``current_stream()``, ``.cuda()`` and CUDA tensor-type name
checks). When CUDA is available, `apply()` patches nothing and megatron-core runs untouched. Without
CUDA it redirects exactly the call sites below, each one found by tracing keel's whole test suite on
0.19.2 (docs/design.md lists them; tests/pretrain/test_cpu_compat.py exercises each one):

1. `CUDA_CALL_SITES`: these modules see a ``torch`` whose ``zeros``/``tensor`` map ``device="cuda"``
   to the CPU and whose ``torch.cuda`` answers ``current_device()`` with the CPU, ``get_rng_state()``
   with the CPU generator's state (a state that the no-op restore of 4. never applies) and makes
   ``synchronize()``/``current_stream()`` no-ops. The real ``torch`` module is never modified.
2. `CUDA_TYPE_NAME_CHECKS`: while these functions run, ``Tensor.type()`` gives CUDA-style names, so
   their ``param.type() == 'torch.cuda.FloatTensor'`` checks accept CPU tensors.
3. `CUDA_MOVES`: while these functions run, ``Tensor.cuda()`` is the identity.
4. `CUDA_RNG_STATE`: these functions, which save and restore the CUDA RNG state, do nothing.

Importing this module imports megatron-core the way every keel process does (models/megatron_release.py's
`import_megatron`): entry points import it first.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types

import torch

from models import megatron_release

# module -> the functions in it whose CUDA tensors, device queries or waits are redirected
CUDA_CALL_SITES: dict[str, tuple[str, ...]] = {
    "megatron.core.utils": ("local_multi_tensor_l2_norm", "GlobalMemoryBuffer.get_tensor"),
    "megatron.core.pipeline_parallel.schedules": (
        "forward_backward_no_pipelining", "forward_backward_pipelining_without_interleaving"),
    "megatron.core.pipeline_parallel.p2p_communication": ("P2PCommunicator._communicate",),
    "megatron.core.distributed.param_and_grad_buffer": (
        "_ParamAndGradBuffer.__init__", "_ParamAndGradBucketGroup.start_grad_sync"),
    "megatron.core.optimizer.optimizer": (
        "FP32Optimizer.__init__", "MixedPrecisionOptimizer.__init__", "MegatronOptimizer.has_grad_norm_group"),
    "megatron.core.optimizer.clip_grads": ("get_grad_norm_fp32", "clip_grad_by_total_norm_fp32"),
    # the fully reshardable checkpoint format gathers the distributed optimizer's shards on DP rank 0
    "megatron.core.optimizer.distrib_optimizer": ("DistributedOptimizer.get_parameter_state_dp_zero",),
    "megatron.core.models.common.embeddings.rotary_pos_embedding": ("RotaryEmbedding.get_emb",),
    "megatron.core.tensor_parallel.mappings": ("_gather_along_first_dim", "_reduce_scatter_along_first_dim"),
    # sequence parallelism: the tracker's tensor-parallel RNG state, which seeding creates and the
    # layers fork; the backward of a parallel linear gathers its input's sequence shards again
    "megatron.core.tensor_parallel.random": ("CudaRNGStatesTracker.add",),
    "megatron.core.tensor_parallel.layers": ("LinearWithGradAccumulationAndAsyncCommunication.backward",),
    "megatron.core.dist_checkpointing.strategies.filesystem_async": ("FileSystemWriterAsync.preload_tensors",),
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": ("save_state_dict_async_finalize",),
    # checkpoint.async_save: megatron's background writer and its collective finalization
    "megatron.core.dist_checkpointing.strategies.async_utils": (
        "AsyncCaller.sync_all_async_calls", "TemporalAsyncCaller.schedule_async_call",
        "AsyncCallsQueue.maybe_finalize_async_calls"),
}

# (module, function) that compare tensor type names with CUDA ones
CUDA_TYPE_NAME_CHECKS: tuple[tuple[str, str], ...] = (
    ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32"),  # imported from clip_grads
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.__init__"),
)

# (module, function) that call Tensor.cuda()
CUDA_MOVES: tuple[tuple[str, str], ...] = (
    ("megatron.core.models.common.language_module.language_module",
     "LanguageModule.setup_embeddings_and_output_layer"),  # tied embeddings across pipeline stages
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.get_parameter_state_dp_zero"),
)

# (module, function) that read or write the CUDA RNG state: megatron's activation recompute
# (model.recompute) saves and restores it around each recomputed region. Without CUDA every draw comes
# from the CPU generator, which the same code saves and restores on its own, so there is nothing to keep.
CUDA_RNG_STATE: tuple[tuple[str, str], ...] = (
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state"),
)

_FACTORIES = ("zeros", "tensor")  # the only factories these modules call with device="cuda"
_applied = False


def _to_cpu_device(device):
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
    """What ``torch.cuda`` answers inside redirected modules; anything else is the real torch.cuda."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


def _cpu_torch() -> types.ModuleType:
    proxy = types.ModuleType("torch")
    proxy.__dict__.update(torch.__dict__)
    for name in _FACTORIES:
        setattr(proxy, name, _redirect_factory(getattr(torch, name)))
    proxy.cuda = _CpuCuda(current_device=lambda: torch.device("cpu"), synchronize=lambda *a, **k: None,
                          current_stream=lambda *a, **k: None, get_rng_state=lambda *a, **k: torch.get_rng_state())
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


@contextlib.contextmanager
def _cuda_is_identity():
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _within(context):
    def wrap(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with context():
                return fn(*args, **kwargs)

        return wrapper

    return wrap


def _patch_attr(module_name: str, qualname: str, wrap) -> None:
    owner = importlib.import_module(module_name)
    *path, attr = qualname.split(".")
    for p in path:
        owner = getattr(owner, p)
    setattr(owner, attr, wrap(getattr(owner, attr)))


def apply() -> None:
    """Apply the CPU redirects once; a no-op when CUDA is available."""
    global _applied
    megatron_release.require(__name__, "CUDA call sites (the CPU redirects)", RuntimeError)
    if _applied or torch.cuda.is_available():
        return
    for name in CUDA_CALL_SITES:
        importlib.import_module(name).torch = _cpu_torch()
    for module_name, qualname in CUDA_TYPE_NAME_CHECKS:
        _patch_attr(module_name, qualname, _within(_cuda_type_names))
    for module_name, qualname in CUDA_MOVES:
        _patch_attr(module_name, qualname, _within(_cuda_is_identity))
    for module_name, qualname in CUDA_RNG_STATE:
        _patch_attr(module_name, qualname, _without_cuda_rng)
    _applied = True


def _without_cuda_rng(fn):
    @functools.wraps(fn)
    def nothing(*args, **kwargs) -> None:
        return None

    return nothing


megatron_release.import_megatron()  # every entry point imports this module before anything of megatron's
