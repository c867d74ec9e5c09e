"""keel's router: megatron-core's TopKRouter plus the variance loss and routing statistics.

Routing itself (z-loss, top-k, capacity dropping, the load-balancing loss) is megatron's; this
subclass only (1) keeps the gate on the input's device, (2) adds L_v and (3) records statistics: of
training forwards, and the routed assignments per expert of evaluation forwards (routing by source).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe.moe_utils import save_to_aux_losses_tracker
from megatron.core.transformer.moe.router import TopKRouter

from models.moe.losses import attach_loss, variance_loss
from models.moe.stats import MoEStats


class KeelRouter(TopKRouter):
    def __init__(self, config, pg_collection=None, var_coeff: float = 0.0, **megatron_kwargs):
        super().__init__(config=config, pg_collection=pg_collection, **megatron_kwargs)
        self.var_coeff = var_coeff
        self.stats = MoEStats(config.num_moe_experts, config.moe_router_topk)
        self.last_routing_map: Optional[torch.Tensor] = None  # read by the MoE layer for L_o

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        # megatron moves the weight to torch.cuda.current_device() (router.py:90) and its
        # router_gating_linear needs TransformerEngine (moe_utils.py:1192 `te_general_gemm` is undefined
        # without it); the model is already on its device, so a plain linear in the router dtype
        dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(self.config.moe_router_dtype, input.dtype)
        bias = self.bias.to(dtype) if self.bias is not None else None
        return torch.nn.functional.linear(input.to(dtype), self.weight.to(dtype), bias)

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        flat = logits.view(-1, self.config.num_moe_experts)
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        self.last_routing_map = routing_map
        # 1. the full routing distribution p_i = softmax(logits_i) over all experts (eq. 7)
        full = torch.softmax(flat.float(), dim=-1)
        train = self.training and torch.is_grad_enabled()
        if train:
            self.stats.add_routing(full.detach(), routing_map)
        elif not self.training:  # an evaluation forward (not the monitors' no-grad pass in train mode)
            self.stats.add_eval_routing(routing_map)
        # 2. L_v, attached to the top-k probs like megatron's aux loss (identity forward)
        if train and self.var_coeff > 0:
            loss = variance_loss(full)
            probs = attach_loss(probs, loss, self.var_coeff, flat.shape[0], self.calculate_per_token_loss)
            self._track("var_loss", loss)
        return probs, routing_map

    def _track(self, name: str, loss: torch.Tensor) -> None:
        """Log through megatron's MoE tracker, beside its load_balancing_loss and z_loss."""
        num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
        save_to_aux_losses_tracker(name, loss.detach(), self.layer_number, num_layers)
