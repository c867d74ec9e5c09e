"""Tests for pretrain/callbacks/stability_stats.py against hand-computed values and explicit SVDs."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.callbacks.stability_stats import (
    attention_entropy,
    attention_entropy_from_scores,
    logit_stats,
    qk_spectral_stats,
    spectral_norm,
    split_megatron_qkv,
)

torch.set_num_threads(1)


# ---------------------------------------------------------------------------- entropy
def test_uniform_attention_entropy_is_log_t() -> None:
    t = 7
    probs = torch.full((2, 3, 5, t), 1.0 / t)
    assert torch.allclose(attention_entropy(probs), torch.full((3,), math.log(t)))


def test_one_hot_attention_entropy_is_zero() -> None:
    probs = torch.nn.functional.one_hot(torch.randint(0, 6, (2, 3, 4)), 6).float()
    assert torch.equal(attention_entropy(probs), torch.zeros(3))


def test_causal_uniform_entropy_hand_computed() -> None:
    # uniform over the visible keys: query i sees i+1 keys -> entropy log(i+1); mean over queries
    t = 5
    probs = torch.tril(torch.ones(t, t)) / torch.arange(1, t + 1).unsqueeze(1)
    expected = sum(math.log(i + 1) for i in range(t)) / t
    out = attention_entropy(probs.expand(1, 2, t, t))
    assert torch.allclose(out, torch.full((2,), expected))


def test_entropy_from_scores_zero_queries_is_causal_uniform() -> None:
    # zero queries -> equal scores -> uniform over visible keys (same value as the hand computation)
    t = 9
    q, k = torch.zeros(2, 3, t, 4), torch.randn(2, 3, t, 4)
    expected = sum(math.log(i + 1) for i in range(t)) / t
    for chunk in (1, 4, 64):
        out = attention_entropy_from_scores(q, k, causal=True, chunk_size=chunk)
        assert torch.allclose(out, torch.full((3,), expected), atol=1e-6)
    full = attention_entropy_from_scores(q, k, causal=False)
    assert torch.allclose(full, torch.full((3,), math.log(t)), atol=1e-6)


def test_entropy_from_scores_matches_probs_with_gqa_and_mask() -> None:
    g = torch.Generator().manual_seed(0)
    b, h, kv, s, d = 2, 4, 2, 10, 8
    q, k = torch.randn(b, h, s, d, generator=g), torch.randn(b, kv, s, d, generator=g)
    pad = torch.zeros(b, 1, 1, s, dtype=torch.bool)
    pad[1, ..., -3:] = True  # padded keys in the second sequence
    scores = q @ k.repeat_interleave(h // kv, 1).transpose(-1, -2) / math.sqrt(d)
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)
    probs = torch.softmax(scores.masked_fill(causal | pad, float("-inf")), -1)
    # rows whose every key is masked are excluded: none here since key 0 is never padded
    out = attention_entropy_from_scores(q, k, causal=True, mask=pad, chunk_size=3)
    assert torch.allclose(out, attention_entropy(probs), atol=1e-5)


def test_fully_masked_rows_are_excluded() -> None:
    q, k = torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2)
    mask = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    mask[..., 0, :] = True  # query 0 sees nothing
    out = attention_entropy_from_scores(q, k, causal=False, mask=mask)
    assert torch.allclose(out, torch.tensor([math.log(3)]))


# ---------------------------------------------------------------------------- W_qᵀ W_k
def _explicit_svdvals(w_q, w_k, heads, hd):
    kv = w_k.shape[0] // hd
    out = []
    for h in range(heads):
        j = h // (heads // kv)
        m = w_q[h * hd:(h + 1) * hd].T.double() @ w_k[j * hd:(j + 1) * hd].double()
        out.append(torch.linalg.svdvals(m))
    return out


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_qk_stats_match_explicit_svd(kv_heads: int) -> None:
    g = torch.Generator().manual_seed(1)
    heads, hd, d, top_s = 4, 6, 20, 2
    w_q = torch.randn(heads * hd, d, generator=g)
    w_k = torch.randn(kv_heads * hd, d, generator=g)
    ref = _explicit_svdvals(w_q, w_k, heads, hd)
    st = qk_spectral_stats(w_q, w_k, heads, hd, top_s=top_s)
    sig = torch.stack([s[0] for s in ref]).float()
    conc = torch.stack([(s[:top_s] ** 2).sum() / (s ** 2).sum() for s in ref]).float()
    assert torch.allclose(st.sigma1, sig, rtol=1e-4)
    assert torch.allclose(st.sigma1_max, sig.max(), rtol=1e-4)
    assert torch.allclose(st.concentration, conc, rtol=1e-4)
    # power-iteration mode converges to the same σ1 when warm-started across calls
    state: dict = {}
    for _ in range(30):
        pw = qk_spectral_stats(w_q, w_k, heads, hd, iters=5, state=state)
    assert pw.concentration is None and torch.allclose(pw.sigma1, sig, rtol=1e-3)


def test_qk_concentration_of_rank_one_is_one() -> None:
    u, v = torch.randn(8, 1), torch.randn(1, 16)
    w = u @ v  # one head, hd=8: every row parallel -> rank-1 product
    st = qk_spectral_stats(w, w, num_heads=1, head_dim=8)
    assert st.concentration.item() == pytest.approx(1.0, abs=1e-5)


def test_split_megatron_qkv_layout() -> None:
    heads, kv, hd, d = 4, 2, 3, 5
    per = heads // kv
    # rows tagged by (group, slot): slot < per*hd is q, then k, then v
    rows = []
    for grp in range(kv):
        rows += [("q", grp * per + i // hd, i % hd) for i in range(per * hd)]
        rows += [("k", grp, i) for i in range(hd)] + [("v", grp, i) for i in range(hd)]
    code = {"q": 0, "k": 1, "v": 2}
    w = torch.tensor([[code[r[0]] * 100 + r[1] * 10 + r[2]] * d for r in rows], dtype=torch.float32)
    w_q, w_k, w_v = split_megatron_qkv(w, heads, kv, hd)
    assert torch.equal(w_q[:, 0], torch.tensor([h * 10 + i for h in range(heads) for i in range(hd)]).float())
    assert torch.equal(w_k[:, 0], torch.tensor([100 + j * 10 + i for j in range(kv) for i in range(hd)]).float())
    assert torch.equal(w_v[:, 0], torch.tensor([200 + j * 10 + i for j in range(kv) for i in range(hd)]).float())


# ---------------------------------------------------------------------------- misc
def test_spectral_norm_and_logit_stats() -> None:
    w = torch.randn(12, 7, generator=torch.Generator().manual_seed(2))
    state: dict = {}
    for _ in range(20):
        est = spectral_norm(w, iters=3, state=state)
    assert float(est) == pytest.approx(float(torch.linalg.svdvals(w)[0]), rel=1e-4)
    logits = torch.tensor([[[3.0, 4.0], [0.0, -6.0]]])
    out = logit_stats(logits, chunk_rows=1)
    assert out == {"logit_norm_mean": pytest.approx(5.5), "logit_max_abs": 6.0}
