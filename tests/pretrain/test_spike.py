"""Tests for the spike detector (pretrain/callbacks/spike.py) on a synthetic loss curve."""

from __future__ import annotations

import math
import random

import pytest

from pretrain.callbacks.spike import SpikeDetector

SPIKES = {150: 3.0, 151: 2.0, 300: 1.5, 420: 4.0}


def _series(n: int = 500, seed: int = 0) -> list[float]:
    """Smooth power-law decay with small noise, plus injected spikes and one NaN."""
    rng = random.Random(seed)
    out = [2.0 + 8.0 * (t + 10) ** -0.5 + rng.gauss(0, 0.01) for t in range(n)]
    for t, bump in SPIKES.items():
        out[t] += bump
    out[250] = math.nan
    return out


def test_detects_exactly_the_injected_spikes() -> None:
    det = SpikeDetector(window=50, z_threshold=6.0, min_history=20, action="skip")
    events = [e for t, x in enumerate(_series()) if (e := det.observe(t, x)) is not None]
    assert [e.step for e in events] == sorted([*SPIKES, 250])
    assert all(e.action == "skip" for e in events)
    assert next(e for e in events if e.step == 250).reason == "nonfinite"
    assert [e.consecutive for e in events if e.step in (150, 151)] == [1, 2]
    assert det.num_spikes == 5


def test_no_false_positives_on_smooth_curve_and_noise() -> None:
    for seed in range(5):
        det = SpikeDetector(window=50, z_threshold=6.0, min_history=20)
        clean = [x for t, x in enumerate(_series(seed=seed)) if t not in SPIKES and t != 250]
        assert all(det.observe(t, x) is None for t, x in enumerate(clean))


def test_nonfinite_is_a_spike_even_without_history() -> None:
    det = SpikeDetector(min_history=20)
    ev = det.observe(0, float("inf"))
    assert ev is not None and ev.reason == "nonfinite" and len(det.history) == 0
    assert det.observe(1, 3.0) is None  # too little history for a z-score


def test_state_dict_resume_is_exact() -> None:
    series = _series()
    full = SpikeDetector(window=40, min_history=10)
    ref = [full.observe(t, x) for t, x in enumerate(series)]
    first = SpikeDetector(window=40, min_history=10)
    for t, x in enumerate(series[:200]):
        first.observe(t, x)
    resumed = SpikeDetector(window=40, min_history=10)
    resumed.load_state_dict(first.state_dict())
    rest = [resumed.observe(t, x) for t, x in enumerate(series) if t >= 200]
    assert rest == ref[200:]


def test_reset_after_accepts_a_level_shift() -> None:
    det = SpikeDetector(window=30, min_history=10, reset_after=3)
    series = [1.0 + 0.001 * (t % 3) for t in range(40)] + [5.0 + 0.001 * (t % 3) for t in range(40)]
    flagged = [t for t, x in enumerate(series) if det.observe(t, x) is not None]
    assert flagged == [40, 41, 42]


def test_rejects_bad_config() -> None:
    with pytest.raises(ValueError):
        SpikeDetector(action="explode")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SpikeDetector(window=5, min_history=10)
