"""The spectral bound and the stability monitors inside the trainer."""

import pytest

from tests.helpers import losses, metrics, resume_folder, run_keel, tiny_overrides

pytestmark = pytest.mark.slow
SPECTRAL = ["optim.spectral.enabled=true", "optim.spectral.tau=0.05", "logging.monitors.interval=2"]


@pytest.fixture(scope="module")
def bounded(tiny_data, tmp_path_factory):
    """One uninterrupted 6-step run with the bound and the monitors on, shared below."""
    run = tmp_path_factory.mktemp("bounded") / "run"
    run_keel(tiny_overrides(tiny_data, run, steps=6) + SPECTRAL)
    return run


def test_monitors_log_every_quantity(bounded):
    rows = {r["step"]: r for r in metrics(bounded)}
    logged = rows[2]
    for key in ("stability/attn_entropy/layer1", "stability/attn_entropy/layer2/head0", "stability/qk_sigma1/layer2",
                "stability/qk_energy_top1/layer1", "stability/logit_norm", "stability/logit_max",
                "stability/param_norm", "stability/sigma1/decoder.layers.1.mlp.linear_fc2.weight",
                "stability/update_ratio/decoder.layers.0.self_attention.linear_qkv.weight",
                "spectral/clip_rate", "spectral/mean_scale/linear_qkv.weight"):
        assert key in logged, key
    assert "stability/logit_norm" not in rows[1]  # only every `interval` steps
    assert 0 < logged["spectral/mean_scale/linear_qkv.weight"] <= 1


def test_spectral_bound_and_monitors_resume_exactly(tiny_data, tmp_path, bounded):
    run_keel(tiny_overrides(tiny_data, resume_folder(bounded, 3, tmp_path / "b"), steps=6) + SPECTRAL)
    a, b = metrics(bounded), metrics(tmp_path / "b")
    resumed = losses(tmp_path / "b")
    assert sorted(resumed) == [4, 5, 6]
    assert resumed == {step: loss for step, loss in losses(bounded).items() if step > 3}
    assert a[-1]["stability/qk_sigma1/layer1"] == b[-1]["stability/qk_sigma1/layer1"]


def test_infinite_tau_equals_no_bound(tiny_data, tmp_path):
    run_keel(tiny_overrides(tiny_data, tmp_path / "off", steps=2))
    run_keel(tiny_overrides(tiny_data, tmp_path / "inf", steps=2) + ["optim.spectral.enabled=true", "optim.spectral.tau=inf"])
    assert losses(tmp_path / "off") == losses(tmp_path / "inf")


@pytest.mark.parametrize("parallel, rel", [(["parallel.tensor=2"], 1e-4), (["optim.distributed=true"], 1e-5),
                                           (["parallel.pipeline=2"], 1e-4)])
def test_bounded_training_with_two_processes_matches_one(tiny_data, tmp_path, bounded, parallel, rel):
    # the first two steps of the same 6-step schedule (stop_at keeps the schedule)
    run_keel(tiny_overrides(tiny_data, tmp_path / "two", steps=6) + SPECTRAL + ["trainer.stop_at=2"] + parallel, nproc=2)
    one, two = metrics(bounded)[:2], metrics(tmp_path / "two")
    assert len(two) == 2
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=rel)
    # the monitors see every layer and head whatever the split
    assert two[1]["stability/qk_sigma1/layer2"] == pytest.approx(one[1]["stability/qk_sigma1/layer2"], rel=1e-3)
    assert two[1]["stability/attn_entropy/layer2/head3"] == pytest.approx(
        one[1]["stability/attn_entropy/layer2/head3"], rel=1e-3)
