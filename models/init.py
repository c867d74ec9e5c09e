"""Initialisation that does not depend on how the model is split.

megatron-core draws each weight from the global RNG in construction order, so a pipeline stage
that builds layers 3-4 first gives them different weights than a single process would. keel
re-draws every parameter from a generator seeded by (seed, global parameter name), builds the
full (unsharded) tensor and keeps this rank's tensor-parallel slice exactly as megatron splits it.
Any TP/PP layout therefore starts from the same model as one process.
"""

from __future__ import annotations

import hashlib
import math
import re

import torch
from megatron.core import parallel_state

_LAYER = re.compile(r"^(.*?layers\.)(\d+)(\..*)$")


def _seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def global_name(name: str, layer_offset: int) -> str:
    """`decoder.layers.0.x` on a pipeline stage starting at layer 2 -> `decoder.layers.2.x`."""
    m = _LAYER.match(name)
    return f"{m.group(1)}{int(m.group(2)) + layer_offset}{m.group(3)}" if m else name


_EXPERT = re.compile(r"(local_experts\.)(\d+)(\.)")


def expert_global_name(name: str, expert_offset: int) -> str:
    """`...local_experts.1.x` on an expert-parallel rank whose first expert is 4 -> `...local_experts.5.x`,
    so every expert is seeded by its global index and EP=N starts from the same experts as EP=1."""
    return _EXPERT.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + expert_offset}{m.group(3)}", name)


def _tp_slice(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's shard, split like megatron's `_initialize_affine_weight_cpu` (with stride)."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    per_stride = param.shape[dim] // stride
    return torch.cat(torch.split(full, per_stride, dim=dim)[rank::tp], dim=dim)


def _full_shape(param: torch.Tensor) -> list[int]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= parallel_state.get_tensor_model_parallel_world_size()
    return shape


def _is_residual_output(name: str) -> bool:
    # megatron scales the init of the projections that write into the residual stream
    return name.endswith(("linear_proj.weight", "linear_fc2.weight"))


@torch.no_grad()
def reset_parameters(model: torch.nn.Module, seed: int, std: float, num_layers: int, layer_offset: int,
                     tied_embeddings: bool, rename=None) -> None:
    """Re-initialise `model` in place; `rename` maps a global name to the name its seed comes from."""
    for name, param in model.named_parameters():
        gname = global_name(name, layer_offset)
        if tied_embeddings and gname == "output_layer.weight":
            gname = "embedding.word_embeddings.weight"  # the last stage's copy of the tied matrix
        if rename is not None:
            gname = rename(gname)
        if param.ndim == 1:
            param.fill_(1.0 if name.endswith("weight") and "norm" in name else 0.0)
            continue
        gen = torch.Generator().manual_seed(_seed(seed, gname))
        scale = std / math.sqrt(2 * num_layers) if _is_residual_output(name) else std
        full = torch.empty(_full_shape(param), dtype=torch.float32).normal_(0.0, scale, generator=gen)
        param.copy_(_tp_slice(full, param).to(param.dtype))
