"""The model's configuration: architecture and mixture of experts (each attention type owns its own
config, in models/attention/).

Each dataclass validates itself in `__post_init__` and raises one `ConfigError` line naming the fix.
Derived sizes (heads from `hidden_size` and the fixed `head_dim`, the FFN width) are properties, never
stored, so Hydra's schema defaults can not freeze them. Choice fields draw their values from one
`StrEnum` each (which tools reuse); members compare equal to their strings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Optional

def choices(name: str, *values: str) -> type[StrEnum]:
    """A StrEnum whose member names are its values (Hydra matches by name; `auto()` would lowercase)."""
    return StrEnum(name, [(v, v) for v in values])


PositionEmbedding = choices("PositionEmbedding", "rope", "learned_absolute")
Normalization = choices("Normalization", "RMSNorm", "LayerNorm")
Activation = choices("Activation", "swiglu", "gelu")
AuxLoss = choices("AuxLoss", "switch", "seq", "none")  # switch: global load balancing; seq: per sequence
DropPolicy = choices("DropPolicy", "probs", "position")
RopeScaling = choices("RopeScaling", "none", "llama3")
Recompute = choices("Recompute", "none", "selective", "full")  # activation recompute, megatron's granularities


class ConfigError(ValueError):
    """A setting keel cannot run with (of the model, the optimizer, the run): the message is the one line
    the user sees. Every config above the data layer fails with it (data/ has its own, `data.errors`)."""


def check(ok: bool, message: str) -> None:
    """The one way keel's configs fail: a ConfigError whose message is the line the user sees."""
    if not ok:
        raise ConfigError(message)


def choice(kind: type[StrEnum], default: str):
    """A config field limited to `kind`'s values. Hydra sees a plain string, so a bad value reaches
    `check_choices` (one line) rather than failing inside Hydra's composition."""
    return field(default=kind(default), metadata={"choices": kind})


def check_choices(owner: str, obj) -> None:
    """Turn each choice field's string into its enum member; an unknown value is one line naming the choices."""
    for f in fields(obj):
        kind = f.metadata.get("choices")
        if kind is not None:
            value = getattr(obj, f.name)
            check(value in tuple(kind), f"{owner}.{f.name}={value!r} is unknown; choose one of {', '.join(kind)}")
            setattr(obj, f.name, kind(value))


def check_positive(owner: str, obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        check(value is None or value > 0, f"{owner}.{name} must be positive, got {value}")


@dataclass
class MoEConfig:
    num_experts: int = 0  # 0: dense MLP everywhere
    top_k: int = 2
    every: int = 1  # every n-th layer is MoE (1: all layers)
    # which layers are MoE, one 0/1 per layer (1: MoE), as Qwen's mlp_only_layers/decoder_sparse_step place
    # them; None: every `every`-th layer, from layer 0. The other layers keep the dense MLP of model.ffn_hidden_size
    layers: Optional[list[int]] = None
    ffn_hidden_size: Optional[int] = None  # per expert; None: the dense FFN size
    # the top-k routing weights: True renormalises them to sum to 1 (softmax over the top-k logits: Mixtral,
    # Qwen3-MoE with norm_topk_prob); False keeps each expert's softmax over all experts (Qwen2-MoE)
    norm_topk: bool = True
    shared_expert_size: Optional[int] = None  # a shared expert of this FFN width beside the routed ones; None: none
    shared_expert_gate: bool = False  # the shared expert's output scaled by sigmoid(w . x) (Qwen2-MoE)
    aux_loss: str = choice(AuxLoss, "switch")
    aux_loss_coeff: float = 1e-2
    z_loss: float = 0.0
    ortho_loss: float = 0.0  # beta
    var_loss: float = 0.0  # gamma
    capacity_factor: Optional[float] = None  # None: no token dropping
    drop_policy: str = choice(DropPolicy, "probs")

    def __post_init__(self):
        check_choices("model.moe", self)
        check(self.num_experts >= 0, f"model.moe.num_experts must be >= 0, got {self.num_experts}")
        if self.num_experts:
            check(1 <= self.top_k <= self.num_experts,
                  f"model.moe.top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        check_positive("model.moe", self, "every", "ffn_hidden_size", "capacity_factor", "shared_expert_size")
        check(self.layers is None or set(self.layers) <= {0, 1},
              f"model.moe.layers={self.layers} must hold one 0 (dense) or 1 (MoE) per layer")
        check(not self.shared_expert_gate or self.shared_expert_size is not None,
              "model.moe.shared_expert_gate needs model.moe.shared_expert_size (the shared expert it gates)")
        if self.num_experts:
            check(self.top_k > 1 or not self.norm_topk,
                  "model.moe.top_k=1 needs model.moe.norm_topk=false (a renormalised top-1 weight is always 1)")
        for name in ("aux_loss_coeff", "z_loss", "ortho_loss", "var_loss"):
            check(getattr(self, name) >= 0, f"model.moe.{name} must be >= 0, got {getattr(self, name)}")

    def moe_layers(self, num_layers: int) -> list[int]:
        """One 0 (dense) or 1 (MoE) per layer: `layers`, or every `every`-th layer from layer 0 (megatron's
        moe_layer_freq convention); all 0 without experts."""
        if not self.num_experts:
            return [0] * num_layers
        if self.layers is not None:
            return list(self.layers)
        return [int(i % self.every == 0) for i in range(num_layers)]


@dataclass
class RopeScalingConfig:
    """RoPE frequency scaling. llama3: Llama 3.1's rule (transformers' `_compute_llama3_parameters`):
    wavelengths above original_max_positions / low_freq_factor are stretched by `factor`, those below
    original_max_positions / high_freq_factor kept, the band between interpolated."""

    type: str = choice(RopeScaling, "none")
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192

    def __post_init__(self):
        check_choices("model.rope_scaling", self)
        check_positive("model.rope_scaling", self, "factor", "low_freq_factor", "high_freq_factor",
                       "original_max_positions")
        check(self.high_freq_factor > self.low_freq_factor,
              f"model.rope_scaling.high_freq_factor={self.high_freq_factor} must exceed "
              f"low_freq_factor={self.low_freq_factor}")


@dataclass
class ModelConfig:
    num_layers: int = 2
    hidden_size: int = 128
    head_dim: int = 32  # each head's width (kv_channels); fixed under width scaling: heads = hidden_size // head_dim
    # None: derived from hidden_size and head_dim; set, heads * head_dim may differ from hidden_size (Qwen3-0.6B:
    # hidden 1024, 16 heads of 128)
    num_heads: Optional[int] = None
    ffn_hidden_size: Optional[int] = None  # None: derived from hidden_size (8/3 h for SwiGLU, 4 h otherwise)
    max_seq_len: int = 2048
    position_embedding: str = choice(PositionEmbedding, "rope")
    rotary_base: float = 10000  # RoPE theta
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    normalization: str = choice(Normalization, "RMSNorm")
    norm_eps: float = 1e-5
    final_norm: bool = True  # a norm after the last layer; without it the output logits blow up early (docs/design.md)
    activation: str = choice(Activation, "swiglu")
    tie_embeddings: bool = True
    vocab_size: Optional[int] = None  # rows of the embedding and output; None: the tokenizer's vocabulary
    vocab_multiple: int = 1  # pad those rows to a multiple of this, so that tensor parallelism divides them
    init_std: float = 0.02
    moe: MoEConfig = field(default_factory=MoEConfig)
    # speed and memory, never the function computed:
    # selective recomputes core attention in the backward, full every layer (megatron's uniform method)
    recompute: str = choice(Recompute, "none")
    # cross-entropy over chunks of this many tokens, so fp32 logits never exist for a whole micro-batch
    # (models/loss.py); 0 computes them at once; None: 8192 on a GPU, 0 on CPU (one chunk is as fast there)
    loss_chunk: Optional[int] = None

    def __post_init__(self):
        # validation only: derived sizes are properties, so a default instance never freezes them
        check_choices("model", self)
        check(self.loss_chunk is None or self.loss_chunk >= 0,
              f"model.loss_chunk must be >= 0 (0: no chunking), got {self.loss_chunk}")
        check_positive("model", self, "num_layers", "hidden_size", "head_dim", "num_heads", "ffn_hidden_size",
                       "max_seq_len", "rotary_base", "norm_eps", "vocab_size", "vocab_multiple", "init_std")
        if self.num_heads is None:
            check(self.hidden_size % self.head_dim == 0,
                  f"model.hidden_size={self.hidden_size} is not divisible by model.head_dim={self.head_dim}; "
                  "choose a multiple of the head dimension")
        check(self.heads >= 1, f"model.hidden_size={self.hidden_size} is narrower than model.head_dim={self.head_dim}")
        moe = self.moe
        check(moe.layers is None or len(moe.layers) == self.num_layers,
              f"model.moe.layers has {len(moe.layers or [])} entries for model.num_layers={self.num_layers}; "
              "give one 0/1 per layer")

    def loss_chunk_tokens(self, device) -> int:
        return self.loss_chunk if self.loss_chunk is not None else (8192 if device.type == "cuda" else 0)

    @property
    def heads(self) -> int:
        return self.num_heads if self.num_heads is not None else self.hidden_size // self.head_dim

    @property
    def kv_channels(self) -> int:
        """Each head's width: megatron's kv_channels."""
        return self.head_dim

    def vocab_rows(self, tokenizer_vocab: int) -> tuple[int, int]:
        """(tokens the model predicts, rows of its embedding and output after padding). Padded rows
        are never predicted: the model masks their logits (models/gpt.py)."""
        vocab = self.vocab_size or tokenizer_vocab
        check_vocabulary(tokenizer_vocab, vocab, model="the model (model.vocab_size)")
        return vocab, _round_up(vocab, self.vocab_multiple)

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        return _round_up(8 * self.hidden_size // 3, 8) if self.activation == Activation.swiglu else 4 * self.hidden_size


def sequence_parallel(choice: bool | None, moe: MoEConfig, tensor: int) -> bool:
    """Whether megatron's sequence parallelism is on: activations outside attention and the MLP (norms,
    residuals, the router) split along the sequence over the TP ranks. Off at TP=1, where there is nothing
    to split (Megatron-LM turns --sequence-parallel off there too); `choice` None: on where megatron-core
    needs it, an MoE at TP>1 (its MoELayer trains with TP only under sequence parallelism)."""
    if tensor == 1:
        return False
    return bool(moe.num_experts) if choice is None else choice


def check_vocabulary(tokens: int, predicted: int, tokenizer: str = "the tokenizer", model: str = "the model") -> None:
    """A tokenizer fits a model when the model predicts every id it produces."""
    check(tokens <= predicted, f"{tokenizer} has {tokens} tokens but {model} predicts {predicted}; "
                               "use the model's own tokenizer")


def _round_up(x: int, m: int) -> int:
    return int(math.ceil(x / m) * m)
