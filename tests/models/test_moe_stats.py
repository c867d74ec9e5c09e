"""Router statistics on hand-built routings, and the `moe/...` metrics of a tiny MoE model."""

import math

import pytest
import torch

from models.moe.stats import MoEStats, max_violation, pairwise_abs_cosine, router_entropy, routing_variance


def _routing() -> tuple[torch.Tensor, torch.Tensor]:
    # 4 tokens, 4 experts, top-2; token 3 lost its second expert to capacity dropping
    routing_map = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 0]], dtype=torch.bool)
    probs = torch.full((4, 4), 0.25)
    probs[0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    return probs, routing_map


def test_max_violation_by_hand():
    # kT/E = 2*4/4 = 2; loads (3, 3, 1, 1) -> max |load - 2| / 2 = 0.5
    assert max_violation(torch.tensor([3.0, 3.0, 1.0, 1.0]), tokens=4, k=2) == 0.5
    assert max_violation(torch.tensor([2.0, 2.0, 2.0, 2.0]), tokens=4, k=2) == 0.0


def test_entropy_and_variance_by_hand():
    probs, _ = _routing()
    torch.testing.assert_close(router_entropy(probs), torch.tensor([0.0, math.log(4), math.log(4), math.log(4)]))
    torch.testing.assert_close(routing_variance(probs), torch.tensor([3 / 16, 0.0, 0.0, 0.0]))


def test_overlap_by_hand():
    outputs = torch.tensor([[[1.0, 0.0], [0.0, 2.0]],   # orthogonal: 0
                            [[1.0, 1.0], [-2.0, -2.0]],  # anti-parallel: |cos| = 1
                            [[1.0, 0.0], [0.0, 0.0]]])   # second slot dropped: no pair
    total, count = pairwise_abs_cosine(outputs, torch.tensor([[True, True], [True, True], [True, False]]))
    assert count.item() == 2 and total.item() == pytest.approx(1.0)


def test_step_summary_of_a_hand_built_routing():
    probs, routing_map = _routing()
    stats = MoEStats(num_experts=4, top_k=2)
    for _ in range(2):  # two micro-batches of the same routing: shares and means do not change
        stats.add_routing(probs, routing_map)
        stats.add_overlap(torch.tensor([[[1.0, 0.0], [1.0, 0.0]]]), torch.ones(1, 2, dtype=torch.bool))
    s = stats.summary(stats.values)
    # loads (6, 6, 2, 0) over T=8 tokens: kT/E = 4, max |load - 4| / 4 = 1 (expert 3 is idle)
    assert s["maxvio"] == pytest.approx(1.0)
    assert s["dropped"] == pytest.approx(1 / 8)
    assert s["entropy"] == pytest.approx(3 * math.log(4) / 4)
    assert s["routing_var"] == pytest.approx(3 / 64)
    assert s["overlap"] == pytest.approx(1.0)
    assert [s[f"load/{e}"] for e in range(4)] == pytest.approx([3 / 7, 3 / 7, 1 / 7, 0.0])
    stats.reset()
    assert stats.values.abs().sum() == 0


def test_tiny_moe_model_reports_per_layer_metrics(megatron_world):
    from models.moe import collect, reset
    from tests.helpers import build_tiny_gpt

    cfg, gpt = build_tiny_gpt(["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.every=2",
                               "model.moe.ortho_loss=0.1", "model.moe.var_loss=0.1", "model.moe.z_loss=0.001"])
    gpt.train()
    reset(gpt)
    tokens = torch.randint(0, 128, (2, 32))
    gpt(tokens, torch.arange(32).expand(2, 32), None, labels=tokens).sum().backward()
    m = collect(gpt)
    reset(gpt)
    assert "moe/layer1/maxvio" in m and "moe/layer2/maxvio" not in m  # every=2: layer 1 only
    for key in ("maxvio", "dropped", "entropy", "routing_var", "overlap", "weight_sim", "load_balancing_loss",
                "z_loss", "ortho_loss", "var_loss"):
        assert math.isfinite(m[f"moe/{key}"]), key
    assert sum(m[f"moe/layer1/load/{e}"] for e in range(4)) == pytest.approx(1.0)
    assert m["moe/var_loss"] == pytest.approx(-m["moe/routing_var"], rel=1e-5)
    assert 0 < m["moe/entropy"] <= math.log(4) + 1e-6 and m["moe/dropped"] == 0.0
