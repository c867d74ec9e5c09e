"""MoE end to end through `pretrain/main.py`: training with statistics and exact resume, routing by source at
each evaluation, DP=2, EP=2 and TP=2 (sequence parallel) equal one process, and the losses' restrictions."""

import math

import pytest

from tests.helpers import assert_index_admitted, losses, metrics, resume_folder, run_keel, tiny_overrides

pytestmark = pytest.mark.slow

MOE = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.z_loss=1e-3"]
SPECIALIZE = ["model.moe.ortho_loss=0.5", "model.moe.var_loss=1.0"]


def _step1(run_dir) -> dict:
    return metrics(run_dir)[0]


def test_moe_trains_logs_router_statistics_and_resumes_exactly(tiny_data, tmp_path):
    # capacity 1.0 drops some tokens on a skewed router: the dropping path trains, logs and resumes too
    straight = tmp_path / "straight"
    extra = MOE + SPECIALIZE + ["model.moe.capacity_factor=1.0"]
    run_keel(tiny_overrides(tiny_data, straight, steps=6) + extra)
    # 1. every statistic logged, some tokens dropped, and the model learns
    rows = metrics(straight)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for key in ("maxvio", "dropped", "entropy", "routing_var", "overlap", "weight_sim", "load_balancing_loss",
                "z_loss", "ortho_loss", "var_loss", "layer1/load/0", "layer2/overlap"):
        assert f"moe/{key}" in rows[-1], key
    assert any(r["moe/dropped"] > 0 for r in rows)
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert val[-1] < val[0]
    # 2. resumed from the checkpoint after step 3: steps 4-6 bit for bit, routing statistics included
    split = resume_folder(straight, 3, tmp_path / "split")
    out = run_keel(tiny_overrides(tiny_data, split, steps=6) + extra)
    assert "resumed from" in out.stdout
    resumed = losses(split)
    assert sorted(resumed) == [4, 5, 6]
    assert resumed == {step: loss for step, loss in losses(straight).items() if step > 3}
    assert [r["moe/overlap"] for r in metrics(split)] == [r["moe/overlap"] for r in rows[3:]]


def _sources(**paths: str) -> list[str]:
    """data.val_sets naming each packed set: one source each for the routing-by-source metrics."""
    return ["data.val_sets=[" + ", ".join(f"{{name: {n}, path: {p}}}" for n, p in paths.items()) + "]"]


def test_moe_logs_routing_by_source_at_each_evaluation(tiny_data, tmp_path):
    run = tmp_path / "run"
    # two names for the same text: whatever the router does, the two sources route alike
    run_keel(tiny_overrides(tiny_data, run, steps=6) + MOE + _sources(a=tiny_data["val"], b=tiny_data["val"]))
    rows = metrics(run)
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6] and all("moe/purity" not in r for r in rows if "val_loss" not in r)
    for r in evals:
        assert r["val_loss/a"] == r["val_loss/b"]
        assert r["moe/purity"] == pytest.approx(0.5) and r["moe/source_nmi"] == pytest.approx(0.0, abs=1e-9)
        for layer in (1, 2):
            a = [r[f"moe/layer{layer}/routed/a/{e}"] for e in range(4)]
            assert a == [r[f"moe/layer{layer}/routed/b/{e}"] for e in range(4)] and sum(a) == pytest.approx(1.0)
            assert r[f"moe/layer{layer}/purity/a"] == pytest.approx(0.5)
    assert not any(k.startswith("moe/purity/val") for k in evals[-1])  # the main set is not a source


def test_moe_data_parallel_matches_one_process(tiny_data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    extra = MOE + SPECIALIZE + ["trainer.max_steps=1"] + _sources(val=tiny_data["val"], train=tiny_data["train"])
    run_keel(tiny_overrides(tiny_data, one, steps=1) + extra)
    run_keel(tiny_overrides(tiny_data, two, steps=1) + extra, nproc=2)
    a, b = _step1(one), _step1(two)
    for key in ("loss", "grad_norm", "moe/load_balancing_loss", "moe/ortho_loss", "moe/var_loss", "moe/maxvio",
                "moe/purity", "moe/source_nmi", "moe/layer1/routed/train/0"):  # each rank counts its share of rows
        assert b[key] == pytest.approx(a[key], rel=1e-5), key


def test_moe_expert_and_tensor_parallel_match_data_parallel(tiny_data, tmp_path):
    """EP=2, and TP=2 with sequence parallelism (on by default for an MoE at TP>1: each TP rank routes half
    of every sequence, the norms' and router's gradients summed over TP), against DP=2 (which equals one
    process): the loss of both steps (the second after the first update), the gradient norm and the
    router's statistics. One test, so that the DP=2 reference runs once under xdist."""
    extra = MOE + ["model.moe.var_loss=1.0", "trainer.max_steps=2"]
    # the stability monitors watch the TP=2 forward too (hooks only: the step's numbers are the same)
    layouts = {"dp": [], "ep": ["parallel.expert=2"], "tp": ["parallel.tensor=2", "logging.monitors.interval=1"]}
    runs = {layout: tmp_path / layout for layout in layouts}
    for layout, run in runs.items():
        run_keel(tiny_overrides(tiny_data, run, steps=2) + extra + layouts[layout], nproc=2)
    reference = metrics(runs.pop("dp"))
    for layout, run in runs.items():
        assert_index_admitted(run)  # the allowlist admits this layout's shard index
        rows = metrics(run)
        assert len(rows) == len(reference) == 2
        for a, b in zip(reference, rows):
            for key in ("loss", "grad_norm", "moe/load_balancing_loss", "moe/z_loss", "moe/var_loss", "moe/maxvio",
                        "moe/entropy", "moe/layer1/load/0"):
                assert b[key] == pytest.approx(a[key], rel=1e-5), (layout, a["step"], key)
    monitored = metrics(runs["tp"])[-1]
    assert math.isfinite(monitored["stability/logit_norm"]) and math.isfinite(monitored["stability/attn_entropy_min"])
