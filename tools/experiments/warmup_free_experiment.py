"""The warmup-free experiment (docs/results/warmup_free.md): does AdamW need warmup at high learning rates,
and does the spectral update bound (optim/rules/spectral_bound.py) without warmup replace it?

Three stages; each training stage is Hydra multiruns of the warmup_free presets, --jobs runs at once, one
folder per preset and overrides below the stage's folder (the presets' hydra.sweep.subdir):
1. tune: on tuning seed 100, AdamW's warmup length (WARMUPS) and the bound's τ (TAUS) at lr --tune-at, and
   AdamW without and with 60 steps of warmup at PROBE_TUNING_LRS (where it breaks), into
   runs/warmup_free/tuning:
       python pretrain/main.py -m hydra/launcher=local hydra.launcher.n_jobs=2 +experiment=warmup_free_adamw_warmup \\
           lr.warmup_steps=0,30,60,120 optim.lr=0.01 seed=100 hydra.sweep.dir=runs/warmup_free/tuning ...
2. reported: on seeds 1, 2, 3, AdamW without warmup and with the chosen length, and the bound at the chosen
   τ, at every rate of LRS, and AdamW without warmup at PROBE_LRS, into runs/warmup_free/reported. The length
   and τ are warmup_free_report.choose's on the tuning runs, or --warmup and --tau: a re-run at choices made
   before (tools/gpu_check.sh section 41 takes the CPU's, with --lrs and --seeds).
3. report: tools/experiments/warmup_free_report.py over both stages' runs: docs/results/warmup_free.json and .png.

    python tools/experiments/warmup_free_experiment.py                  # every stage
    python tools/experiments/warmup_free_experiment.py --dry-run        # print the commands only
    python tools/experiments/warmup_free_experiment.py --stage report   # re-aggregate existing runs

`--design long` runs the design registered for keel issue 38 before its runs (preregistration.WARMUP_LONG,
docs/preregistration.md): conf/experiment/warmup_free_long_*.yaml (3000 steps), into
runs/warmup_free_long, in four stages: tune (on the tuning seeds, AdamW + warmup's length and the bound's τ
at lr tune_at, AdamW without warmup over its rates), tune-lr (each at its chosen length or τ over the rate
grid), reported (each method at its own choice on the reported seeds) and report (`warmup_free_report.py
--design long`: TOST at the registered margin). A choice on a grid's edge extends that grid
(preregistration.tuned_grid): the stage plans again from its finished runs and runs the next value past
the edge, at most MAX_EXTENSIONS times; the report names any choice still on an edge.

    python tools/experiments/warmup_free_experiment.py --design long --jobs 2

Every run of the short design also gets COMMON (evaluation every 100 steps, no progress bar or TensorBoard)
unless --set names the key. A training stage whose runs have all finished (completed or diverged) is skipped
(--force reruns it from scratch); otherwise it runs whole: a completed run ends at once, a killed one starts
again (the long design's resume from their last checkpoint, every 250 steps).
"""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from tools.experiments import ExperimentError, warmup_free_report
from tools.experiments.cli import chosen_stages, driver_parser, guarded
from tools.experiments.preregistration import MAX_EXTENSIONS, WARMUP_LONG, WarmupDesign
from tools.experiments.runs import NoRuns, Run, load_runs
from tools.experiments.seeds import REPORTED_SEEDS
from tools.experiments.stages import ROOT, TrainingStage, launch, print_commands, run_rounds, run_stage, sweep_values

ADAMW, SPECTRAL = "warmup_free_adamw_warmup", "warmup_free_spectral"  # presets: warmup_steps and tau are named
WARMUPS = (0, 30, 60, 120)  # tuning candidates, steps of linear warmup (of 300)
TAUS = (0.02, 0.05, 0.1, 0.2)  # tuning candidates, the bound's relative step
PROBE_TUNING_LRS = (3e-2, 1e-1)  # on the tuning seed: where AdamW without warmup starts to break
PROBE_WARMUP = 60
LRS = (3e-3, 1e-2, 3e-2, 1e-1)  # the reported grid, every method
PROBE_LRS = (1e-3,)  # AdamW without warmup alone, below the grid: its best rate must lie inside
TUNING_SEED = 100
SEEDS = (1, 2, 3)
COMMON = ("trainer.progress=false", "logging.tensorboard=false", "trainer.eval_interval=100")
RUNS = Path("runs") / "warmup_free"  # relative to ROOT, where main() runs
STAGES = ("tune", "tune-lr", "reported", "report")  # tune-lr: the long design's


@dataclass(frozen=True)
class Sweep:
    """One multirun: `preset` over `key` (its warmup length or τ) x rates x seeds."""

    preset: str
    key: str
    values: tuple[float, ...]
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]

    def argv(self, jobs: int, folder: Path, common: tuple[str, ...] = COMMON) -> list[str]:
        return ["pretrain/main.py", "-m", "hydra/launcher=local", f"hydra.launcher.n_jobs={jobs}",
                f"+experiment={self.preset}", f"{self.key}={sweep_values(self.values)}",
                f"optim.lr={sweep_values(self.lrs)}", f"seed={sweep_values(self.seeds)}", f"hydra.sweep.dir={folder}",
                *common]

    def points(self) -> set[tuple]:
        return {(self.preset, v, lr, seed) for v in self.values for lr in self.lrs for seed in self.seeds}

    def point(self, run: Run) -> tuple:
        """(preset, value of `key`, lr, seed) of a run, as `points` names the runs this sweep starts."""
        section, field = self.key.rsplit(".", 1)
        value = run.config
        for part in section.split("."):
            value = value[part]
        return run.config["name"], value[field], run.config["optim"]["lr"], run.seed


def tune_sweeps(tune_at: float) -> list[Sweep]:
    seed = (TUNING_SEED,)
    return [Sweep(ADAMW, "lr.warmup_steps", WARMUPS, (tune_at,), seed),
            Sweep(SPECTRAL, "optim.spectral.tau", TAUS, (tune_at,), seed),
            Sweep(ADAMW, "lr.warmup_steps", (0, PROBE_WARMUP), PROBE_TUNING_LRS, seed)]


def reported_sweeps(warmup: int, tau: float, lrs: tuple[float, ...], seeds: tuple[int, ...]) -> list[Sweep]:
    """AdamW without and with warmup and the bound on `lrs`; the probe below the grid only with the page's grid."""
    sweeps = [Sweep(ADAMW, "lr.warmup_steps", (0, warmup), lrs, seeds),
              Sweep(SPECTRAL, "optim.spectral.tau", (tau,), lrs, seeds)]
    if lrs == LRS:
        sweeps.append(Sweep(ADAMW, "lr.warmup_steps", (0,), PROBE_LRS, seeds))
    return sweeps


# --- Which runs exist ---------------------------------------------------------------------------------
def finished(folder: Path) -> list[Run]:
    try:
        return load_runs(folder, statuses=warmup_free_report.FINISHED)
    except NoRuns:
        return []


def done(folder: Path, sweeps: list[Sweep]) -> bool:
    """Every run of `sweeps` finished (completed or diverged) below `folder`."""
    runs = finished(folder)
    return all(sweep.points() <= {sweep.point(r) for r in runs if r.config["name"] == sweep.preset}
               for sweep in sweeps)


def chosen(tune_at: float) -> tuple[int, float]:
    """The warmup length and τ warmup_free_report.choose picks from the finished tuning runs."""
    folder = RUNS / "tuning"
    if not done(folder, tune_sweeps(tune_at)):
        raise ExperimentError(f"the tuning runs below {folder} have not all finished (the warmup length and τ are "
                              "chosen from them); run --stage tune first, or give --warmup and --tau")
    runs = finished(folder)
    choice = warmup_free_report.choose(runs, tune_at)
    configs = {warmup_free_report.method(r.config): r.config for r in runs}
    return configs[choice["warmup"]]["lr"]["warmup_steps"], configs[choice["spectral"]]["optim"]["spectral"]["tau"]


# --- The stages ---------------------------------------------------------------------------------------
def stage_training(name: str, args: argparse.Namespace) -> None:
    folder = RUNS / ("tuning" if name == "tune" else name)
    if name == "tune":
        sweeps = tune_sweeps(args.tune_at)
    else:
        try:
            warmup, tau = (args.warmup, args.tau) if args.warmup is not None else chosen(args.tune_at)
        except ExperimentError as e:
            if not args.dry_run:
                raise
            print(f"reported: {e}")
            return
        sweeps = reported_sweeps(warmup, tau, args.lrs, args.seeds)
    # COMMON less the keys --set names: a run folder is named by its overrides, and a name has 255 bytes at most
    named = {o.split("=", 1)[0] for o in args.overrides}
    common = tuple(c for c in COMMON if c.split("=", 1)[0] not in named)
    stage = TrainingStage(lambda: [s.argv(args.jobs, folder, common) for s in sweeps], lambda: done(folder, sweeps),
                          lambda: [folder])
    if args.dry_run:
        print_commands(name, stage, args.overrides)
        return
    run_stage(name, stage, args.force, launch, args.overrides, args.concurrent)


def stage_report(args: argparse.Namespace) -> None:
    roots = [RUNS / "reported", RUNS / "tuning"]
    argv = ["tools/experiments/warmup_free_report.py", *map(str, roots), "--out", str(args.out), "--name", args.name,
            "--tune-at", f"{args.tune_at:g}"]
    print("python " + " ".join(argv))
    if not args.dry_run:
        warmup_free_report.report([r for r in roots if r.exists()], args.out, args.name, args.tune_at)


# --- The long design (preregistration.WARMUP_LONG) -------------------------------------------------------
LONG_RUNS = Path("runs") / "warmup_free_long"  # relative to ROOT
LONG_COMMON = ("trainer.progress=false", "logging.tensorboard=false")
KEYS = {warmup_free_report.ADAMW: "lr.warmup_steps", warmup_free_report.WARMUP: "lr.warmup_steps",
        warmup_free_report.SPECTRAL: "optim.spectral.tau"}


def long_sweeps(design: WarmupDesign, stage: str, choice: dict[str, dict]) -> list[Sweep]:
    """The multiruns of a stage of the long design, from the choices the finished runs make so far: tune
    (the length and τ grids at tune_at, AdamW without warmup's rate grid), tune-lr (each rate grid at the
    chosen length or τ) or reported (each method at its choice, on the reported seeds)."""
    presets = dict(zip((warmup_free_report.ADAMW, warmup_free_report.WARMUP, warmup_free_report.SPECTRAL),
                       design.presets))
    seeds = design.tuning_seeds
    if stage == "tune":
        c = choice[warmup_free_report.ADAMW]
        return [Sweep(presets[warmup_free_report.ADAMW], KEYS[warmup_free_report.ADAMW], (0,), tuple(c["lrs"]), seeds),
                *(Sweep(presets[name], KEYS[name], tuple(choice[name]["values"]), (design.tune_at,), seeds)
                  for name in (warmup_free_report.WARMUP, warmup_free_report.SPECTRAL))]
    if stage == "tune-lr":
        return [Sweep(presets[name], KEYS[name], (choice[name]["value"],), tuple(choice[name]["lrs"]), seeds)
                for name in (warmup_free_report.WARMUP, warmup_free_report.SPECTRAL)]
    return [Sweep(presets[name], KEYS[name], (c["value"] or 0,), (c["lr"],), design.seeds)
            for name, c in choice.items()]


def long_choice(design: WarmupDesign, stage: str) -> dict[str, dict]:
    """warmup_free_report.choose_long on the finished tuning runs, refused (one line) when the stage needs a
    choice that is not made yet."""
    choice = warmup_free_report.choose_long(finished(LONG_RUNS / "tuning"), design)
    needs = {"tune": (), "tune-lr": ("value",), "reported": ("value", "lr")}[stage]
    names = [warmup_free_report.WARMUP, warmup_free_report.SPECTRAL] if stage == "tune-lr" else list(choice)
    if stage == "tune-lr":
        unsettled = [n for n in names if choice[n]["value"] is None]
    else:
        unsettled = [n for n in names if needs and not choice[n]["settled"]]
    if unsettled:
        earlier = "tune" if stage == "tune-lr" else "tune and tune-lr"
        raise ExperimentError(f"{stage}: the choice of {', '.join(unsettled)} is not made yet (its tuning runs below "
                              f"{LONG_RUNS / 'tuning'} have not all finished); run --stage {earlier} first")
    return choice


def stage_long(name: str, args: argparse.Namespace, design: WarmupDesign = WARMUP_LONG) -> None:
    folder = LONG_RUNS / ("reported" if name == "reported" else "tuning")
    if args.force and name == "tune-lr":  # its runs share the tuning folder with tune's, and depend on them
        raise ExperimentError("--force --stage tune-lr would remove the tune stage's runs too; rerun both: "
                              "--force --stage tune tune-lr")
    if args.force and not args.dry_run:
        shutil.rmtree(folder, ignore_errors=True)
    named = {o.split("=", 1)[0] for o in args.overrides}
    common = tuple(c for c in LONG_COMMON if c.split("=", 1)[0] not in named)

    def plan() -> TrainingStage:
        sweeps = long_sweeps(design, name, long_choice(design, name))
        pending = [s for s in sweeps if not done(folder, [s])] or sweeps
        return TrainingStage(lambda: [s.argv(args.jobs, folder, common) for s in pending],
                             lambda: done(folder, sweeps), lambda: [folder])

    try:
        run_rounds(name, plan, launch, args.overrides, args.concurrent, args.dry_run,
                   then="" if name == "reported" else f"the value past a grid's edge that a finished round chose, "
                                                      f"at most {MAX_EXTENSIONS} per grid")
    except ExperimentError as e:
        if not args.dry_run:
            raise
        print(e)


def stage_long_report(args: argparse.Namespace) -> None:
    roots = [LONG_RUNS / "reported", LONG_RUNS / "tuning"]
    name = args.name if args.name != "warmup_free" else "warmup_free_long"
    argv = ["tools/experiments/warmup_free_report.py", *map(str, roots), "--out", str(args.out), "--name", name,
            "--design", "long"]
    print("python " + " ".join(argv))
    if not args.dry_run:
        warmup_free_report.report_long([r for r in roots if r.exists()], args.out, name)


def main(argv: list[str] | None = None) -> int:
    p = driver_parser(__doc__, STAGES, report="warmup_free")
    p.add_argument("--tune-at", type=float, default=1e-2, help="the rate at which warmup length and τ are chosen")
    p.add_argument("--warmup", type=int, help="AdamW's warmup length on the reported seeds (with --tau: not chosen "
                                              "from the tuning runs)")
    p.add_argument("--tau", type=float, help="the bound's τ on the reported seeds (with --warmup)")
    p.add_argument("--lrs", type=float, nargs="+", default=LRS,
                   help=f"the reported rates (the probe at {sweep_values(PROBE_LRS)} runs with the default only)")
    p.add_argument("--seeds", type=int, nargs="+", default=SEEDS, help="the reported seeds")
    p.add_argument("--design", choices=("short", "long"), default="short",
                   help="short: the first runs (warmup_free.md); long: the design registered for issue 38 (its "
                        "grids and seeds: --tune-at, --warmup, --tau, --lrs and --seeds do not apply)")
    args = p.parse_args(argv)
    if (args.warmup is None) != (args.tau is None):
        p.error("--warmup and --tau go together: both choices made before, or both from the tuning runs")
    if stray := [s for s in args.seeds if s not in REPORTED_SEEDS]:
        p.error(f"--seeds {stray} are not reported seeds ({REPORTED_SEEDS.start}-{REPORTED_SEEDS.stop - 1})")
    args.lrs, args.seeds = tuple(args.lrs), tuple(args.seeds)

    def run() -> None:
        os.chdir(ROOT)
        for stage in chosen_stages(args, STAGES):
            if args.design == "long":
                stage_long_report(args) if stage == "report" else stage_long(stage, args)
            elif stage == "report":
                stage_report(args)
            elif stage != "tune-lr":  # the short design chooses no rate
                stage_training(stage, args)

    return guarded(run)


if __name__ == "__main__":
    raise SystemExit(main())
