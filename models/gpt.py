"""The GPT builder: keel's configs -> megatron-core TransformerConfig, layer specs and GPTModel.

Model code receives plain arguments; it never reads a global config.
"""

from __future__ import annotations

import contextlib
import logging
from functools import partial

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules, get_num_layers_to_build)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer, TransformerLayerSubmodules, get_transformer_layer_offset)

from models.attention import AttentionConfig, attention_spec
from models.config import ModelConfig, MoEConfig, RopeScalingConfig, check
from models.loss import chunked_loss


def transformer_config(model: ModelConfig, attention: AttentionConfig, num_query_groups: int,
                       tensor: int = 1, pipeline: int = 1, expert: int = 1,
                       dtype: torch.dtype = torch.float32, sequence_parallel: bool = False) -> TransformerConfig:
    swiglu = model.activation == "swiglu"
    return TransformerConfig(
        num_layers=model.num_layers, hidden_size=model.hidden_size, num_attention_heads=model.heads,
        num_query_groups=num_query_groups, kv_channels=model.kv_channels, ffn_hidden_size=model.ffn_size,
        normalization=model.normalization, layernorm_epsilon=model.norm_eps,
        gated_linear_unit=swiglu, activation_func=F.silu if swiglu else F.gelu,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        init_method_std=model.init_std, use_cpu_initialization=True, perform_initialization=True,
        tensor_model_parallel_size=tensor, pipeline_model_parallel_size=pipeline,
        expert_model_parallel_size=expert, sequence_parallel=sequence_parallel,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, pipeline_dtype=dtype,
        bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False,
        cuda_graph_modules=[],  # megatron's default ("full") only warns that it is deprecated
        # QK-norm in megatron's SelfAttention (its spec holds the norm; megatron also sums the gains'
        # gradients over TP ranks by this flag); keel's own modules take theirs from their spec
        qk_layernorm=attention.qk_norm and attention.megatron_qk_layernorm,
        add_qkv_bias=attention.qkv_bias,  # biases of q, k and v only (Qwen2), in megatron's fused linear_qkv
        **moe_fields(model.moe, model.ffn_size, model.num_layers), **recompute_fields(model.recompute),
    )


def recompute_fields(recompute: str) -> dict:
    """megatron's activation recompute: selective recomputes core attention (megatron's SelfAttention;
    keel's own GTA/GLA/MLA modules keep theirs), full recomputes each whole layer from its input."""
    if recompute == "selective":
        return dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    if recompute == "full":
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return {}


def moe_fields(moe: MoEConfig, ffn_size: int, num_layers: int) -> dict:
    """megatron's MoE settings from `model.moe` (empty for a dense model). Training an MoE at TP>1 needs
    sequence parallelism (models.config.sequence_parallel turns it on there)."""
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
        moe_layer_freq=moe.moe_layers(num_layers), moe_grouped_gemm=False,
        # norm_topk: softmax over the top-k logits (= the top-k softmax values renormalised); else the
        # softmax over all experts, top-k taken after it
        moe_router_pre_softmax=not moe.norm_topk,
        moe_shared_expert_intermediate_size=moe.shared_expert_size, moe_shared_expert_gate=moe.shared_expert_gate)


def mlp_spec():
    """The dense MLP, built the way megatron 0.19 builds a layer's MLP (`MLP.as_mlp_submodule`)."""
    return partial(MLP.as_mlp_submodule,
                   submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))


def torch_norm(config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused) -> torch.nn.Module:
    """torch's RMSNorm or LayerNorm, as megatron's local spec builds them (`WrappedTorchNorm`), that also runs
    under sequence parallelism, which WrappedTorchNorm refuses: each TP rank then normalises its own tokens,
    so the gains' gradients are partial sums, which megatron's finalize_model_grads adds over the TP ranks
    for the parameters tagged `sequence_parallel` (as megatron tags its router and shared-expert gate)."""
    norm = (torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm)(hidden_size, eps=eps)
    for param in norm.parameters():
        param.sequence_parallel = config.sequence_parallel
    return norm


def layer_spec(attention: AttentionConfig | str, mlp=None, model: ModelConfig | None = None) -> ModuleSpec:
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=torch_norm, self_attention=attention_spec(attention, model),
            self_attn_bda=get_bias_dropout_add, pre_mlp_layernorm=torch_norm,
            mlp=mlp or mlp_spec(), mlp_bda=get_bias_dropout_add))


def block_spec(config: TransformerConfig, layer_specs: list[ModuleSpec],
               final_norm=None) -> TransformerBlockSubmodules:
    """Keep the layers of this pipeline stage (megatron builds whatever list it is given); megatron adds
    `final_norm` after the last layer, on the last stage."""
    offset = get_transformer_layer_offset(config)
    count = get_num_layers_to_build(config)
    return TransformerBlockSubmodules(layer_specs=layer_specs[offset:offset + count], layer_norm=final_norm)


class _DropGPTModelDeprecation(logging.Filter):
    """keel stays on GPTModel for now (docs/design.md says why); megatron-core 0.19 logs a deprecation
    notice for every model built. This filter drops that one record from that one logger, nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("GPTModel IS DEPRECATED")


logging.getLogger("megatron.core.models.gpt.gpt_model").addFilter(_DropGPTModelDeprecation())


class KeelGPT(GPTModel):
    """GPTModel whose RoPE follows `position_ids`, so positions can restart at each document, whose
    llama3 RoPE scaling takes all of its parameters, and whose padded vocabulary rows are never predicted.

    megatron-core's GPTModel rotates by sequence index and ignores `position_ids` for RoPE; with
    `per_document_positions` the rotary table is gathered per token instead.
    """

    def __init__(self, *args, attention: AttentionConfig, per_document_positions: bool = False,
                 rope_scaling: RopeScalingConfig | None = None, unpadded_vocab_size: int | None = None,
                 loss_chunk_tokens: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.attention_config = attention  # its type decodes the layers' attention (models/inference)
        self.per_document_positions = per_document_positions
        self.loss_chunk_tokens = loss_chunk_tokens  # 0: the whole micro-batch's logits at once (models/loss.py)
        self.unpadded_vocab_size = unpadded_vocab_size or self.vocab_size
        if rope_scaling is not None and rope_scaling.type == "llama3" and hasattr(self, "rotary_pos_emb"):
            self.rotary_pos_emb.inv_freq = llama3_inv_freq(self.rotary_pos_emb, rope_scaling)

    def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, labels=None, *args,
                output_processor=None, **kwargs):
        """GPTModel's forward; with labels and `loss_chunk_tokens`, the loss comes from chunked logits."""
        if labels is not None and output_processor is None and self.loss_chunk_tokens:
            output_processor = partial(chunked_loss, self.loss_chunk_tokens)
        return super().forward(input_ids, position_ids, attention_mask, decoder_input, labels, *args,
                               output_processor=output_processor, **kwargs)

    @contextlib.contextmanager
    def plain_loss(self):
        """The loss from whole-micro-batch logits inside this block (one output-layer call, as hooks expect)."""
        chunk, self.loss_chunk_tokens = self.loss_chunk_tokens, 0
        try:
            yield
        finally:
            self.loss_chunk_tokens = chunk

    def _scale_logits(self, logits):
        """Padded vocabulary rows get -inf logits, so that neither the loss nor sampling sees them.
        megatron calls this hook on every output-layer result (TP shards, or gathered logits)."""
        logits = super()._scale_logits(logits)
        if self.unpadded_vocab_size == self.vocab_size:
            return logits
        width = logits.shape[-1]
        start = 0 if width == self.vocab_size else parallel_state.get_tensor_model_parallel_rank() * width
        ids = torch.arange(start, start + width, device=logits.device)
        return logits.masked_fill(ids >= self.unpadded_vocab_size, float("-inf"))

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


def llama3_inv_freq(rotary, scaling: RopeScalingConfig) -> torch.Tensor:
    """megatron's llama3 formula with every parameter given: megatron-core 0.19.2's RotaryEmbedding passes
    only the factor and keeps low_freq_factor=1, high_freq_factor=4 and 8192 original positions."""
    return rotary._apply_scaling(rotary.inv_freq, factor=scaling.factor, low_freq_factor=scaling.low_freq_factor,
                                 high_freq_factor=scaling.high_freq_factor,
                                 original_max_position_embeddings=scaling.original_max_positions)


def build_gpt(model: ModelConfig, attention: AttentionConfig, config: TransformerConfig, vocab_size: int,
              layer_specs: list[ModuleSpec], per_document_positions: bool = False) -> KeelGPT:
    """The GPT with `vocab_size` (the tokenizer's) tokens, its rows padded as `model` says."""
    vocab, padded = model.vocab_rows(vocab_size)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    check(padded % tp == 0, f"the {padded} vocabulary rows do not divide by parallel.tensor={tp}; "
                            f"set model.vocab_multiple to a multiple of {tp}")
    final_norm = torch_norm if model.final_norm else None
    return KeelGPT(
        config=config, transformer_layer_spec=block_spec(config, layer_specs, final_norm), vocab_size=padded,
        max_sequence_length=model.max_seq_len,
        pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type=model.position_embedding, rotary_base=model.rotary_base,
        per_document_positions=per_document_positions, rope_scaling=model.rope_scaling, unpadded_vocab_size=vocab,
        attention=attention)
