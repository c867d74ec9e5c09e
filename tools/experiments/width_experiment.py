"""The width re-run of keel issue 16 (docs/results/width_scaling.md): how the optimal AdamW learning rate
scales with width under standard parameterization, on an LR grid widened until it brackets every optimum
and reaches divergence (or MAX_EXTRA steps), and whether the sp_width rule with the fitted exponent
transfers the optimum to a width outside the grid (tools/experiments/width_report.py says how the numbers
are made).

Four stages; the training stages are Hydra multiruns of conf/experiment/width_sweep.yaml, one per width
(the fan-in init std sqrt(2 / 5n) changes with the width, as on the first run's page):
1. grid: widths 32, 64, 128, 256, 512 x learning rates lr_k = 1e-3 * sqrt(2)^k x seeds 1, 2, 3 into
   runs/width/grid, starting at five steps around the first run's optimum at each width:
       python pretrain/main.py -m hydra/launcher=local hydra.launcher.n_jobs=2 +experiment=width_sweep \\
           model.hidden_size=32 model.init_std=0.1118 optim.lr=0.01131,0.016,0.02263,0.032,0.04525 \\
           seed=1,2,3 hydra.sweep.dir=runs/width/grid
   then widened, one step at a time and every seed: a step below while a seed's minimum (or the seed
   mean's) is the lowest LR, a step above while it is the highest LR or while every run at the highest LR
   is still stable (sweep_report.Run.stable: completed, finite, below its starting loss), at most
   MAX_EXTRA steps either way. The stage is done when no width needs a step.
2. fit: width_report.fit over the grid into runs/width/fit.json: the exponent with a 95% bootstrap
   interval over seeds, per-seed optima, every optimum on an edge named, the sp_width anchor.
3. transfer: at width 768 on seeds 4, 5, 6 (not the fit's): optim.lr_rule=sp_width with the fitted alpha
   and with the paper's 0.42 (base width and LR from the fit), and a global-LR search at sqrt(2)^j times
   the fitted rule's LR, j = -2, -1, 1, 2 (j = 0 is the rule's own run), widened like the grid while its
   best LR is at an end (at most SEARCH_EXTRA steps). Into runs/width/transfer.
4. report: width_report.report over both stages: docs/results/width_scaling.json and its plots.

    python tools/experiments/width_experiment.py                  # every stage
    python tools/experiments/width_experiment.py --dry-run        # the next commands, nothing run
    python tools/experiments/width_experiment.py --stage report   # re-aggregate existing runs

LRs are named by their step: lr_k rounded to 4 significant digits (width_report.canonical), and runs are
matched to steps by rounding 2 log2(lr / 1e-3), so a step computed twice is one folder. A stage decides
its next multirun from the runs on disk, so a killed stage resumes where it stopped (a completed run ends
at once; a killed one starts again). --force removes a training stage's runs first.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pretrain.rundir import write_json
from tools import sweep_report
from tools.experiments import width_report
from tools.experiments import ExperimentError
from tools.experiments.cli import chosen_stages, driver_parser, guarded
from tools.experiments.stages import ROOT, TrainingStage, launch, print_commands, run_stage

PRESET = "width_sweep"
WIDTHS = (32, 64, 128, 256, 512)  # head_dim 16: 2 to 32 heads
SEEDS = (1, 2, 3)  # the grid's, which the fit uses
TRANSFER_WIDTH = 768  # 48 heads; 1.5x the widest grid width
TRANSFER_SEEDS = (4, 5, 6)  # reported seeds (seeds.REPORTED_SEEDS) that the fit never saw
BASE_LR = 1e-3  # step k = 0 of the LR grid
INITIAL_STEPS = 2  # the first grid: the first run's optimum +- 2 steps (a factor 4 in all)
MAX_EXTRA = 8  # steps added beyond the first grid per width and direction: a factor 16
SEARCH_STEPS = 2  # the transfer search: the rule's LR +- 2 steps
SEARCH_EXTRA = 2
# The first run's optima (docs/results/archive/width_scaling/sweep_report.json, seeds 1234 and 1), where
# the grid starts; 512 was not run: its prior is the fitted line (exponent -0.92) extended from 256.
PRIOR_OPT_LR = {32: 2.54e-2, 64: 9.98e-3, 128: 6.23e-3, 256: 3.52e-3}
PRIOR_EXPONENT = -0.92
RUNS = Path("runs") / "width"  # relative to ROOT, where main() runs
STAGES = ("grid", "fit", "transfer", "report")


# --- Learning rates by step ------------------------------------------------------------------------------
def step_lr(k: int, base: float = BASE_LR) -> float:
    """The LR k sqrt(2)-steps above `base`, in its canonical spelling."""
    return width_report.canonical(base * 2 ** (k / 2))


def lr_step(lr: float, base: float = BASE_LR) -> int:
    """The step of an LR named by step_lr (the rounding to 4 digits moves it far less than half a step)."""
    return round(2 * math.log2(lr / base))


def prior_step(width: int) -> int:
    prior = PRIOR_OPT_LR.get(width) or PRIOR_OPT_LR[256] * (width / 256) ** PRIOR_EXPONENT
    return lr_step(prior)


def init_std(width: int) -> float:
    """Fan-in (SP) init as on the first run's page: the litgpt/pythia small init sqrt(2 / 5n)."""
    return width_report.canonical(math.sqrt(2 / (5 * width)))


def _csv(values) -> str:
    return ",".join(f"{v:g}" for v in values)


def multirun_argv(jobs: int, width: int, lrs, seeds, folder: Path, *extra: str) -> list[str]:
    return ["pretrain/main.py", "-m", "hydra/launcher=local", f"hydra.launcher.n_jobs={jobs}", f"+experiment={PRESET}",
            f"model.hidden_size={width}", f"model.init_std={init_std(width):g}", *extra, f"optim.lr={_csv(lrs)}",
            f"seed={_csv(seeds)}", f"hydra.sweep.dir={folder}"]


# --- When to widen a grid ------------------------------------------------------------------------------
Points = dict[int, dict[int, sweep_report.Run]]  # step -> seed -> finished run


def widen(points: Points, until_divergence: bool) -> tuple[bool, bool]:
    """(down, up): does one width's grid need the step below its lowest / above its highest?

    Down while some seed's minimum, or the minimum of the seed mean, is the lowest step: the optimum may lie
    below. Up while such a minimum is the highest step, and, with `until_divergence`, while every run at the
    highest step is still stable: the grid ends only once training fails above the optimum, which also puts
    a bound on the max stable LR. Minima are over stable runs only; the seed mean over steps every seed ran
    stably."""
    lo, hi = min(points), max(points)
    curves: dict[int, dict[int, float]] = {}
    for step, runs in points.items():
        for seed, run in runs.items():
            if run.stable:
                curves.setdefault(seed, {})[step] = run.val_loss
    seeds = {seed for runs in points.values() for seed in runs}
    mean = {step: statistics.fmean(curves[s][step] for s in seeds) for step in points
            if all(step in curves.get(s, {}) for s in seeds)}
    minima = {min(c, key=c.get) for c in (*curves.values(), mean) if c}
    top_stable = all(run.stable for run in points[hi].values())
    return lo in minima, hi in minima or (until_divergence and top_stable)


@dataclass(frozen=True)
class Grid:
    """One width's LR grid: the steps it must have run (`steps`) and the ones it may never pass."""

    steps: tuple[int, ...]
    floor: int
    ceiling: int
    until_divergence: bool

    def next_steps(self, points: Points, seeds) -> list[int]:
        """The steps to run next: those of `steps` some seed has not finished; once there are none, the steps
        widen() asks for within [floor, ceiling]; [] when the grid is complete."""
        steps = sorted(set(self.steps) | set(points))
        if missing := [k for k in steps if not set(seeds) <= set(points.get(k, {}))]:
            return missing
        down, up = widen({k: points[k] for k in steps}, self.until_divergence)
        return [k for k, want in ((steps[0] - 1, down), (steps[-1] + 1, up))
                if want and self.floor <= k <= self.ceiling]


def initial_grid(width: int) -> Grid:
    c = prior_step(width)
    return Grid(tuple(range(c - INITIAL_STEPS, c + INITIAL_STEPS + 1)), c - INITIAL_STEPS - MAX_EXTRA,
                c + INITIAL_STEPS + MAX_EXTRA, until_divergence=True)


def points_of(runs: list[sweep_report.Run], step: Callable[[float], int]) -> Points:
    points: Points = {}
    for run in runs:
        points.setdefault(step(run.lr), {})[run.seed] = run
    return points


# --- The stages ----------------------------------------------------------------------------------------
def grid_argvs(jobs: int) -> list[list[str]]:
    """The grid's next multiruns, one per width that needs steps; [] when the grid is complete."""
    runs = width_report.load(RUNS / "grid")
    argvs = []
    for width in WIDTHS:
        points = points_of([r for r in runs if r.width == width], lr_step)
        if steps := initial_grid(width).next_steps(points, SEEDS):
            argvs.append(multirun_argv(jobs, width, map(step_lr, steps), SEEDS, RUNS / "grid"))
    return argvs


def require_complete_grid() -> None:
    if grid_argvs(jobs=1):
        raise ExperimentError(f"the grid below {RUNS / 'grid'} is not complete; run the grid stage first "
                              "(--stage grid)")


def fitted() -> dict:
    """The fit of the complete grid (point estimates only: the transfer needs no interval)."""
    require_complete_grid()
    return width_report.fit(width_report.load(RUNS / "grid"), n_boot=0)


def transfer_argvs(jobs: int) -> list[list[str]]:
    """The transfer's next multiruns: the two rules' runs, then the search's steps; [] when complete."""
    anchor = fitted()["anchor"]
    folder, width = RUNS / "transfer", TRANSFER_WIDTH
    runs = width_report.load(folder)
    arms = width_report.transfer_arms(runs, anchor)
    argvs = []
    rule = ["optim.lr_rule=sp_width", f"optim.base_width={anchor['base_width']}"]
    alphas = list(dict.fromkeys(a for name, a in (("fitted", anchor["alpha"]), ("paper", width_report.PAPER_ALPHA))
                                if not set(TRANSFER_SEEDS) <= {r.seed for r in arms[name]}))  # a fit of 0.42: one run
    if alphas:
        argvs.append(multirun_argv(jobs, width, [anchor["base_lr"]], TRANSFER_SEEDS, folder, *rule,
                                   f"optim.width_exponent={_csv(alphas)}"))
    centre = width_report.predicted_lr(anchor, width, anchor["alpha"])
    points = points_of(arms["search"], lambda lr: lr_step(lr, centre))
    search = Grid(tuple(range(-SEARCH_STEPS, SEARCH_STEPS + 1)), -SEARCH_STEPS - SEARCH_EXTRA,
                  SEARCH_STEPS + SEARCH_EXTRA, until_divergence=False)
    if steps := [k for k in search.next_steps(points, TRANSFER_SEEDS) if k != 0]:  # 0 is the rule's run above
        argvs.append(multirun_argv(jobs, width, [step_lr(k, centre) for k in steps], TRANSFER_SEEDS, folder))
    return argvs


def stage_training(name: str, next_argvs: Callable[[], list[list[str]]], dry: bool, force: bool,
                   overrides: tuple[str, ...] = (), concurrent: bool = False) -> None:
    """Run `next_argvs()` until it asks for nothing more: each round's runs decide the next round's;
    `overrides` (--set) go to every run."""
    folder = RUNS / name
    if force and not dry:
        shutil.rmtree(folder, ignore_errors=True)
    argvs, last = next_argvs(), None
    if not argvs:
        print(f"{name}: every run has finished and nothing needs widening; skipped (--force reruns it)")
    if dry:
        print_commands(name, TrainingStage(lambda: argvs, lambda: False, lambda: [folder]), overrides)
        if argvs:
            print(f"({name}: later rounds follow from these runs' results)")
        return
    while argvs:
        if argvs == last:  # the same runs again: they ended without a result (neither completed nor diverged)
            raise ExperimentError(f"{name}: the last round left runs unfinished; see their main.log below {folder}")
        run_stage(name, TrainingStage(lambda: argvs, lambda: False, lambda: [folder]), False, launch, overrides,
                  concurrent)
        argvs, last = next_argvs(), argvs


def stage_fit(dry: bool, n_boot: int) -> None:
    if dry:
        print(f"(fit) width_report.fit over {RUNS / 'grid'} -> {RUNS / 'fit.json'}")
        return
    require_complete_grid()
    f = width_report.fit(width_report.load(RUNS / "grid"), n_boot)
    write_json(RUNS / "fit.json", f, default=sweep_report._json_default)
    print(width_report.fit_table(f))
    print(f"wrote {RUNS / 'fit.json'}")


def stage_transfer(jobs: int, dry: bool, force: bool, overrides: tuple[str, ...] = (), concurrent: bool = False) -> None:
    if dry:
        try:
            fitted()
        except ExperimentError as e:
            print(f"transfer: {e} (alpha and the anchor come from its fit)")
            return
    stage_training("transfer", lambda: transfer_argvs(jobs), dry, force, overrides, concurrent)


def stage_report(dry: bool, out: Path, name: str, jobs: int, n_boot: int, overrides: tuple[str, ...] = ()) -> None:
    roots = [RUNS / "grid", RUNS / "transfer"]
    argv = ["tools/experiments/width_report.py", *map(str, roots), "--out", str(out), "--name", name]
    print("python " + " ".join(argv))
    if not dry:
        # every multirun is in the runs' own provenance (their command lines); this is what launched them
        driver = f"python tools/experiments/width_experiment.py --jobs {jobs}" + \
            (f" --set {' '.join(overrides)}" if overrides else "")
        width_report.report(roots[0], roots[1] if roots[1].exists() else None, out, name, n_boot, [driver])


def main(argv: list[str] | None = None) -> int:
    p = driver_parser(__doc__, STAGES, report="width_scaling")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap replicates of the exponent's interval")
    args = p.parse_args(argv)

    def run() -> None:
        os.chdir(ROOT)
        for stage in chosen_stages(args, STAGES):
            if stage == "grid":
                stage_training("grid", lambda: grid_argvs(args.jobs), args.dry_run, args.force, args.overrides,
                               args.concurrent)
            elif stage == "fit":
                stage_fit(args.dry_run, args.bootstrap)
            elif stage == "transfer":
                stage_transfer(args.jobs, args.dry_run, args.force, args.overrides, args.concurrent)
            else:
                stage_report(args.dry_run, args.out, args.name, args.jobs, args.bootstrap, args.overrides)

    return guarded(run)


if __name__ == "__main__":
    raise SystemExit(main())
