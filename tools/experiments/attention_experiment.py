"""The GTA/GLA attention-quality experiment of keel issues 7 and 16 at head dimension 128
(docs/results/attention.md): every type at MLA's parameter count, MLA with QK-norm, the learning rate
chosen per type on a tuning seed, then every type at its rate on three reported seeds, paired with GQA
(and GLA with MLA) seed by seed (tools/experiments/seeds.py and stats.py).

Four stages, each training stage Hydra multiruns of conf/experiment/attention_d128.yaml with one arm
file per type (conf/attention_d128/TYPE.yaml: the attention, its FFN width, MLA's QK-norm), so that one
multirun sweeps the types with their own widths:
1. tune: every type at each of LRS on the tuning seed, one multirun into runs/attention_d128/tune:
       python pretrain/main.py -m hydra/launcher=local hydra.launcher.n_jobs=2 +experiment=attention_d128 \\
           +attention_d128=mha,gqa,mqa,gta,gla,mla optim.lr=5e-4,1e-3,2e-3 seed=100 \\
           hydra.sweep.dir=runs/attention_d128/tune
2. report-choice: per type the rate with the lowest final validation loss on the tuning seed
   (attention_report.choose_lrs, i.e. seeds.select; a diverged run never wins), printed and written to
   runs/attention_d128/choice.json; a choice on the grid's edge is flagged.
3. compare: every type at its chosen rate on seeds 1, 2, 3, one multirun per chosen rate (types that
   chose the same rate share it) into runs/attention_d128/compare.
4. report: tools/experiments/attention_report.py over both stages' runs: the tuning grid and choice,
   final validation loss and largest gradient norm per seed, KV bytes per token, paired differences,
   provenance; docs/results/attention_d128.json and .png.

    python tools/experiments/attention_experiment.py                  # every stage
    python tools/experiments/attention_experiment.py --dry-run        # print the commands only
    python tools/experiments/attention_experiment.py --stage report   # re-aggregate existing runs

The compare stage always takes its rates from the tune stage's runs (not from choice.json, which is the
record). A training stage whose runs have all finished is skipped (--force reruns it from scratch);
otherwise it runs whole: a completed run ends at once, a killed one starts again (the only checkpoint is
the last step's). The reported seeds never enter a choice: seeds.select refuses them.
"""

from __future__ import annotations

import os
from pathlib import Path

from models.attention import attention_names
from pretrain.rundir import write_json
from tools.experiments import attention_report
from tools.experiments import ExperimentError
from tools.experiments.cli import chosen_stages, driver_parser, guarded
from tools.experiments.runs import NoRuns, Run, load_runs
from tools.experiments.stages import ROOT, TrainingStage, launch, print_commands, run_stage

PRESET = "attention_d128"  # conf/experiment/attention_d128.yaml, arms in conf/attention_d128/TYPE.yaml
# the registered types this experiment has an arm for, in the registry's order
TYPES = tuple(t for t in attention_names() if (ROOT / "conf" / PRESET / f"{t}.yaml").exists())
LRS = (5e-4, 1e-3, 2e-3)  # the tuning grid, x2 apart around the rate of the earlier runs (1e-3)
TUNING_SEED = 100  # in seeds.TUNING_SEEDS
SEEDS = (1, 2, 3)  # in seeds.REPORTED_SEEDS
RUNS = Path("runs") / PRESET  # relative to ROOT, where main() runs
STAGES = ("tune", "report-choice", "compare", "report")


def _lr(lr: float) -> str:
    return f"{lr:g}"


def multirun_argv(jobs: int, types, lrs, seeds, folder: Path) -> list[str]:
    return ["pretrain/main.py", "-m", "hydra/launcher=local", f"hydra.launcher.n_jobs={jobs}", f"+experiment={PRESET}",
            f"+{PRESET}={','.join(types)}", f"optim.lr={','.join(map(_lr, lrs))}",
            f"seed={','.join(map(str, seeds))}", f"hydra.sweep.dir={folder}"]


def tune_argvs(jobs: int, types=TYPES) -> list[list[str]]:
    return [multirun_argv(jobs, types, LRS, (TUNING_SEED,), RUNS / "tune")]


def compare_argvs(jobs: int, chosen: dict[str, float]) -> list[list[str]]:
    """One multirun per chosen rate, over the types that chose it (type -> rate)."""
    by_lr: dict[float, list[str]] = {}
    for t in TYPES:
        if t in chosen:
            by_lr.setdefault(chosen[t], []).append(t)
    return [multirun_argv(jobs, types, (lr,), SEEDS, RUNS / "compare") for lr, types in sorted(by_lr.items())]


# --- Which runs exist ---------------------------------------------------------------------------------
def finished(folder: Path) -> list[Run]:
    try:
        return load_runs(folder, statuses=attention_report.FINISHED)
    except NoRuns:
        return []


def done(folder: Path, wanted: set[tuple[str, float, int]]) -> bool:
    """Every (type, lr, seed) in `wanted` has a finished run below `folder`."""
    have = {(attention_report.arm_type(attention_report.attention_arm(r.config)), r.config["optim"]["lr"], r.seed)
            for r in finished(folder)}
    return wanted <= have


def chosen_lrs(types=TYPES) -> dict[str, float]:
    """type -> the rate chosen on the tune stage's runs; every type needs one."""
    runs = finished(RUNS / "tune")
    if not runs:
        raise ExperimentError(f"no tuning runs below {RUNS / 'tune'}; run the tune stage first (--stage tune)")
    choice = attention_report.choose_lrs(runs)
    out = {attention_report.arm_type(arm): c["chosen_lr"] for arm, c in choice.items() if c["chosen_lr"] is not None}
    if missing := [t for t in types if t not in out]:
        raise ExperimentError(f"no rate chosen for {', '.join(missing)}: every tuning run of theirs diverged or is "
                              f"missing below {RUNS / 'tune'}")
    return out


# --- The stages ---------------------------------------------------------------------------------------
def stage_training(name: str, jobs: int, dry: bool, force: bool, overrides: tuple[str, ...] = (),
                   concurrent: bool = False) -> None:
    folder = RUNS / name
    if name == "tune":
        argvs, wanted = tune_argvs(jobs), {(t, lr, TUNING_SEED) for t in TYPES for lr in LRS}
    else:
        try:
            chosen = chosen_lrs()
        except ExperimentError as e:
            if not dry:
                raise
            print(f"compare: {e} (the rates are chosen there)")
            return
        argvs, wanted = compare_argvs(jobs, chosen), {(t, chosen[t], s) for t in TYPES for s in SEEDS}
    stage = TrainingStage(lambda: argvs, lambda: done(folder, wanted), lambda: [folder])
    if dry:
        print_commands(name, stage, overrides)
        return
    run_stage(name, stage, force, launch, overrides, concurrent)


def stage_choice(dry: bool) -> None:
    if dry:
        print(f"(report-choice) attention_report.choose_lrs over {RUNS / 'tune'} -> {RUNS / 'choice.json'}")
        return
    runs = finished(RUNS / "tune")
    if not runs:
        raise ExperimentError(f"no tuning runs below {RUNS / 'tune'}; run the tune stage first (--stage tune)")
    choice = attention_report.choose_lrs(runs)
    write_json(RUNS / "choice.json", {"tuning_seed": TUNING_SEED, "lrs": list(LRS), "choice": choice})
    print(attention_report.tuning_table(choice))
    print(f"wrote {RUNS / 'choice.json'}")


def stage_report(dry: bool, out: Path, name: str) -> None:
    roots = [RUNS / "tune", RUNS / "compare"]
    argv = ["tools/experiments/attention_report.py", *map(str, roots), "--out", str(out), "--name", name]
    print("python " + " ".join(argv))
    if not dry:
        attention_report.report([r for r in roots if r.exists()], out, name)


def main(argv: list[str] | None = None) -> int:
    p = driver_parser(__doc__, STAGES, report=PRESET)
    args = p.parse_args(argv)

    def run() -> None:
        os.chdir(ROOT)
        for stage in chosen_stages(args, STAGES):
            if stage == "report-choice":
                stage_choice(args.dry_run)
            elif stage == "report":
                stage_report(args.dry_run, args.out, args.name)
            else:
                stage_training(stage, args.jobs, args.dry_run, args.force, args.overrides, args.concurrent)

    return guarded(run)


if __name__ == "__main__":
    raise SystemExit(main())
