"""What an attention type is to keel, in one class: its config fields, its megatron spec, the rules it
states, and its KV cache and decode step.

Each type (or family of types sharing a module) subclasses `AttentionConfig` in its own module under
models/attention/, adding its config fields as dataclass fields and overriding the methods below;
models/attention/__init__.py registers it. Everything else, the tools and reports included, asks the
registered type: nothing switches on the type's name.

The Hydra schema is the union of every registered type's fields (pretrain/config.py), so a config key
keeps its name (`attention.rope_dim`) whichever type owns it; composing a run turns that node into the
chosen type's own config, refusing a field of another type in one line.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, ClassVar

from models.config import ModelConfig, check, check_positive

if TYPE_CHECKING:
    import torch
    from megatron.core.transformer.spec_utils import ModuleSpec

    from models.inference.cache import KVCache

Layout = dict[str, tuple[int, int]]  # cached tensor name -> its (heads, width) per token


@dataclass
class AttentionConfig:
    """The fields every type has. `type` names the registered type; `qk_norm` RMS-normalises queries and
    keys per head before RoPE and their dot product (models/attention/common.py says how per module)."""

    type: str = "gqa"
    qk_norm: bool = False
    qkv_bias: bool = False  # biases on the query, key and value projections (Qwen2), none on the output

    name: ClassVar[str] = ""  # the registered type's name (the value of `type`)
    # what some of keel asks besides the methods: megatron's fused linear_qkv (QuacK's per-head factors
    # need it), megatron's own q/k_layernorm slot for QK-norm, the Hugging Face Llama attention layout, and
    # sequence parallelism (every projection of the hidden states a megatron parallel linear, which gathers
    # the sequence shards in and scatters them out; keel's own modules also project with replicated linears)
    fused_qkv: ClassVar[bool] = False
    megatron_qk_layernorm: ClassVar[bool] = False
    llama_layout: ClassVar[bool] = False
    sequence_parallel: ClassVar[bool] = False

    def __post_init__(self):
        check(self.type == self.name, f"attention.type={self.type!r} does not name {type(self).__name__} ({self.name})")
        check_positive("attention", self, *self.sizes())
        check(not self.qkv_bias or self.fused_qkv,
              f"attention.qkv_bias needs megatron's fused linear_qkv (mha, gqa or mqa), not attention={self.type}")

    def sizes(self) -> tuple[str, ...]:
        """Its integer size fields, each checked to be positive when set."""
        return ()

    @classmethod
    def options(cls) -> list[str]:
        """Its config keys, as `attention.KEY`."""
        return [f.name for f in fields(cls)]

    # 1. the model
    def query_groups(self, heads: int) -> int:
        """megatron's `num_query_groups`: the key/value heads of megatron's attention. It is also recorded in
        every checkpoint's model signature, so a type keeps its value across keel versions."""
        return heads

    def shape(self, head_dim: int) -> dict:
        """The sizes this type's weights and KV cache depend on beyond heads and groups, defaults resolved:
        its module's parameters, and part of the checkpoint signature."""
        return {}

    def spec(self, model: ModelConfig) -> ModuleSpec:
        raise NotImplementedError

    def check_sequence_parallel(self) -> None:
        """Refuse sequence parallelism for a type that projects the hidden states with replicated linears."""
        from models.attention import ATTENTION_TYPES  # the registry imports this module

        sequential = [name for name, kind in ATTENTION_TYPES.items() if kind.sequence_parallel]
        check(self.sequence_parallel, f"sequence parallelism needs attention={', '.join(sequential)}, not "
                                      f"attention={self.type}, whose replicated projections would see one rank's "
                                      "share of the sequence; set parallel.sequence=false (an MoE: parallel.tensor=1)")

    def check(self, model: ModelConfig, tensor_parallel: int) -> None:
        """The rules this type states about the model and the parallel layout, each a one-line ValueError."""

    # 2. decoding with a KV cache (models/inference)
    def cache_elements(self, model: ModelConfig, tensor_parallel: int = 1) -> int:
        """Elements one rank caches per token and layer, by the type's formula (tools/kv_cache.py checks it
        against the allocated cache)."""
        raise NotImplementedError

    def cache_layout(self, module: torch.nn.Module) -> Layout:
        """What this rank's attention module caches per token."""
        raise NotImplementedError

    def decode_step(self, module: torch.nn.Module, x: torch.Tensor, table: torch.Tensor | None, cache: KVCache,
                    layer: int, upto: int | None, absorbed: bool = True) -> torch.Tensor:
        """One layer's attention for new tokens x [t, b, D] at positions cache.lengths.. -> [t, b, D], over
        the first `upto` cached positions or the whole buffers (upto=None: static shapes, a CUDA graph).
        The step writes its new cache entries and attends with `models.inference.cache.attend_cached`,
        which takes the PyTorch path or the cache's kernel."""
        raise NotImplementedError


def check_key_value_heads(groups: int, heads: int, tensor_parallel: int, option: str = "num_query_groups") -> None:
    """The rule of the types whose key/value heads are megatron's query groups (MHA/GQA/MQA, GTA): the
    groups divide the heads, and tensor parallelism divides the groups (or there is one, replicated).
    `option` is the config key that sets them."""
    check(groups >= 1 and heads % groups == 0, f"attention.{option}={groups} must divide the {heads} heads")
    check(groups % tensor_parallel == 0 or groups == 1,
          f"parallel.tensor={tensor_parallel} does not divide the {groups} key/value heads; "
          f"pick a tensor-parallel size that divides attention.{option}")
