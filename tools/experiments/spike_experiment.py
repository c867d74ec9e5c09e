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
from tools.experiments.stages import ROOT, TrainingStage, launch, print_commands, run_stage, sweep_values

RUNS = Path("runs") / "spikes"  # relative to ROOT, where main() runs
STAGES = ("plant", "tune", "runs", "report")
FOLDERS = {spike_report.PLANTED: "planted", spike_report.HIGH_LR: "high_lr", spike_report.CLEAN: "clean"}


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


def planted_copy(seed: int) -> Path:
    return RUNS / "data" / f"seed{seed}"


def plant_argv(data: Data, seed: int, design: SpikeDesign = SPIKES) -> list[str]:
    return ["tools/plant_spikes.py", "--data", data.train, "--output", str(planted_copy(seed)), "--seed", str(seed),
            "--global-batch", str(data.global_batch), "--start", str(design.plant_start), "--steps",
            str(design.plant_steps), "--kind", design.plant_kind]


def sweep_argv(jobs: int, folder: Path, seeds, design: SpikeDesign = SPIKES, arms=None, extra=()) -> list[str]:
    """One multirun: the policies' presets (`arms`, default all) x `seeds`, with `extra` overrides."""
    return ["pretrain/main.py", "-m", "hydra/launcher=local", f"hydra.launcher.n_jobs={jobs}",
            f"+experiment={','.join(arms or design.arms)}", f"seed={','.join(map(str, seeds))}", *extra,
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


def points(seeds, lrs, design: SpikeDesign = SPIKES, arms=None) -> set[tuple]:
    return {(arm, lr, seed) for arm in arms or design.arms for lr in lrs for seed in seeds}


def chosen_lr(design: SpikeDesign = SPIKES) -> float | None:
    """The high rate the finished tuning runs chose (None: no rate of the grid spiked on every tuning seed)."""
    choice = spike_report.choose_lr(finished(RUNS / "tuning"), design)
    if not choice["settled"]:
        raise ExperimentError(f"the tuning runs below {RUNS / 'tuning'} have not all finished (the high rate is "
                              "chosen from them); run --stage tune first")
    return choice["chosen"]


# --- The stages ---------------------------------------------------------------------------------------
def stage_plant(args: argparse.Namespace, design: SpikeDesign = SPIKES) -> TrainingStage:
    data = clean_data(tuple(args.overrides), build=not args.dry_run)
    if not args.dry_run:
        (RUNS / "data").mkdir(parents=True, exist_ok=True)
    missing = lambda: [s for s in design.seeds if not Path(f"{planted_copy(s)}.json").exists()]  # noqa: E731
    return TrainingStage(lambda: [plant_argv(data, s, design) for s in missing()], lambda: not missing(),
                         lambda: [RUNS / "data"])


def stage_tune(args: argparse.Namespace, design: SpikeDesign = SPIKES) -> TrainingStage:
    folder, arm = RUNS / "tuning", design.arms[:1]
    argv = sweep_argv(args.jobs, folder, design.tuning_seeds, design, arm, [f"optim.lr={sweep_values(design.lrs)}"])
    return TrainingStage(lambda: [argv], lambda: done(folder, points(design.tuning_seeds, design.lrs, design, arm)),
                         lambda: [folder])


def stage_runs(args: argparse.Namespace, design: SpikeDesign = SPIKES) -> TrainingStage:
    """No fault, the chosen rate (when one spiked) and the planted copies, one multirun each (one per seed for the
    planted copies: each seed reads its own)."""
    data = clean_data(tuple(args.overrides), build=False)
    folders = {f: RUNS / name for f, name in FOLDERS.items()}

    def plan() -> list[tuple[list[str], Path, set]]:
        missing = [s for s in design.seeds if not Path(f"{planted_copy(s)}.json").exists()]
        if missing and not args.dry_run:
            raise ExperimentError(f"the planted copies of seeds {missing} are missing below {RUNS / 'data'}; run "
                                  "--stage plant first")
        try:
            chosen = chosen_lr(design)
            lr = None if chosen is None else f"{chosen:g}"
        except ExperimentError:
            if not args.dry_run:
                raise
            lr = "RATE"  # --dry-run before the tuning runs: the rate they will choose
        out = [(sweep_argv(args.jobs, folders[spike_report.CLEAN], design.seeds, design), folders[spike_report.CLEAN],
                points(design.seeds, [design.base_lr], design))]
        if lr is not None:
            out.append((sweep_argv(args.jobs, folders[spike_report.HIGH_LR], design.seeds, design,
                                   extra=[f"optim.lr={lr}"]), folders[spike_report.HIGH_LR],
                        points(design.seeds, [float(lr) if lr != "RATE" else None], design)))
        for seed in design.seeds:
            extra = [f"data.path={planted_copy(seed)}", f"data.val_path={data.val}"]
            argv = sweep_argv(min(args.jobs, len(design.arms)), folders[spike_report.PLANTED], [seed], design,
                              extra=extra)
            out.append((argv, folders[spike_report.PLANTED], points([seed], [design.base_lr], design)))
        return out

    return TrainingStage(lambda: [argv for argv, folder, want in plan() if not done(folder, want)],
                         lambda: all(done(folder, want) for _, folder, want in plan()), lambda: list(folders.values()))


def stage_report(args: argparse.Namespace) -> None:
    roots = [RUNS / name for name in (*FOLDERS.values(), "tuning")]
    argv = ["tools/experiments/spike_report.py", *map(str, roots), "--out", str(args.out), "--name", args.name]
    print("python " + " ".join(argv))
    if not args.dry_run:
        spike_report.report([r for r in roots if r.exists()], args.out, args.name)


def main(argv: list[str] | None = None) -> int:
    args = driver_parser(__doc__, STAGES, report="spikes").parse_args(argv)
    stages = {"plant": stage_plant, "tune": stage_tune, "runs": stage_runs}

    def run() -> None:
        os.chdir(ROOT)
        for name in chosen_stages(args, STAGES):
            if name == "report":
                stage_report(args)
                continue
            if name == "plant" and args.force and not args.dry_run:
                shutil.rmtree(RUNS / "data", ignore_errors=True)  # before planning: the copies are remade
            stage = stages[name](args)
            if args.dry_run:
                print_commands(name, stage, args.overrides, pending=lambda e, n=name: [f"{n}: {e}"])
            else:
                run_stage(name, stage, args.force and name != "plant", launch, args.overrides, args.concurrent)

    return guarded(run)


if __name__ == "__main__":
    raise SystemExit(main())
