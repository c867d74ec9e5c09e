"""The GPT builder: keel's configs -> megatron-core TransformerConfig, layer specs and GPTModel.

Model code receives plain arguments; it never reads a global config.
"""

from __future__ import annotations

import logging
from functools import partial

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules, get_num_layers_to_build)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer, TransformerLayerSubmodules, get_transformer_layer_offset)

from models.attention import attention_spec
from models.config import AttentionConfig, ModelConfig, MoEConfig


def transformer_config(model: ModelConfig, attention: AttentionConfig, num_query_groups: int,
                       tensor: int = 1, pipeline: int = 1, expert: int = 1,
                       dtype: torch.dtype = torch.float32) -> TransformerConfig:
    swiglu = model.activation == "swiglu"
    return TransformerConfig(
        num_layers=model.num_layers, hidden_size=model.hidden_size, num_attention_heads=model.heads,
        num_query_groups=num_query_groups, kv_channels=model.kv_channels, ffn_hidden_size=model.ffn_size,
        normalization=model.normalization, layernorm_epsilon=1e-5,
        gated_linear_unit=swiglu, activation_func=F.silu if swiglu else F.gelu,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        init_method_std=model.init_std, use_cpu_initialization=True, perform_initialization=True,
        tensor_model_parallel_size=tensor, pipeline_model_parallel_size=pipeline,
        expert_model_parallel_size=expert, sequence_parallel=False,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, pipeline_dtype=dtype,
        bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False,
        cuda_graph_modules=[],  # megatron's default ("full") only warns that it is deprecated
        **moe_fields(model.moe, model.ffn_size),
    )


def moe_fields(moe: MoEConfig, ffn_size: int) -> dict:
    """megatron's MoE settings from `model.moe` (empty for a dense model). MoE with TP>1 is refused by
    the run config (megatron's MoE with TP needs sequence parallelism, which keel keeps off)."""
    if not moe.num_experts:
        return {}
    balance = {"switch": "aux_loss", "seq": "seq_aux_loss", "none": "none"}[moe.aux_loss]
    return dict(
        num_moe_experts=moe.num_experts, moe_router_topk=moe.top_k, moe_ffn_hidden_size=moe.ffn_hidden_size or ffn_size,
        # alltoall builds CUDA streams (token_dispatcher.py:445); allgather runs anywhere
        moe_token_dispatcher_type="alltoall" if torch.cuda.is_available() else "allgather",
        moe_router_load_balancing_type=balance, moe_aux_loss_coeff=moe.aux_loss_coeff if balance != "none" else 0.0,
        moe_z_loss_coeff=moe.z_loss or None, moe_router_dtype="fp32",
        moe_expert_capacity_factor=moe.capacity_factor, moe_token_drop_policy=moe.drop_policy,
        moe_layer_freq=moe.every, moe_grouped_gemm=False)


def mlp_spec():
    """The dense MLP, built the way megatron 0.19 builds a layer's MLP (`MLP.as_mlp_submodule`)."""
    return partial(MLP.as_mlp_submodule,
                   submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))


def layer_spec(attention: AttentionConfig | str, normalization: str, mlp=None,
               model: ModelConfig | None = None) -> ModuleSpec:
    norm = LocalSpecProvider().layer_norm(rms_norm=normalization == "RMSNorm")
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm, self_attention=attention_spec(attention, model),
            self_attn_bda=get_bias_dropout_add, pre_mlp_layernorm=norm,
            mlp=mlp or mlp_spec(), mlp_bda=get_bias_dropout_add))


def block_spec(config: TransformerConfig, layer_specs: list[ModuleSpec]) -> TransformerBlockSubmodules:
    """Keep the layers of this pipeline stage (megatron builds whatever list it is given)."""
    offset = get_transformer_layer_offset(config)
    count = get_num_layers_to_build(config)
    return TransformerBlockSubmodules(layer_specs=layer_specs[offset:offset + count])


class _DropGPTModelDeprecation(logging.Filter):
    """keel stays on GPTModel for now (docs/design.md says why); megatron-core 0.19 logs a deprecation
    notice for every model built. This filter drops that one record from that one logger, nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("GPTModel IS DEPRECATED")


logging.getLogger("megatron.core.models.gpt.gpt_model").addFilter(_DropGPTModelDeprecation())


class KeelGPT(GPTModel):
    """GPTModel whose RoPE follows `position_ids`, so positions can restart at each document.

    megatron-core's GPTModel rotates by sequence index and ignores `position_ids` for RoPE; with
    `per_document_positions` the rotary table is gathered per token instead.
    """

    def __init__(self, *args, per_document_positions: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.per_document_positions = per_document_positions

    def _preprocess(self, input_ids, position_ids, *args, **kwargs):
        out = super()._preprocess(input_ids, position_ids, *args, **kwargs)
        rotary = out[1]
        if not (self.per_document_positions and rotary is not None and position_ids is not None):
            return out
        table = rotary[:, 0, 0, :]  # [s, rot_dim]
        if table.shape[0] <= int(position_ids.max()):
            table = self.rotary_pos_emb(int(position_ids.max()) + 1)[:, 0, 0, :]
        per_token = table[position_ids].transpose(0, 1).unsqueeze(2)  # [s, b, 1, rot_dim]
        return (out[0], per_token, *out[2:])


def build_gpt(model: ModelConfig, config: TransformerConfig, vocab_size: int, layer_specs: list[ModuleSpec],
              per_document_positions: bool = False) -> KeelGPT:
    return KeelGPT(
        config=config, transformer_layer_spec=block_spec(config, layer_specs), vocab_size=vocab_size,
        max_sequence_length=model.max_seq_len,
        pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type=model.position_embedding, rotary_base=model.rotary_base,
        per_document_positions=per_document_positions)
