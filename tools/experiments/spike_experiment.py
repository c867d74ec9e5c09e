"""The spike-recovery experiment (docs/results/spikes.md, registered as preregistration.SPIKES): does skipping a
spiking step, or rewinding past the data that caused it, save a run that a fault would spoil, and what does it
cost?

Four stages, each skipped when its outputs exist (--force redoes it); a training stage is Hydra multiruns of the
presets spikes_none (log only), spikes_skip and spikes_rewind, --jobs runs at once, below runs/spikes:
1. plant: one copy of the clean packed training set per reported seed, with rows of random ids where that seed
   reads them at the registered steps (tools/plant_spikes.py), into runs/spikes/data/seedN:
       python tools/plant_spikes.py --data CLEAN_TRAIN --output runs/spikes/data/seed1 --seed 1 \\
           --global-batch 16 --start 140 --steps 10 --kind random
2. tune: the log arm over the high-rate grid on the tuning seeds, into runs/spikes/tuning; the rate is the lowest
   at which it flagged a loss spike on every tuning seed (spike_report.choose_lr).
3. runs: every policy on every reported seed, three fault designs: on the planted copy (data.path, with the clean
   validation set as data.val_path), at the chosen rate, and without a fault, into runs/spikes/planted,
   runs/spikes/high_lr and runs/spikes/clean.
4. report: tools/experiments/spike_report.py over all four folders: docs/results/spikes.json and .png.

    python tools/experiments/spike_experiment.py                  # every stage
    python tools/experiments/spike_experiment.py --dry-run        # print the commands only
    python tools/experiments/spike_experiment.py --stage report   # re-aggregate existing runs

--design spikes_ramp runs the second high-rate design (preregistration.SPIKES_RAMP) below runs/spikes_ramp: the
same presets with lr.warmup_steps, so the peak rate comes once the detector judges; its stages are tune (the peak
rate, as above), runs (the three policies at that rate on the reported seeds, into runs/spikes_ramp/high_lr; no
planted copies, no no-fault runs: SPIKES measured those) and report (docs/results/spikes_ramp.json and .png).

    python tools/experiments/spike_experiment.py --design spikes_ramp --dry-run

A run stopped midway resumes from its last checkpoint (every 20 steps) when its stage is run again; a finished
run ends at once. The clean packed sets are the presets' (the stdlib corpus at 128-token rows, built into the
cache on first use): --set changes them as it changes every training run.
"""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from tools.experiments import ExperimentError, spike_report
from tools.experiments.cli import chosen_stages, driver_parser, guarded
from tools.experiments.preregistration import SPIKES, SpikeDesign
from tools.experiments.runs import NoRuns, load_runs
from tools.experiments.spike_report import CLEAN, DESIGNS, HIGH_LR, PLANTED, Design, design_warmup, faults
from tools.experiments.stages import ROOT, TrainingStage, launch, print_commands, run_stage, sweep_values

RUNS = Path("runs")  # relative to ROOT, where main() runs: each design's runs below RUNS / design.name
STAGES = ("plant", "tune", "runs", "report")
FOLDERS = {PLANTED: "planted", HIGH_LR: "high_lr", CLEAN: "clean"}


@dataclass(frozen=True)
class Data:
    """The clean packed sets every run reads (the presets' cache, with --set), and the global batch planting uses."""

    train: str
    val: str
    global_batch: int


def clean_data(overrides: tuple[str, ...], build: bool) -> Data:
    """The presets' clean training and validation sets; `build` packs them into the cache when missing (a dry
    run names them only when the cached tokenizer exists, which fixes their paths)."""
    from data.prepare import ensure_packed, ensure_tokenizer, packed_prefixes, tokenizer_path
    from data.tokenizer import load_tokenizer
    from pretrain.config import compose_config

    cfg = compose_config([f"+experiment={SPIKES.arms[0]}", *overrides])
    if cfg.data.path or cfg.data.sources:
        raise ExperimentError("--set names data.path or data.sources: the experiment plants its faults in the presets' "
                              "clean corpus and scores its clean validation set; leave them unset")
    batch = cfg.trainer.global_batch_size
    if build:
        train, val = ensure_packed(cfg.data, ensure_tokenizer(cfg.data))
    elif tokenizer_path(cfg.data).exists():
        train, val = packed_prefixes(cfg.data, load_tokenizer(tokenizer_path(cfg.data)))
    else:
        train, val = "CLEAN_TRAIN", "CLEAN_VAL"  # named once the stdlib tokenizer is trained (the first run)
    return Data(str(train), str(val), batch)


def runs_of(design: Design) -> Path:
    return RUNS / design.name


def planted_copy(seed: int) -> Path:
    return runs_of(SPIKES) / "data" / f"seed{seed}"


def stages_of(design: Design) -> tuple[str, ...]:
    """A design that plants no rows has no plant stage."""
    return STAGES if PLANTED in faults(design) else tuple(s for s in STAGES if s != "plant")


def plant_argv(data: Data, seed: int, design: SpikeDesign = SPIKES) -> list[str]:
    return ["tools/plant_spikes.py", "--data", data.train, "--output", str(planted_copy(seed)), "--seed", str(seed),
            "--global-batch", str(data.global_batch), "--start", str(design.plant_start), "--steps",
            str(design.plant_steps), "--kind", design.plant_kind]


def sweep_argv(jobs: int, folder: Path, seeds, design: Design = SPIKES, arms=None, extra=()) -> list[str]:
    """One multirun: the policies' presets (`arms`, default all) x `seeds`, with the design's warmup (the ramp's;
    none for SPIKES, as the presets) and `extra` overrides."""
    ramp = [f"lr.warmup_steps={w}"] if (w := design_warmup(design)) else []
    return ["pretrain/main.py", "-m", "hydra/launcher=local", f"hydra.launcher.n_jobs={jobs}",
            f"+experiment={','.join(arms or design.arms)}", f"seed={','.join(map(str, seeds))}", *ramp, *extra,
            f"hydra.sweep.dir={folder}"]


# --- Which runs exist ---------------------------------------------------------------------------------
def finished(folder: Path) -> list[dict]:
    """The outcomes (spike_report.outcome) of the finished runs below `folder`."""
    try:
        return [spike_report.outcome(r) for r in load_runs(folder, statuses=spike_report.FINISHED)]
    except NoRuns:
        return []


def done(folder: Path, points: set[tuple]) -> bool:
    """Every (preset, lr, seed) of `points` has a finished run below `folder`."""
    have = {(o["preset"], o["lr"], o["seed"]) for o in finished(folder)}
    return points <= have


def points(seeds, lrs, design: Design = SPIKES, arms=None) -> set[tuple]:
    return {(arm, lr, seed) for arm in arms or design.arms for lr in lrs for seed in seeds}


def chosen_lr(design: Design = SPIKES) -> float | None:
    """The high rate the finished tuning runs chose (None: no rate of the grid spiked on every tuning seed)."""
    folder = runs_of(design) / "tuning"
    choice = spike_report.choose_lr(finished(folder), design)
    if not choice["settled"]:
        raise ExperimentError(f"the tuning runs below {folder} have not all finished (the high rate is "
                              "chosen from them); run --stage tune first")
    return choice["chosen"]


# --- The stages ---------------------------------------------------------------------------------------
def stage_plant(args: argparse.Namespace, design: SpikeDesign = SPIKES) -> TrainingStage:
    data = clean_data(tuple(args.overrides), build=not args.dry_run)
    if not args.dry_run:
        (runs_of(SPIKES) / "data").mkdir(parents=True, exist_ok=True)
    missing = lambda: [s for s in design.seeds if not Path(f"{planted_copy(s)}.json").exists()]  # noqa: E731
    return TrainingStage(lambda: [plant_argv(data, s, design) for s in missing()], lambda: not missing(),
                         lambda: [runs_of(SPIKES) / "data"])


def stage_tune(args: argparse.Namespace, design: Design = SPIKES) -> TrainingStage:
    folder, arm = runs_of(design) / "tuning", design.arms[:1]
    argv = sweep_argv(args.jobs, folder, design.tuning_seeds, design, arm, [f"optim.lr={sweep_values(design.lrs)}"])
    return TrainingStage(lambda: [argv], lambda: done(folder, points(design.tuning_seeds, design.lrs, design, arm)),
                         lambda: [folder])


def stage_runs(args: argparse.Namespace, design: Design = SPIKES) -> TrainingStage:
    """The design's faults, one multirun each: no fault, the chosen rate (when one spiked) and the planted copies
    (one per seed: each seed reads its own)."""
    shown = faults(design)
    folders = {f: runs_of(design) / FOLDERS[f] for f in shown}
    data = clean_data(tuple(args.overrides), build=False) if PLANTED in shown else None

    def plan() -> list[tuple[list[str], Path, set]]:
        missing = [s for s in design.seeds if not Path(f"{planted_copy(s)}.json").exists()]
        if PLANTED in shown and missing and not args.dry_run:
            raise ExperimentError(f"the planted copies of seeds {missing} are missing below "
                                  f"{runs_of(SPIKES) / 'data'}; run --stage plant first")
        try:
            chosen = chosen_lr(design)
            lr = None if chosen is None else f"{chosen:g}"
        except ExperimentError:
            if not args.dry_run:
                raise
            lr = "RATE"  # --dry-run before the tuning runs: the rate they will choose
        out = []
        if CLEAN in shown:
            out.append((sweep_argv(args.jobs, folders[CLEAN], design.seeds, design), folders[CLEAN],
                        points(design.seeds, [design.base_lr], design)))
        if lr is not None:
            out.append((sweep_argv(args.jobs, folders[HIGH_LR], design.seeds, design, extra=[f"optim.lr={lr}"]),
                        folders[HIGH_LR], points(design.seeds, [float(lr) if lr != "RATE" else None], design)))
        for seed in design.seeds if PLANTED in shown else ():
            extra = [f"data.path={planted_copy(seed)}", f"data.val_path={data.val}"]
            argv = sweep_argv(min(args.jobs, len(design.arms)), folders[PLANTED], [seed], design, extra=extra)
            out.append((argv, folders[PLANTED], points([seed], [design.base_lr], design)))
        return out

    return TrainingStage(lambda: [argv for argv, folder, want in plan() if not done(folder, want)],
                         lambda: all(done(folder, want) for _, folder, want in plan()), lambda: list(folders.values()))


def stage_report(args: argparse.Namespace, design: Design = SPIKES) -> None:
    roots = [runs_of(design) / name for name in (*(FOLDERS[f] for f in faults(design)), "tuning")]
    name = args.name or design.name
    argv = ["tools/experiments/spike_report.py", *map(str, roots), "--design", design.name, "--out", str(args.out),
            "--name", name]
    print("python " + " ".join(argv))
    if not args.dry_run:
        spike_report.report([r for r in roots if r.exists()], args.out, name, design)


def main(argv: list[str] | None = None) -> int:
    parser = driver_parser(__doc__, STAGES, report="spikes")
    parser.add_argument("--design", choices=DESIGNS, default=SPIKES.name, help="the registered design to run")
    parser.set_defaults(name=None)  # the report's stem: the design's name unless --name
    args = parser.parse_args(argv)
    design = DESIGNS[args.design]
    stages = {"plant": stage_plant, "tune": stage_tune, "runs": stage_runs}

    def run() -> None:
        os.chdir(ROOT)
        chosen = chosen_stages(args, stages_of(design))
        if extra := [s for s in chosen if s not in stages_of(design)]:
            raise ExperimentError(f"{design.name} has no stage {', '.join(extra)}: it plants no rows; choose among "
                                  f"{', '.join(stages_of(design))}")
        for name in chosen:
            if name == "report":
                stage_report(args, design)
                continue
            if name == "plant" and args.force and not args.dry_run:
                shutil.rmtree(runs_of(SPIKES) / "data", ignore_errors=True)  # before planning: the copies are remade
            stage = stages[name](args, design)
            if args.dry_run:
                print_commands(name, stage, args.overrides, pending=lambda e, n=name: [f"{n}: {e}"])
            else:
                run_stage(name, stage, args.force and name != "plant", launch, args.overrides, args.concurrent)

    return guarded(run)


if __name__ == "__main__":
    raise SystemExit(main())
