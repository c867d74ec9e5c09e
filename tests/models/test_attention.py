"""GTA/GLA/MLA modules: shapes, wiring against megatron's GQA, RoPE helper, QK-norm, configuration errors."""

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
    from models.attention.standard import GQA
    from models.config import ModelConfig
    from models.gpt import transformer_config

    model = ModelConfig(hidden_size=heads * d, head_dim=d, num_layers=1)
    return transformer_config(model, GQA(), groups)


def test_gta_without_the_tie_is_gqa(megatron_world):
    """Untied GTA with d_R = d (separate K and V, all dims rotated) must equal megatron's GQA exactly."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.spec_utils import build_module

    from models.attention.gta import GTA
    from models.attention.standard import standard_attention_spec
    from models.config import ModelConfig

    config, d, groups, per_group = _config(), 16, 2, 2
    spec = GTA(rope_dim=d).spec(ModelConfig(hidden_size=64, head_dim=d))
    spec.params["tied"] = False
    gta = build_module(spec, config=config, layer_number=1)
    gqa = build_module(standard_attention_spec(), config=config, layer_number=1)
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


def _query_weight(attn) -> torch.Tensor:
    """The rows of `attn`'s weights that produce its queries (and nothing else)."""
    from megatron.core.transformer.attention import SelfAttention

    if isinstance(attn, SelfAttention):  # fused per KV group: [its query heads | k | v]
        groups, d = attn.num_query_groups_per_partition, attn.hidden_size_per_attention_head
        per_group = attn.num_attention_heads_per_partition // groups
        return attn.linear_qkv.weight.view(groups, (per_group + 2) * d, -1)[:, :per_group * d]
    for name in ("linear_q_up_proj", "linear_q_proj", "linear_q"):
        if hasattr(attn, name):
            return getattr(attn, name).weight
    raise TypeError(type(attn).__name__)


@pytest.mark.parametrize("attention", TYPES)
def test_qk_norm_normalises_queries_and_keys_and_trains_its_gains(megatron_world, attention):
    """attention.qk_norm: a different forward from the same weights; the attention output no longer sees
    the scale of the query projection (queries are RMS-normalised per head before the dot product); every
    QK-norm gain gets a gradient."""
    _, plain = build_tiny_gpt([f"attention={attention}", "model.init_std=0.2"])
    _, normed = build_tiny_gpt([f"attention={attention}", "model.init_std=0.2", "attention.qk_norm=true"])
    gains = {n: p for n, p in normed.named_parameters() if n not in dict(plain.named_parameters())}
    assert len(gains) == 2 * (2 if attention in ("mha", "gqa", "mqa") else 4)  # per layer: q, k (and RoPE parts)
    assert all(p.ndim == 1 and bool((p == 1).all()) for p in gains.values())  # norm gains start at 1
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16)[None].expand(2, -1)
    with torch.no_grad():
        assert (plain(tokens, positions, None) - normed(tokens, positions, None)).abs().max() > 1e-2
    x = torch.randn(16, 2, 64, generator=torch.Generator().manual_seed(1))
    table = normed.rotary_pos_emb(16)
    for gpt, blind in ((normed, True), (plain, False)):
        attn = gpt.decoder.layers[0].self_attention
        with torch.no_grad():
            before = attn(x, None, rotary_pos_emb=table)[0]
            _query_weight(attn).mul_(10.0)
            after = attn(x, None, rotary_pos_emb=table)[0]
        assert torch.allclose(before, after, rtol=1e-4, atol=1e-5) == blind
    normed.train()(tokens, positions, None).float().pow(2).mean().backward()
    for name, p in gains.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name


def test_a_qk_norm_model_exports_as_qwen3_not_llama():
    from models.hf import UnsupportedModel, export_family
    from pretrain.config import compose_config

    cfg = compose_config(["attention=gqa", "attention.qk_norm=true"])
    assert export_family(cfg.model, cfg.attention).architecture == "Qwen3ForCausalLM"
    assert export_family(cfg.model, cfg.attention, "LlamaForCausalLM").architecture == "Qwen3ForCausalLM"
    cfg = compose_config(["attention=gqa", "model.moe.num_experts=4", "model.moe.every=2"])
    with pytest.raises(UnsupportedModel, match=r"^no Hugging Face family keel writes holds this model exactly; the "
                                               r"nearest, .* cannot hold its"):
        export_family(cfg.model, cfg.attention)


# What the TP worlds below build: each type with QK-norm (which adds its norms to the type's own TP path and
# changes nothing else of its training forward), and GLA with fewer latents than ranks (h_c = 1 < TP = 2,
# GLA's own option: each rank keeps the one latent its heads read, replicated). MQA at TP=2 (1 KV head < 2
# ranks) uses megatron's all-gather in tensor_parallel/mappings.py, which needs that module's CPU redirect in
# pretrain/cpu_compat.py
TP_CASES = {**{t: [f"attention={t}", "attention.qk_norm=true"] for t in TYPES},
            "gla_one_latent": ["attention=gla", "attention.num_latent_heads=1"]}


def _tp_step(tp: int, cases: dict[str, list[str]]) -> list[dict]:
    """Per case, one forward-backward of a tiny model through megatron's DDP and finalize_model_grads at this
    world's TP size (tools/kv_cache.py's in_tp_world): the loss, the gradient norm over every parameter as
    megatron's clipping counts it (a sharded one on every rank, a replicated one once), and every rank's
    gradients of the parameters tensor parallelism replicates (the sharded ones differ by construction)."""
    import torch.distributed as dist
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    from models.builder import build_model
    from pretrain.config import compose_config

    out = {}
    for case, overrides in cases.items():
        cfg = compose_config([*overrides, "model.num_layers=2", "model.head_dim=16", "model.hidden_size=64",
                              "model.init_std=0.2", f"parallel.tensor={tp}"])
        built = build_model(cfg.model, cfg.attention, 128, torch.device("cpu"), torch.float32, cfg.seed)
        tokens = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(0))
        loss = built.ddp(tokens[:, :-1], torch.arange(16)[None].expand(2, -1), None, labels=tokens[:, 1:]).sum()
        loss.backward()
        finalize_model_grads([built.ddp])
        params = list(built.gpt.named_parameters())
        counted = [p.main_grad.double() for _, p in params if param_is_not_tensor_parallel_duplicate(p)]
        squares = torch.stack([g.square().sum() for g in counted]).sum()
        dist.all_reduce(squares)  # this world is one TP group
        out[case] = {"loss": loss.item(), "grad_norm": squares.sqrt().item(), "grads": {
            name: p.main_grad.clone() for name, p in params if not getattr(p, "tensor_model_parallel", False)}}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, out)
    return every


@pytest.fixture(scope="module")
def tp_gradients(megatron_world) -> tuple[dict, list[dict]]:
    """(TP=1 result, every TP=2 rank's result) of `_tp_step` for all cases: TP=1 in this process's world of
    one, TP=2 in a world of two processes."""
    from tools.kv_cache import in_tp_world

    (one,) = _tp_step(1, TP_CASES)
    return one, in_tp_world(2, _tp_step, TP_CASES)


def _assert_equal_on_every_rank(one: dict, ranks: list[dict]) -> None:
    """Each TP rank's loss, gradient norm and replicated gradients are the one-process ones: fp32 sums in
    another order, so to 1e-4 of each tensor's largest element."""
    for rank in ranks:
        assert rank["loss"] == pytest.approx(one["loss"], rel=1e-5)
        assert rank["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
        assert rank["grads"].keys() == one["grads"].keys()
        for name, grad in one["grads"].items():
            torch.testing.assert_close(rank["grads"][name], grad, rtol=1e-4, atol=1e-4 * float(grad.abs().max()),
                                       msg=name)


@pytest.mark.slow  # a gloo world of two processes for all cases
@pytest.mark.parametrize("attention", TYPES)
def test_tensor_parallelism_equals_one_process(tp_gradients, attention):
    """Each type's own TP path (GTA shards its KV heads and replicates the RoPE key, GLA shards its latents,
    MLA replicates its latent, MQA all-gathers its one KV head): every TP rank holds the one-process loss,
    gradient norm and replicated gradients. Each rank normalises its own heads with QK-norm gains replicated on
    every rank, which must hold the one-process gradient after megatron's finalisation (megatron sums
    SelfAttention's q/k_layernorm over ranks; keel's modules mark their gains replicated); compared directly,
    since Adam's sign-like first steps hide a partial gradient from the losses of a short run."""
    one, ranks = tp_gradients[0][attention], [r[attention] for r in tp_gradients[1]]
    gains = [n for n in one["grads"] if any(k in n for k in ("qk_norm.", "q_layernorm.", "k_layernorm."))]
    assert gains and all(one["grads"][n].abs().max() > 0 for n in gains)
    _assert_equal_on_every_rank(one, ranks)


@pytest.mark.slow
def test_gla_with_fewer_latents_than_ranks_equals_one_process(tp_gradients):
    """h_c = 1 < TP = 2: each rank keeps the one latent and its projections, replicated, and its heads send back
    only their share of the latent's gradient. After finalisation every rank must hold the sum, the one-process
    gradient, as for every other replicated parameter; and the loss is the one-process loss."""
    one, ranks = tp_gradients[0]["gla_one_latent"], [r["gla_one_latent"] for r in tp_gradients[1]]
    assert any("linear_kv_down_proj" in name for name in one["grads"])  # replicated at this TP size
    _assert_equal_on_every_rank(one, ranks)
