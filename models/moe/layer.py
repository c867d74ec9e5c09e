"""keel's MoE layer: megatron-core's MoELayer plus the orthogonality loss L_o and expert overlap.

L_o needs each token's k expert outputs *before* gate weighting (paper eq. 6). megatron's experts
scale the FFN's intermediate activation by the gate probability (mlp.py, `per_token_scale`); with
no bias on linear_fc2 that equals scaling the output, so the experts run with unit probabilities,
the raw outputs feed L_o, and the gate is applied afterwards -- the same function, split in two.
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from models.config import ConfigError
from models.moe.losses import attach_loss, orthogonality_loss
from models.moe.router import KeelRouter


def permuted_rows(routing_map: torch.Tensor, top_k: int) -> torch.Tensor:
    """Row of each (token, selected expert) in the experts' permuted input, [T, k] (-1: dropped).

    Both CPU (allgather) and GPU (alltoall) dispatchers at EP=1 permute expert-major, tokens in
    order within an expert (moe_utils.permute over routing_map.T), so a running count over the
    transposed map gives each pair's row.
    """
    mask_t = routing_map.T  # [E, T]
    rows = (mask_t.flatten().cumsum(0) - 1).view_as(mask_t).T  # [T, E]
    rows = torch.where(routing_map, rows, torch.full_like(rows, -1))
    # 1. per token, its (at most k) selected rows first; order within a token does not matter
    return rows.sort(dim=1, descending=True).values[:, :top_k]


def group_by_token(permuted_outputs: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T*k rows in expert order, H] -> ([T, k, H] grouped by token, valid [T, k]); dropped slots are 0.

    The official code reshapes expert-grouped outputs straight to [T, k, H], which mixes tokens;
    gathering by row index keeps each token's own k outputs together, as eq. 6 sums over i.
    """
    valid = rows >= 0
    grouped = permuted_outputs[rows.clamp(min=0)] * valid.unsqueeze(-1).to(permuted_outputs.dtype)
    return grouped, valid


class KeelMoELayer(MoELayer):
    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None, ortho_coeff: float = 0.0,
                 **megatron_kwargs):
        # megatron passes its own options through (is_mtp_layer, name); keel forwards them untouched
        super().__init__(config=config, submodules=submodules, layer_number=layer_number, pg_collection=pg_collection,
                         **megatron_kwargs)
        # every local expert sees the whole token set only without expert/tensor parallelism
        self.sees_all_experts = self.ep_group.size() == 1 and self.experts.tp_group.size() == 1
        if ortho_coeff > 0 and not self.sees_all_experts:
            raise ConfigError("model.moe.ortho_loss needs parallel.expert=1 and parallel.tensor=1: each token's "
                              "selected experts must be on one rank")
        self.ortho_coeff = ortho_coeff

    def routed_experts_compute(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        train = self.training and torch.is_grad_enabled()
        if not (train and self.sees_all_experts):
            return super().routed_experts_compute(hidden_states, probs)
        dispatched, tokens_per_expert, permuted_probs = self.token_dispatcher.dispatch_postprocess(hidden_states, probs)
        # 1. raw expert outputs x~_ij (unit gate), then the gate: identical to megatron's scaling
        raw, _ = self.experts(dispatched, tokens_per_expert, torch.ones_like(permuted_probs))
        output = (raw * permuted_probs.unsqueeze(-1)).to(raw.dtype)
        # 2. each token's k outputs side by side: L_o and the overlap statistic
        grouped, valid = group_by_token(raw, permuted_rows(self.router.last_routing_map, self.config.moe_router_topk))
        self.router.stats.add_overlap(grouped.detach(), valid)
        if self.ortho_coeff > 0:
            loss = orthogonality_loss(grouped.float())
            output = attach_loss(output, loss, self.ortho_coeff, grouped.shape[0], self.config.calculate_per_token_loss)
            self.router._track("ortho_loss", loss)
        return self.token_dispatcher.combine_preprocess(output), None


def moe_spec(ortho_coeff: float = 0.0, var_coeff: float = 0.0) -> ModuleSpec:
    """The MLP spec of an MoE layer: local linears, sequential experts, keel's router and layer, and
    megatron's shared expert (built only when config.moe_shared_expert_intermediate_size is set; L_o and the
    statistics see the routed experts alone)."""
    expert = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    return ModuleSpec(
        module=KeelMoELayer, params={"ortho_coeff": ortho_coeff},
        submodules=MoESubmodules(experts=ModuleSpec(module=SequentialMLP, submodules=expert),
                                 shared_experts=partial(SharedExpertMLP, submodules=expert),
                                 router=partial(KeelRouter, var_coeff=var_coeff)))
