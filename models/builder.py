"""Assemble the model: specs → megatron GPTModel initialised like one process would → device/dtype →
megatron's DDP wrapper for training. The parallel layout comes from megatron's `parallel_state`."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from models.attention import AttentionConfig
from models.config import ModelConfig, sequence_parallel as resolve_sequence_parallel
from models.gpt import build_gpt, layer_spec, transformer_config
from models.init import expert_global_name, reset_parameters
from models.moe import moe_spec


@dataclass
class BuiltModel:
    gpt: torch.nn.Module  # the bare GPTModel (checkpoints and monitors use it)
    ddp: DistributedDataParallel  # what the schedule runs
    num_params: int  # over all tensor/pipeline ranks
    active_params: int = 0  # what one token's forward multiplies by: MoE counts its top_k experts only

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per active parameter for the matmuls (2 forward, 4 backward) plus
        attention's 12*L*h*s (PaLM's appendix B)."""
        c = self.gpt.config
        return 6 * (self.active_params or self.num_params) + 12 * c.num_layers * c.hidden_size * seq_len


def layer_specs(model: ModelConfig, attention: AttentionConfig) -> list:
    """One spec per layer: the attention type and (dense or MoE) MLP are chosen here, not in model code."""
    moe = model.moe
    mlp = moe_spec(moe.ortho_loss, moe.var_loss)
    return [layer_spec(attention, mlp if is_moe else None, model=model)
            for is_moe in moe.moe_layers(model.num_layers)]


def build_initialised_gpt(model: ModelConfig, attention: AttentionConfig, vocab_size: int, seed: int,
                          dtype: torch.dtype = torch.float32, per_document_positions: bool = False,
                          sequence_parallel: bool | None = None):
    """This rank's part of the GPT, every parameter drawn as a single process would draw it (models/init.py).
    `sequence_parallel`: `parallel.sequence` (None: where an MoE needs it, models.config.sequence_parallel)."""
    tp, pp = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_pipeline_model_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    sp = resolve_sequence_parallel(sequence_parallel, model.moe, tp)
    if sp:
        attention.check_sequence_parallel()
        seed_tensor_parallel_rng(seed)
    config = transformer_config(model, attention, attention.query_groups(model.heads), tp, pp, ep, dtype, sp)
    # token-weighted loss: gradients are divided by the global token count, so any split over
    # micro-batches and data-parallel ranks gives the same update
    config.calculate_per_token_loss = True
    config.finalize_model_grads_func = finalize_model_grads
    gpt = build_gpt(model, attention, config, vocab_size, layer_specs(model, attention), per_document_positions)
    # experts are seeded by their global index (this expert-parallel rank holds a contiguous block)
    expert_offset = parallel_state.get_expert_model_parallel_rank() * (model.moe.num_experts // ep)
    reset_parameters(gpt, seed, model.init_std, model.num_layers, get_transformer_layer_offset(config),
                     model.tie_embeddings, rename=partial(expert_global_name, expert_offset=expert_offset))
    return gpt


def seed_tensor_parallel_rng(seed: int) -> None:
    """megatron forks the tracker's tensor-parallel RNG state around the sequence-parallel regions (the
    transformer block, the embedding's dropout), so the state must exist; keel has no dropout, so it draws
    nothing. Seeded once per process, as Megatron-LM's start-up does (its data-parallel seed is `seed`,
    the same default-generator seed that pretrain.run's seed_everything set)."""
    from megatron.core import tensor_parallel

    if not tensor_parallel.get_cuda_rng_tracker().is_initialized():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def build_model(model: ModelConfig, attention: AttentionConfig, vocab_size: int, device: torch.device,
                dtype: torch.dtype, seed: int, per_document_positions: bool = False,
                distributed_optimizer: bool = False, overlap_grad_reduce: bool | None = None,
                sequence_parallel: bool | None = None) -> BuiltModel:
    """The GPT for training, wrapped in megatron's DDP (fp32 gradient reduction). `overlap_grad_reduce`
    reduces each gradient bucket while the backward goes on (None: with a GPU and more than one DP rank).
    Under sequence parallelism megatron's finalize_model_grads sums the norms' gradients over TP."""
    gpt = build_initialised_gpt(model, attention, vocab_size, seed, dtype, per_document_positions, sequence_parallel)
    gpt = gpt.to(device=device, dtype=dtype)
    gpt.loss_chunk_tokens = model.loss_chunk_tokens(device)
    dp = parallel_state.get_data_parallel_world_size(with_context_parallel=True)
    overlap = overlap_grad_reduce if overlap_grad_reduce is not None else (device.type == "cuda" and dp > 1)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=overlap,
                                               bucket_size=bucket_size(dp) if overlap else None,
                                               use_distributed_optimizer=distributed_optimizer)
    ddp = DistributedDataParallel(config=gpt.config, ddp_config=ddp_config, module=gpt,
                                  full_param_layout=distributed_optimizer_layout(gpt, ddp_config))
    if overlap:
        # the schedule holds every bucket's reduction back until the last micro-batch's backward;
        # without this each micro-batch would reduce the accumulating buffer again
        gpt.config.no_sync_func = ddp.no_sync
    return BuiltModel(gpt=gpt, ddp=ddp, num_params=count_params(gpt), active_params=active_params(gpt, model.moe))


def bucket_size(dp: int) -> int:
    """Elements per gradient bucket when reductions overlap the backward: megatron-LM's default, large
    enough that each rank's share of a ring all-reduce stays a big message."""
    return max(40_000_000, 1_000_000 * dp)


def distributed_optimizer_layout(gpt: torch.nn.Module, ddp_config: DistributedDataParallelConfig):
    """How the distributed optimizer shards the gradient buffers; megatron 0.19 wants it computed
    before DDP is built (None without the distributed optimizer)."""
    if not ddp_config.use_distributed_optimizer:
        return None
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return DistributedOptimizer.compute_full_param_layout(
        [p for p in gpt.parameters() if p.requires_grad], ddp_config.bucket_size,
        parallel_state.get_data_parallel_world_size(with_context_parallel=True), ddp_config,
        expert_data_parallel_world_size=parallel_state.get_expert_data_parallel_world_size())


def active_params(gpt: torch.nn.Module, moe) -> int:
    """Parameters one token passes through: all but the experts, plus top_k of num_experts experts.
    Each expert-parallel rank holds num_experts / ep of them, so the model-parallel sum is scaled by ep."""
    if not moe.num_experts:
        return count_params(gpt)
    experts = count_params(gpt, lambda name: ".experts." in name)
    ep = parallel_state.get_expert_model_parallel_world_size()
    return count_params(gpt) - experts + round(experts * ep * moe.top_k / moe.num_experts)


def count_params(model: torch.nn.Module, keep=lambda name: True) -> int:
    """Parameters of `model` whose name `keep` accepts, summed over the tensor/pipeline ranks."""
    device = next(model.parameters()).device  # nccl reduces only device tensors
    local = torch.tensor([sum(p.numel() for n, p in model.named_parameters() if keep(n))], dtype=torch.float64,
                         device=device)
    if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        dist.all_reduce(local, group=parallel_state.get_model_parallel_group())
    return int(local.item())
