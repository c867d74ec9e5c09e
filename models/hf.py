"""Hugging Face Llama/Mistral and keel's GPT, both ways: the architecture (config.json's values and
keel's model/attention configs) and the weights (full, unsplit tensors).

Weights are converted at one process (TP=1, PP=1); megatron's dist_checkpointing then splits them for
any layout. The layouts differ in two places:
- attention: megatron's fused `linear_qkv` holds, for each query group (key/value head) in turn, the
  group's query heads, then its key head, then its value head ([q q k v | q q k v | ...]); HF keeps
  q_proj, k_proj and v_proj apart, query head i belonging to key/value head i // (heads / groups);
- SwiGLU: megatron's `linear_fc1` is [gate; up], HF's gate_proj and up_proj.
Vocabulary rows past the model's vocabulary (`model.vocab_multiple` padding) are zeros on import and
dropped on export. RoPE needs no permutation: transformers' Llama rotates halves, as megatron does.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from models.attention import ATTENTION_TYPES, AttentionConfig
from models.config import ConfigError, ModelConfig

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
SUPPORTED = ("LlamaForCausalLM, or MistralForCausalLM without sliding window: RMSNorm, SwiGLU (silu), RoPE "
             "(default or llama3 scaling), no biases, head_dim = hidden_size / num_attention_heads")

# keel's name within a layer -> HF's names within a layer (several: concatenated in megatron's fused layout)
_LAYER = {
    "input_layernorm.weight": ("input_layernorm.weight",),
    "self_attention.linear_qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                         "self_attn.v_proj.weight"),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight",),
    "pre_mlp_layernorm.weight": ("post_attention_layernorm.weight",),
    "mlp.linear_fc1.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight",),
}
EMBEDDING, OUTPUT = "embedding.word_embeddings.weight", "output_layer.weight"


class UnsupportedModel(ConfigError):
    """A model keel cannot convert; the message says what it can."""


# --- Architecture -----------------------------------------------------------------------------------------
def keel_architecture(hf: dict, vocab_multiple: int) -> tuple[dict, dict]:
    """keel's `model` and `attention` config values for a config.json (as transformers reads it: the
    rope settings under `rope_parameters`). Anything keel would compute differently is refused."""
    by_type = {t: a for a, t in ARCHITECTURES.items()}
    arch = (hf.get("architectures") or [by_type.get(hf.get("model_type"), hf.get("model_type", "?"))])[0]
    if arch not in ARCHITECTURES:
        raise UnsupportedModel(f"cannot import {arch}; keel imports {SUPPORTED}")
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    groups = hf.get("num_key_value_heads") or heads
    rope = hf.get("rope_parameters") or {}
    problems = [
        (hf.get("sliding_window") not in (None, 0) and hf["sliding_window"] < hf["max_position_embeddings"],
         f"a sliding window of {hf.get('sliding_window')}"),
        (hf.get("hidden_act") != "silu", f"activation {hf.get('hidden_act')}"),
        (bool(hf.get("attention_bias")) or bool(hf.get("mlp_bias")), "biases"),
        ((hf.get("head_dim") or hidden // heads) * heads != hidden, f"head_dim {hf.get('head_dim')}"),
        (rope.get("rope_type", "default") not in ("default", "llama3"), f"rope type {rope.get('rope_type')}"),
    ]
    found = [what for bad, what in problems if bad]
    if found:
        raise UnsupportedModel(f"cannot import a model with {', '.join(found)}; keel imports {SUPPORTED}")
    scaling = {"type": "none"}
    if rope.get("rope_type") == "llama3":
        scaling = {"type": "llama3", "factor": rope["factor"], "low_freq_factor": rope["low_freq_factor"],
                   "high_freq_factor": rope["high_freq_factor"],
                   "original_max_positions": rope["original_max_position_embeddings"]}
    model = {"num_layers": hf["num_hidden_layers"], "hidden_size": hidden, "head_dim": hidden // heads,
             "num_heads": heads, "ffn_hidden_size": hf["intermediate_size"],
             "max_seq_len": hf["max_position_embeddings"], "position_embedding": "rope",
             "rotary_base": float(rope.get("rope_theta", 10000.0)), "rope_scaling": scaling,
             "normalization": "RMSNorm", "norm_eps": hf["rms_norm_eps"], "final_norm": True, "activation": "swiglu",
             "tie_embeddings": bool(hf.get("tie_word_embeddings")), "vocab_size": hf["vocab_size"],
             "vocab_multiple": vocab_multiple}
    kind = "mha" if groups == heads else "mqa" if groups == 1 else "gqa"
    attention = {"type": kind} | ({"num_query_groups": groups} if kind == "gqa" else {})
    return model, attention


def check_exportable(model: ModelConfig, attention: AttentionConfig) -> None:
    """One line when transformers' Llama cannot hold this model."""
    if not attention.llama_layout:
        exportable = [name for name, kind in ATTENTION_TYPES.items() if kind.llama_layout]
        others = [name.upper() for name, kind in ATTENTION_TYPES.items() if not kind.llama_layout]
        raise UnsupportedModel(f"attention={attention.type} has no Hugging Face Llama equivalent; export takes "
                               f"dense {'/'.join(exportable)} models ({', '.join(others)} and MoE checkpoints stay in "
                               "keel)")
    problems = [(bool(model.moe.num_experts), "MoE (model.moe.num_experts > 0)"),
                (model.position_embedding != "rope", f"position_embedding={model.position_embedding}"),
                (model.normalization != "RMSNorm", f"normalization={model.normalization}"),
                (model.activation != "swiglu", f"activation={model.activation}"),
                (not model.final_norm, "no final norm (model.final_norm=false)"),
                (attention.qk_norm, "QK-norm (attention.qk_norm=true)")]
    found = [what for bad, what in problems if bad]
    if found:
        raise UnsupportedModel(f"cannot export a model with {', '.join(found)}: Hugging Face Llama has RoPE, "
                               "RMSNorm, SwiGLU, a final norm, no MoE and no QK-norm")


def hf_config(model: ModelConfig, attention: AttentionConfig, vocab: int, special: dict) -> dict:
    """LlamaConfig's values for keel's model (`special`: bos/eos/pad token ids)."""
    s = model.rope_scaling
    rope = {"rope_type": "default", "rope_theta": model.rotary_base}
    if s.type == "llama3":
        rope |= {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                 "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_positions}
    return {"architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": model.hidden_size,
            "intermediate_size": model.ffn_size, "num_hidden_layers": model.num_layers,
            "num_attention_heads": model.heads, "num_key_value_heads": attention.query_groups(model.heads),
            "head_dim": model.kv_channels, "hidden_act": "silu", "max_position_embeddings": model.max_seq_len,
            "rms_norm_eps": model.norm_eps, "tie_word_embeddings": model.tie_embeddings, "rope_parameters": rope,
            "attention_bias": False, "mlp_bias": False, "initializer_range": model.init_std, **special}


# --- Weights ----------------------------------------------------------------------------------------------
def hf_shapes(model: ModelConfig, attention: AttentionConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a HF checkpoint of this model holds, with its shape."""
    h, d, ffn, vocab = model.hidden_size, model.kv_channels, model.ffn_size, model.vocab_size
    q, kv = model.heads * d, attention.query_groups(model.heads) * d
    layer = {"input_layernorm.weight": (h,), "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
             "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
             "post_attention_layernorm.weight": (h,), "mlp.gate_proj.weight": (ffn, h), "mlp.up_proj.weight": (ffn, h),
             "mlp.down_proj.weight": (h, ffn)}
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    shapes |= {f"model.layers.{i}.{k}": v for i in range(model.num_layers) for k, v in layer.items()}
    return shapes | ({} if model.tie_embeddings else {"lm_head.weight": (vocab, h)})


def name_pairs(model: ModelConfig) -> list[tuple[str, tuple[str, ...]]]:
    """(keel parameter, the HF tensors it is made of), for every keel parameter."""
    pairs = [(EMBEDDING, ("model.embed_tokens.weight",))]
    for i in range(model.num_layers):
        pairs += [(f"decoder.layers.{i}.{k}", tuple(f"model.layers.{i}.{h}" for h in hs)) for k, hs in _LAYER.items()]
    pairs.append(("decoder.final_layernorm.weight", ("model.norm.weight",)))
    if not model.tie_embeddings:
        pairs.append((OUTPUT, ("lm_head.weight",)))
    return pairs


def to_keel(get: Callable[[str], torch.Tensor], model: ModelConfig, attention: AttentionConfig,
            padded_vocab: int) -> Iterator[tuple[str, torch.Tensor]]:
    """keel's full tensors from HF's (`get` reads one by name), one at a time."""
    groups = attention.query_groups(model.heads)
    for keel, hf in name_pairs(model):
        parts = [get(name) for name in hf]
        if keel.endswith("linear_qkv.weight"):
            yield keel, fuse_qkv(*parts, groups, model.kv_channels)
        elif keel.endswith("linear_fc1.weight"):
            yield keel, torch.cat(parts)
        elif keel in (EMBEDDING, OUTPUT):
            yield keel, torch.cat([parts[0], parts[0].new_zeros(padded_vocab - len(parts[0]), parts[0].shape[1])])
        else:
            yield keel, parts[0]


def to_hf(get: Callable[[str], torch.Tensor], model: ModelConfig, attention: AttentionConfig,
          vocab: int) -> Iterator[tuple[str, torch.Tensor]]:
    """HF's tensors from keel's full ones (`get` reads one by name), padded vocabulary rows dropped."""
    groups = attention.query_groups(model.heads)
    for keel, hf in name_pairs(model):
        tensor = get(keel)
        if keel.endswith("linear_qkv.weight"):
            parts = split_qkv(tensor, model.heads, groups, model.kv_channels)
        elif keel.endswith("linear_fc1.weight"):
            parts = tensor.chunk(2)
        elif keel in (EMBEDDING, OUTPUT):
            parts = (tensor[:vocab],)
        else:
            parts = (tensor,)
        yield from zip(hf, (p.contiguous() for p in parts))


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int, head_dim: int) -> torch.Tensor:
    """[q; k; v] of HF -> megatron's per-group [q heads of the group, k, v]: [(heads + 2 groups) d, hidden]."""
    hidden = q.shape[1]
    q = q.view(groups, -1, head_dim, hidden)  # query heads of group g are g*r .. g*r + r - 1
    k, v = (t.view(groups, 1, head_dim, hidden) for t in (k, v))
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def split_qkv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """The inverse of `fuse_qkv`: (q, k, v) of HF."""
    hidden, per_group = qkv.shape[1], heads // groups
    blocks = qkv.view(groups, per_group + 2, head_dim, hidden)
    q, k, v = blocks[:, :per_group], blocks[:, per_group], blocks[:, per_group + 1]
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)
