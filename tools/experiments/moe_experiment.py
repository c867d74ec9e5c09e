"""The MoE expert-specialisation experiment of keel issue 37 (docs/results/moe.md, its pre-registration) in the
paper's setting: Guo et al. 2025 add L_o and L_v to an MoE pretrained with the auxiliary loss only. Here one MoE
is pretrained with the aux loss only on an even mixture of two sources that differ in kind, code and English
prose; then it is continued with aux only, + L_o, + L_v and + both. β and γ are set apart: each grid is centred
on the paper's target magnitude measured at the start of continuation, each loss is tuned alone on tuning
seeds, and the four arms are compared seed by seed with aux only on reported seeds, on one fixed validation
set per source. Expert specialisation is measured by routing purity per source, which no loss optimises.

Seven stages; each training stage is Hydra multiruns of pretrain/main.py (hydra/launcher=local, --jobs runs
at once):
1. pack: the standard library's modules without their docstrings (stdlib:code-nodoc) and its English prose
   (stdlib:prose: the modules' docstrings and help()'s topics), split by file (topics by topic; data.val_percent
   of the names held out) and concat-packed: each source's training set, each source's validation set
   (val_loss/code-nodoc, val_loss/prose) and both sources' held-out documents interleaved by characters
   (val_loss: every prefix holds both, so the rows one evaluation scores do), at the presets' paths.
2. pretrain: the aux-only MoE, one run:
       python pretrain/main.py +experiment=moe_pretrain
3. measure: MEASURE_STEPS steps continued from it with both losses computed at a negligible coefficient
   (PROBE), logging every step, into runs/moe_continue/measure: L_LM (the logged loss), and L_o and L_v summed
   over the MoE layers (each layer adds its own term), means over those steps. Each grid's centre is the
   coefficient that puts the term at the paper's share of the loss (TARGETS): β·L_o / L_LM = 1e-4,
   γ·|L_v| / L_LM = 1e-3 (`centres`; two significant figures).
4. tune: each loss alone at GRID x its centre, on the tuning seeds, into runs/moe_continue/tune:
       python pretrain/main.py -m hydra/launcher=local hydra.launcher.n_jobs=2 +experiment=moe_continue \
           model.moe.ortho_loss=B model.moe.var_loss=0 seed=100,101 hydra.sweep.dir=runs/moe_continue/tune
   A value is chosen per loss (moe_report.choose: the lowest mean final val_loss over the tuning seeds). A
   choice at an edge of the values tried adds the next value past it (x1/4 or x4) and tunes again, at most
   EXTENSIONS times per loss; a choice still at an edge then is flagged (at_edge in the JSON) and used.
5. continue: aux only, aux + L_o (β chosen), aux + L_v (γ chosen), aux + both (each as chosen alone) on the
   reported seeds, into runs/moe_continue/arms. The seed sets a continued run's data order; its weights are
   the pretrained ones. With --coeffs-from REPORT_JSON, β and γ are those that report's tuning chose (a
   re-run elsewhere: tools/gpu_check.sh section 44); the measure and tune stages then have nothing to do.
6. report: tools/experiments/moe_report.py over runs/moe_continue, the pretrained run as step 0:
   docs/results/moe.json (provenance, the measured magnitudes and centres, each loss's tuning, per-arm final
   validation loss overall and per source, paired differences against aux only with 95% intervals, purity
   and NMI per source and layer, overlap, routing variance, MaxVio, validation digests) and
   docs/results/moe_*.png.

    python tools/experiments/moe_experiment.py                  # every stage
    python tools/experiments/moe_experiment.py --dry-run        # print the commands only
    python tools/experiments/moe_experiment.py --stage report   # re-aggregate existing runs

A stage whose packed sets exist or whose runs have all completed is skipped (--force redoes it from
scratch); otherwise it runs whole: keel resumes a killed run from its last checkpoint, and a completed
run ends at once, so a stage stopped by the end of a session continues in the next. Row length, validation
rows, the held-out share and every path come from the presets.

Cost, measured 2026-12-06 on the 2-core CPU (one thread per run, nice 19, the machine shared with other work:
CPU seconds from /usr/bin/time, so the sharing inflates wall time, not these): a training step of 16 x 128
tokens takes 0.39 CPU-s with aux only and 0.43 with L_o + L_v on (60-step minus 10-step runs), one evaluation
batch (16 x 128 tokens) 0.19 CPU-s, so one evaluation of the three sets (64 + 64 + 39 batches) 32 CPU-s, and a
process's start 12 CPU-s. Hence per run: pretraining (1200 steps, 4 evaluations) 9.2 CPU-minutes; measuring
(5 steps, 1 evaluation) 0.6; a continued run (500 steps, 5 evaluations with the one at its start) 5.0-5.4.
Stages, in CPU-hours: pack not measured (the 20% split's tokenizer is trained once, then five sets packed);
pretrain 0.15; measure 0.01; tune 1.05 (12 runs: 2 losses x 3 values x 2 seeds) plus 0.18 per extension of
one loss (2 runs), at most 0.7 more (4 extensions); continue 1.75 (20 runs: 4 arms x 5 seeds); report 0.02.
In all 3.0 CPU-hours, 3.7 at the most. Wall time on 2 free cores (--jobs 2; pretraining runs alone): pretrain
9 minutes, tune 31 (+10.5 per extension round), continue 62 (each arm's 5 seeds in 3 waves of 2, 2, 1).
Split across sessions (a stage cut off by a session's end resumes in the next): session 1, pack + pretrain +
measure + tune, about 45 minutes of 2 free cores (plus 10.5 per extension round); session 2, continue +
report, about 65 minutes. A session on a machine shared as on 2026-12-06 (load about 10) takes 2-3x longer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from data.config import DataConfig
from data.corpus import STDLIB_SUBSETS, Document
from tools.experiments import moe_report
from tools.experiments import ExperimentError
from tools.experiments.cli import chosen_stages, driver_parser, guarded
from tools.experiments.runs import FINISHED, NoRuns, Run, completed, load_runs
from tools.experiments.stages import ROOT, TrainingStage, launch, print_commands, run_stage, with_overrides

LOSSES = tuple(moe_report.LOSSES)  # ("ortho_loss", "var_loss"): model.moe's β (L_o) and γ (L_v)
TARGETS = {"ortho_loss": 1e-4, "var_loss": 1e-3}  # the paper's share of L_LM: β·L_o and γ·|L_v| at the start
GRID = (0.25, 1.0, 4.0)  # each loss's first candidates, multiples of its centre
STEP = 4.0  # a choice at an edge adds the candidate STEP past it (x1/4 below, x4 above) ...
EXTENSIONS = 2  # ... at most this many times per loss; a choice still at an edge is flagged and used
TUNING_SEEDS = (100, 101)  # within seeds.TUNING_SEEDS
SEEDS = (1, 2, 3, 4, 5)  # reported, within seeds.REPORTED_SEEDS
MEASURE_SEED = 199  # a tuning seed: the measuring run reports nothing
MEASURE_STEPS = 5  # inside the continuation's 20 warmup steps: the pretrained model barely moves
PROBE = 1e-9  # both losses on at this coefficient in the measuring run: computed and logged, too weak to act
BASELINE = (0.0, 0.0)  # aux only: L_o and L_v off
STAGES = ("pack", "pretrain", "measure", "tune", "continue", "report")
MIXED = "mixed"  # val_loss's set: both sources' held-out documents, interleaved by characters


# --- The experiment's settings, from the presets ----------------------------------------------------
@dataclass(frozen=True)
class Setup:
    data: DataConfig  # moe_pretrain's: tokenizer, row length, held-out share, the packed sets' paths
    val_rows: int  # eval_batches x global_batch_size: the rows val_loss's set must hold (a source's: half)
    pretrain_dir: Path  # moe_pretrain's run_dir, moe_continue's init_from
    continue_dir: Path  # measure/, tune/ and arms/ below it
    coeffs_from: Path | None = None  # --coeffs-from: a report whose tuning chose β and γ; None: this tuning's

    @property
    def measure_dir(self) -> Path:
        return self.continue_dir / "measure"

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
    """Prefix -> (stdlib subset, or MIXED for val_loss's set; split) of every packed set the presets name."""
    out = {Path(src.path): (src.name, "train") for src in s.data.sources}
    out |= {Path(v.path): (v.name, "val") for v in s.data.val_sets}
    out[Path(s.data.val_path)] = (MIXED, "val")
    return out


def corpus_names(s: Setup, subset: str, split: str) -> list[str]:
    """The stdlib corpus names a packed set is made of: the sources' for MIXED."""
    subsets = [src.name for src in s.data.sources] if subset == MIXED else [subset]
    return [f"stdlib:{name}:{split}" for name in subsets]


def interleaved(streams: Iterable[Iterable[Document]]) -> Iterator[Document]:
    """The documents of several streams merged so that every prefix holds about as many characters of each:
    the next document comes from the stream that has given the fewest characters so far (the first on a tie).
    An evaluation scores only the first rows of its set, so val_loss's rows hold both sources alike."""
    streams = [iter(stream) for stream in streams]
    heads = [next(stream, None) for stream in streams]
    given = [0] * len(streams)
    while live := [i for i, head in enumerate(heads) if head is not None]:
        i = min(live, key=lambda k: given[k])
        yield heads[i]
        given[i] += len(heads[i].text)
        heads[i] = next(streams[i], None)


def documents(s: Setup, subset: str, split: str) -> Iterator[Document]:
    from data.corpus import stdlib_documents

    subsets = [src.name for src in s.data.sources] if subset == MIXED else [subset]
    return interleaved(stdlib_documents(name, split, s.data.val_percent) for name in subsets)


# --- The coefficients: measured centres, then each loss's grid --------------------------------------
def coefficient(x: float) -> float:
    """Two significant figures: a coefficient the commands and the page can name."""
    return float(f"{x:.2g}")


def arm(loss: str, value: float) -> tuple[float, float]:
    """(β, γ) with `loss` at `value` and the other off."""
    return (value, 0.0) if loss == "ortho_loss" else (0.0, value)


def magnitudes(s: Setup) -> dict:
    """L_LM, L_o and L_v at the start of continuation, from the measuring run: means over its logged steps,
    L_o and L_v summed over the MoE layers; and each grid's centre, TARGETS[loss] x L_LM / |term|."""
    run = next((r for r in runs_below(s.measure_dir) if r.folder == s.measure_dir), None)
    if run is None:
        raise ExperimentError(f"{s.measure_dir} holds no completed measuring run; run --stage measure first")
    layers = moe_report.layers_of(run)
    steps = [row for row in run.rows if "loss" in row and all(f"moe/layer{n}/{k}" in row for n in layers
                                                             for k in LOSSES)]
    if not layers or not steps:
        raise ExperimentError(f"{s.measure_dir}/metrics.jsonl logs no step with loss and every MoE layer's "
                              f"{' and '.join(LOSSES)}; rerun --stage measure --force")
    terms = {"lm_loss": statistics.fmean(row["loss"] for row in steps)}
    terms |= {k: statistics.fmean(sum(row[f"moe/layer{n}/{k}"] for n in layers) for row in steps) for k in LOSSES}
    centres = {k: coefficient(TARGETS[k] * terms["lm_loss"] / abs(terms[k])) for k in LOSSES}
    return {"steps": [row["step"] for row in steps], "layers": layers, **terms, "targets": TARGETS,
            "centres": centres}


def tuning_values(s: Setup, loss: str, runs: list[Run] | None = None) -> tuple[list[float], bool]:
    """The values of `loss` to tune, and whether they are final: GRID x its centre, extended by STEP past an
    edge the finished tuning runs chose, EXTENSIONS times at most. Not final while a value lacks a run."""
    runs = runs_below(s.tune_dir) if runs is None else runs
    values = [coefficient(m * magnitudes(s)["centres"][loss]) for m in GRID]
    while True:
        if missing(s.tune_dir, [arm(loss, v) for v in values], TUNING_SEEDS):
            return values, False
        choice = moe_report.choose([r for r in runs if moe_report.alone(r, loss) in values], loss)
        if choice is None:
            raise ExperimentError(f"every tuning run of {loss} in {s.tune_dir} diverged; lower its TARGETS or "
                                  "optim.lr in conf/experiment/moe_continue.yaml and rerun --stage tune --force")
        if not choice["at_edge"] or len(values) - len(GRID) == EXTENSIONS:
            return values, True
        edge = min(values) if choice["chosen"] == min(values) else max(values)
        values = sorted([*values, coefficient(edge / STEP if edge == min(values) else edge * STEP)])


# --- Which runs exist ---------------------------------------------------------------------------------


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


def require_pretrained(s: Setup) -> None:
    if not completed(s.pretrain_dir):
        raise ExperimentError(f"{s.pretrain_dir} holds no completed pretraining run (result.json); run "
                              "--stage pretrain first, or point moe_continue.yaml's init_from at one")


def chosen(s: Setup) -> tuple[float, float]:
    """(β, γ): each loss's value moe_report.choose picks from its finished tuning grid, or with --coeffs-from,
    those an earlier report's tuning picked."""
    if s.coeffs_from:
        return reported_choice(s.coeffs_from)
    runs = runs_below(s.tune_dir)
    out = []
    for loss in LOSSES:
        values, final = tuning_values(s, loss, runs)
        if not final:
            raise ExperimentError(f"the tuning of {loss} in {s.tune_dir} has not finished (values "
                                  f"{', '.join(f'{v:g}' for v in values)} on seeds {TUNING_SEEDS}); run --stage "
                                  "tune first")
        out.append(moe_report.choose([r for r in runs if moe_report.alone(r, loss) in values], loss)["chosen"])
    return out[0], out[1]


def reported_choice(report: Path) -> tuple[float, float]:
    """(β, γ) as a results JSON's "tuning" records them (moe_report.choose on its tuning seeds, each loss on its
    own): a re-run elsewhere (the GPU's, tools/gpu_check.sh section 44) continues at the choice made there."""
    try:
        tuned = json.loads(Path(report).read_text())["tuning"]
        return float(tuned["ortho_loss"]["chosen"]), float(tuned["var_loss"]["chosen"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExperimentError(f"{report}: no β and γ chosen apart on tuning seeds (its \"tuning\": ortho_loss and "
                              f"var_loss, each with \"chosen\"; {type(e).__name__}: {e}); give a report this "
                              "design's moe_report.py wrote") from None


def reported_arms(coeffs: tuple[float, float]) -> list[tuple[float, float]]:
    """Aux only, + L_o, + L_v and + both, at the chosen (β, γ)."""
    beta, gamma = coeffs
    return [BASELINE, (beta, 0.0), (0.0, gamma), (beta, gamma)]


# --- The commands -------------------------------------------------------------------------------------
def pretrain_argv() -> list[str]:
    return ["pretrain/main.py", "+experiment=moe_pretrain"]


def measure_argv(s: Setup) -> list[str]:
    """The measuring run: the first MEASURE_STEPS steps of a continuation, every one logged, both losses
    computed (at PROBE) so that the router logs them, no evaluation before the first step."""
    return ["pretrain/main.py", "+experiment=moe_continue", f"model.moe.ortho_loss={PROBE:g}",
            f"model.moe.var_loss={PROBE:g}", f"seed={MEASURE_SEED}", f"trainer.max_steps={MEASURE_STEPS}",
            "trainer.log_interval=1", "trainer.eval_at_start=false", f"run_dir={s.measure_dir}"]


def continue_argv(coeffs: tuple[float, float], seeds: tuple[int, ...], folder: Path, jobs: int) -> list[str]:
    """One arm (L_o and L_v coefficients) continued on `seeds`, one multirun into `folder`. The coefficients
    are named even when 0: init_from would bring the pretrained run's, and a named key keeps its value."""
    ortho, var = coeffs
    return ["pretrain/main.py", "-m", "hydra/launcher=local", f"hydra.launcher.n_jobs={jobs}",
            "+experiment=moe_continue", f"model.moe.ortho_loss={ortho:g}", f"model.moe.var_loss={var:g}",
            f"seed={','.join(map(str, seeds))}", f"hydra.sweep.dir={folder}"]


def tuning_arms(s: Setup, pending: bool = False) -> list[tuple[float, float]]:
    """(β, γ) of every value each loss's grid holds now; `pending`: only those lacking a finished run."""
    runs = runs_below(s.tune_dir)
    arms = [arm(loss, v) for loss in LOSSES for v in tuning_values(s, loss, runs)[0]]
    return [c for c in arms if missing(s.tune_dir, [c], TUNING_SEEDS)] if pending else arms


def report_argv(s: Setup, out: Path, name: str) -> list[str]:
    return ["tools/experiments/moe_report.py", str(s.continue_dir), "--pretrained", str(s.pretrain_dir),
            "--out", str(out), "--name", name]


def training_stages(s: Setup, jobs: int) -> dict[str, TrainingStage]:
    def arms() -> list[tuple[float, float]]:  # asked only when needed: the choice exists once the tuning runs do
        return reported_arms(chosen(s))

    def tuned() -> bool:
        return all(tuning_values(s, loss)[1] for loss in LOSSES)

    return {"pretrain": TrainingStage(lambda: [pretrain_argv()], lambda: completed(s.pretrain_dir),
                                      lambda: [s.pretrain_dir]),
            "measure": TrainingStage(lambda: [measure_argv(s)], lambda: completed(s.measure_dir),
                                     lambda: [s.measure_dir]),
            "tune": TrainingStage(lambda: [continue_argv(c, TUNING_SEEDS, s.tune_dir, jobs)
                                           for c in tuning_arms(s, pending=True)], tuned, lambda: [s.tune_dir]),
            "continue": TrainingStage(lambda: [continue_argv(c, SEEDS, s.arms_dir, jobs) for c in arms()],
                                      lambda: not missing(s.arms_dir, arms(), SEEDS), lambda: [s.arms_dir])}


# --- The stages ---------------------------------------------------------------------------------------
def stage_pack(s: Setup, dry: bool, force: bool) -> None:
    sets = packed_sets(s)
    share = f"{s.data.val_percent:g}% of the names held out"
    for prefix, (subset, split) in sets.items():
        how = ", interleaved by characters" if subset == MIXED else ""
        print(f"(packed set) {' + '.join(corpus_names(s, subset, split))} ({share}{how}), concat rows of "
              f"{s.data.seq_len} -> {prefix}")
    if dry:
        return
    if not force and all(Path(f"{p}.json").exists() for p in sets):
        print("pack: every packed set exists; skipped (--force repacks)")
        check_held_out_share(s)
        check_validation_rows(s)
        return
    from data.format import dataset_exists
    from data.pipeline import pack_documents
    from data.prepare import ensure_tokenizer

    tokenizer = ensure_tokenizer(s.data)
    for prefix, (subset, split) in sets.items():
        prefix.parent.mkdir(parents=True, exist_ok=True)
        source = {"inputs": corpus_names(s, subset, split), "val_percent": s.data.val_percent,
                  **({"interleaved": "by characters"} if subset == MIXED else {})}
        meta = pack_documents(documents(s, subset, split), tokenizer, s.data.seq_len, "concat", str(prefix),
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
    """val_loss's set (MIXED, the compared loss) holds the rows one evaluation scores, so none is scored twice.
    A source's own set may hold fewer, down to half: keel then scores the whole batches it holds
    (data.loader.evaluation_batches; run_info.json records the rows), since prose is small."""
    for prefix, (subset, split) in packed_sets(s).items():
        rows = json.loads(Path(f"{prefix}.json").read_text())["stats"]["rows"]
        needed = s.val_rows if subset == MIXED else s.val_rows // 2
        if split == "val" and rows < needed:
            raise ExperimentError(f"{prefix} holds {rows} rows, fewer than the {needed} its evaluation needs; "
                                  "raise data.val_percent in conf/experiment/moe_pretrain.yaml and rerun --stage pack "
                                  "--force")


def pending_lines(name: str, s: Setup, jobs: int) -> Callable[[ExperimentError], list[str]]:
    """--dry-run's lines for a stage whose commands wait on an earlier stage's runs."""
    def lines(e: ExperimentError) -> list[str]:
        if name == "tune":
            return [f"tune: each loss alone at {' / '.join(f'{m:g}' for m in GRID)} x its centre (measured by the "
                    f"measure stage) on seeds {','.join(map(str, TUNING_SEEDS))}, once measured: {e}"]
        return ["python " + " ".join(continue_argv(BASELINE, SEEDS, s.arms_dir, jobs)),
                f"{name}: and aux + L_o, aux + L_v, aux + both at the chosen β and γ on seeds "
                f"{','.join(map(str, SEEDS))}, once chosen: {e}"]
    return lines


def stage_training(name: str, s: Setup, jobs: int, dry: bool, force: bool, overrides: tuple[str, ...] = (),
                   concurrent: bool = False) -> None:
    stage = training_stages(s, jobs)[name]
    if dry:  # the tuning grids come from the measuring run, the continued arms from the tuning runs
        print_commands(name, stage, overrides, pending_lines(name, s, jobs))
        return
    if s.coeffs_from and name in ("measure", "tune"):
        print(f"{name}: β and γ come from {s.coeffs_from}; skipped")
        return
    if name != "pretrain":
        require_pretrained(s)
    if name == "tune" and force:
        shutil.rmtree(s.tune_dir, ignore_errors=True)
    run_stage(name, stage, force and name != "tune", launch, overrides, concurrent)
    # a choice at an edge of a loss's values adds one past it: tune again until every grid is final
    while name == "tune" and not stage.done():
        run_stage(name, stage, False, launch, overrides, concurrent)


def commands(s: Setup, jobs: int, overrides: tuple[str, ...] = ()) -> list[str]:
    """Every training command of the experiment, for the report's provenance."""
    try:
        arms = reported_arms(chosen(s))
    except ExperimentError:
        arms = [BASELINE]
    try:
        tuned = [] if s.coeffs_from else [measure_argv(s), *(continue_argv(c, TUNING_SEEDS, s.tune_dir, jobs)
                                                               for c in tuning_arms(s))]
    except ExperimentError:
        tuned = []
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
    try:
        measured = None if s.coeffs_from else magnitudes(s)
    except ExperimentError:
        measured = None
    setup_ = {"targets": TARGETS, "grid": list(GRID), "step": STEP, "extensions": EXTENSIONS,
              "tuning_seeds": list(TUNING_SEEDS), "reported_seeds": list(SEEDS), "magnitudes": measured,
              "coeffs_from": str(s.coeffs_from) if s.coeffs_from else None,
              "validation_rows": s.val_rows, "val_percent": s.data.val_percent,
              "packed_sets": {str(p): " + ".join(corpus_names(s, sub, split))
                              for p, (sub, split) in packed_sets(s).items()},
              **presets}
    result = moe_report.write(report, out, name, {"setup": setup_})
    print(moe_report.summary(result, out, name))
    return result


def main(argv: list[str] | None = None) -> int:
    p = driver_parser(__doc__, STAGES, report="moe")
    p.add_argument("--tail", type=float, default=0.2, help="fraction of logged steps averaged for router statistics")
    p.add_argument("--coeffs-from", type=Path, metavar="REPORT_JSON",
                   help="continue at the β and γ this report's tuning chose (a re-run elsewhere), not tuned again")
    args = p.parse_args(argv)

    def run() -> None:
        os.chdir(ROOT)
        if args.coeffs_from:  # checked before the presets are composed
            beta, gamma = reported_choice(args.coeffs_from)
            print(f"β = {beta:g}, γ = {gamma:g}, as {args.coeffs_from} chose them on its tuning seeds")
        s = dataclasses.replace(setup(tuple(args.overrides)), coeffs_from=args.coeffs_from)
        stages: dict[str, Callable[[], object]] = {
            "pack": lambda: stage_pack(s, args.dry_run, args.force),
            "report": lambda: stage_report(s, args.jobs, args.out, args.name, args.tail, args.dry_run,
                                           args.overrides)}
        for stage in chosen_stages(args, STAGES):
            stages.get(stage, lambda: stage_training(stage, s, args.jobs, args.dry_run, args.force, args.overrides,
                                                     args.concurrent))()

    return guarded(run)


if __name__ == "__main__":
    raise SystemExit(main())
