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

`--design long` runs the design registered for keel issue 38 before its runs (preregistration.ATTENTION_LONG,
docs/preregistration.md): conf/experiment/attention_d128_long.yaml (480 steps), the arms GQA, GTA,
GLA, MLA with QK-norm (mla) and without (mla_plain), each rate chosen on two tuning seeds, the grid extended
past an edge the choice sits on (preregistration.extension: the tune stage runs again until every choice
lies inside, at most MAX_EXTENSIONS times), then every arm on seeds 1-15 into runs/attention_d128_long;
the report tests GTA - GQA and GLA - the better MLA for equivalence at the registered margin (TOST).

    python tools/experiments/attention_experiment.py --design long --jobs 2

The compare stage always takes its rates from the tune stage's runs (not from choice.json, which is the
record). A training stage whose runs have all finished is skipped (--force reruns it from scratch);
otherwise it runs whole: a completed run ends at once, a killed one resumes from its last checkpoint (the
last step's in the first design, every 120 steps in the long one). The reported seeds never enter a choice:
seeds.select refuses them.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from functools import cache
from pathlib import Path

from models.attention import attention_names
from pretrain.rundir import write_json
from tools.experiments import attention_report
from tools.experiments import ExperimentError
from tools.experiments.cli import chosen_stages, driver_parser, guarded
from tools.experiments.preregistration import ATTENTION_LONG, MAX_EXTENSIONS, AttentionDesign, tuned_grid
from tools.experiments.runs import NoRuns, Run, load_runs
from tools.experiments.stages import ROOT, TrainingStage, launch, print_commands, run_rounds, run_stage

PRESET = "attention_d128"  # conf/experiment/attention_d128.yaml, arms in conf/attention_d128/ARM.yaml
# the registered types this experiment has an arm for, in the registry's order
TYPES = tuple(t for t in attention_names() if (ROOT / "conf" / PRESET / f"{t}.yaml").exists())
D128 = AttentionDesign(  # the first runs (docs/results/attention.md), designed before margins were registered
    name="d128", preset=PRESET, arms=TYPES, lrs=(5e-4, 1e-3, 2e-3),  # x2 apart around the earlier runs' 1e-3
    tuning_seeds=(100,), seeds=(1, 2, 3), steps=120)
DESIGNS = {d.name: d for d in (D128, ATTENTION_LONG)}
RUNS = Path("runs")  # relative to ROOT, where main() runs; a design's runs go to RUNS / its preset
STAGES = ("tune", "report-choice", "compare", "report")


def _lr(lr: float) -> str:
    return f"{lr:g}"


def folder(design: AttentionDesign) -> Path:
    return RUNS / design.preset


def multirun_argv(design: AttentionDesign, jobs: int, arms, lrs, seeds, into: Path) -> list[str]:
    return ["pretrain/main.py", "-m", "hydra/launcher=local", f"hydra.launcher.n_jobs={jobs}",
            f"+experiment={design.preset}", f"+{PRESET}={','.join(arms)}", f"optim.lr={','.join(map(_lr, lrs))}",
            f"seed={','.join(map(str, seeds))}", f"hydra.sweep.dir={into}"]


def tune_argvs(design: AttentionDesign, jobs: int,
               grids: dict[str, tuple[float, ...]] | None = None) -> list[list[str]]:
    """One multirun per tuning grid (arm -> its rates; the registered grid for every arm by default), over the
    arms in `grids` that share it, on the tuning seeds."""
    grids = grids or {arm: design.lrs for arm in design.arms}
    by_grid: dict[tuple[float, ...], list[str]] = {}
    for arm in (a for a in design.arms if a in grids):
        by_grid.setdefault(tuple(sorted(grids[arm])), []).append(arm)
    return [multirun_argv(design, jobs, arms, lrs, design.tuning_seeds, folder(design) / "tune")
            for lrs, arms in by_grid.items()]


def compare_argvs(design: AttentionDesign, jobs: int, chosen: dict[str, float]) -> list[list[str]]:
    """One multirun per chosen rate, over the arms that chose it (arm -> rate), on the reported seeds."""
    by_lr: dict[float, list[str]] = {}
    for arm in design.arms:
        if arm in chosen:
            by_lr.setdefault(chosen[arm], []).append(arm)
    return [multirun_argv(design, jobs, arms, (lr,), design.seeds, folder(design) / "compare")
            for lr, arms in sorted(by_lr.items())]


# --- Which runs exist ---------------------------------------------------------------------------------
@cache
def arm_label(preset: str, arm: str) -> str:
    """The report's name of an arm file's runs: its type, marked "+qk-norm" with QK-norm (mla -> mla+qk-norm)."""
    from pretrain.config import compose_config

    return attention_report.attention_arm(dataclasses.asdict(compose_config([f"+experiment={preset}",
                                                                             f"+{PRESET}={arm}"])))


def finished(under: Path) -> list[Run]:
    try:
        return load_runs(under, statuses=attention_report.FINISHED)
    except NoRuns:
        return []


def done(design: AttentionDesign, under: Path, wanted: set[tuple[str, float, int]]) -> bool:
    """Every (arm, lr, seed) in `wanted` has a finished run below `under`."""
    labels = {arm_label(design.preset, arm): arm for arm in design.arms}
    have = {(labels.get(attention_report.attention_arm(r.config)), r.config["optim"]["lr"], r.seed)
            for r in finished(under)}
    return wanted <= have


def tuning_grids(design: AttentionDesign, runs: list[Run]) -> dict[str, tuple[float, ...]]:
    """arm -> the rates its tuning runs need: the registered grid, and past it one rate per round whose
    finished runs chose the grid's edge (preregistration.tuned_grid), at most MAX_EXTENSIONS."""
    grids = {}
    for arm in design.arms:
        mine = [r for r in runs if attention_report.attention_arm(r.config) == arm_label(design.preset, arm)
                and r.seed in design.tuning_seeds]
        grids[arm] = tuned_grid(design.lrs, lambda lr: {r.seed: r for r in mine if r.config["optim"]["lr"] == lr},
                                design.tuning_seeds, attention_report.final_val)[0]
    return grids


def chosen_lrs(design: AttentionDesign = D128) -> dict[str, float]:
    """arm -> the rate chosen on the tune stage's runs, once every run its grids call for has finished (a
    choice on an edge is not final until the extension past it has run); every arm needs one."""
    under = folder(design) / "tune"
    runs = finished(under)
    if not runs:
        raise ExperimentError(f"no tuning runs below {under}; run the tune stage first (--stage tune)")
    grids = tuning_grids(design, runs)
    if not done(design, under, {(arm, lr, s) for arm, lrs in grids.items() for lr in lrs for s in design.tuning_seeds}):
        raise ExperimentError(f"the tuning runs below {under} have not all finished (a grid or its extension past an "
                              "edge); run the tune stage first (--stage tune)")
    choice = attention_report.choose_lrs(runs)
    out = {arm: c["chosen_lr"] for arm in design.arms
           if (c := choice.get(arm_label(design.preset, arm))) and c["chosen_lr"] is not None}
    if missing := [arm for arm in design.arms if arm not in out]:
        raise ExperimentError(f"no rate chosen for {', '.join(missing)}: every tuning run of theirs diverged or is "
                              f"missing below {under}")
    return out


# --- The stages ---------------------------------------------------------------------------------------
def stage_tune(design: AttentionDesign, jobs: int, dry: bool, force: bool, overrides: tuple[str, ...] = (),
               concurrent: bool = False) -> None:
    """The registered grid, then round by round a rate past the edge that a finished round chose (tuning_grids
    plans from the finished runs, so a stopped stage picks up where it was)."""
    under = folder(design) / "tune"
    if force and not dry:
        shutil.rmtree(under, ignore_errors=True)

    def plan() -> TrainingStage:
        grids = tuning_grids(design, finished(under))
        wanted = {arm: {(arm, lr, s) for lr in lrs for s in design.tuning_seeds} for arm, lrs in grids.items()}
        pending = {arm: grids[arm] for arm in grids if not done(design, under, wanted[arm])} or grids
        return TrainingStage(lambda: tune_argvs(design, jobs, pending),
                             lambda: done(design, under, set().union(*wanted.values())), lambda: [under])

    run_rounds("tune", plan, launch, overrides, concurrent, dry,
               then=f"a rate past the grid's edge for each arm whose choice sits there (at most {MAX_EXTENSIONS})")


def stage_compare(design: AttentionDesign, jobs: int, dry: bool, force: bool, overrides: tuple[str, ...] = (),
                  concurrent: bool = False) -> None:
    under = folder(design) / "compare"
    try:
        chosen = chosen_lrs(design)
    except ExperimentError as e:
        if not dry:
            raise
        print(f"compare: {e} (the rates are chosen there)")
        return
    wanted = {(arm, chosen[arm], s) for arm in design.arms for s in design.seeds}
    stage = TrainingStage(lambda: compare_argvs(design, jobs, chosen), lambda: done(design, under, wanted),
                          lambda: [under])
    if dry:
        print_commands("compare", stage, overrides)
        return
    run_stage("compare", stage, force, launch, overrides, concurrent)


def stage_choice(design: AttentionDesign, dry: bool) -> None:
    under, record = folder(design) / "tune", folder(design) / "choice.json"
    if dry:
        print(f"(report-choice) attention_report.choose_lrs over {under} -> {record}")
        return
    runs = finished(under)
    if not runs:
        raise ExperimentError(f"no tuning runs below {under}; run the tune stage first (--stage tune)")
    choice = attention_report.choose_lrs(runs)
    write_json(record, {"design": design.name, "tuning_seeds": list(design.tuning_seeds), "lrs": list(design.lrs),
                        "choice": choice})
    print(attention_report.tuning_table(choice))
    print(f"wrote {record}")


def stage_report(design: AttentionDesign, dry: bool, out: Path, name: str) -> None:
    roots = [folder(design) / "tune", folder(design) / "compare"]
    argv = ["tools/experiments/attention_report.py", *map(str, roots), "--out", str(out), "--name", name]
    print("python " + " ".join(argv))
    if not dry:
        attention_report.report([r for r in roots if r.exists()], out, name)


def main(argv: list[str] | None = None) -> int:
    p = driver_parser(__doc__, STAGES, report=PRESET)
    p.add_argument("--design", choices=tuple(DESIGNS), default=D128.name,
                   help="d128: the first runs (docs/results/attention.md); long: the design registered for issue 38")
    args = p.parse_args(argv)
    design = DESIGNS[args.design]
    if design is not D128 and args.name == PRESET:
        args.name = design.preset

    def run() -> None:
        os.chdir(ROOT)
        for stage in chosen_stages(args, STAGES):
            if stage == "report-choice":
                stage_choice(design, args.dry_run)
            elif stage == "report":
                stage_report(design, args.dry_run, args.out, args.name)
            elif stage == "tune":
                stage_tune(design, args.jobs, args.dry_run, args.force, args.overrides, args.concurrent)
            else:
                stage_compare(design, args.jobs, args.dry_run, args.force, args.overrides, args.concurrent)

    return guarded(run)


if __name__ == "__main__":
    raise SystemExit(main())
