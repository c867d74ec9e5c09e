"""Paired seeds: `paired` compares two arms seed by seed (the same seed means the same initialisation and
data order, so the per-seed difference cancels most of the seed noise): the mean difference and its 95%
Student-t interval. An interval that covers 0 shows no difference, and shows no equality either: only
`Paired.equivalence` (TOST, two one-sided paired t-tests against a margin fixed before the runs) can say
two arms match. `summarize` gives an arm's mean, spread and values."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Iterable

from tools.experiments import ExperimentError
from tools.experiments.seeds import REPORTED_SEEDS, TUNING_SEEDS

CONFIDENCE = 0.95
EQUIVALENCE_ALPHA = 0.05  # each one-sided test of TOST: equivalence when the 90% interval lies inside ±margin


@dataclass(frozen=True)
class Equivalence:
    """TOST of paired differences against ±margin: two one-sided t-tests, H0 "mean <= -margin" and H0
    "mean >= +margin"; the arms are equivalent when both are rejected at `alpha`, which is the same as
    the (1 - 2 alpha) interval of the mean lying inside (-margin, +margin)."""

    margin: float
    alpha: float
    p_value: float  # the larger of the two one-sided p-values: TOST's p-value
    interval: tuple[float, float]  # the (1 - 2 alpha) Student-t interval of the mean

    @property
    def equivalent(self) -> bool:
        return self.p_value < self.alpha

    def as_dict(self) -> dict:
        return {"margin": self.margin, "alpha": self.alpha, "p_value": self.p_value,
                f"interval{round(100 * (1 - 2 * self.alpha))}": list(self.interval), "equivalent": self.equivalent}


@dataclass(frozen=True)
class Paired:
    """Arm b against arm a, seed by seed."""

    seeds: tuple[int, ...]  # the seeds both arms ran
    diffs: tuple[float, ...]  # b - a, per seed
    mean: float
    interval: tuple[float, float] | None  # 95% Student-t interval of the mean; None from one pair

    @property
    def covers_zero(self) -> bool:
        """The interval covers 0: no difference shown (which is not equality). Never true without an
        interval: one pair says nothing about noise."""
        return self.interval is not None and self.interval[0] <= 0.0 <= self.interval[1]

    def equivalence(self, margin: float, alpha: float = EQUIVALENCE_ALPHA) -> Equivalence | None:
        """TOST at ±margin (None from one pair). The margin must be fixed before the runs it judges."""
        if not margin > 0:
            raise ExperimentError(f"an equivalence margin must be positive, got {margin}")
        if len(self.diffs) < 2:
            return None
        from scipy import stats

        n = len(self.diffs)
        se = statistics.stdev(self.diffs) / math.sqrt(n)
        if se == 0.0:  # identical differences: the mean is known exactly
            p = 0.0 if abs(self.mean) < margin else 1.0
            return Equivalence(margin, alpha, p, (self.mean, self.mean))
        t = stats.t(n - 1)
        p_above = t.sf((self.mean + margin) / se)  # H0: mean <= -margin
        p_below = t.cdf((self.mean - margin) / se)  # H0: mean >= +margin
        half = t_quantile(1 - 2 * alpha, n - 1) * se
        return Equivalence(margin, alpha, float(max(p_above, p_below)), (self.mean - half, self.mean + half))

    def verdict(self, margin: float | None = None) -> str:
        """higher / lower when the 95% interval excludes 0; otherwise "interval covers 0", or with a
        `margin`, "equivalent within ±margin" when TOST shows it and "inconclusive" when it does not."""
        if self.interval is None:
            return "one seed: no interval"
        direction = None if self.covers_zero else ("higher" if self.mean > 0 else "lower")
        if margin is None:
            return direction or "interval covers 0"
        equivalent = self.equivalence(margin).equivalent
        if direction:
            return f"{direction}, by less than {margin:g}" if equivalent else direction
        return f"equivalent within ±{margin:g}" if equivalent else "inconclusive"

    def as_dict(self, margin: float | None = None) -> dict:
        """What a results JSON records of the pair; with a margin, also its TOST ("equivalence")."""
        out = {"seeds": list(self.seeds), "diffs": list(self.diffs), "mean": self.mean,
               "interval95": list(self.interval) if self.interval else None, "verdict": self.verdict(margin)}
        if margin is not None:
            tost = self.equivalence(margin)
            out["equivalence"] = tost.as_dict() if tost else None
        return out


def paired(a: dict[int, float], b: dict[int, float], confidence: float = CONFIDENCE) -> Paired:
    """The per-seed differences b - a over the seeds both arms ran, their mean and its interval."""
    seeds = tuple(sorted(a.keys() & b.keys()))
    if tuning := [s for s in seeds if s in TUNING_SEEDS]:
        raise ExperimentError(f"seeds {tuning} are tuning seeds: hyperparameters were chosen on them, so they "
                              f"cannot report a comparison; pair on seeds {REPORTED_SEEDS.start}-"
                              f"{REPORTED_SEEDS.stop - 1}")
    if not seeds:
        raise ExperimentError(f"the arms share no seed (seeds {sorted(a)} and {sorted(b)}); "
                              "run both arms with the same seeds")
    diffs = tuple(b[s] - a[s] for s in seeds)
    mean = statistics.fmean(diffs)
    if len(diffs) == 1:
        return Paired(seeds, diffs, mean, None)
    half = t_quantile(confidence, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return Paired(seeds, diffs, mean, (mean - half, mean + half))


def t_quantile(confidence: float, df: int) -> float:
    """t such that P(|T| <= t) = confidence for Student's t with `df` degrees of freedom (two-sided)."""
    from scipy import stats

    return float(stats.t.ppf(0.5 + confidence / 2, df))


def summarize(values: Iterable[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), extremes and the values themselves."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("summarize needs at least one value")
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs), "spread": max(xs) - min(xs), "n": len(xs), "values": xs}
