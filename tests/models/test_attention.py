"""GTA/GLA/MLA modules: shapes, wiring against megatron's GQA, RoPE helper, configuration errors."""

import pytest
import torch

from tests.helpers import build_tiny_gpt

TYPES = ["mha", "gqa", "mqa", "gta", "gla", "mla"]


@pytest.mark.parametrize("attention", TYPES)
def test_every_type_trains_a_step(megatron_world, attention):
    _, gpt = build_tiny_gpt([f"attention={attention}"])
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    out = gpt.train()(tokens, torch.arange(16)[None].expand(2, -1), None)
    assert out.shape == (2, 16, 128)
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gpt.parameters())


def _config(heads=4, groups=2, d=16):
    from models.gpt import transformer_config
    from models.config import AttentionConfig, ModelConfig

    model = ModelConfig(hidden_size=heads * d, head_dim=d, num_layers=1)
    return transformer_config(model, AttentionConfig(type="gqa"), groups)


def test_gta_without_the_tie_is_gqa(megatron_world):
    """Untied GTA with d_R = d (separate K and V, all dims rotated) must equal megatron's GQA exactly."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.spec_utils import build_module

    from models.attention import standard_attention_spec
    from models.attention.gta import gta_spec
    from models.config import AttentionConfig, ModelConfig

    config, d, groups, per_group = _config(), 16, 2, 2
    spec = gta_spec(AttentionConfig(type="gta", rope_dim=d), ModelConfig(hidden_size=64, head_dim=d))
    spec.params["tied"] = False
    gta = build_module(spec, config=config, layer_number=1)
    gqa = build_module(standard_attention_spec(None, None), config=config, layer_number=1)
    # 1. megatron's fused layout is, per KV group: [its query heads | k | v]
    q = gta.linear_q.weight.view(groups, per_group * d, -1)
    kv = gta.linear_kv.weight.view(groups, 2 * d, -1)
    with torch.no_grad():
        gqa.linear_qkv.weight.copy_(torch.cat([q, kv], dim=1).reshape(-1, q.shape[-1]))
        gqa.linear_proj.weight.copy_(gta.linear_proj.weight)
    # 2. same input, same RoPE table
    x = torch.randn(10, 2, 64, generator=torch.Generator().manual_seed(0))
    table = RotaryEmbedding(d, rotary_percent=1.0, use_cpu_initialization=True)(10)
    out_gta, _ = gta(x, None, rotary_pos_emb=table)
    out_gqa, _ = gqa(x, None, rotary_pos_emb=table)
    torch.testing.assert_close(out_gta, out_gqa, rtol=1e-5, atol=1e-6)


def test_gta_key_is_tied_half_and_shared_rope(megatron_world):
    _, gpt = build_tiny_gpt(["attention=gta"])
    attn = gpt.decoder.layers[0].self_attention
    x = torch.randn(6, 1, 64)
    table = gpt.rotary_pos_emb(6)
    q, kv, k_rope = attn.qkv(x, table)
    k = attn.tied_key(kv, k_rope)
    d, r = attn.head_dim, attn.rope_dim
    assert (q.shape, kv.shape, k_rope.shape) == ((6, 1, 4, d), (6, 1, 2, d), (6, 1, 1, r))
    torch.testing.assert_close(k[..., : d - r], kv[..., : d - r])  # the tied half is never rotated
    torch.testing.assert_close(k[:, :, 0, d - r:], k[:, :, 1, d - r:])  # one RoPE key for all heads


def test_rope_table_subsampling_is_a_narrower_rope():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from models.attention.common import rope_table

    wide = RotaryEmbedding(32, rotary_percent=1.0, use_cpu_initialization=True)(7)
    narrow = RotaryEmbedding(16, rotary_percent=1.0, use_cpu_initialization=True)(7)
    torch.testing.assert_close(rope_table(wide, 16), narrow)


def test_gla_latent_feeds_only_its_own_heads(megatron_world):
    _, gpt = build_tiny_gpt(["attention=gla"])
    attn = gpt.decoder.layers[0].self_attention
    c = torch.zeros(3, 1, 2, attn.latent_dim)
    c[:, :, 1] = torch.randn(3, 1, attn.latent_dim)  # only latent 1 is non-zero
    k_nope, v = attn.expand(c)
    assert k_nope[:, :, :2].abs().max() == 0 and v[:, :, :2].abs().max() == 0  # heads 0-1 use latent 0
    assert k_nope[:, :, 2:].abs().max() > 0


@pytest.mark.parametrize("extra, message", [
    (["attention=gla", "attention.num_latent_heads=3"], "latent heads"),
    (["attention=gta", "attention.rope_dim=6"], "RoPE width"),
])
def test_bad_options_fail_clearly(megatron_world, extra, message):
    with pytest.raises(ValueError, match=message):
        _, gpt = build_tiny_gpt(extra)
        gpt(torch.zeros(1, 4, dtype=torch.long), torch.arange(4)[None], None)
