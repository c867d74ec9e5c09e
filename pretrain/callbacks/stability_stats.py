"""Stability monitors: attention entropy, spectra of W_qᵀW_k, weight spectral norms, logit size.

Pure, model-agnostic functions (no global config, no host sync except where a dict of floats is
returned).  The quantities are the ones plotted by σReparam (Zhai et al., ICML 2023, arXiv 2303.06296)
and AdamW² (Qi et al., ICLR 2025, arXiv 2505.21910): entropy collapse and spectral energy
concentration of W_qᵀW_k precede loss blow-ups when training without warmup.
Power iteration is imported from optim/spectral.py (the one implementation in keel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from optim.spectral import init_vectors, power_iteration, power_iteration_op

DEFAULT_ITERS = 3


# ---------------------------------------------------------------------------------------------
# Attention entropy
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def attention_entropy(probs: Tensor) -> Tensor:
    """Per-head entropy of attention rows, [b, heads, q, k] -> [heads].

    σReparam eq. for Ent(A): -Σ_j A_ij log A_ij per query row, averaged over queries (and batch).
    Zero probabilities (causal masking) contribute 0 (xlogy(0, 0) = 0).
    """
    row = -torch.special.xlogy(probs.float(), probs.float()).sum(-1)
    return row.mean(dim=(0, 2))


def _expand_kv(k: Tensor, heads: int) -> Tensor:
    """GQA: query head h reads kv head h // (heads / kv_heads)."""
    kv = k.shape[1]
    if heads % kv:
        raise ValueError(f"{heads} query heads not divisible by {kv} kv heads")
    return k if kv == heads else k.repeat_interleave(heads // kv, dim=1)


def _chunk_mask(mask: Tensor | None, start: int, end: int) -> Tensor | None:
    if mask is None or mask.shape[-2] == 1:
        return mask
    return mask[..., start:end, :]


@torch.no_grad()
def attention_entropy_from_scores(
    q: Tensor,
    k: Tensor,
    causal: bool = True,
    mask: Tensor | None = None,
    scale: float | None = None,
    chunk_size: int = 256,
) -> Tensor:
    """Per-head attention entropy from queries [b, heads, sq, d] and keys [b, kv_heads, sk, d].

    Scores are formed `chunk_size` queries at a time, so memory is O(b·heads·chunk·sk), never sq·sk.
    `mask`: bool, broadcastable to [b, heads, sq, sk], True = masked out (megatron-core convention).
    Causal alignment is bottom-right (query i sees keys j <= i + sk - sq).  scale defaults to 1/√d.
    Rows with every key masked are left out of the mean.
    """
    b, heads, sq, d = q.shape
    k = _expand_kv(k, heads).float()
    sk = k.shape[-2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    total = torch.zeros(heads, device=q.device)
    count = torch.zeros(heads, device=q.device)
    for start in range(0, sq, chunk_size):
        end = min(start + chunk_size, sq)
        # 1. scores for this block of queries, masked to -inf where attention is not allowed
        scores = (q[:, :, start:end].float() @ k.transpose(-1, -2)) * scale
        blocked = _chunk_mask(mask, start, end)
        if causal:
            qpos = torch.arange(start, end, device=q.device)[:, None] + (sk - sq)
            future = torch.arange(sk, device=q.device)[None, :] > qpos
            blocked = future if blocked is None else blocked | future
        if blocked is not None:
            scores = scores.masked_fill(blocked, float("-inf"))
        # 2. entropy from log-probs; 0·log 0 = 0 for masked keys, fully masked rows dropped
        logp = torch.log_softmax(scores, dim=-1)
        ent = -torch.where(logp.isfinite(), logp.exp() * logp, 0.0).sum(-1)
        valid = torch.isfinite(scores).any(-1)
        total += torch.where(valid, ent, 0.0).sum(dim=(0, 2))
        count += valid.sum(dim=(0, 2))
    return total / count.clamp_min(1)


# ---------------------------------------------------------------------------------------------
# Spectra of W_qᵀ W_k
# ---------------------------------------------------------------------------------------------

@dataclass
class QKStats:
    sigma1: Tensor  # [heads] σ1(W_q,hᵀ W_k,h)
    sigma1_max: Tensor  # 0-dim, max over heads
    concentration: Tensor | None  # [heads] Σ_{i<=s} σ_i² / Σ σ_i²  (None in power-iteration mode)


def split_megatron_qkv(
    w_qkv: Tensor, num_heads: int, num_kv_heads: int, head_dim: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Split megatron-core's fused linear_qkv weight (rows grouped per query group as
    [q heads of the group, k, v], see SelfAttention.get_query_key_value_tensors) into
    w_q [heads·hd, d], w_k [kv·hd, d], w_v [kv·hd, d] in head order.  Works on a TP shard when
    given the shard's local head counts."""
    per_group = num_heads // num_kv_heads
    grouped = w_qkv.view(num_kv_heads, (per_group + 2) * head_dim, -1)
    w_q, w_k, w_v = grouped.split([per_group * head_dim, head_dim, head_dim], dim=1)
    return (w_q.reshape(num_heads * head_dim, -1), w_k.reshape(num_kv_heads * head_dim, -1),
            w_v.reshape(num_kv_heads * head_dim, -1))


def _head_blocks(w_q: Tensor, w_k: Tensor, num_heads: int, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """[heads, hd, d] query blocks, [kv_heads, hd, d] key blocks, and each query head's kv index."""
    wq = w_q.float().reshape(num_heads, head_dim, -1)
    wk = w_k.float().reshape(-1, head_dim, w_k.shape[-1])
    if num_heads % wk.shape[0]:
        raise ValueError(f"{num_heads} query heads not divisible by {wk.shape[0]} kv heads")
    kv_of = torch.arange(num_heads, device=wq.device) // (num_heads // wk.shape[0])
    return wq, wk, kv_of


@torch.no_grad()
def qk_spectral_stats(
    w_q: Tensor,
    w_k: Tensor,
    num_heads: int,
    head_dim: int,
    top_s: int = 1,
    iters: int | None = None,
    state: dict | None = None,
) -> QKStats:
    """Per-head spectrum of M_h = W_q,hᵀ W_k,h (d×d) from projection weights [heads·hd, d].

    iters=None (default): exact.  M_h has rank <= hd; with W_q,hᵀ = Q_q R_q and W_k,hᵀ = Q_k R_k (thin
    QR), M_h = Q_q (R_q R_kᵀ) Q_kᵀ, so its singular values are those of the hd×hd core R_q R_kᵀ:
    O(heads·d·hd²) instead of an SVD of d×d; R comes from a Cholesky of the Gram matrix W Wᵀ.
    Energy concentration (AdamW² §3) = top-s share of Σσ².
    iters=int: σ1 only, by warm-started power iteration on the implicit operator (cheaper for large
    hd; pass the same `state` dict every call), concentration=None.
    w_k may have fewer heads (GQA): query head h uses kv head h // (heads / kv_heads).
    """
    wq, wk, kv_of = _head_blocks(w_q, w_k, num_heads, head_dim)
    if iters is not None:
        sigma = _qk_sigma_power(wq, wk[kv_of], iters, {} if state is None else state)
        return QKStats(sigma, sigma.max(), None)
    # 1. the triangular factor of each head block's Gram matrix W Wᵀ = Rᵀ R (the R of a thin QR of
    #    Wᵀ, up to signs); under GQA each kv head is factored once and shared by its query heads
    r_q, r_k = _gram_factor(wq), _gram_factor(wk)[kv_of]
    # 2. singular values of the small core (descending), on the host: on a GPU torch's default SVD
    #    solves one core at a time (384 cores of 64×64, fp64: 553 ms on an H200, 97 ms on its host;
    #    BENCHMARKS.md), which made the monitor cost +5.6% of step time instead of +1.8%
    core = r_q @ r_k.transpose(-1, -2)
    sv = torch.linalg.svdvals(core.cpu()).to(core.device, torch.float32)
    energy = sv.square()
    conc = energy[:, :top_s].sum(-1) / energy.sum(-1).clamp_min(torch.finfo(energy.dtype).tiny)
    return QKStats(sv[:, 0], sv[:, 0].max(), conc)


def _gram_factor(w: Tensor) -> Tensor:
    """R with Rᵀ R = w wᵀ for w [n, hd, d]: a batched matmul and an hd×hd Cholesky (fp64), far
    cheaper than a QR of the tall d×hd blocks; rank-deficient blocks fall back to QR."""
    gram = w.double() @ w.double().transpose(-1, -2)
    lower, info = torch.linalg.cholesky_ex(gram)
    if bool((info != 0).any()):
        return torch.linalg.qr(w.transpose(-1, -2).double(), mode="r").R
    return lower.transpose(-1, -2)


def _qk_sigma_power(wq: Tensor, wk: Tensor, iters: int, state: dict) -> Tensor:
    """σ1(W_qᵀW_k) per head without forming the d×d product: M v = W_qᵀ(W_k v), Mᵀu = W_kᵀ(W_q u)."""
    heads, _, d = wq.shape
    if state.get("u") is None or state["u"].shape != (heads, d):
        state["u"], state["v"] = init_vectors((heads, d, d), wq.device)

    def mv(v: Tensor) -> Tensor:
        return ((wk @ v.unsqueeze(-1)).transpose(-1, -2) @ wq).squeeze(-2)

    def rmv(u: Tensor) -> Tensor:
        return ((wq @ u.unsqueeze(-1)).transpose(-1, -2) @ wk).squeeze(-2)

    sigma, state["u"], state["v"] = power_iteration_op(mv, rmv, state["u"], state["v"], iters)
    return sigma


# ---------------------------------------------------------------------------------------------
# Weight spectral norm and logits
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def spectral_norm(w: Tensor, iters: int = DEFAULT_ITERS, state: dict | None = None) -> Tensor:
    """σ1(w) estimate (a lower bound) for w [..., m, n]; pass the same `state` dict every call to
    warm-start (then a few iterations per call converge over calls, as in spectral-norm layers)."""
    return power_iteration(w, {} if state is None else state, iters)


@torch.no_grad()
def logit_stats(logits: Tensor, chunk_rows: int = 4096) -> dict[str, float]:
    """Mean over positions of ||logits||₂ (over the vocab) and max |logit|, for logits [..., vocab].

    Chunked over positions so the fp32 upcast of a large-vocab tensor never materialises at once.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    norm_sum = torch.zeros((), device=logits.device)
    max_abs = torch.zeros((), device=logits.device)
    for start in range(0, flat.shape[0], chunk_rows):
        block = flat[start:start + chunk_rows].float()
        norm_sum += torch.linalg.vector_norm(block, dim=-1).sum()
        max_abs = torch.maximum(max_abs, block.abs().max())
    return {"logit_norm_mean": float(norm_sum) / max(flat.shape[0], 1), "logit_max_abs": float(max_abs)}
