"""What every update rule needs of megatron's fp32 main parameters: a rule rescales the update a model
parameter got after megatron's step, and the main copy (a separate tensor in bf16 training, a flat
shard of it under the distributed optimizer) must get the same update."""

from __future__ import annotations

import torch

from optim.megatron_private import main_param_range


def main_copy(p: torch.Tensor) -> torch.Tensor | None:
    """A snapshot of the fp32 main parameter when it is a separate tensor (bf16 training)."""
    main = getattr(p, "main_param", None)
    if main is None or main.data_ptr() == p.data_ptr():
        return None
    return main.detach().clone()


def rescale_main_copy(optimizer, p: torch.Tensor, main_old: torch.Tensor | None, keep: torch.Tensor) -> None:
    """Give p's fp32 main copy the rescaled update its model parameter got: main = lerp(main, main_old,
    keep), where `keep` (1 - the update's scale) is 0-dim or shaped like p. Nothing to do without a
    separate main copy. Under the distributed optimizer the copy is a flat shard of p, so a per-element
    `keep` is cut to the shard's range."""
    if main_old is None:
        return
    if keep.ndim:
        start, end = main_param_range(optimizer, p)
        keep = keep.expand_as(p).reshape(-1)[start:end].view_as(main_old)
    p.main_param.lerp_(main_old, keep)
