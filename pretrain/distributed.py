"""Process groups: torch.distributed (gloo on CPU, nccl on GPU) and megatron's parallel_state.

`torchrun` sets RANK/WORLD_SIZE; a plain `python pretrain/main.py` becomes a world of one.
Data parallelism is whatever remains of the world after tensor and pipeline parallelism.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from models.config import ConfigError
from pretrain import cpu_compat
from pretrain.config import ParallelConfig


@dataclass
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device
    tp: int
    pp: int
    dp: int
    dp_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def check_world(parallel: ParallelConfig, world_size: int) -> int:
    """Data-parallel size, or a one-line error when the parallel sizes do not divide the world."""
    model_parallel = parallel.tensor * parallel.pipeline
    if world_size % model_parallel:
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tensor*parallel.pipeline="
                          f"{model_parallel}; launch a multiple of {model_parallel} processes")
    dp = world_size // model_parallel
    if parallel.expert > 1 and (dp * parallel.tensor) % parallel.expert:
        raise ConfigError(f"parallel.expert={parallel.expert} must divide data*tensor parallel size "
                          f"{dp * parallel.tensor}")
    return dp


def init(parallel: ParallelConfig, init_method: str | None = None) -> World:
    """Initialise torch.distributed and megatron's model-parallel groups.

    Under torchrun the rendezvous comes from the environment (env://); `init_method` overrides it
    (e.g. `file://` for mp.spawn workers). A world of one uses an in-process store: no port to race
    for when many single-process runs start side by side."""
    from megatron.core import parallel_state

    cpu_compat.apply()
    rank = int(os.environ.get("RANK", 0))
    size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dp = check_world(parallel, size)
    cuda = torch.cuda.is_available() and parallel.backend != "gloo"
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        timeout = timedelta(minutes=10)
        if init_method is not None:
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size, timeout=timeout)
        elif "RANK" not in os.environ:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            dist.init_process_group(backend, rank=rank, world_size=size, timeout=timeout)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor, pipeline_model_parallel_size=parallel.pipeline,
        expert_model_parallel_size=parallel.expert)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return World(rank=rank, size=size, local_rank=local_rank, device=device, tp=parallel.tensor,
                 pp=parallel.pipeline, dp=dp, dp_rank=parallel_state.get_data_parallel_rank())


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def tool_world(parallel: ParallelConfig | None = None):
    """The megatron world for a tool's work at `parallel`'s layout (default: one process, gloo): the
    caller's own when it has one (a test's, which must outlive the work; its layout must be the one asked
    for), else torchrun's processes, or this one alone, initialised for the block and shut down after it."""
    from megatron.core import parallel_state

    parallel = parallel or ParallelConfig(backend="gloo")
    if dist.is_initialized():
        held = (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_pipeline_model_parallel_world_size())
        if parallel_state.model_parallel_is_initialized() and held != (parallel.tensor, parallel.pipeline):
            raise ConfigError(f"this process group runs TP={held[0]}, PP={held[1]}, not the TP={parallel.tensor}, "
                              f"PP={parallel.pipeline} asked for; ask for its layout")
        yield
        return
    init(parallel)
    try:
        yield
    finally:
        shutdown()
