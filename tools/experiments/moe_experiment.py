"""The MoE expert-specialisation experiment of keel issues 6 and 16 (docs/results/moe.md) in the paper's
setting: Guo et al. 2025 add L_o + L_v to an MoE pretrained with the auxiliary loss only. Here one MoE is
pretrained with the aux loss only on an even mixture of two sources, then continued with and without
L_o + L_v; β = γ is chosen on tuning seeds, the arms are compared seed by seed on reported seeds, and
expert specialisation is measured by routing purity per source, which no loss optimises.

Five stages; each training stage is Hydra multiruns of pretrain/main.py (hydra/launcher=local, --jobs
runs at once), one per arm:
1. pack: the standard library's modules (stdlib:code) and tests (stdlib:tests), split by file
   (data.val_percent of the files held out) and concat-packed: each source's training set, each source's
   validation set (val_loss/code, val_loss/tests) and both sources' held-out files together (val_loss), at
   the paths conf/experiment/moe_pretrain.yaml names.
2. pretrain: the aux-only MoE, one run:
       python pretrain/main.py +experiment=moe_pretrain
3. tune: β = γ in BETAS, each continued from it on the tuning seeds, one multirun per β into
   runs/moe_continue/tune:
       python pretrain/main.py -m hydra/launcher=local hydra.launcher.n_jobs=2 +experiment=moe_continue \
           model.moe.ortho_loss=0.1 model.moe.var_loss=0.1 seed=100,101 hydra.sweep.dir=runs/moe_continue/tune
4. continue: aux only (β = γ = 0) and the chosen β = γ (tools/experiments/moe_report.py SELECTION: the
   lowest mean final val_loss over the tuning seeds) on the reported seeds, into runs/moe_continue/arms. The
   seed sets a continued run's data order; its weights are the pretrained ones. With --beta-from REPORT_JSON
   the β = γ is the one that report's tuning chose (a re-run elsewhere: tools/gpu_check.py section 44).
5. report: tools/experiments/moe_report.py over runs/moe_continue, the pretrained run as step 0:
   docs/results/moe.json (provenance, per-arm final validation loss per source, paired differences against
   aux only with 95% intervals, purity and NMI per source and layer, overlap, routing variance, MaxVio) and
   docs/results/moe_*.png.

    python tools/experiments/moe_experiment.py                  # every stage
    python tools/experiments/moe_experiment.py --dry-run        # print the commands only
    python tools/experiments/moe_experiment.py --stage report   # re-aggregate existing runs

A stage whose packed sets exist or whose runs have all completed is skipped (--force redoes it from
scratch); otherwise it runs whole: keel resumes a killed run from its last checkpoint, and a completed
run ends at once. Row length, validation rows, the held-out share and every path come from the presets.
Cost, measured 2026-11-30 on the 2-core CPU (one thread per run, the machine shared): a training step of
16 x 128 tokens takes 0.37 s (fastest of 20; median 0.44 s), one evaluation of the three validation sets
(3 x 131k tokens) 33 CPU-seconds. So the pretraining run (1200 steps, 4 evaluations) takes about 10
CPU-minutes and each continued run (500 steps, 4 evaluations) about 5.5; with the 6 tuning and 6 reported
runs that is about 76 CPU-minutes, about 50 minutes on 2 cores (--jobs 2; pretraining runs alone).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from data.config import DataConfig
from data.corpus import STDLIB_SUBSETS
from tools.experiments import moe_report
from tools.experiments import ExperimentError
from tools.experiments.cli import chosen_stages, driver_parser, guarded
from tools.experiments.runs import NoRuns, Run, completed, load_runs
from tools.experiments.stages import ROOT, TrainingStage, launch, print_commands, run_stage, with_overrides

BETAS = (0.01, 0.1, 1.0)  # β = γ candidates, continued on the tuning seeds
TUNING_SEEDS = (100, 101)  # within seeds.TUNING_SEEDS
SEEDS = (1, 2, 3)  # reported, within seeds.REPORTED_SEEDS
BASELINE = (0.0, 0.0)  # aux only: L_o and L_v off
STAGES = ("pack", "pretrain", "tune", "continue", "report")
ALL = "all"  # the stdlib subset of val_loss's set: both sources' held-out files


# --- The experiment's settings, from the presets ----------------------------------------------------
@dataclass(frozen=True)
class Setup:
    data: DataConfig  # moe_pretrain's: tokenizer, row length, held-out share, the packed sets' paths
    val_rows: int  # eval_batches x global_batch_size: the rows each validation set must hold
    pretrain_dir: Path  # moe_pretrain's run_dir, moe_continue's init_from
    continue_dir: Path  # tune/ and arms/ below it
    beta_from: Path | None = None  # --beta-from: a report whose tuning chose β = γ; None: the tune stage's runs

    @property
    def tune_dir(self) -> Path:
        return self.continue_dir / "tune"

    @property
    def arms_dir(self) -> Path:
        return self.continue_dir / "arms"


def setup(overrides: tuple[str, ...] = ()) -> Setup:
    """The settings conf/experiment/moe_pretrain.yaml and moe_continue.yaml give, with the driver's --set
    overrides (which may change the held-out share and the validation rows, as the GPU section does)."""
    from pretrain.config import compose_config

    pre = compose_config(["+experiment=moe_pretrain", *overrides])
    cont = compose_config(["+experiment=moe_continue", *overrides])
    if Path(cont.init_from or "") != Path(pre.run_dir):
        raise ExperimentError(f"conf/experiment/moe_continue.yaml: init_from={cont.init_from} must be moe_pretrain's "
                              f"run_dir ({pre.run_dir}), the run it continues")
    names = [s.name for s in pre.data.sources] + [v.name for v in pre.data.val_sets]
    if stray := sorted({n for n in names if n not in STDLIB_SUBSETS}):
        raise ExperimentError(f"conf/experiment/moe_pretrain.yaml: sources {stray} are not stdlib subsets "
                              f"({', '.join(STDLIB_SUBSETS)}); each data.sources and data.val_sets name is the subset "
                              "its set is packed from")
    return Setup(data=pre.data, val_rows=pre.trainer.eval_batches * pre.trainer.global_batch_size,
                 pretrain_dir=Path(pre.run_dir), continue_dir=Path(cont.run_dir).parent)


def packed_sets(s: Setup) -> dict[Path, tuple[str, str]]:
    """Prefix -> (stdlib subset, split) of every packed set the presets name."""
    out = {Path(src.path): (src.name, "train") for src in s.data.sources}
    out |= {Path(v.path): (v.name, "val") for v in s.data.val_sets}
    out[Path(s.data.val_path)] = (ALL, "val")
    return out


# --- The commands -------------------------------------------------------------------------------------
def pretrain_argv() -> list[str]:
    return ["pretrain/main.py", "+experiment=moe_pretrain"]


def continue_argv(coeffs: tuple[float, float], seeds: tuple[int, ...], folder: Path, jobs: int) -> list[str]:
    """One arm (L_o and L_v coefficients) continued on `seeds`, one multirun into `folder`. The coefficients
    are named even when 0: init_from would bring the pretrained run's, and a named key keeps its value."""
    ortho, var = coeffs
    return ["pretrain/main.py", "-m", "hydra/launcher=local", f"hydra.launcher.n_jobs={jobs}",
            "+experiment=moe_continue", f"model.moe.ortho_loss={ortho:g}", f"model.moe.var_loss={var:g}",
            f"seed={','.join(map(str, seeds))}", f"hydra.sweep.dir={folder}"]


def report_argv(s: Setup, out: Path, name: str) -> list[str]:
    return ["tools/experiments/moe_report.py", str(s.continue_dir), "--pretrained", str(s.pretrain_dir),
            "--out", str(out), "--name", name]


# --- Which runs exist ---------------------------------------------------------------------------------
FINISHED = ("completed", "diverged")  # a diverged run is done too: rerunning it would diverge again


def runs_below(folder: Path, statuses: tuple[str, ...] = ("completed",)) -> list[Run]:
    try:
        return load_runs(folder, statuses=statuses)
    except NoRuns:
        return []


def coefficients(run: Run) -> tuple[float, float]:
    moe = run.config["model"]["moe"]
    return float(moe["ortho_loss"]), float(moe["var_loss"])


def missing(folder: Path, arms: list[tuple[float, float]], seeds: tuple[int, ...]) -> list[tuple]:
    """The (coefficients, seed) of `arms` x `seeds` without a finished (completed or diverged) run below
    `folder`."""
    found = {(coefficients(r), r.seed) for r in runs_below(folder, FINISHED)}
    return [(c, seed) for c in arms for seed in seeds if (c, seed) not in found]


def tuning_grid() -> list[tuple[float, float]]:
    return [(b, b) for b in BETAS]


def require_pretrained(s: Setup) -> None:
    if not completed(s.pretrain_dir):
        raise ExperimentError(f"{s.pretrain_dir} holds no completed pretraining run (result.json); run "
                              "--stage pretrain first, or point moe_continue.yaml's init_from at one")


def chosen(s: Setup) -> tuple[float, float]:
    """The coefficients moe_report.choose picks from the completed tuning runs, or with --beta-from, those an
    earlier report's tuning picked."""
    if s.beta_from:
        return reported_choice(s.beta_from)
    if gaps := missing(s.tune_dir, tuning_grid(), TUNING_SEEDS):
        raise ExperimentError(f"{len(gaps)} of the {len(BETAS) * len(TUNING_SEEDS)} tuning runs in {s.tune_dir} have "
                              "not finished (β = γ is chosen from them); run --stage tune first")
    choice = moe_report.choose(runs_below(s.tune_dir))
    if choice is None:
        raise ExperimentError(f"every tuning run in {s.tune_dir} diverged; lower the β = γ grid (BETAS) or optim.lr "
                              "in conf/experiment/moe_continue.yaml and rerun --stage tune --force")
    return float(choice["ortho_loss"]), float(choice["var_loss"])


def reported_choice(report: Path) -> tuple[float, float]:
    """β = γ as a results JSON's "tuning" records it (moe_report.choose on its tuning seeds): a re-run
    elsewhere (the GPU's, tools/gpu_check.py section 44) continues at the choice made there, not chosen again."""
    try:
        tuning = json.loads(Path(report).read_text())["tuning"]
        coeffs = float(tuning["ortho_loss"]), float(tuning["var_loss"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExperimentError(f"{report}: no β = γ chosen on tuning seeds (its \"tuning\": ortho_loss, var_loss; "
                              f"{type(e).__name__}: {e}); give a report moe_report.py wrote") from None
    if coeffs[0] != coeffs[1]:
        raise ExperimentError(f"{report}: its tuning chose β = {coeffs[0]:g} and γ = {coeffs[1]:g}; the arms "
                              "continue at β = γ")
    return coeffs


def training_stages(s: Setup, jobs: int) -> dict[str, TrainingStage]:
    def arms() -> list[tuple[float, float]]:  # asked only when needed: the choice exists once the tuning runs do
        return [BASELINE, chosen(s)]

    return {"pretrain": TrainingStage(lambda: [pretrain_argv()], lambda: completed(s.pretrain_dir),
                                      lambda: [s.pretrain_dir]),
            "tune": TrainingStage(lambda: [continue_argv(c, TUNING_SEEDS, s.tune_dir, jobs) for c in tuning_grid()],
                                  lambda: not missing(s.tune_dir, tuning_grid(), TUNING_SEEDS), lambda: [s.tune_dir]),
            "continue": TrainingStage(lambda: [continue_argv(c, SEEDS, s.arms_dir, jobs) for c in arms()],
                                      lambda: not missing(s.arms_dir, arms(), SEEDS), lambda: [s.arms_dir])}


# --- The stages ---------------------------------------------------------------------------------------
def stage_pack(s: Setup, dry: bool, force: bool) -> None:
    sets = packed_sets(s)
    share = f"{s.data.val_percent:g}% of the files held out"
    for prefix, (subset, split) in sets.items():
        print(f"(packed set) stdlib:{subset}:{split} ({share}), concat rows of {s.data.seq_len} -> {prefix}")
    if dry:
        return
    if not force and all(Path(f"{p}.json").exists() for p in sets):
        print("pack: every packed set exists; skipped (--force repacks)")
        check_held_out_share(s)
        check_validation_rows(s)
        return
    from data.corpus import stdlib_documents
    from data.format import dataset_exists
    from data.pipeline import pack_documents
    from data.prepare import ensure_tokenizer

    tokenizer = ensure_tokenizer(s.data)
    for prefix, (subset, split) in sets.items():
        prefix.parent.mkdir(parents=True, exist_ok=True)
        documents = stdlib_documents(subset, split, s.data.val_percent)
        source = {"inputs": [f"stdlib:{subset}:{split}"], "val_percent": s.data.val_percent}
        meta = pack_documents(documents, tokenizer, s.data.seq_len, "concat", str(prefix),
                              overwrite=dataset_exists(prefix), progress=False, metadata={"source": source})
        print(f"wrote {prefix}: {meta['stats']['rows']} rows, {meta['stats']['corpus_tokens']} tokens")
    check_validation_rows(s)
    launch(["tools/pack.py", "--verify", *map(str, sets)])


def check_held_out_share(s: Setup) -> None:
    """Every packed set was split at the presets' data.val_percent: its path does not say the share."""
    for prefix in packed_sets(s):
        packed = json.loads(Path(f"{prefix}.json").read_text()).get("source", {}).get("val_percent")
        if packed != s.data.val_percent:
            raise ExperimentError(f"{prefix} was packed with {packed}% of the files held out, but data.val_percent "
                                  f"is {s.data.val_percent:g}; rerun --stage pack --force")


def check_validation_rows(s: Setup) -> None:
    """Every validation set holds the rows one evaluation scores, so none is scored twice."""
    for prefix, (_, split) in packed_sets(s).items():
        rows = json.loads(Path(f"{prefix}.json").read_text())["stats"]["rows"]
        if split == "val" and rows < s.val_rows:
            raise ExperimentError(f"{prefix} holds {rows} rows, fewer than the {s.val_rows} one evaluation scores; "
                                  "raise data.val_percent in conf/experiment/moe_pretrain.yaml and rerun --stage pack "
                                  "--force")


def stage_training(name: str, s: Setup, jobs: int, dry: bool, force: bool, overrides: tuple[str, ...] = (),
                   concurrent: bool = False) -> None:
    stage = training_stages(s, jobs)[name]
    if dry:  # the continue stage's β = γ comes from the tuning runs
        print_commands(name, stage, overrides, lambda e: [
            "python " + " ".join(continue_argv(BASELINE, SEEDS, s.arms_dir, jobs)),
            f"{name}: and the chosen β = γ on seeds {','.join(map(str, SEEDS))}, once chosen: {e}"])
        return
    if name != "pretrain":
        require_pretrained(s)
    run_stage(name, stage, force, launch, overrides, concurrent)


def commands(s: Setup, jobs: int, overrides: tuple[str, ...] = ()) -> list[str]:
    """Every training command of the experiment, for the report's provenance."""
    try:
        arms = [BASELINE, chosen(s)]
    except ExperimentError:
        arms = [BASELINE]
    tuned = [] if s.beta_from else [continue_argv(c, TUNING_SEEDS, s.tune_dir, jobs) for c in tuning_grid()]
    argvs = [pretrain_argv(), *tuned, *(continue_argv(c, SEEDS, s.arms_dir, jobs) for c in arms)]
    return ["python " + " ".join(with_overrides(a, overrides)) for a in argvs]


def stage_report(s: Setup, jobs: int, out: Path, name: str, tail: float, dry: bool,
                 overrides: tuple[str, ...] = ()) -> dict | None:
    print("python " + " ".join(report_argv(s, out, name)))
    if dry:
        return None
    report = moe_report.build([s.continue_dir], tail, s.pretrain_dir if completed(s.pretrain_dir) else None)
    report["provenance"]["experiment_commands"] = commands(s, jobs, overrides)
    presets = {f"{p}.yaml": (ROOT / "conf" / "experiment" / f"{p}.yaml").read_text()
               for p in ("moe_specialization", "moe_pretrain", "moe_continue")}
    setup_ = {"betas": list(BETAS), "tuning_seeds": list(TUNING_SEEDS), "reported_seeds": list(SEEDS),
              "beta_from": str(s.beta_from) if s.beta_from else None,
              "validation_rows": s.val_rows, "val_percent": s.data.val_percent,
              "packed_sets": {str(p): f"stdlib:{sub}:{split}" for p, (sub, split) in packed_sets(s).items()},
              **presets}
    result = moe_report.write(report, out, name, {"setup": setup_})
    print(moe_report.summary(result, out, name))
    return result


def main(argv: list[str] | None = None) -> int:
    p = driver_parser(__doc__, STAGES, report="moe")
    p.add_argument("--tail", type=float, default=0.2, help="fraction of logged steps averaged for router statistics")
    p.add_argument("--beta-from", type=Path, metavar="REPORT_JSON",
                   help="continue at the β = γ this report's tuning chose (e.g. docs/results/moe.json), not tuned "
                        "again")
    args = p.parse_args(argv)

    def run() -> None:
        os.chdir(ROOT)
        if args.beta_from:  # checked before the presets are composed
            print(f"β = γ = {reported_choice(args.beta_from)[0]:g}, as {args.beta_from} chose it on its tuning seeds")
        s = dataclasses.replace(setup(tuple(args.overrides)), beta_from=args.beta_from)
        stages: dict[str, Callable[[], object]] = {
            "pack": lambda: stage_pack(s, args.dry_run, args.force),
            "report": lambda: stage_report(s, args.jobs, args.out, args.name, args.tail, args.dry_run,
                                           args.overrides)}
        for stage in chosen_stages(args, STAGES):
            stages.get(stage, lambda: stage_training(stage, s, args.jobs, args.dry_run, args.force, args.overrides, args.concurrent))()

    return guarded(run)


if __name__ == "__main__":
    raise SystemExit(main())
