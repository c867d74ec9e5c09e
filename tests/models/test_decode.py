"""KV-cache decoding: incremental and static-shape steps equal a full forward (with and without QK-norm),
batched prompts of different lengths decode as if alone, cache sizes equal the formulas, GLA absorbed = naive."""

import pytest
import torch

from models.inference import (CapturedStep, forward_cached, forward_static, generate, new_cache,
                              right_pad)
from tests.helpers import DEVICE, build_tiny_gpt

TYPES = ["mha", "gqa", "mqa", "gta", "gla", "mla"]
# larger weights than the training init, so attention is far from uniform and errors would show
BASE = ["model.init_std=0.2"]
QK_NORM = {False: [], True: ["attention.qk_norm=true"]}  # with QK-norm GTA's key and GLA/MLA's decoding change


def _tokens(b=2, t=14):
    return torch.randint(0, 128, (b, t), generator=torch.Generator().manual_seed(1)).to(DEVICE)


def _positions(t: int, b: int = 1) -> torch.Tensor:
    return torch.arange(t, device=DEVICE)[None].expand(b, -1)


def _decode(gpt, tokens, prefill, absorbed=True):
    cache = new_cache(gpt, tokens.shape[0], tokens.shape[1])
    parts = [forward_cached(gpt, tokens[:, :prefill], cache, absorbed)]
    parts += [forward_cached(gpt, tokens[:, i:i + 1], cache, absorbed) for i in range(prefill, tokens.shape[1])]
    return torch.cat(parts, dim=1), cache


@pytest.mark.parametrize("qk_norm", list(QK_NORM))
@pytest.mark.parametrize("attention", TYPES)
def test_incremental_decoding_equals_full_forward(megatron_world, attention, qk_norm):
    _, gpt = build_tiny_gpt([f"attention={attention}"] + BASE + QK_NORM[qk_norm], device=DEVICE)
    tokens = _tokens()
    with torch.no_grad():
        full = gpt(tokens, _positions(tokens.shape[1], 2), None)
    assert full.std() > 0.5  # non-trivial logits
    inc, cache = _decode(gpt, tokens, prefill=5)
    torch.testing.assert_close(inc, full, rtol=0, atol=1e-4)
    assert cache.length == tokens.shape[1]


@pytest.mark.parametrize("qk_norm", list(QK_NORM))
@pytest.mark.parametrize("attention", TYPES)
def test_static_shape_steps_equal_the_full_forward(megatron_world, attention, qk_norm):
    """One-token steps over whole buffers (what a CUDA graph captures), with garbage in the unfilled tail
    and sequences of different lengths: the per-sequence length tensor alone decides what is read."""
    _, gpt = build_tiny_gpt([f"attention={attention}"] + BASE + QK_NORM[qk_norm], device=DEVICE)
    tokens = _tokens()
    with torch.no_grad():
        full = gpt(tokens, _positions(tokens.shape[1], 2), None)
    cache = new_cache(gpt, 2, 20)
    for layer in cache.layers:
        for buf in layer.values():
            buf.normal_()
    first = forward_cached(gpt, tokens[:, :6], cache)
    cache.lengths.copy_(torch.tensor([6, 5]))  # sequence 1 lags one token: its slot 5 is decoded again
    rows = torch.arange(2, device=DEVICE)
    while cache.lengths[0] < tokens.shape[1]:
        pos = cache.lengths.clone()
        with torch.no_grad():
            logits = forward_static(gpt, tokens[rows, pos][:, None], cache)[:, 0]
        torch.testing.assert_close(logits, full[rows, pos], rtol=0, atol=1e-4)
    torch.testing.assert_close(first, full[:, :6], rtol=0, atol=1e-4)
    assert cache.lengths.tolist() == [14, 13]


@pytest.mark.parametrize("attention", ["gla", "mla"])
def test_absorbed_latent_decoding_equals_naive(megatron_world, attention):
    _, gpt = build_tiny_gpt([f"attention={attention}"] + BASE, device=DEVICE)
    tokens = _tokens()
    absorbed, _ = _decode(gpt, tokens, prefill=3, absorbed=True)
    naive, _ = _decode(gpt, tokens, prefill=3, absorbed=False)
    torch.testing.assert_close(absorbed, naive, rtol=0, atol=1e-4)


# hidden 64, head_dim 16: h_q = 4, d = 16; GQA/GTA h_kv = 2; GLA h_c = 2, d_c = 32; MLA d_c = 64; d_R = 8
@pytest.mark.parametrize("attention, overrides, expected", [
    ("mha", [], 2 * 4 * 16),
    ("gqa", [], 2 * 2 * 16),
    ("mqa", [], 2 * 16),
    ("gta", [], 2 * 16 + 8),
    ("gla", [], 2 * 32 + 8),
    ("mla", [], 64 + 8),
    ("gta", ["attention.num_query_groups=4", "attention.rope_dim=16"], 4 * 16 + 16),
    ("gla", ["attention.num_latent_heads=4", "attention.latent_dim=24", "attention.qk_pos_emb_head_dim=4"], 4 * 24 + 4),
    ("mla", ["attention.kv_lora_rank=40"], 40 + 8),
])
def test_cache_elements_per_token_match_the_formula(megatron_world, attention, overrides, expected):
    _, gpt = build_tiny_gpt([f"attention={attention}"] + overrides, device=DEVICE)
    cache = new_cache(gpt, batch=1, max_len=4)
    assert [cache.elements_per_token(i) for i in range(2)] == [expected, expected]
    assert cache.bytes_per_token() == 4 * expected  # fp32


def test_decoding_with_changed_options_still_matches(megatron_world):
    _, gpt = build_tiny_gpt(["attention=gla", "attention.num_latent_heads=4", "attention.latent_dim=24",
                             "attention.qk_pos_emb_head_dim=4", "attention.q_lora_rank=null"] + BASE, device=DEVICE)
    tokens = _tokens(1, 9)
    with torch.no_grad():
        full = gpt(tokens, _positions(9), None)
    torch.testing.assert_close(_decode(gpt, tokens, prefill=1)[0], full, rtol=0, atol=1e-4)


def test_greedy_generation_follows_the_full_forward(megatron_world):
    _, gpt = build_tiny_gpt(["attention=gta"] + BASE, device=DEVICE)
    prompt = _tokens(1, 4)
    out = generate(gpt, prompt, max_new_tokens=5)
    assert out.shape == (1, 9) and torch.equal(out[:, :4], prompt)
    with torch.no_grad():  # each generated token is the argmax of a full forward over what precedes it
        full = gpt(out[:, :-1], _positions(8), None)
    torch.testing.assert_close(full[0, 3:].argmax(-1), out[0, 4:])


def test_sampling_is_seeded(megatron_world):
    _, gpt = build_tiny_gpt(["attention=gla"] + BASE, device=DEVICE)
    prompt = _tokens(1, 3)
    runs = [generate(gpt, prompt, 6, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(s))
            for s in (0, 0, 1)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_cache_overflow_is_an_error(megatron_world):
    _, gpt = build_tiny_gpt(["attention=gqa"], device=DEVICE)
    cache = new_cache(gpt, 1, 3)
    with pytest.raises(ValueError, match="holds 3 tokens"):
        forward_cached(gpt, _tokens(1, 4), cache)


@pytest.mark.parametrize("attention", ["gqa", "gta", "gla"])
def test_batched_prompts_of_different_lengths_generate_as_if_alone(megatron_world, attention):
    _, gpt = build_tiny_gpt([f"attention={attention}"] + BASE, device=DEVICE)
    prompts = [(_tokens(1, n)[0] + n) % 128 for n in (3, 7, 1)]
    padded, lengths = right_pad(prompts, device=DEVICE)
    assert padded.shape == (3, 7) and lengths.tolist() == [3, 7, 1]
    out = generate(gpt, padded, max_new_tokens=6, lengths=lengths, pad=-1)
    assert out.shape == (3, 13)
    for i, p in enumerate(prompts):
        alone = generate(gpt, p[None], max_new_tokens=6)[0]
        assert torch.equal(out[i, :len(p) + 6], alone), (i, out[i], alone)
        assert (out[i, len(p) + 6:] == -1).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (tools/gpu_check.sh 30)")
@pytest.mark.parametrize("qk_norm", list(QK_NORM))
@pytest.mark.parametrize("attention", TYPES)
def test_captured_step_equals_eager_steps(megatron_world, attention, qk_norm):
    _, gpt = build_tiny_gpt([f"attention={attention}"] + BASE + QK_NORM[qk_norm], device=DEVICE)
    tokens = _tokens()
    eager, graphed = new_cache(gpt, 2, 16), new_cache(gpt, 2, 16)
    ref = [forward_cached(gpt, tokens[:, :5], eager)[:, -1]]
    forward_cached(gpt, tokens[:, :5], graphed)
    step = CapturedStep(gpt, graphed)
    out = [ref[0]]
    for i in range(5, tokens.shape[1]):
        ref.append(forward_cached(gpt, tokens[:, i:i + 1], eager)[:, -1])
        out.append(step(tokens[:, i:i + 1])[:, -1].clone())
    torch.testing.assert_close(torch.stack(out), torch.stack(ref), rtol=0, atol=1e-4)
    assert graphed.lengths.tolist() == [tokens.shape[1]] * 2
    with pytest.raises(ValueError, match="holds 16 tokens"):
        for _ in range(3):
            step(tokens[:, :1])


@pytest.mark.parametrize("attention", ["gqa", "gla"])
def test_a_cache_in_another_dtype_decodes(megatron_world, attention):
    """A bf16 cache under an fp32 model: queries attend in the cache's dtype (the Triton kernel's dot takes
    no mixed operands), and the result goes back to the model's dtype."""
    _, gpt = build_tiny_gpt([f"attention={attention}"] + BASE, device=DEVICE)
    tokens = _tokens()
    with torch.no_grad():
        full = gpt(tokens, _positions(tokens.shape[1], 2), None)
    cache = new_cache(gpt, 2, tokens.shape[1], dtype=torch.bfloat16)
    parts = [forward_cached(gpt, tokens[:, :5], cache)]
    parts += [forward_cached(gpt, tokens[:, i:i + 1], cache) for i in range(5, tokens.shape[1])]
    inc = torch.cat(parts, dim=1)
    assert inc.dtype == full.dtype and cache.layers[0][next(iter(cache.layers[0]))].dtype == torch.bfloat16
    torch.testing.assert_close(inc, full, rtol=0, atol=0.1)  # bf16's rounding of the cached keys and values
