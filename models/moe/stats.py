"""Router and specialization statistics of MoE layers, accumulated over one optimizer step.

Each router owns a `MoEStats` that sums cheap detached quantities over the step's micro-batches
(training forwards only); `collect` reduces them over data-parallel ranks and turns them into the
`moe/...` metrics that the trainer logs. The pure functions are what the metrics mean.

Routing by source: in evaluation forwards (eval mode) each router also counts its routed top-k
assignments per expert; `take_eval_loads` reads and restarts those counts, so the trainer's caller can
take them once per validation set. `source_routing_metrics` turns the counts of several sources (one
validation set each) into routing purity and the normalised mutual information I(source; expert) /
H(source): measures of expert specialisation that no loss optimises (the aux loss, L_o and L_v never
see which source a token came from).
"""

from __future__ import annotations

import math

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


def balanced_routing(counts: torch.Tensor) -> torch.Tensor:
    """[sources, experts] routed assignments -> each source's shares of its assignments (rows sum to 1),
    so every source weighs the same whatever its token count."""
    counts = counts.double()
    return counts / counts.sum(1, keepdim=True)


def routing_purity(counts: torch.Tensor) -> tuple[float, list[float]]:
    """(purity, purity per source) of [sources >= 2, experts] routed-assignment counts, sources balanced.

    Each expert belongs to its majority source (the largest balanced share; an exact tie splits it). A
    source's purity is the share of its assignments that go to its own experts; the purity is their mean,
    = sum_e max_s P[s, e] / S: 1/S when every source routes alike, 1 when no expert serves two sources.
    """
    shares = balanced_routing(counts)
    top = shares == shares.max(0, keepdim=True).values  # [S, E]: which sources hold each expert's majority
    owned = top.double() / top.sum(0, keepdim=True)  # a tie splits the expert between its majority sources
    per_source = (shares * owned).sum(1)
    return float(per_source.mean()), per_source.tolist()


def source_expert_nmi(counts: torch.Tensor) -> float:
    """I(source; expert) / H(source) of [sources >= 2, experts] routed-assignment counts, sources balanced
    (each source 1/S of the joint distribution, so H(source) = log S): 0 when every source routes alike,
    1 when an assignment's expert tells its source."""
    joint = balanced_routing(counts) / counts.shape[0]
    p_source = joint.sum(1, keepdim=True)
    p_expert = joint.sum(0, keepdim=True)
    terms = joint * (joint / (p_source * p_expert)).log()
    return float(torch.where(joint > 0, terms, torch.zeros_like(terms)).sum() / math.log(counts.shape[0]))


def source_routing_metrics(loads: dict[str, dict[int, torch.Tensor]]) -> dict[str, float]:
    """`loads[source][layer]`: routed assignments per expert of one source's tokens (`take_eval_loads`)
    -> `moe/layer<n>/purity`, `.../purity/<source>`, `.../source_nmi` and each source's balanced shares
    `.../routed/<source>/<e>`, plus the means over layers `moe/purity`, `moe/purity/<source>` and
    `moe/source_nmi`. Empty with fewer than two sources or a source that routed nothing."""
    sources = list(loads)
    layers = sorted(set.intersection(*(set(by_layer) for by_layer in loads.values()))) if loads else []
    if len(sources) < 2 or not layers or any(float(loads[s][l].sum()) <= 0 for s in sources for l in layers):
        return {}
    out, means = {}, {}
    for layer in layers:
        counts = torch.stack([loads[s][layer].double().cpu() for s in sources])
        purity, per_source = routing_purity(counts)
        m = {"purity": purity, "source_nmi": source_expert_nmi(counts)}
        m |= {f"purity/{s}": p for s, p in zip(sources, per_source)}
        for name, value in m.items():
            means.setdefault(name, []).append(value)
        shares = balanced_routing(counts)
        m |= {f"routed/{s}/{e}": float(x) for s, row in zip(sources, shares) for e, x in enumerate(row)}
        out.update({f"moe/layer{layer}/{k}": v for k, v in m.items()})
    out.update({f"moe/{k}": sum(v) / len(v) for k, v in means.items()})
    return out


# ---- accumulation over a step ------------------------------------------------------------------
class MoEStats:
    """Sums over the micro-batches of one step; one float64 vector so one all-reduce covers it."""

    FIELDS = ("calls", "tokens", "dropped", "entropy", "variance", "overlap", "overlap_pairs")

    def __init__(self, num_experts: int, top_k: int):
        self.num_experts, self.top_k = num_experts, top_k
        self.values = torch.zeros(len(self.FIELDS) + num_experts, dtype=torch.float64)
        # routed assignments per expert in evaluation forwards, until `take_eval_loads` reads them: kept
        # apart from `values`, which describe training steps only
        self.eval_load = torch.zeros(num_experts, dtype=torch.float64)

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
    def add_eval_routing(self, routing_map: torch.Tensor) -> None:
        """`routing_map`: bool [T, E] of an evaluation forward (after any capacity dropping); every
        position of the rows counts, padding included (keel's validation sets are concat-packed)."""
        if self.eval_load.device != routing_map.device:
            self.eval_load = self.eval_load.to(routing_map.device)
        self.eval_load += routing_map.sum(0).to(torch.float64)

    @torch.no_grad()
    def add_overlap(self, grouped: torch.Tensor, valid: torch.Tensor) -> None:
        """`grouped` [T, k, H]: each token's selected experts' outputs; `valid` [T, k] real slots."""
        total, count = pairwise_abs_cosine(grouped, valid)
        self._add("overlap", total.double())
        self._add("overlap_pairs", count.double())

    def reset(self) -> None:
        self.values.zero_()
        self.eval_load.zero_()

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
    losses = {n: tracked_loss(tracker[n]) for n in names}
    # 1. one vector per layer: the step sums, then this layer's tracked loss sums
    rows = []
    for layer in layers:
        s = layer.router.stats
        tracked = [losses[n][layer.layer_number - 1].to(s.values) for n in names]
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


def tracked_loss(entry: dict) -> torch.Tensor:
    """One loss of megatron's tracker, per layer, as this rank reports it. megatron records some losses as
    partial sums over a `reduce_group` (the load-balancing loss, over the TP ranks that each route a share
    of a sequence under sequence parallelism) and sums them there before it logs; so does this, so that
    every rank holds the loss and `collect`'s mean over ranks is the loss."""
    values, group = entry["values"], entry["reduce_group"]
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return values
    values = values.clone()
    dist.all_reduce(values, group=group)
    return values


def take_eval_loads(model: torch.nn.Module, group=None) -> dict[int, torch.Tensor]:
    """Layer number -> routed assignments per expert that the layer counted in evaluation forwards since
    the last call, summed over `group` (a collective: every rank in it calls this together); the counts
    restart from zero."""
    layers = moe_layers(model)
    if not layers:
        return {}
    device = next(model.parameters()).device  # a layer that never evaluated still holds its CPU zeros
    flat = torch.stack([layer.router.stats.eval_load.to(device) for layer in layers])
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(flat, group=group)
    for layer in layers:
        layer.router.stats.eval_load.zero_()
    return {layer.layer_number: row.cpu() for layer, row in zip(layers, flat)}


def reset(model: torch.nn.Module) -> None:
    """Start a new step: zero every layer's sums (its evaluation counts too) and megatron's MoE loss tracker."""
    for layer in moe_layers(model):
        layer.router.stats.reset()
    clear_aux_losses_tracker()
