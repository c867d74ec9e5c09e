"""Router and specialization statistics of MoE layers, accumulated over one optimizer step.

Each router owns a `MoEStats` that sums cheap detached quantities over the step's micro-batches
(training forwards only); `collect` reduces them over data-parallel ranks and turns them into the
`moe/...` metrics that the trainer logs. The pure functions are what the metrics mean.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

from models.moe.losses import routing_variance

TRACKED_LOSSES = ("load_balancing_loss", "seq_load_balancing_loss", "z_loss", "ortho_loss", "var_loss")


# ---- what each statistic means ----------------------------------------------------------------
def max_violation(load: torch.Tensor, tokens: float, k: int) -> float:
    """MaxVio = max_i |load_i - kT/E| / (kT/E) (Wang et al. 2024, used by the paper's Table 5)."""
    ideal = k * tokens / load.numel()
    return float((load - ideal).abs().max() / ideal) if ideal > 0 else 0.0


def router_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-token entropy of the routing distribution, [tokens, experts] -> [tokens] (nats)."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)


def pairwise_abs_cosine(vectors: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of |cos| over unordered pairs in [groups, n, d]; `valid` [groups, n] masks slots."""
    unit = torch.nn.functional.normalize(vectors.float(), dim=-1)
    cos = (unit @ unit.transpose(1, 2)).abs()
    n = vectors.shape[1]
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=vectors.device), diagonal=1)
    pair_ok = upper if valid is None else upper & valid.unsqueeze(2) & valid.unsqueeze(1)
    return (cos * pair_ok).sum(), pair_ok.expand_as(cos).sum()


def expert_weight_similarity(experts: torch.nn.Module) -> float:
    """Mean |cos| between flattened weights of the local experts: cheap, no forward pass needed."""
    flat = [torch.cat([p.detach().float().flatten() for p in e.parameters()]) for e in experts.local_experts]
    if len(flat) < 2:
        return float("nan")
    total, count = pairwise_abs_cosine(torch.stack(flat).unsqueeze(0))
    return float(total / count)


# ---- accumulation over a step ------------------------------------------------------------------
class MoEStats:
    """Sums over the micro-batches of one step; one float64 vector so one all-reduce covers it."""

    FIELDS = ("calls", "tokens", "dropped", "entropy", "variance", "overlap", "overlap_pairs")

    def __init__(self, num_experts: int, top_k: int):
        self.num_experts, self.top_k = num_experts, top_k
        self.values = torch.zeros(len(self.FIELDS) + num_experts, dtype=torch.float64)

    def _add(self, name: str, value) -> None:
        self.values[self.FIELDS.index(name)] += value

    @torch.no_grad()
    def add_routing(self, probs: torch.Tensor, routing_map: torch.Tensor) -> None:
        """`probs`: full softmax [T, E]; `routing_map`: bool [T, E] after capacity dropping."""
        if self.values.device != probs.device:
            self.values = self.values.to(probs.device)
        tokens = probs.shape[0]
        load = routing_map.sum(0).to(torch.float64)
        self.values[len(self.FIELDS):] += load
        self._add("calls", 1)
        self._add("tokens", tokens)
        self._add("dropped", tokens * self.top_k - load.sum())  # top-k always picks k before dropping
        self._add("entropy", router_entropy(probs).sum().double())
        self._add("variance", routing_variance(probs).sum().double())

    @torch.no_grad()
    def add_overlap(self, grouped: torch.Tensor, valid: torch.Tensor) -> None:
        """`grouped` [T, k, H]: each token's selected experts' outputs; `valid` [T, k] real slots."""
        total, count = pairwise_abs_cosine(grouped, valid)
        self._add("overlap", total.double())
        self._add("overlap_pairs", count.double())

    def reset(self) -> None:
        self.values.zero_()

    def summary(self, values: torch.Tensor) -> dict[str, float]:
        v = dict(zip(self.FIELDS, values[:len(self.FIELDS)].tolist()))
        load = values[len(self.FIELDS):]
        tokens = max(v["tokens"], 1.0)
        out = {"maxvio": max_violation(load, tokens, self.top_k),
               "dropped": v["dropped"] / (tokens * self.top_k),
               "entropy": v["entropy"] / tokens, "routing_var": v["variance"] / tokens}
        if v["overlap_pairs"]:
            out["overlap"] = v["overlap"] / v["overlap_pairs"]
        share = load / load.sum().clamp_min(1)
        out.update({f"load/{e}": float(s) for e, s in enumerate(share)})
        return out


def moe_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The MoE layers of `model` (anything whose router carries `MoEStats`), in layer order."""
    return [m for m in model.modules() if isinstance(getattr(getattr(m, "router", None), "stats", None), MoEStats)]


def collect(model: torch.nn.Module, group=None, weight_similarity: bool = True) -> dict[str, float]:
    """`moe/layer<n>/<stat>` per MoE layer plus `moe/<stat>` means over layers; a collective over
    `group` (the data-parallel group), so every rank in it must call this together."""
    layers = moe_layers(model)
    if not layers:
        return {}
    tracker = get_moe_layer_wise_logging_tracker()
    names = [n for n in TRACKED_LOSSES if n in tracker]
    # 1. one vector per layer: the step sums, then this layer's tracked loss sums
    rows = []
    for layer in layers:
        s = layer.router.stats
        tracked = [tracker[n]["values"][layer.layer_number - 1].to(s.values) for n in names]
        rows.append(torch.cat([s.values, torch.stack(tracked)]) if tracked else s.values.clone())
    flat = torch.cat(rows)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(flat, group=group)
    # 2. per-layer metrics; losses are means over the step's micro-batches of all ranks
    out, offset = {}, 0
    for layer, row in zip(layers, rows):
        s = layer.router.stats
        values = flat[offset:offset + row.numel()]
        offset += row.numel()
        m = s.summary(values[:s.values.numel()])
        calls = max(float(values[0]), 1.0)
        m.update({n: float(x) / calls for n, x in zip(names, values[s.values.numel():])})
        if weight_similarity:
            m["weight_sim"] = expert_weight_similarity(layer.experts)
        out.update({f"moe/layer{layer.layer_number}/{k}": x for k, x in m.items()})
    # 3. means over layers of the scalar statistics
    keys = {k.split("/", 2)[2] for k in out if "/load/" not in k}
    for key in sorted(keys):
        vals = [out[f"moe/layer{l.layer_number}/{key}"] for l in layers if f"moe/layer{l.layer_number}/{key}" in out]
        out[f"moe/{key}"] = sum(vals) / len(vals)
    return out


def reset(model: torch.nn.Module) -> None:
    """Start a new step: zero every layer's sums and megatron's MoE loss tracker."""
    for layer in moe_layers(model):
        layer.router.stats.reset()
    clear_aux_losses_tracker()
