"""Tuning apart from reporting: hyperparameters are chosen on TUNING_SEEDS (`select`, which refuses any
other seed) and arms are compared on REPORTED_SEEDS (`stats.paired`, which refuses a tuning seed), so no
reported difference comes from the seeds a choice was made on."""

from __future__ import annotations

import statistics
from typing import Callable, Hashable, Iterable

from tools.experiments import ExperimentError
from tools.experiments.runs import Run, per_seed

TUNING_SEEDS = range(100, 200)  # τ, β/γ, learning rates, warmup lengths are chosen on these
REPORTED_SEEDS = range(1, 100)  # arms are compared on these


def tuning_runs(runs: Iterable[Run]) -> list[Run]:
    return [run for run in runs if run.seed in TUNING_SEEDS]


def reported_runs(runs: Iterable[Run]) -> list[Run]:
    return [run for run in runs if run.seed in REPORTED_SEEDS]


def select(candidates: dict[Hashable, dict[int, Run]], value: Callable[[Run], float | None]) -> Hashable:
    """The candidate (arm -> seed -> run) with the lowest mean `value` over its runs. Only tuning seeds may
    decide: a run on any other seed is an error, since its arm would then be chosen on the seeds it is
    reported on."""
    means = {}
    for name, by_seed in candidates.items():
        if stray := sorted(set(by_seed) - set(TUNING_SEEDS)):
            raise ExperimentError(f"candidate {name!r} ran seeds {stray}, outside the tuning seeds "
                                  f"{TUNING_SEEDS.start}-{TUNING_SEEDS.stop - 1}; choose hyperparameters on tuning "
                                  "seeds only")
        if values := list(per_seed(by_seed, value).values()):
            means[name] = statistics.fmean(values)
    if not means:
        raise ExperimentError(f"no candidate among {list(candidates)} has a value to choose by")
    return min(means, key=means.get)
