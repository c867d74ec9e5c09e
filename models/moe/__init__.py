"""Mixture of experts on megatron-core: keel's router and layer, the specialization losses, statistics."""

from models.moe.layer import KeelMoELayer, group_by_token, moe_spec, permuted_rows
from models.moe.losses import attach_loss, orthogonality_loss, variance_loss
from models.moe.router import KeelRouter
from models.moe.stats import (MoEStats, collect, max_violation, reset, routing_purity, source_expert_nmi,
                              source_routing_metrics, take_eval_loads)

__all__ = ["KeelMoELayer", "KeelRouter", "MoEStats", "attach_loss", "collect", "group_by_token", "max_violation",
           "moe_spec", "orthogonality_loss", "permuted_rows", "reset", "routing_purity", "source_expert_nmi",
           "source_routing_metrics", "take_eval_loads", "variance_loss"]
