"""Hugging Face causal LMs and keel's GPT, both ways: the architecture (config.json's values and keel's
model/attention configs) and the weights (full, unsplit tensors).

Seven families (`FAMILIES`): Llama and Mistral; Qwen2 (Qwen2.5: biases on q, k and v); Qwen3 (per-head
RMSNorm of queries and keys before RoPE, head_dim independent of hidden / heads); Mixtral (every layer
MoE, top-k weights renormalised); Qwen3-MoE (MoE layers placed by `decoder_sparse_step` and
`mlp_only_layers`, `norm_topk_prob` choosing renormalised or raw softmax weights) and Qwen2-MoE (the same
plus a shared expert scaled by a sigmoid gate). Each maps onto megatron-core's own switches
(`add_qkv_bias`, `qk_layernorm`, `kv_channels`, `moe_router_pre_softmax`, `moe_layer_freq` as a list,
`moe_shared_expert_intermediate_size` with `moe_shared_expert_gate`); no module of keel's own is involved.

Weights are converted at one process (TP=1, PP=1, EP=1); megatron's dist_checkpointing then splits them
for any layout. The layouts differ in two places:
- attention: megatron's fused `linear_qkv` (weight and bias) holds, for each query group (key/value
  head) in turn, the group's query heads, then its key head, then its value head ([q q k v | ...]); HF
  keeps q_proj, k_proj and v_proj apart, query head i belonging to key/value head i // (heads / groups);
- SwiGLU (dense MLP, each expert, the shared expert): megatron's `linear_fc1` is [gate; up], HF's
  gate_proj and up_proj (Mixtral: w1 and w3, w2 the down projection).
Vocabulary rows past the model's vocabulary (`model.vocab_multiple` padding) are zeros on import and
dropped on export. RoPE needs no permutation: transformers rotates halves, as megatron does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from models.attention import ATTENTION_TYPES, AttentionConfig
from models.config import ConfigError, ModelConfig

EMBEDDING, OUTPUT = "embedding.word_embeddings.weight", "output_layer.weight"


@dataclass(frozen=True)
class Family:
    """One Hugging Face architecture: what its attention and MLP hold, and where its MoE tensors live."""

    architecture: str
    qkv_bias: bool | None  # biases on q, k, v: always (True), never (False) or as config.json's `qkv_bias` (None)
    qk_norm: bool = False  # q_norm/k_norm per head before RoPE
    moe: str = ""  # "": dense; "mixtral": block_sparse_moe, w1/w2/w3; "qwen": mlp.gate, mlp.experts.e.*_proj
    shared_expert: bool = False  # Qwen2-MoE's sigmoid-gated shared expert

    @property
    def config_class(self) -> str:
        return self.architecture.replace("ForCausalLM", "Config")


FAMILIES = {f.architecture: f for f in (
    Family("LlamaForCausalLM", qkv_bias=False), Family("MistralForCausalLM", qkv_bias=False),
    Family("Qwen2ForCausalLM", qkv_bias=True), Family("Qwen3ForCausalLM", qkv_bias=False, qk_norm=True),
    Family("MixtralForCausalLM", qkv_bias=False, moe="mixtral"),
    Family("Qwen3MoeForCausalLM", qkv_bias=False, qk_norm=True, moe="qwen"),
    Family("Qwen2MoeForCausalLM", qkv_bias=None, moe="qwen", shared_expert=True))}
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
               "qwen2_moe": "Qwen2MoeForCausalLM"}
# what export writes for a model keel trained from scratch: the first family that holds it exactly
EXPORT_ORDER = ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen2ForCausalLM", "MixtralForCausalLM",
                "Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM")
SUPPORTED = ("Llama, Mistral, Qwen2/Qwen2.5, Qwen3, Mixtral, Qwen2-MoE and Qwen3-MoE (*ForCausalLM) with RMSNorm, "
             "SwiGLU (silu), RoPE (default or llama3 scaling), full attention (no sliding window in use)")
ROPE_TYPES = ("default", "llama3")


class UnsupportedModel(ConfigError):
    """A model keel cannot convert; the message says what it can."""


# --- Architecture -----------------------------------------------------------------------------------------
def family_of(hf: dict) -> Family:
    """The family config.json describes; anything else is refused in one line."""
    arch = (hf.get("architectures") or [MODEL_TYPES.get(hf.get("model_type"), hf.get("model_type", "?"))])[0]
    if arch not in FAMILIES:
        raise UnsupportedModel(f"cannot import {arch}; keel imports {SUPPORTED}")
    return FAMILIES[arch]


def sliding_window(hf: dict) -> int | None:
    """The window a model applies, or None. transformers 5 says so per layer in `layer_types` (Qwen2,
    Qwen3, Qwen2-MoE; `use_sliding_window=false` leaves them all full attention though `sliding_window` is
    set); the others (Mistral, Mixtral, Qwen3-MoE) apply `sliding_window` whenever it is set and shorter
    than the positions the model takes."""
    window, types = hf.get("sliding_window"), hf.get("layer_types")
    if types is not None:
        return (window or 0) if "sliding_attention" in types else None
    if hf.get("use_sliding_window") is False or window in (None, 0):
        return None
    return window if window < hf["max_position_embeddings"] else None


def moe_placement(hf: dict) -> list[int]:
    """Qwen's rule, per layer: MoE unless listed in `mlp_only_layers`, and only every
    `decoder_sparse_step`-th layer counting from 1."""
    skip, step = set(hf.get("mlp_only_layers") or []), hf.get("decoder_sparse_step") or 1
    return [int(i not in skip and (i + 1) % step == 0) for i in range(hf["num_hidden_layers"])]


def keel_architecture(hf: dict, vocab_multiple: int) -> tuple[dict, dict]:
    """keel's `model` and `attention` config values for a config.json (as transformers reads it: the
    rope settings under `rope_parameters`). Anything keel would compute differently is refused."""
    family = family_of(hf)
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    groups = hf.get("num_key_value_heads") or heads
    rope = hf.get("rope_parameters") or {}
    head_dim = hf.get("head_dim") or hidden // heads
    window, types = sliding_window(hf), set(hf.get("layer_types") or []) - {"full_attention", "sliding_attention"}
    qkv_bias = family.qkv_bias if family.qkv_bias is not None else bool(hf.get("qkv_bias"))
    shared = hf.get("shared_expert_intermediate_size") if family.shared_expert else None
    problems = [
        (window is not None, f"a sliding window of {window} in use"),
        (bool(types), f"attention layer types {sorted(types)}"),
        (hf.get("hidden_act") != "silu", f"activation {hf.get('hidden_act')}"),
        (bool(hf.get("attention_bias")) or bool(hf.get("mlp_bias")), "biases on the output or MLP projections"),
        (not hf.get("head_dim") and hidden % heads != 0, f"hidden_size {hidden} not divisible by {heads} heads"),
        (rope.get("rope_type", "default") not in ROPE_TYPES, f"rope type {rope.get('rope_type')}"),
        (family.shared_expert and not shared, f"a shared expert of width {shared!r} (keel imports one of width > 0 "
                                              "with its sigmoid gate)"),
    ]
    found = [what for bad, what in problems if bad]
    if found:
        raise UnsupportedModel(f"cannot import {family.architecture} with {', '.join(found)}; keel imports "
                               f"{SUPPORTED}")
    scaling = {"type": "none"}
    if rope.get("rope_type") == "llama3":
        scaling = {"type": "llama3", "factor": rope["factor"], "low_freq_factor": rope["low_freq_factor"],
                   "high_freq_factor": rope["high_freq_factor"],
                   "original_max_positions": rope["original_max_position_embeddings"]}
    model = {"num_layers": hf["num_hidden_layers"], "hidden_size": hidden, "head_dim": head_dim,
             "num_heads": heads, "ffn_hidden_size": hf["intermediate_size"],
             "max_seq_len": hf["max_position_embeddings"], "position_embedding": "rope",
             "rotary_base": float(rope.get("rope_theta", 10000.0)), "rope_scaling": scaling,
             "normalization": "RMSNorm", "norm_eps": hf["rms_norm_eps"], "final_norm": True, "activation": "swiglu",
             "tie_embeddings": bool(hf.get("tie_word_embeddings")), "vocab_size": hf["vocab_size"],
             "vocab_multiple": vocab_multiple, "moe": keel_moe(hf, family)}
    kind = "mha" if groups == heads else "mqa" if groups == 1 else "gqa"
    attention = {"type": kind, "qk_norm": family.qk_norm, "qkv_bias": qkv_bias}
    return model, attention | ({"num_query_groups": groups} if kind == "gqa" else {})


def keel_moe(hf: dict, family: Family) -> dict:
    """keel's `model.moe` for a family's config.json ({} for a dense family). The router's load-balancing
    coefficient is the model's own (`router_aux_loss_coef`), for continued training."""
    if not family.moe:
        return {}
    top_k = hf["num_experts_per_tok"]
    experts = hf.get("num_local_experts") or hf["num_experts"]  # transformers maps one name onto the other
    if family.moe == "mixtral":
        moe = {"num_experts": experts, "ffn_hidden_size": hf["intermediate_size"], "norm_topk": True}
    else:
        moe = {"num_experts": experts, "ffn_hidden_size": hf["moe_intermediate_size"],
               "norm_topk": bool(hf.get("norm_topk_prob")), "layers": moe_placement(hf)}
    if family.shared_expert:
        moe |= {"shared_expert_size": hf["shared_expert_intermediate_size"], "shared_expert_gate": True}
    if top_k == 1 and moe["norm_topk"]:
        raise UnsupportedModel(f"cannot import {family.architecture} with top-1 routing renormalised (every weight 1); "
                               f"keel imports {SUPPORTED}")
    return moe | {"top_k": top_k, "aux_loss_coeff": float(hf.get("router_aux_loss_coef", 0.01))}


def export_family(model: ModelConfig, attention: AttentionConfig, recorded: str | None = None) -> Family:
    """The family export writes: the one recorded at import when it still holds the model, else the first
    of EXPORT_ORDER that holds it exactly; none: one line saying why the nearest cannot."""
    if not attention.llama_layout:
        exportable = [name for name, kind in ATTENTION_TYPES.items() if kind.llama_layout]
        others = [name.upper() for name, kind in ATTENTION_TYPES.items() if not kind.llama_layout]
        raise UnsupportedModel(f"attention={attention.type} has no Hugging Face equivalent; export takes "
                               f"{'/'.join(exportable)} attention ({', '.join(others)} checkpoints stay in keel)")
    common = [(model.position_embedding != "rope", f"position_embedding={model.position_embedding}"),
              (model.normalization != "RMSNorm", f"normalization={model.normalization}"),
              (model.activation != "swiglu", f"activation={model.activation}"),
              (not model.final_norm, "no final norm (model.final_norm=false)")]
    found = [what for bad, what in common if bad]
    if found:
        raise UnsupportedModel(f"cannot export a model with {', '.join(found)}: the Hugging Face families keel "
                               "writes have RoPE, RMSNorm, SwiGLU and a final norm")
    order = ([recorded] if recorded in FAMILIES else []) + [a for a in EXPORT_ORDER if a != recorded]
    reasons = {arch: family_problems(FAMILIES[arch], model, attention) for arch in order}
    fits = [arch for arch in order if not reasons[arch]]
    if fits:
        return FAMILIES[fits[0]]
    nearest = min(order, key=lambda arch: len(reasons[arch]))
    raise UnsupportedModel(f"no Hugging Face family keel writes holds this model exactly; the nearest, {nearest}, "
                           f"cannot hold its {', '.join(reasons[nearest])}")


def family_problems(family: Family, model: ModelConfig, attention: AttentionConfig) -> list[str]:
    """What of keel's model `family` cannot hold (empty: it holds it exactly)."""
    moe = model.moe
    placement = moe.moe_layers(model.num_layers)
    problems = [
        (attention.qk_norm != family.qk_norm, f"QK-norm={attention.qk_norm}"),
        (family.qkv_bias is not None and attention.qkv_bias != family.qkv_bias, f"qkv_bias={attention.qkv_bias}"),
        (bool(moe.num_experts) != bool(family.moe), f"MoE (model.moe.num_experts={moe.num_experts})"),
    ]
    if moe.num_experts and family.moe:
        problems += [
            (family.moe == "mixtral" and not all(placement), f"dense layers (MoE placement {placement})"),
            (family.moe == "mixtral" and not moe.norm_topk, "un-renormalised top-k weights (norm_topk=false)"),
            ((moe.shared_expert_size is not None) != family.shared_expert,
             f"shared expert {moe.shared_expert_size}"),
            (family.shared_expert and not moe.shared_expert_gate, "a shared expert without its sigmoid gate"),
            (family.moe == "mixtral" and moe.ffn_hidden_size not in (None, model.ffn_size),
             f"experts of width {moe.ffn_hidden_size} beside model.ffn_hidden_size={model.ffn_size}"),
        ]
    return [what for bad, what in problems if bad]


def hf_config(family: Family, model: ModelConfig, attention: AttentionConfig, vocab: int, special: dict) -> dict:
    """The family's config.json values for keel's model (`special`: bos/eos/pad token ids and dtype)."""
    s, moe = model.rope_scaling, model.moe
    rope = {"rope_type": "default", "rope_theta": model.rotary_base}
    if s.type == "llama3":
        rope |= {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                 "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_positions}
    config = {"architectures": [family.architecture], "vocab_size": vocab, "hidden_size": model.hidden_size,
              "intermediate_size": model.ffn_size, "num_hidden_layers": model.num_layers,
              "num_attention_heads": model.heads, "num_key_value_heads": attention.query_groups(model.heads),
              "head_dim": model.kv_channels, "hidden_act": "silu", "max_position_embeddings": model.max_seq_len,
              "rms_norm_eps": model.norm_eps, "tie_word_embeddings": model.tie_embeddings, "rope_parameters": rope,
              "initializer_range": model.init_std, **special}
    if family.architecture in ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
        config |= {"attention_bias": False} | ({"mlp_bias": False} if family.architecture == "LlamaForCausalLM" else {})
    if family.architecture != "LlamaForCausalLM":
        config |= {"sliding_window": None, "use_sliding_window": False}
    if family.moe == "mixtral":
        config |= {"num_local_experts": moe.num_experts, "num_experts_per_tok": moe.top_k,
                   "router_aux_loss_coef": moe.aux_loss_coeff}
    elif family.moe == "qwen":
        placement = moe.moe_layers(model.num_layers)
        config |= {"num_experts": moe.num_experts, "num_experts_per_tok": moe.top_k,
                   "moe_intermediate_size": moe.ffn_hidden_size or model.ffn_size, "norm_topk_prob": moe.norm_topk,
                   "decoder_sparse_step": 1, "mlp_only_layers": [i for i, m in enumerate(placement) if not m],
                   "router_aux_loss_coef": moe.aux_loss_coeff}
    if family.shared_expert:
        config |= {"shared_expert_intermediate_size": moe.shared_expert_size, "qkv_bias": attention.qkv_bias}
    return config


# --- Weights ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pair:
    """One keel parameter, the HF tensors it is made of (several: concatenated in megatron's layout), and
    how: "qkv" (fused per query group), "cat" (SwiGLU's [gate; up]), "vocab" (padded rows) or "" (as is)."""

    keel: str
    hf: tuple[str, ...]
    how: str = ""


def _layer_pairs(family: Family, model: ModelConfig, attention: AttentionConfig, i: int, is_moe: bool) -> list[Pair]:
    k, h = f"decoder.layers.{i}.", f"model.layers.{i}."
    qkv = tuple(f"{h}self_attn.{p}_proj" for p in "qkv")
    pairs = [Pair(f"{k}input_layernorm.weight", (f"{h}input_layernorm.weight",)),
             Pair(f"{k}self_attention.linear_qkv.weight", tuple(f"{n}.weight" for n in qkv), "qkv"),
             Pair(f"{k}self_attention.linear_proj.weight", (f"{h}self_attn.o_proj.weight",)),
             Pair(f"{k}pre_mlp_layernorm.weight", (f"{h}post_attention_layernorm.weight",))]
    if attention.qkv_bias:
        pairs.append(Pair(f"{k}self_attention.linear_qkv.bias", tuple(f"{n}.bias" for n in qkv), "qkv"))
    if attention.qk_norm:
        pairs += [Pair(f"{k}self_attention.{q}_layernorm.weight", (f"{h}self_attn.{q}_norm.weight",)) for q in "qk"]
    if not is_moe:
        return pairs + _swiglu(f"{k}mlp.", f"{h}mlp.", ("gate_proj", "up_proj", "down_proj"))
    # MoE: the router, each expert, the shared expert and its gate
    mixtral = family.moe == "mixtral"
    block = f"{h}block_sparse_moe." if mixtral else f"{h}mlp."
    names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    pairs.append(Pair(f"{k}mlp.router.weight", (f"{block}gate.weight",)))
    for e in range(model.moe.num_experts):
        pairs += _swiglu(f"{k}mlp.experts.local_experts.{e}.", f"{block}experts.{e}.", names)
    if model.moe.shared_expert_size is not None:
        pairs += _swiglu(f"{k}mlp.shared_experts.", f"{h}mlp.shared_expert.", ("gate_proj", "up_proj", "down_proj"))
        pairs.append(Pair(f"{k}mlp.shared_experts.gate_weight", (f"{h}mlp.shared_expert_gate.weight",)))
    return pairs


def _swiglu(keel: str, hf: str, names: tuple[str, str, str]) -> list[Pair]:
    gate, up, down = (f"{hf}{n}.weight" for n in names)
    return [Pair(f"{keel}linear_fc1.weight", (gate, up), "cat"), Pair(f"{keel}linear_fc2.weight", (down,))]


def name_pairs(family: Family, model: ModelConfig, attention: AttentionConfig) -> list[Pair]:
    """Every keel parameter of a world of one process, with the HF tensors it is made of."""
    pairs = [Pair(EMBEDDING, ("model.embed_tokens.weight",), "vocab")]
    for i, is_moe in enumerate(model.moe.moe_layers(model.num_layers)):
        pairs += _layer_pairs(family, model, attention, i, bool(is_moe))
    pairs.append(Pair("decoder.final_layernorm.weight", ("model.norm.weight",)))
    if not model.tie_embeddings:
        pairs.append(Pair(OUTPUT, ("lm_head.weight",), "vocab"))
    return pairs


def hf_shapes(family: Family, model: ModelConfig, attention: AttentionConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a HF checkpoint of this model holds, with its shape."""
    h, d, moe = model.hidden_size, model.kv_channels, model.moe
    q, kv = model.heads * d, attention.query_groups(model.heads) * d

    def mlp_width(keel: str) -> int:
        if ".mlp.shared_experts." in keel:
            return moe.shared_expert_size
        return moe.ffn_hidden_size or model.ffn_size if ".mlp.experts." in keel else model.ffn_size

    def shape(keel: str, hf: str) -> tuple[int, ...]:
        rows = {"q_proj": q, "k_proj": kv, "v_proj": kv}.get(hf.rsplit(".", 2)[-2])
        if rows is not None:  # a projection's weight or bias
            return (rows, h) if hf.endswith("weight") else (rows,)
        if hf.endswith("o_proj.weight"):
            return (h, q)
        if hf.endswith(("q_norm.weight", "k_norm.weight")):
            return (d,)
        if hf.endswith("shared_expert_gate.weight"):
            return (1, h)
        if hf.endswith("gate.weight"):
            return (moe.num_experts, h)
        if keel.endswith("linear_fc1.weight"):
            return (mlp_width(keel), h)
        if keel.endswith("linear_fc2.weight"):
            return (h, mlp_width(keel))
        return (model.vocab_size, h) if keel in (EMBEDDING, OUTPUT) else (h,)

    return {name: shape(p.keel, name) for p in name_pairs(family, model, attention) for name in p.hf}


def to_keel(get: Callable[[str], torch.Tensor], family: Family, model: ModelConfig, attention: AttentionConfig,
            padded_vocab: int) -> Iterator[tuple[str, torch.Tensor]]:
    """keel's full tensors from HF's (`get` reads one by name), one at a time."""
    groups = attention.query_groups(model.heads)
    for pair in name_pairs(family, model, attention):
        parts = [get(name) for name in pair.hf]
        if pair.how == "qkv":
            yield pair.keel, fuse_qkv(*parts, groups, model.kv_channels)
        elif pair.how == "cat":
            yield pair.keel, torch.cat(parts)
        elif pair.how == "vocab":
            yield pair.keel, torch.cat([parts[0], parts[0].new_zeros(padded_vocab - len(parts[0]), parts[0].shape[1])])
        else:
            yield pair.keel, parts[0]


def to_hf(get: Callable[[str], torch.Tensor], family: Family, model: ModelConfig, attention: AttentionConfig,
          vocab: int) -> Iterator[tuple[str, torch.Tensor]]:
    """HF's tensors from keel's full ones (`get` reads one by name), padded vocabulary rows dropped."""
    groups = attention.query_groups(model.heads)
    for pair in name_pairs(family, model, attention):
        tensor = get(pair.keel)
        if pair.how == "qkv":
            parts = split_qkv(tensor, model.heads, groups, model.kv_channels)
        elif pair.how == "cat":
            parts = tensor.chunk(2)
        elif pair.how == "vocab":
            parts = (tensor[:vocab],)
        else:
            parts = (tensor,)
        yield from zip(pair.hf, (p.contiguous() for p in parts))


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int, head_dim: int) -> torch.Tensor:
    """[q; k; v] of HF (weights [rows, hidden] or biases [rows]) -> megatron's per-group [q heads of the
    group, k, v]: [(heads + 2 groups) d, ...]."""
    rest = q.shape[1:]
    q = q.reshape(groups, -1, head_dim, *rest)  # query heads of group g are g*r .. g*r + r - 1
    k, v = (t.reshape(groups, 1, head_dim, *rest) for t in (k, v))
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """The inverse of `fuse_qkv`: (q, k, v) of HF."""
    rest, per_group = qkv.shape[1:], heads // groups
    blocks = qkv.reshape(groups, per_group + 2, head_dim, *rest)
    q, k, v = blocks[:, :per_group], blocks[:, per_group], blocks[:, per_group + 1]
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)
