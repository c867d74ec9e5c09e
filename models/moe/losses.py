"""The expert-specialization losses of Guo et al. 2025 (arXiv 2505.22323) as plain functions.

    L = L_lm + alpha * L_aux + beta * L_o + gamma * L_v                      (paper, eq. 9)

`orthogonality_loss` is L_o (eq. 6), `variance_loss` is L_v (eq. 7, in the per-token form the
official code runs). `attach_loss` hangs either one on the graph the way megatron-core attaches its
load-balancing loss, so the value steers the gradients but never enters the reported LM loss.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

EPS = 1e-6


def orthogonality_loss(expert_outputs: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """L_o over each token's selected experts; `expert_outputs` is [tokens, k, hidden], pre-gate.

    Eq. 6: sum_i sum_j sum_{m != j} || (<x_ij, x_im> / (<x_im, x_im> + eps)) * x_im ||^2, i.e. the
    squared norm of the projection of one selected expert's output on another's, over ordered pairs,
    divided by tokens * k. All-zero rows (slots of dropped tokens) contribute nothing.
    """
    tokens, k, _ = expert_outputs.shape
    # 1. Gram matrix per token: G[i, j, m] = <x_ij, x_im>; its diagonal holds the squared norms
    gram = expert_outputs @ expert_outputs.transpose(1, 2)
    sq_norm = gram.diagonal(dim1=1, dim2=2)  # [tokens, k]
    # 2. ||c * x_m||^2 = c^2 * ||x_m||^2 with c = G[j, m] / (||x_m||^2 + eps)
    proj_sq = gram.pow(2) * sq_norm.unsqueeze(1) / (sq_norm.unsqueeze(1) + eps).pow(2)
    # 3. drop j == m: a vector's projection on itself is not a redundancy
    off_diag = ~torch.eye(k, dtype=torch.bool, device=expert_outputs.device)
    return (proj_sq * off_diag).sum() / max(tokens * k, 1)


def variance_loss(probs: torch.Tensor) -> torch.Tensor:
    """L_v = -mean over tokens of Var_j(p_ij); `probs` is [tokens, experts] (the full softmax).

    The variance is across experts per token, as the official code computes it (the paper's eq. 7
    writes a per-expert variance over tokens). Population variance: for a distribution over E experts
    it equals mean(p^2) - 1/E^2, so it is largest (the loss most negative) for one-hot routing.
    """
    return -routing_variance(probs).mean()


def routing_variance(probs: torch.Tensor) -> torch.Tensor:
    """Per-token variance across experts (population), [tokens, experts] -> [tokens]; -L_v per token."""
    return probs.var(dim=-1, unbiased=False)


def attach_loss(activation: torch.Tensor, loss: torch.Tensor, coeff: float, num_tokens: int,
                per_token_loss: bool) -> torch.Tensor:
    """Attach `coeff * loss` to `activation` (identity forward) with megatron's MoEAuxLossAutoScaler.

    Under `calculate_per_token_loss` megatron's schedule sets the auto-scaler's scale to 1 (times any
    grad scaler) and finalize_model_grads divides every gradient by the global token count N. Like
    megatron's own aux and z losses (router.py attach_and_log_load_balancing_loss), the loss is
    therefore multiplied by this micro-batch's token count T: the gradient becomes
    sum_mb T_mb * coeff * grad(loss_mb) / N, i.e. coeff times the token-weighted mean over micro-batches
    and data-parallel ranks -- the same weighting as the LM loss, for any split of the batch.
    """
    scaled = coeff * loss * (num_tokens if per_token_loss else 1)
    return MoEAuxLossAutoScaler.apply(activation, scaled)
