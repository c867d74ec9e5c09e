"""The stability monitor's batched statistics against a lone, per-matrix computation."""

from types import SimpleNamespace

import pytest
import torch

from optim.spectral import power_iteration
from pretrain.callbacks.stability import StabilityConfig, StabilityMonitor
from tests.helpers import build_tiny_gpt


@pytest.mark.parametrize("attention", ["gqa", "gla"])
def test_batched_statistics_equal_per_matrix_ones(megatron_world, attention):
    from pretrain.callbacks.stability_stats import qk_spectral_stats
    from pretrain.callbacks.stability import _qk_weights

    _, gpt = build_tiny_gpt([f"attention={attention}", "model.num_layers=3"])
    monitor = StabilityMonitor(gpt, StabilityConfig(interval=1))
    assert len(monitor.batches) < len(monitor.matrices)  # a weight of every layer shares one batch
    lone = {n: {} for n, _ in monitor.matrices}
    trainer, g = SimpleNamespace(step=0), torch.Generator().manual_seed(0)
    for step in (1, 2, 3):  # warm-started: each call continues from the last call's vectors
        monitor.on_before_update(trainer, 0.0)
        deltas = {}
        with torch.no_grad():
            for n, p in monitor.matrices:  # a rank-one update: σ1(ΔW) = |u| |v| exactly
                deltas[n] = 1e-3 * torch.outer(torch.randn(p.shape[0], generator=g), torch.randn(p.shape[1], generator=g))
                p.add_(deltas[n])
        trainer.step = step
        metrics = {"step": step}
        monitor.on_step_end(trainer, metrics)
        for n, p in monitor.matrices:
            sigma = float(power_iteration(p.detach().float(), lone[n].setdefault("w", {}), 3))
            assert metrics[f"stability/sigma1/{n}"] == pytest.approx(sigma, rel=1e-5)
            ratio = float(torch.linalg.matrix_norm(deltas[n], 2)) / sigma
            assert metrics[f"stability/update_ratio/{n}"] == pytest.approx(ratio, rel=1e-4)
    # W_qᵀW_k of all layers at once equals each layer on its own
    for layer in monitor.layers:
        w_q, w_k, heads, _, d = _qk_weights(layer.self_attention)
        alone = qk_spectral_stats(w_q, w_k, heads, d).sigma1
        for h in range(heads):
            assert metrics[f"stability/qk_sigma1/layer{layer.layer_number}/head{h}"] == pytest.approx(
                float(alone[h]), rel=1e-5)
    total = torch.sqrt(sum(p.detach().double().square().sum() for p in gpt.parameters()))
    assert metrics["stability/param_norm"] == pytest.approx(float(total), rel=1e-6)


def test_the_run_summary_reads_the_monitors_worst_values_and_the_spikes():
    from pretrain.callbacks.spike import SpikeConfig, SpikeMonitor
    from pretrain.callbacks.stability import worst_readings

    rows = [{"step": 1, "loss": 9.0},
            {"step": 5, "loss": 8.0, "stability/attn_entropy_min": 3.5, "stability/qk_sigma1_max": 1.5,
             "stability/logit_norm": 40.0},
            {"step": 6, "loss": 12.0, "spike": 1},
            {"step": 10, "loss": 7.0, "stability/attn_entropy_min": 0.5, "stability/qk_sigma1_max": 2.5,
             "stability/logit_norm": 20.0}]
    assert worst_readings(rows) == ("lowest attention entropy 0.50 (step 10); highest σ1(W_qᵀW_k) 2.50 (step 10); "
                                    "highest output-logit norm 40.00 (step 5)")
    assert worst_readings([{"step": 1, "loss": 9.0}]) is None  # monitors off: no line
    spikes = SpikeMonitor(SpikeConfig())
    assert spikes.summary(rows) == {"loss spikes": "flagged at steps 6"}
    assert spikes.summary(rows[:2]) == {"loss spikes": "none flagged"}
