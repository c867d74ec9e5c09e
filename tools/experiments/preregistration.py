"""The designs registered before any of their runs: keel issue 38's (docs/preregistration.md) and issue
34's spike recovery (`SPIKES`, docs/results/spikes.md): the equivalence margins, seeds, grids and horizons the
drivers run and the reports judge by, in one place.

`ATTENTION_LONG` (GTA against GQA for equivalence, MLA with and without QK-norm, GLA against the better MLA)
and `WARMUP_LONG` (warmup-free at 10x the horizon) are read by tools/experiments/attention_experiment.py
and warmup_free_experiment.py (what to run) and by their reports (the TOST margins, which pairs claim
equivalence). tests/tools/test_preregistration.py checks that the page states exactly these values.
`SPIKES` and its second high-rate design `SPIKES_RAMP` (registered after SPIKES's runs found no rate that
spikes once the detector judges) are read by spike_experiment.py and spike_report.py, and
tests/tools/test_spike_experiment.py checks both against docs/results/spikes.md. Once
a design's runs have started its values are fixed: a change is a new design under a new name, on a page
of its own.

A choice on the edge of its grid is extended (`extension`): the grid's own geometric step continued
beyond that edge, on the tuning seeds, until the choice lies inside, at most MAX_EXTENSIONS times per
knob; a choice still on an edge after that (or at a bound no value may pass) is reported as such.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Hashable

from tools.experiments.runs import Run, per_seed
from tools.experiments.seeds import select
from tools.experiments.stats import CONFIDENCE, EQUIVALENCE_ALPHA

MAX_EXTENSIONS = 2  # per knob and arm: how far a grid may grow past its registered edge


@dataclass(frozen=True)
class AttentionDesign:
    """Per arm a rate chosen on `tuning_seeds` from `lrs` (extended at an edge), then every arm at its rate on
    `seeds`, paired with GQA; GTA - GQA and GLA - the better MLA are also tested for equivalence at ±margin
    (TOST) when a margin is registered."""

    name: str
    preset: str  # conf/experiment/PRESET.yaml
    arms: tuple[str, ...]  # conf/attention_d128/ARM.yaml
    lrs: tuple[float, ...]  # the tuning grid
    tuning_seeds: tuple[int, ...]  # in seeds.TUNING_SEEDS
    seeds: tuple[int, ...]  # in seeds.REPORTED_SEEDS
    steps: int  # the preset's trainer.max_steps (a test checks it)
    margin: float | None = None  # nats; None: no equivalence claim was registered (the first runs)


@dataclass(frozen=True)
class WarmupDesign:
    """Per method, on `tuning_seeds`: the warmup length (AdamW + warmup) or τ (the bound) at lr `tune_at`,
    then the rate at that length or τ (AdamW without warmup: its rate alone), each grid extended at an
    edge; then every method at its choice on `seeds`, paired with AdamW + warmup and judged at ±margin."""

    name: str
    presets: tuple[str, str, str]  # AdamW without warmup, with warmup, the spectral bound without warmup
    tune_at: float
    warmups: tuple[int, ...]  # steps of linear warmup
    taus: tuple[float, ...]  # the bound's relative step
    lrs: tuple[float, ...]  # the rate grid of AdamW + warmup and of the bound, at the chosen length and τ
    adamw_lrs: tuple[float, ...]  # the rate grid of AdamW without warmup
    tuning_seeds: tuple[int, ...]
    seeds: tuple[int, ...]
    steps: int
    margin: float


@dataclass(frozen=True)
class SpikeDesign:
    """Three policies (`arms`, one preset each: log only, skip, rewind) on three fault designs, paired by seed on
    one clean validation set: rows of random ids planted where each seed reads them at steps [plant_start,
    plant_start + plant_steps); a rate high enough that plain AdamW spikes (the lowest of `lrs` at which the log
    arm flags a loss spike on every tuning seed); no fault (false fires). Skip and rewind are each judged against
    log only by their paired final validation loss: lower or higher when the 95% interval excludes 0, the same
    within ±margin only by TOST."""

    name: str
    arms: tuple[str, str, str]  # conf/experiment/ARM.yaml: log only ("none"), skip, rewind
    steps: int  # the presets' trainer.max_steps (a test checks it)
    base_lr: float  # the presets' optim.lr: the planted and no-fault designs train at it
    plant_start: int  # the first step (1-based) that reads planted rows
    plant_steps: int  # how many steps read them
    plant_kind: str  # tools/plant_spikes.py --kind
    lrs: tuple[float, ...]  # the high-rate grid, tried on the tuning seeds with the log arm
    tuning_seeds: tuple[int, ...]
    seeds: tuple[int, ...]
    margin: float  # nats: "no cost" on the no-fault runs, by TOST


@dataclass(frozen=True)
class SpikeRampDesign:
    """SPIKES's high-rate fault alone, its peak where the detector judges it: `warmup_steps` of linear warmup to
    the peak rate, then cosine over the rest of `steps`, with SPIKES's presets (model, data, validation set, spike
    rule, policies). The rate is the lowest of `lrs` at which the log arm flags a loss spike (or a non-finite loss)
    on every tuning seed; none: the design is not run. Then the three policies at that rate on `seeds`, skip and
    rewind each paired with log only: the fault is saved when one of them ends lower (95% interval below 0). That
    they cost nothing without a fault is SPIKES's no-fault result (TOST at ±margin), not run again."""

    name: str
    arms: tuple[str, str, str]  # conf/experiment/ARM.yaml, as SPIKES: log only ("none"), skip, rewind
    steps: int  # the presets' trainer.max_steps (a test checks it)
    warmup_steps: int  # lr.warmup_steps: past the detector's min_count, so the peak rate comes once it judges
    lrs: tuple[float, ...]  # the peak-rate grid, tried on the tuning seeds with the log arm
    tuning_seeds: tuple[int, ...]
    seeds: tuple[int, ...]
    margin: float  # nats: the TOST margin the paired differences are also tested at, as SPIKES's


ATTENTION_LONG = AttentionDesign(
    name="long", preset="attention_d128_long", arms=("gqa", "gta", "gla", "mla", "mla_plain"),
    lrs=(5e-4, 1e-3, 2e-3), tuning_seeds=(100, 101), seeds=tuple(range(1, 16)), steps=480, margin=0.03)

WARMUP_LONG = WarmupDesign(
    name="long", presets=("warmup_free_long_adamw", "warmup_free_long_adamw_warmup", "warmup_free_long_spectral"),
    tune_at=1e-2, warmups=(30, 100, 300, 1000), taus=(0.02, 0.05, 0.1, 0.2), lrs=(3e-3, 1e-2, 3e-2),
    adamw_lrs=(1e-3, 3e-3, 1e-2), tuning_seeds=(100, 101), seeds=tuple(range(1, 11)), steps=3000, margin=0.02)

SPIKES = SpikeDesign(
    name="spikes", arms=("spikes_none", "spikes_skip", "spikes_rewind"), steps=240, base_lr=3e-3, plant_start=140,
    plant_steps=10, plant_kind="random", lrs=(1e-2, 3e-2, 1e-1), tuning_seeds=(100, 101), seeds=tuple(range(1, 7)),
    margin=0.02)

SPIKES_RAMP = SpikeRampDesign(
    name="spikes_ramp", arms=SPIKES.arms, steps=SPIKES.steps, warmup_steps=100, lrs=(5e-1, 1.0, 2.0),
    tuning_seeds=SPIKES.tuning_seeds, seeds=SPIKES.seeds, margin=SPIKES.margin)

ALPHA = EQUIVALENCE_ALPHA  # each one-sided test of TOST: the 90% interval must lie inside ±margin
INTERVAL = CONFIDENCE  # paired differences: 95% Student-t intervals; "higher"/"lower" when 0 lies outside


def at_edge(grid, chosen) -> bool:
    """The choice is the lowest or highest value of a grid of more than one value: a value beyond it could
    be better."""
    values = sorted(grid)
    return chosen is not None and len(values) > 1 and chosen in (values[0], values[-1])


def extension(grid, chosen, low: float = 0.0, high: float = math.inf, integer: bool = False):
    """The next value past the edge `chosen` sits on, the grid's step at that edge continued (x2 after 1e-3,
    2e-3; 1000 -> 3333 after 300, 1000), kept within (low, high]; None when the choice is inside the grid or
    the next value would not pass the bound."""
    values = sorted(grid)
    if not at_edge(values, chosen):
        return None
    edge, neighbour = (values[-1], values[-2]) if chosen == values[-1] else (values[0], values[1])
    nxt = min(max(edge * edge / neighbour, low), high)
    nxt = round(nxt) if integer else float(f"{nxt:.3g}")
    beyond = nxt > edge if chosen == values[-1] else nxt < edge
    return nxt if beyond and low < nxt <= high else None


def tuned_grid(grid, runs_at: Callable[[Hashable], dict[int, Run]], seeds, score: Callable[[Run], float | None],
               **bounds) -> tuple[tuple, Hashable | None, bool]:
    """(grid, choice, settled): the registered `grid` and, round by round, the value past the edge that a
    finished round chose (`extension` with `bounds`, at most MAX_EXTENSIONS); the choice (seeds.select by
    `score` over `runs_at(value)`, seed -> run on the tuning `seeds`; None while a round is unfinished or when
    no run has a score) and whether the grid is settled: every run of it finished and no extension left."""
    grid, registered = sorted(grid), len(grid)
    while True:
        candidates = {value: runs_at(value) for value in grid}
        if any(not set(seeds) <= set(c) for c in candidates.values()):
            return tuple(grid), None, False  # this round's runs have not all finished
        scored = {value: c for value, c in candidates.items() if per_seed(c, score)}
        chosen = select(scored, score) if scored else None
        nxt = extension(grid, chosen, **bounds) if len(grid) < registered + MAX_EXTENSIONS else None
        if nxt is None:
            return tuple(grid), chosen, True
        grid = sorted([*grid, nxt])
