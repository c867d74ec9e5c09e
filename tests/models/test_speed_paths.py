"""The GPU step's speed paths, run on CPU: each computes what the plain model computes.

Chunked cross-entropy, activation recompute, native grouped K/V in SDPA, the MoE active-parameter count
and the MFU peak table. Compiled layers: tests/pretrain/test_compile.py.
"""

import math

import pytest
import torch

from tests.helpers import build_tiny_gpt

SEQ = 32


def _loss_and_grads(gpt, tokens):
    """Per-token losses and every parameter's gradient under unequal token weights (so each token's
    own gradient must be right, not just their sum)."""
    gpt.train()
    gpt.zero_grad(set_to_none=True)
    loss = gpt(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None, labels=tokens)
    weights = torch.linspace(0.5, 1.5, loss.numel()).view_as(loss)
    (loss * weights).sum().backward()
    return loss.detach(), {n: p.grad.clone() for n, p in gpt.named_parameters()}


def _assert_same(a, b, rtol=1e-5, atol=1e-7):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def test_chunked_cross_entropy_equals_the_plain_one(megatron_world):
    """Values and gradients, with padded vocabulary rows (masked per chunk) and an uneven last chunk;
    no output-layer call sees more than one chunk of tokens."""
    _, gpt = build_tiny_gpt(["model.vocab_multiple=96"], vocab_size=100)
    tokens = torch.randint(0, 100, (2, SEQ), generator=torch.Generator().manual_seed(0))
    plain = _loss_and_grads(gpt, tokens)
    seen = []
    hook = gpt.output_layer.register_forward_hook(lambda m, a, out: seen.append(out[0].shape[:2].numel()))
    gpt.loss_chunk_tokens = 10  # 5 positions of both rows: 7 chunks, the last of 2 positions
    try:
        chunked = _loss_and_grads(gpt, tokens)
    finally:
        gpt.loss_chunk_tokens = 0
        hook.remove()
    _assert_same(plain, chunked, atol=5e-6)  # the weight gradient sums its chunks in another order
    chunks = math.ceil(SEQ / 5)
    assert len(seen) == 2 * chunks and max(seen) <= 10  # each chunk once forward, once recomputed


def test_one_chunk_is_the_plain_path(megatron_world):
    _, gpt = build_tiny_gpt()
    tokens = torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(1))
    plain = _loss_and_grads(gpt, tokens)
    gpt.loss_chunk_tokens = 2 * SEQ
    one = _loss_and_grads(gpt, tokens)
    gpt.loss_chunk_tokens = 0
    _assert_same(plain, one, rtol=0, atol=0)


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_activation_recompute_changes_nothing_but_memory(megatron_world, recompute):
    tokens = torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(2))
    _, plain = build_tiny_gpt()
    cfg, again = build_tiny_gpt([f"model.recompute={recompute}"])
    assert again.config.recompute_granularity == recompute
    _assert_same(_loss_and_grads(plain, tokens), _loss_and_grads(again, tokens), rtol=0, atol=0)


def test_grouped_kv_is_never_expanded(megatron_world, monkeypatch):
    """GQA reads the shared K/V heads in SDPA (enable_gqa) and equals attention over expanded heads."""
    import torch.nn.functional as F

    from models.attention.sdpa import SDPACoreAttention

    _, gpt = build_tiny_gpt(["attention.num_query_groups=1"])
    core = gpt.decoder.layers[0].self_attention.core_attention
    assert isinstance(core, SDPACoreAttention)
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(8, 2, 4, 16, generator=g), torch.randn(8, 2, 1, 16, generator=g), torch.randn(8, 2, 1, 16, generator=g)
    expanded = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3).expand(-1, 4, -1, -1) for t in (q, k, v)),
                                              is_causal=True, scale=core.softmax_scale)
    monkeypatch.setattr(torch.Tensor, "repeat_interleave", lambda *a, **k: pytest.fail("K/V expanded"))
    out = core(q, k, v, None)
    torch.testing.assert_close(out, expanded.permute(2, 0, 1, 3).reshape(8, 2, 64))


@pytest.mark.parametrize("per_head_mask", [False, True])
def test_grouped_kv_with_a_mask_folds_query_heads_into_rows(megatron_world, monkeypatch, per_head_mask):
    """A dense mask (documents) with grouped K/V: torch has no fused kernel for a mask together with
    enable_gqa (only its math path, K/V expanded), so each KV head's query heads become query rows of one
    attention. Same values as the grouped call; training and decoding never pass both."""
    import torch.nn.functional as F

    from models.attention import sdpa
    from models.kernels.sdpa_decode import sdpa_decode

    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(sdpa.F, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(12, 2, 8, 16, generator=g), torch.randn(12, 2, 2, 16, generator=g), torch.randn(12, 2, 2, 16,
                                                                                                          generator=g)
    heads = 8 if per_head_mask else 1
    masked = torch.rand(2, heads, 12, 12, generator=g) > 0.6  # megatron's convention: True is masked out
    masked &= ~torch.eye(12, dtype=torch.bool)  # every query sees at least itself
    _, gpt = build_tiny_gpt()
    out = gpt.decoder.layers[0].self_attention.core_attention(q, k, v, masked)
    want = real(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), attn_mask=~masked, enable_gqa=True)
    torch.testing.assert_close(out, want.permute(2, 0, 1, 3).reshape(12, 2, 128), rtol=1e-5, atol=1e-6)
    lengths = torch.tensor([5, 12])
    keys = torch.arange(12) < lengths[:, None]
    k_cache, v_cache = k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)
    want = real(q[0][:, :, None], k_cache, v_cache, attn_mask=keys[:, None, None], scale=0.25, enable_gqa=True)[:, :, 0]
    decoded = sdpa_decode(q[0], k_cache, v_cache, lengths, 0.25)
    torch.testing.assert_close(decoded, want, rtol=1e-5, atol=1e-6)
    assert len(calls) == 2 and not any(kw.get("enable_gqa") and kw.get("attn_mask") is not None for kw in calls)


def test_moe_counts_only_the_active_experts(megatron_world):
    from models.builder import active_params, count_params

    cfg, gpt = build_tiny_gpt(["model.moe.num_experts=4", "model.moe.top_k=2"])
    experts = sum(p.numel() for n, p in gpt.named_parameters() if ".experts." in n)
    assert experts > 0
    assert active_params(gpt, cfg.model.moe) == count_params(gpt) - experts + experts // 2


def test_peak_table_and_unknown_gpus(capsys):
    from pretrain import mfu

    assert mfu.peak_for_name("NVIDIA H100 PCIe") == 756e12
    assert mfu.peak_for_name("NVIDIA H100 80GB HBM3") == mfu.peak_for_name("NVIDIA H200") == 989.4e12
    assert mfu.peak_for_name("NVIDIA A100-SXM4-40GB") == mfu.peak_for_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert mfu.peak_for_name("NVIDIA B200") == 2250e12 and mfu.peak_for_name("NVIDIA L40S") == 362e12
    assert mfu.peak_for_name("NVIDIA GeForce GTX 1080") is None
    assert mfu.mfu(1e5, 1e9, torch.device("cpu")) is None  # never a made-up peak
    mfu._warn_unknown.cache_clear()
    for _ in range(3):
        mfu._warn_unknown("Mystery GPU")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no bf16 peak known for GPU 'Mystery GPU'" in err


def test_document_block_mask_equals_the_dense_mask(megatron_world):
    """FlexAttention over a block mask (documents of 9, 15 and 8 tokens; grouped K/V) gives the logits of
    SDPA over the dense [b, 1, s, s] mask. Forward only: FlexAttention has no backward on CPU, so
    training with block masks is checked on a GPU (tools/gpu_check.sh 20, tests/pretrain/test_compile.py)."""
    from data.loader import document_attention_mask
    from models.attention.flex import document_block_mask

    _, gpt = build_tiny_gpt()
    doc_ids = torch.repeat_interleave(torch.tensor([0, 1, 2]), torch.tensor([9, 15, 8])).expand(2, SEQ)
    tokens = torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(4))
    positions = torch.arange(SEQ).expand(2, SEQ)
    with torch.no_grad():
        dense = gpt(tokens, positions, document_attention_mask(doc_ids))
        blocks = gpt(tokens, positions, document_block_mask(doc_ids))
    torch.testing.assert_close(blocks, dense, rtol=1e-5, atol=1e-5)
