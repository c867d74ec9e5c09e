"""Router statistics on hand-built routings, routing by source on hand-built counts, and the `moe/...`
metrics of a tiny MoE model."""

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


# ---- routing by source: purity and I(source; expert) from routed-assignment counts -------------------
# 4 experts; source a routes 100 assignments, b 30: balanced shares a = (.7, .2, .1, 0), b = (.1, .1, .3, .5)
COUNTS = torch.tensor([[70.0, 20.0, 10.0, 0.0], [3.0, 3.0, 9.0, 15.0]])


def test_routing_purity_by_hand():
    from models.moe.stats import routing_purity

    # majority sources: experts 0, 1 -> a; 2, 3 -> b. a keeps .7 + .2, b keeps .3 + .5; mean (.9 + .8) / 2
    purity, per_source = routing_purity(COUNTS)
    assert per_source == pytest.approx([0.9, 0.8]) and purity == pytest.approx(0.85)
    # balanced: scaling one source's token count changes nothing
    assert routing_purity(COUNTS * torch.tensor([[10.0], [1.0]]))[1] == pytest.approx([0.9, 0.8])
    # a tie splits the expert: shares a = (.5, .5, 0), b = (.5, 0, .5); expert 0 is half a's, half b's
    purity, per_source = routing_purity(torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]]))
    assert per_source == pytest.approx([0.25 + 0.5, 0.25 + 0.5]) and purity == pytest.approx(0.75)


def test_routing_purity_and_nmi_at_their_extremes():
    from models.moe.stats import routing_purity, source_expert_nmi

    alike = torch.tensor([[5.0, 3.0, 2.0], [50.0, 30.0, 20.0]])  # the same routing, ten times the tokens
    assert routing_purity(alike) == (pytest.approx(0.5), pytest.approx([0.5, 0.5]))  # 1/S: chance
    assert source_expert_nmi(alike) == pytest.approx(0.0, abs=1e-12)
    apart = torch.tensor([[4.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 9.0]])
    assert routing_purity(apart) == (pytest.approx(1.0), pytest.approx([1.0, 1.0, 1.0]))
    assert source_expert_nmi(apart) == pytest.approx(1.0)  # normalised by log 3 for three sources


def test_source_nmi_by_hand():
    from models.moe.stats import source_expert_nmi

    # joint = shares / 2: a (.35, .1, .05, 0), b (.05, .05, .15, .25); p(expert) = (.4, .15, .2, .25), p(source) = .5
    terms = [(0.35, 0.4), (0.1, 0.15), (0.05, 0.2), (0.05, 0.4), (0.05, 0.15), (0.15, 0.2), (0.25, 0.25)]
    mi = sum(j * math.log(j / (0.5 * e)) for j, e in terms)
    assert source_expert_nmi(COUNTS) == pytest.approx(mi / math.log(2))
    assert 0 < source_expert_nmi(COUNTS) < 1


def test_source_routing_metrics_per_layer_and_their_means():
    from models.moe.stats import source_routing_metrics

    alike = torch.tensor([1.0, 1.0, 1.0, 1.0])
    loads = {"a": {1: COUNTS[0], 3: alike}, "b": {1: COUNTS[1], 3: 2 * alike}}
    m = source_routing_metrics(loads)
    assert m["moe/layer1/purity"] == pytest.approx(0.85) and m["moe/layer3/purity"] == pytest.approx(0.5)
    assert m["moe/layer1/purity/b"] == pytest.approx(0.8) and m["moe/purity/b"] == pytest.approx((0.8 + 0.5) / 2)
    assert m["moe/purity"] == pytest.approx((0.85 + 0.5) / 2)
    assert m["moe/source_nmi"] == pytest.approx(m["moe/layer1/source_nmi"] / 2)  # layer 3 routes alike: 0
    assert [m[f"moe/layer1/routed/b/{e}"] for e in range(4)] == pytest.approx([0.1, 0.1, 0.3, 0.5])
    assert source_routing_metrics({"a": loads["a"]}) == {}  # one source: nothing to compare
    assert source_routing_metrics({"a": loads["a"], "b": {1: torch.zeros(4), 3: alike}}) == {}  # b routed nothing


def test_evaluation_forwards_count_routed_assignments_per_layer(megatron_world):
    from models.moe import take_eval_loads
    from tests.helpers import build_tiny_gpt

    _, gpt = build_tiny_gpt(["model.moe.num_experts=4", "model.moe.top_k=2"])  # eval mode, both layers MoE
    tokens = torch.randint(0, 128, (2, 32))
    positions = torch.arange(32).expand(2, 32)
    take_eval_loads(gpt)
    with torch.no_grad():
        gpt(tokens, positions, None)
    loads = take_eval_loads(gpt)
    assert sorted(loads) == [1, 2] and all(float(v.sum()) == 2 * 32 * 2 for v in loads.values())  # tokens x top-k
    assert all(float(v.sum()) == 0 for v in take_eval_loads(gpt).values())  # taken: the counts restart
    gpt.train()
    with torch.no_grad():  # the stability monitors' pass: train mode without gradients is not an evaluation
        gpt(tokens, positions, None)
    gpt.eval()
    assert all(float(v.sum()) == 0 for v in take_eval_loads(gpt).values())
