"""Peak learning rate per parameter group, as a function of width (`optim.lr_rule`).

Haas, Bordt, von Luxburg, Vankadara, "On the Surprising Effectiveness of Large Learning Rates under
Standard Width Scaling" (NeurIPS 2025, arXiv 2505.22491): under standard parameterization (SP) with
cross-entropy, the optimal LR decays much more slowly than infinite-width theory's n^-1. Every rule
here is eta_g = optim.lr * (n / n0)^(-alpha_g) with n = model.hidden_size and n0 = optim.base_width,
so at n = n0 every rule gives optim.lr; the rules differ only in the exponents alpha_g:

- global:    alpha_g = 0 (one LR, no width dependence)
- sp_width:  one alpha for every group; default the paper's measured optimal exponent for the optimizer
- layerwise: one alpha per group (embedding, hidden, readout, norm) from a preset plus overrides

The schedule multiplies these peaks (`KeelOptimizer.set_lr`), so rules and schedules compose.
"""

from __future__ import annotations

import torch

from models.config import ModelConfig
from optim.config import LayerwisePreset, OptimConfig

GROUPS = ("embedding", "hidden", "readout", "norm")


def param_group(name: str, param: torch.Tensor) -> str:
    """The LR group of a parameter, from its megatron-core name.

    With tied embeddings the one shared matrix is the embedding; `readout` exists only untied. Under
    pipeline parallelism the last stage holds its own copy of the tied matrix as `output_layer.weight`
    (megatron marks both copies `shared_embedding` and keeps them equal by summing their gradients),
    so that copy is the embedding too: the same LR and no spectral bound, like the first stage's.
    """
    if "word_embeddings" in name or "position_embeddings" in name or getattr(param, "shared_embedding", False):
        return "embedding"
    if "output_layer" in name:
        return "readout"
    if param.ndim < 2:
        return "norm"  # norm gains and biases
    return "hidden"


# 1. Optimal-LR exponents the paper measured on GPT (pythia-14m shape, widths 256/1024/4096, DCLM):
#    Adam with trainable LayerNorm -0.42; SGD with gradient clipping -0.38, without clipping -0.5.
PAPER_ALPHA = {"adamw": 0.42, "sgd_clipped": 0.38, "sgd": 0.5}

# 2. Layerwise exponents (decay rates, eta_g ~ n^-alpha_g).
#    max_stable: the paper's layerwise maximal stable rates under CE (SGD analysis): readout O(n^-1),
#      hidden O(n^-1/2), input/embedding and LayerNorm O(1).
#    everett_adam: Everett et al. 2024, "Scaling exponents across parameterizations and optimizers",
#      Adam in SP with per-layer LRs: embedding Theta(1), hidden 1/n, readout 1/n (norms/biases Theta(1)).
PRESETS: dict[str, dict[str, float]] = {
    "max_stable": {"embedding": 0.0, "hidden": 0.5, "readout": 1.0, "norm": 0.0},
    "everett_adam": {"embedding": 0.0, "hidden": 1.0, "readout": 1.0, "norm": 0.0},
}
assert tuple(PRESETS) == tuple(LayerwisePreset)  # the config validates names, this module holds the tables


def default_alpha(optim: OptimConfig) -> float:
    """The paper's optimal exponent for `optim.name` (clipping changes SGD's exponent)."""
    if optim.name == "sgd":
        return PAPER_ALPHA["sgd_clipped" if optim.grad_clip > 0 else "sgd"]
    return PAPER_ALPHA[optim.name]


def group_exponents(optim: OptimConfig, model: ModelConfig) -> dict[str, float]:
    """alpha_g for every group under `optim.lr_rule`."""
    if optim.lr_rule == "global":
        return dict.fromkeys(GROUPS, 0.0)
    if optim.lr_rule == "sp_width":
        alpha = optim.width_exponent if optim.width_exponent is not None else default_alpha(optim)
        return dict.fromkeys(GROUPS, alpha)
    # layerwise: the preset, then explicit per-group overrides
    lw = optim.layerwise
    exps = {g: getattr(lw, g) if getattr(lw, g) is not None else PRESETS[lw.preset][g] for g in GROUPS}
    if model.tie_embeddings:
        # 3. a tied matrix is both input embedding and readout, and param_group calls it `embedding`;
        #    it gets the stricter (larger) exponent so the readout's stability bound still holds.
        exps["embedding"] = max(exps["embedding"], exps["readout"])
    return exps


def width_factor(width: int, base_width: int, alpha: float) -> float:
    """(n / n0)^-alpha: the multiplier of the base LR at width n."""
    return (width / base_width) ** (-alpha)


def peak_lrs(optim: OptimConfig, model: ModelConfig) -> dict[str, float]:
    """Peak LR per group (embedding, hidden, readout, norm) before the schedule's factor."""
    exps = group_exponents(optim, model)
    return {g: optim.lr * width_factor(model.hidden_size, optim.base_width, exps[g]) for g in GROUPS}


def transfer_lr(lr: float, from_width: int, to_width: int, alpha: float) -> float:
    """The sp_width rule as a one-liner: the LR at `to_width` given the (optimal) LR at `from_width`."""
    return lr * width_factor(to_width, from_width, alpha)
