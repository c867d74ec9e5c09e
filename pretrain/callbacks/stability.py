"""The stability monitors, as a trainer callback.

Every `logging.monitors.interval` steps the monitor looks at the first micro-batch's first
`batch_rows` rows as the training forward sees them (forward hooks, no extra forward pass, so it
works on every pipeline stage; with compiled layers or a chunked loss, which leave nothing to hook,
an eager forward-only pass over that micro-batch before the update) and logs under `stability/...`:
- attention entropy per layer and head (σReparam's definition, from the post-RoPE queries/keys);
- σ1(W_qᵀW_k) per layer (max over heads) and the top-1 spectral energy share;
- σ1 of every weight matrix and its update ratio σ1(ΔW)/σ1(W) over that step;
- output-logit norm (mean L2 over positions) and max |logit|; parameter norm.
Attention modules say what plays W_q and W_k through an optional `qk_weights()` method returning
(w_q, w_k, local_heads, local_kv_heads, head_dim); megatron's fused `linear_qkv` is split otherwise.
The monitor runs on every rank (it uses collectives); rank 0 writes.

Cost: on a GPU the monitor is bound by kernel launches and host syncs, not FLOPs, so it batches:
same-shaped matrices (the same weight in every layer) share one power iteration, W_qᵀW_k of all
layers is one batched factorisation, and every value leaves the device in one sync at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from models.config import check, check_positive
from optim.spectral import init_vectors, megatron_shard_dim, power_iteration
from pretrain.callbacks.base import Callback, RunContext
from pretrain.callbacks.stability_stats import attention_entropy_from_scores, qk_spectral_stats, split_megatron_qkv

STACK_BYTES = 1 << 28  # fp32 bytes per batch of stacked matrices: bounds the monitor's extra memory
POWER_ITERS = 3  # per monitored step; the vectors are warm-started, so estimates tighten over steps
# what the run summary reads from the monitors: (metric, label, the worst is the highest?)
WORST_READINGS = (("stability/attn_entropy_min", "lowest attention entropy", False),
                  ("stability/qk_sigma1_max", "highest σ1(W_qᵀW_k)", True),
                  ("stability/logit_norm", "highest output-logit norm", True))


@dataclass
class StabilityConfig:
    """The monitors' keys of `logging.monitors` (pretrain.config.MonitorConfig composes them)."""

    interval: int = 50  # stability monitors every n steps; 0 disables
    batch_rows: int = 1  # rows of the batch the monitors look at

    def __post_init__(self):
        check(self.interval >= 0, f"logging.monitors.interval must be >= 0 (0 disables), got {self.interval}")
        check_positive("logging.monitors", self, "batch_rows")


class StabilityMonitor(Callback):
    name, order = "stability", 20  # every rank: it uses collectives
    layout_free = False  # its power-iteration vectors are per tensor-parallel shard

    @classmethod
    def build(cls, run: RunContext) -> StabilityMonitor | None:
        monitors = run.cfg.logging.monitors
        return cls(run.model, monitors) if monitors.interval > 0 else None

    def __init__(self, model: torch.nn.Module, cfg: StabilityConfig):
        self.model, self.cfg = model, cfg
        self.layers = list(model.decoder.layers)
        self.matrices = [(n, p) for n, p in model.named_parameters() if p.ndim >= 2]
        self.batches = _same_shape_batches(self.matrices)
        self.global_names = {n: _layer_name(n, model) for n, _ in self.matrices}  # as logged: model-wide layer numbers
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.power_state: dict[str, dict] = {}
        self._hooks, self._captured, self._before = [], {}, {}
        self._hooked_training = True  # whether this step's hooks watch the training forward

    def _due(self, step: int) -> bool:
        return self.cfg.interval > 0 and step % self.cfg.interval == 0

    # 1. capture q/k of each layer and the logits: during the training forward when it is the eager
    #    model's; else (compiled layers, chunked loss: no module calls to hook) in an eager forward-only
    #    pass over the first micro-batch before the update, with the same weights, so the same values
    def on_step_start(self, trainer) -> None:
        if not self._due(trainer.step + 1):
            return
        self._captured = {}
        # decided once per step: a compile error may turn the layers eager during this step's forward
        self._hooked_training = _training_forward_is_plain(trainer)
        if self._hooked_training:
            self._add_hooks()

    def _add_hooks(self) -> None:
        for layer in self.layers:
            core = layer.self_attention.core_attention
            self._hooks.append(core.register_forward_pre_hook(self._capture_qk(layer.layer_number), with_kwargs=True))
        if getattr(self.model, "post_process", False):
            self._hooks.append(self.model.output_layer.register_forward_hook(self._capture_logits))

    def _capture_qk(self, layer_number: int):
        rows = self.cfg.batch_rows

        def hook(module, args, kwargs):
            if layer_number in self._captured:
                return  # first micro-batch only
            q, k = args[0], args[1]
            mask = args[3] if len(args) > 3 else kwargs.get("attention_mask")
            q, k = (t[:, :rows].detach().permute(1, 2, 0, 3).float() for t in (q, k))  # [r, h, s, d]
            self._captured[layer_number] = (q, k, None if mask is None else mask[:rows])
        return hook

    def _capture_logits(self, module, args, output):
        if "logits" not in self._captured:
            logits = output[0] if isinstance(output, tuple) else output
            # clone: megatron's cross entropy later turns the logits into probabilities in place
            self._captured["logits"] = logits[:, : self.cfg.batch_rows].detach().float().clone()

    # 2. snapshot matrices before the update, for the update ratio (stacking copies them)
    def on_before_update(self, trainer, loss: float):
        if self._due(trainer.step + 1):
            if not self._hooked_training:
                self._add_hooks()
                trainer.reference_forward(trainer.microbatches[0])
            self._before = [torch.stack([p.detach() for _, p in batch]) for batch in self.batches]
        return None

    # 3. compute, gather to rank 0, add to the step's metrics
    @torch.no_grad()
    def on_step_end(self, trainer, metrics: dict) -> None:
        if not self._due(metrics["step"]):
            return
        for h in self._hooks:
            h.remove()
        self._hooks = []
        # every statistic stays on the device until the one .tolist() below
        pending = {**self._attention_stats(), **self._matrix_stats(), **self._logit_stats()}
        self._before, self._captured = [], {}
        local = dict(zip(pending, torch.stack(list(pending.values())).tolist())) if pending else {}
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        merged = {k: v for part in gathered for k, v in part.items()}
        metrics.update(_summarise(merged))
        metrics["stability/param_norm"] = _param_norm(self.model)

    def _attention_stats(self) -> dict:
        """0-dim tensors per layer and head: entropy from the captured q/k, then W_qᵀW_k's spectrum."""
        out = {}
        for layer in self.layers:
            n, attn = layer.layer_number, layer.self_attention
            if n in self._captured:
                q, k, mask = self._captured[n]
                ent = attention_entropy_from_scores(q, k, causal=mask is None, mask=mask,
                                                    scale=getattr(attn.core_attention, "softmax_scale", None))
                for h, e in enumerate(ent.unbind()):
                    out[f"stability/attn_entropy/layer{n}/head{self._global_head(h, len(ent))}"] = e
        # layers of one shape (all of them, in a homogeneous model) are factorised together
        by_shape: dict[tuple, list] = {}
        for layer in self.layers:
            w_q, w_k, heads, _, head_dim = _qk_weights(layer.self_attention)
            by_shape.setdefault((w_q.shape, w_k.shape, heads, head_dim), []).append((layer.layer_number, w_q, w_k))
        for (_, _, heads, head_dim), group in by_shape.items():
            qk = qk_spectral_stats(torch.cat([q for _, q, _ in group]), torch.cat([k for _, _, k in group]),
                                   heads * len(group), head_dim, top_s=1)
            conc = qk.concentration if qk.concentration is not None else torch.full_like(qk.sigma1, math.nan)
            for i, (n, _, _) in enumerate(group):
                for h in range(heads):
                    g = self._global_head(h, heads)
                    out[f"stability/qk_sigma1/layer{n}/head{g}"] = qk.sigma1[i * heads + h]
                    out[f"stability/qk_energy_top1/layer{n}/head{g}"] = conc[i * heads + h]
        return out

    def _global_head(self, h: int, local_heads: int) -> int:
        return self.tp_rank * local_heads + h

    def _matrix_stats(self) -> dict:
        """σ1(W) and σ1(ΔW)/σ1(W) per matrix (0-dim tensors), one batched power iteration per batch."""
        out = {}
        for batch, before in zip(self.batches, self._before):
            names, shard = [n for n, _ in batch], megatron_shard_dim(batch[0][1])
            w = torch.stack([p.detach() for _, p in batch]).float()
            sigma = self._power(w, names, "w", shard)
            ratio = self._power(w - before.float(), names, "dw", shard) / sigma.clamp_min(1e-12)
            if self.tp_rank == 0:
                for name, s, r in zip(names, sigma.unbind(), ratio.unbind()):
                    out[f"stability/sigma1/{self.global_names[name]}"] = s
                    out[f"stability/update_ratio/{self.global_names[name]}"] = r
        return out

    def _power(self, mats: torch.Tensor, names: list[str], which: str, shard) -> torch.Tensor:
        """Power iteration over a stack of matrices, warm-started from (and saved to) each one's vectors."""
        states = [self.power_state.setdefault(n, {"w": {}, "dw": {}})[which] for n in names]
        if any(st.get("u") is None for st in states):  # a matrix's first call starts where a lone one would
            u, v = init_vectors(mats.shape[1:], mats.device, self.tp_group, shard)
            for st in states:
                st.setdefault("u", u)
                st.setdefault("v", v)
        batch = {"u": torch.stack([st["u"] for st in states]), "v": torch.stack([st["v"] for st in states])}
        sigma = power_iteration(mats, batch, POWER_ITERS, self.tp_group, shard)
        for st, u, v in zip(states, batch["u"].unbind(), batch["v"].unbind()):
            st["u"], st["v"] = u, v
        return sigma

    def _logit_stats(self) -> dict:
        if "logits" not in self._captured:
            return {}
        logits = self._captured["logits"]  # [s, r, vocab/tp]
        sq = logits.pow(2).sum(-1)
        mx = logits.abs().max().reshape(1)
        dist.all_reduce(sq, group=self.tp_group)
        dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=self.tp_group)
        if self.tp_rank != 0:
            return {}
        return {"stability/logit_norm": sq.sqrt().mean(), "stability/logit_max": mx[0]}

    def state_dict(self) -> dict:
        return {"power_state": self.power_state}

    def load_state_dict(self, state: dict) -> None:
        self.power_state = state["power_state"]

    def summary(self, rows: list[dict]) -> dict[str, str]:
        return {"stability": reading} if (reading := worst_readings(rows)) else {}


def worst_readings(rows: list[dict]) -> str | None:
    """The monitors' worst readings over the run's metrics rows, with their steps (None: none logged)."""
    parts = []
    for key, label, highest in WORST_READINGS:
        seen = [(r[key], r["step"]) for r in rows if isinstance(r.get(key), float)]
        if seen:
            value, step = (max if highest else min)(seen)
            parts.append(f"{label} {value:.2f} (step {step})")
    return "; ".join(parts) or None


def _training_forward_is_plain(trainer) -> bool:
    """Whether the training forward calls each module as the eager model does (so hooks see it all)."""
    return getattr(trainer, "forward_is_plain", True)


def _qk_weights(attn):
    if hasattr(attn, "qk_weights"):
        return attn.qk_weights()
    heads = attn.num_attention_heads_per_partition
    kv = attn.num_query_groups_per_partition
    d = attn.hidden_size_per_attention_head
    w_q, w_k, _ = split_megatron_qkv(attn.linear_qkv.weight.detach(), heads, kv, d)
    return w_q, w_k, heads, kv, d


def _same_shape_batches(matrices: list) -> list[list]:
    """(name, param) lists of one shape, dtype and TP split, each at most STACK_BYTES as fp32."""
    groups: dict[tuple, list] = {}
    for name, p in matrices:
        groups.setdefault((tuple(p.shape), p.dtype, megatron_shard_dim(p)), []).append((name, p))
    batches = []
    for (shape, _, _), members in groups.items():
        size = max(1, STACK_BYTES // (4 * math.prod(shape)))
        batches += [members[i:i + size] for i in range(0, len(members), size)]
    return batches


def _layer_name(name: str, model) -> str:
    """Parameter name with the pipeline stage's local layer index made global."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from models.init import global_name

    return global_name(name, get_transformer_layer_offset(model.config))


def _summarise(values: dict) -> dict:
    """Per-head values plus per-layer summaries (mean/min entropy, max σ1, mean energy share)."""
    out = dict(values)
    by_layer: dict[tuple[str, str], list[float]] = {}
    for key, v in values.items():
        parts = key.split("/")
        if len(parts) == 4 and parts[3].startswith("head"):
            by_layer.setdefault((parts[1], parts[2]), []).append(v)
    for (metric, layer), vs in by_layer.items():
        if metric == "attn_entropy":
            out[f"stability/attn_entropy/{layer}"] = sum(vs) / len(vs)
            out[f"stability/attn_entropy_min/{layer}"] = min(vs)
        elif metric == "qk_sigma1":
            out[f"stability/qk_sigma1/{layer}"] = max(vs)
        elif metric == "qk_energy_top1":
            out[f"stability/qk_energy_top1/{layer}"] = sum(vs) / len(vs)
    for metric, agg in (("attn_entropy", min), ("qk_sigma1", max)):
        layer_vals = [v for k, v in out.items() if k.startswith(f"stability/{metric}/layer") and k.count("/") == 2]
        if layer_vals:
            out[f"stability/{metric}_{agg.__name__}"] = agg(layer_vals)
    return out


def _param_norm(model) -> float:
    """L2 norm of all parameters across the model-parallel group (replicas and shared copies once)."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    owned = [p.detach() for p in model.parameters()
             if (getattr(p, "tensor_model_parallel", False) or tp_rank == 0) and not getattr(p, "shared", False)]
    norms = torch.stack([torch.linalg.vector_norm(p, dtype=torch.float32) for p in owned])
    total = norms.double().square().sum().reshape(1)
    dist.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return float(total.sqrt())
