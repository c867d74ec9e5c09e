"""Model FLOPs utilisation: achieved training FLOP/s over the GPU's dense bf16 peak.

MFU = tokens/s × FLOPs per token / (peak × GPUs), with FLOPs per token from
`models.builder.BuiltModel.flops_per_token` (6 per active parameter plus attention's 12·L·h·s).
An unknown GPU gets one warning and no MFU: a guessed peak would make the figure meaningless.
"""

from __future__ import annotations

import sys
from functools import lru_cache

import torch

# dense (no sparsity) bf16 tensor-core peak, FLOP/s, from NVIDIA's data sheets. Matched as substrings of
# torch.cuda.get_device_name, first match wins: the PCIe/NVL variants come before their SXM name.
PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989.4e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200 NVL", 835e12),
    ("H200", 989.4e12),  # SXM, and GH200
    ("B200", 2250e12),
    ("A100", 312e12),  # 40 GB and 80 GB, SXM and PCIe
    ("L40S", 362e12),
    ("A10G", 70e12),
    ("A10", 125e12),
)


def peak_for_name(name: str) -> float | None:
    """The dense bf16 peak of the GPU called `name`, or None when the table does not know it."""
    for key, value in PEAK_BF16:
        if key in name:
            return value
    return None


@lru_cache(maxsize=None)
def _warn_unknown(name: str) -> None:
    print(f"keel: warning: no bf16 peak known for GPU {name!r}; MFU is not reported "
          "(add it to PEAK_BF16 in pretrain/mfu.py)", file=sys.stderr, flush=True)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of `device`; None (after one warning per GPU name) off the table, and None on CPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = peak_for_name(name)
    if peak is None:
        _warn_unknown(name)
    return peak


def mfu(tokens_per_s: float, flops_per_token: float, device: torch.device, gpus: int = 1) -> float | None:
    peak = peak_flops(device)
    return None if peak is None else tokens_per_s * flops_per_token / (peak * gpus)
