"""What the experiment drivers and reports share, written once.

- Runs: `load_runs` finds the finished run folders below some roots (the resolved config of
  run_info.json, the status of result.json, the rows of metrics.jsonl); `Run` reads metrics from them.
- Arms and seeds: `by_arm` groups runs into arms, one run per seed; `per_seed` takes one number per seed.
- Paired seeds: `paired` compares two arms seed by seed (the same seed means the same initialisation
  and data order, so the per-seed difference cancels most of the seed noise): the mean difference and
  its 95% Student-t interval. An interval that covers 0 shows no difference, and shows no equality either:
  only `Paired.equivalence` (TOST, two one-sided paired t-tests against a margin fixed before the runs)
  can say two arms match.
- Tuning apart from reporting: hyperparameters are chosen on TUNING_SEEDS (`select`, which refuses any
  other seed) and arms are compared on REPORTED_SEEDS (`paired`, which refuses a tuning seed), so no
  reported difference comes from the seeds a choice was made on.
- One validation set: `one_validation_set`, the digest of the text each validation set scored, from the
  runs' run_info.json, refusing runs that scored different text.
- Provenance: `results_provenance`, what every results JSON opens with, refusing a report from an
  uncommitted tree, a run trained from one, and a run that scored a validation set without its digest.
- Summaries and tables: `summarize`, `mean_std`, `fmt`, `markdown_table`.
- The reports' command line: `report_parser`, and `guarded`, which turns a problem with the runs into
  one line and exit code 2.
- The drivers' stages: `TrainingStage` (its commands, whether its runs are done, what --force removes),
  `print_commands` (--dry-run), `run_stage` (skip when done, else launch, in order or --concurrent),
  `launch` (one process from the repository root, one thread per BLAS pool) and `completed`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable, Iterable

from pretrain.rundir import read_metrics, runs_provenance, scored_validation

ROOT = Path(__file__).resolve().parents[2]  # the drivers' commands run from the repository root
CONFIDENCE = 0.95
MISSING = "—"  # a table cell without a value


class ExperimentError(ValueError):
    """A problem an experiment script reports in one line: no runs found, one seed twice in an arm, a
    stage that failed."""


class NoRuns(ExperimentError):
    """No finished run below the roots a report was given."""


# --- Runs -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    name: str  # the folder, relative to the root it was found below
    folder: Path
    config: dict  # the resolved config (run_info.json)
    status: str  # completed | diverged (result.json)
    rows: list[dict]  # metrics.jsonl
    info: dict = field(default_factory=dict, compare=False)  # the whole run_info.json: command, device, versions

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    def series(self, key: str) -> dict[int, float]:
        """step -> value of `key`, at the steps where it was logged as a number (keel logs a
        non-finite value as a string, so NaN and inf are left out)."""
        return {int(r["step"]): float(r[key]) for r in self.rows if _is_number(r.get(key))}

    def values(self, key: str, after: int = 0) -> list[float]:
        """The logged values of `key` after step `after`, in step order."""
        return [v for step, v in sorted(self.series(key).items()) if step > after]

    def last(self, key: str) -> float | None:
        """The value of `key` at the last step that logged it (the final evaluation for val_loss)."""
        values = self.values(key)
        return values[-1] if values else None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_runs(*roots: Path, statuses: tuple[str, ...] = ("completed",)) -> list[Run]:
    """Every run folder below `roots` (any depth) whose result.json status is one of `statuses`, in
    path order. Runs without a result.json are still going and left out."""
    runs = []
    for root, info in sorted((Path(root), p) for root in roots for p in Path(root).rglob("run_info.json")):
        folder, result = info.parent, info.parent / "result.json"
        status = json.loads(result.read_text())["status"] if result.exists() else None
        if status in statuses:
            name = str(folder.relative_to(root)) if folder != root else folder.name
            run_info = json.loads(info.read_text())
            runs.append(Run(name, folder, run_info["config"], status, read_metrics(folder), run_info))
    if not runs:
        raise NoRuns(f"no {' or '.join(statuses)} runs (run_info.json beside a result.json) below "
                              f"{', '.join(map(str, roots))}; run the experiment first")
    return runs


# --- Arms and seeds -------------------------------------------------------------------------------
def by_arm(runs: Iterable[Run], arm: Callable[[Run], Hashable]) -> dict[Hashable, dict[int, Run]]:
    """arm -> seed -> run, arms in the order first seen and seeds sorted. Two runs of one arm with the
    same seed are an error: they would be counted twice."""
    arms: dict[Hashable, dict[int, Run]] = {}
    for run in runs:
        seeds = arms.setdefault(arm(run), {})
        if run.seed in seeds:
            raise ExperimentError(f"{seeds[run.seed].folder} and {run.folder} are both seed {run.seed} of arm "
                                  f"{arm(run)!r}; remove one, or report them from separate roots")
        seeds[run.seed] = run
    return {name: dict(sorted(seeds.items())) for name, seeds in arms.items()}


def per_seed(arm: dict[int, Run], value: Callable[[Run], float | None]) -> dict[int, float]:
    """seed -> value(run) for the arm's runs, leaving out runs without a value."""
    return {seed: v for seed, run in arm.items() if (v := value(run)) is not None}


# --- Tuning and reported seeds --------------------------------------------------------------------
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


# --- Paired seeds ---------------------------------------------------------------------------------
EQUIVALENCE_ALPHA = 0.05  # each one-sided test of TOST: equivalence when the 90% interval lies inside ±margin


@dataclass(frozen=True)
class Equivalence:
    """TOST of paired differences against ±margin: two one-sided t-tests, H0 "mean <= -margin" and H0
    "mean >= +margin"; the arms are equivalent when both are rejected at `alpha`, which is the same as
    the (1 - 2 alpha) interval of the mean lying inside (-margin, +margin)."""

    margin: float
    alpha: float
    p_value: float  # the larger of the two one-sided p-values: TOST's p-value
    interval: tuple[float, float]  # the (1 - 2 alpha) Student-t interval of the mean

    @property
    def equivalent(self) -> bool:
        return self.p_value < self.alpha

    def as_dict(self) -> dict:
        return {"margin": self.margin, "alpha": self.alpha, "p_value": self.p_value,
                f"interval{round(100 * (1 - 2 * self.alpha))}": list(self.interval), "equivalent": self.equivalent}


@dataclass(frozen=True)
class Paired:
    """Arm b against arm a, seed by seed."""

    seeds: tuple[int, ...]  # the seeds both arms ran
    diffs: tuple[float, ...]  # b - a, per seed
    mean: float
    interval: tuple[float, float] | None  # 95% Student-t interval of the mean; None from one pair

    @property
    def covers_zero(self) -> bool:
        """The interval covers 0: no difference shown (which is not equality). Never true without an
        interval: one pair says nothing about noise."""
        return self.interval is not None and self.interval[0] <= 0.0 <= self.interval[1]

    def equivalence(self, margin: float, alpha: float = EQUIVALENCE_ALPHA) -> Equivalence | None:
        """TOST at ±margin (None from one pair). The margin must be fixed before the runs it judges."""
        if not margin > 0:
            raise ExperimentError(f"an equivalence margin must be positive, got {margin}")
        if len(self.diffs) < 2:
            return None
        from scipy import stats

        n = len(self.diffs)
        se = statistics.stdev(self.diffs) / math.sqrt(n)
        if se == 0.0:  # identical differences: the mean is known exactly
            p = 0.0 if abs(self.mean) < margin else 1.0
            return Equivalence(margin, alpha, p, (self.mean, self.mean))
        t = stats.t(n - 1)
        p_above = t.sf((self.mean + margin) / se)  # H0: mean <= -margin
        p_below = t.cdf((self.mean - margin) / se)  # H0: mean >= +margin
        half = t_quantile(1 - 2 * alpha, n - 1) * se
        return Equivalence(margin, alpha, float(max(p_above, p_below)), (self.mean - half, self.mean + half))

    def verdict(self, margin: float | None = None) -> str:
        """higher / lower when the 95% interval excludes 0; otherwise "interval covers 0", or with a
        `margin`, "equivalent within ±margin" when TOST shows it and "inconclusive" when it does not."""
        if self.interval is None:
            return "one seed: no interval"
        direction = None if self.covers_zero else ("higher" if self.mean > 0 else "lower")
        if margin is None:
            return direction or "interval covers 0"
        equivalent = self.equivalence(margin).equivalent
        if direction:
            return f"{direction}, by less than {margin:g}" if equivalent else direction
        return f"equivalent within ±{margin:g}" if equivalent else "inconclusive"

    def as_dict(self, margin: float | None = None) -> dict:
        """What a results JSON records of the pair; with a margin, also its TOST ("equivalence")."""
        out = {"seeds": list(self.seeds), "diffs": list(self.diffs), "mean": self.mean,
               "interval95": list(self.interval) if self.interval else None, "verdict": self.verdict(margin)}
        if margin is not None:
            tost = self.equivalence(margin)
            out["equivalence"] = tost.as_dict() if tost else None
        return out


def paired(a: dict[int, float], b: dict[int, float], confidence: float = CONFIDENCE) -> Paired:
    """The per-seed differences b - a over the seeds both arms ran, their mean and its interval."""
    seeds = tuple(sorted(a.keys() & b.keys()))
    if tuning := [s for s in seeds if s in TUNING_SEEDS]:
        raise ExperimentError(f"seeds {tuning} are tuning seeds: hyperparameters were chosen on them, so they "
                              f"cannot report a comparison; pair on seeds {REPORTED_SEEDS.start}-"
                              f"{REPORTED_SEEDS.stop - 1}")
    if not seeds:
        raise ExperimentError(f"the arms share no seed (seeds {sorted(a)} and {sorted(b)}); "
                              "run both arms with the same seeds")
    diffs = tuple(b[s] - a[s] for s in seeds)
    mean = statistics.fmean(diffs)
    if len(diffs) == 1:
        return Paired(seeds, diffs, mean, None)
    half = t_quantile(confidence, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return Paired(seeds, diffs, mean, (mean - half, mean + half))


def t_quantile(confidence: float, df: int) -> float:
    """t such that P(|T| <= t) = confidence for Student's t with `df` degrees of freedom (two-sided)."""
    from scipy import stats

    return float(stats.t.ppf(0.5 + confidence / 2, df))


# --- Provenance ------------------------------------------------------------------------------------
def one_validation_set(infos: Iterable[dict]) -> dict[str, list[str]]:
    """Validation set -> the digest of the text the runs scored on it (run_info.json); an error when runs
    scored different text: a report compares every loss it reads with others, so a stale run from another
    split or size left below its roots must not slip in."""
    digests = {name: v["digests"] for name, v in scored_validation(infos).items()}
    if mixed := {name: len(d) for name, d in digests.items() if len(d) > 1}:
        sets = ", ".join(f"{name} ({n} different texts)" for name, n in mixed.items())
        raise ExperimentError(f"the runs scored different validation sets: {sets}; remove the stale runs or rerun "
                              "them on one set")
    return digests


def committed(revision: str | None) -> bool:
    """A revision names a commit: recorded, known, and not "+dirty" (uncommitted changes to tracked files)."""
    return bool(revision) and revision not in ("unknown", "unrecorded") and not revision.endswith("+dirty")


def scored_sets(run: Run) -> set[str]:
    """The validation sets a run logged a loss on: val_loss and val_loss/NAME (data.val_sets)."""
    return {key for row in run.rows for key, value in row.items()
            if (key == "val_loss" or key.startswith("val_loss/")) and _is_number(value)}


def results_provenance(runs: Iterable[Run]) -> dict:
    """{"provenance", "val_digests"}: where a results JSON comes from (pretrain.rundir.runs_provenance) and
    the one digest of each validation set its runs scored. A report calls it before it writes anything,
    and it refuses, in one line: a report from a tree with uncommitted changes, a run trained from one (or
    that recorded no revision), a run that scored a validation set without recording its digest, and runs
    that scored different text. Every number in a results JSON can then be traced to a commit and to the
    exact validation text."""
    runs = list(runs)
    prov = runs_provenance([r.info for r in runs])
    if not committed(prov["git_revision"]):
        raise ExperimentError(f"this checkout is at git revision {prov['git_revision']}, not a commit: commit (or "
                              "stash) the changes to tracked files, then report again; a results JSON comes from "
                              "a committed tree")
    if dirty := [r for r in runs if not committed(r.info.get("git_revision"))]:
        raise ExperimentError(f"{len(dirty)} run(s) were not trained from a commit, e.g. {dirty[0].folder} (git "
                              f"revision {dirty[0].info.get('git_revision', 'unrecorded')}); rerun them from a "
                              "committed tree")
    for run in runs:
        if missing := sorted(scored_sets(run) - set(run.info.get("validation", {}))):
            raise ExperimentError(f"{run.folder} scored {', '.join(missing)} but its run_info.json records no digest "
                                  "of that text (a run from before keel recorded them); rerun it")
    return {"provenance": prov, "val_digests": one_validation_set(r.info for r in runs)}


# --- Summaries and tables -------------------------------------------------------------------------
def summarize(values: Iterable[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), extremes and the values themselves."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("summarize needs at least one value")
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs), "spread": max(xs) - min(xs), "n": len(xs), "values": xs}


def mean_std(mean: float, std: float, spec: str = ".4f") -> str:
    return f"{mean:{spec}} ± {std:{spec}}"


def fmt(value: float | None, spec: str = ".3f") -> str:
    return MISSING if value is None else format(value, spec)


def markdown_table(header: list[str], rows: Iterable[list], align: str = "") -> str:
    """A markdown table of preformatted cells; `align` holds one letter per column, l or r (default l)."""
    rule = ["---:" if a == "r" else "---" for a in align.ljust(len(header), "l")]
    return "\n".join("| " + " | ".join(map(str, cells)) + " |" for cells in [header, rule, *rows])


# --- The reports' command line --------------------------------------------------------------------
def report_parser(doc: str, name: str | None = None) -> argparse.ArgumentParser:
    """ROOT ... --out DIR [--name STEM]: the arguments every report takes."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("roots", type=Path, nargs="+", help="folders holding the run folders (any depth)")
    p.add_argument("--out", type=Path, required=True, help="folder for the JSON and the plots")
    if name:
        p.add_argument("--name", default=name, help="stem of the files written into --out")
    return p


def driver_parser(doc: str, stages: tuple[str, ...], report: str | None = None) -> argparse.ArgumentParser:
    """--stage, --jobs, --concurrent, --dry-run, --force, --set: the arguments every experiment driver takes; with
    `report` (the stem of its report's files) also --out and --name."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if report:
        p.add_argument("--out", type=Path, default=Path("docs/results"), help="folder for the report's JSON and plots")
        p.add_argument("--name", default=report, help="stem of the report's files")
    p.add_argument("--stage", choices=("all", *stages), default="all", help="one stage (default: all, in order)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (hydra.launcher.n_jobs), one core each")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--force", action="store_true", help="redo stages that are done (their folders removed)")
    p.add_argument("--concurrent", action="store_true",
                   help="launch a stage's multiruns all at once rather than one after another (a machine with "
                        "cores and a GPU to spare: --jobs runs each, so jobs x multiruns in all)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="Hydra overrides added to every training run and to the presets the driver reads (its "
                        "packed sets, validation rows), e.g. trainer.precision=bf16 on a GPU (tools/gpu_check.sh)")
    return p


def guarded(report: Callable[[], None]) -> int:
    """Run a report; a problem with its runs is one line on stderr and exit code 2."""
    try:
        report()
    except ExperimentError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        return 2
    return 0


# --- The drivers' stages --------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingStage:
    argvs: Callable[[], list[list[str]]]  # its processes, one after another
    done: Callable[[], bool]  # have all its runs finished?
    folders: Callable[[], list[Path]]  # what --force removes


def completed(run_dir: Path) -> bool:
    result = run_dir / "result.json"
    return result.exists() and json.loads(result.read_text()).get("status") == "completed"


def launch(argv: list[str]) -> None:
    """One process of a stage, its output on this terminal (each run also logs to its folder's main.log).
    One thread per BLAS pool: the multiruns put one run on each core."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env)
    if proc.returncode:
        raise ExperimentError(f"`python {' '.join(argv)}` exited {proc.returncode}; see its output above")


def with_overrides(argv: list[str], overrides: Iterable[str]) -> list[str]:
    """A training run's command with the driver's --set overrides last (they win); other commands as they are."""
    return [*argv, *overrides] if argv[:1] == ["pretrain/main.py"] else argv


def print_commands(name: str, stage: TrainingStage, overrides: Iterable[str] = (),
                   pending: Callable[[ExperimentError], list[str]] | None = None) -> None:
    """--dry-run: the stage's commands; when they depend on runs not made yet (a rate or β = γ chosen by
    an earlier stage, steps from packed sets), the lines `pending` makes of the reason instead."""
    try:
        lines = ["python " + " ".join(with_overrides(argv, overrides)) for argv in stage.argvs()]
    except ExperimentError as e:
        lines = pending(e) if pending else [f"{name}: {e}"]
    print("\n".join(lines))


def run_stage(name: str, stage: TrainingStage, force: bool, launch: Callable[[list[str]], None] = launch,
              overrides: Iterable[str] = (), concurrent: bool = False) -> None:
    """Launch a stage's processes in order, or all at once when `concurrent` (--concurrent), or skip the
    stage when its runs are done; --force removes its folders and runs it again; `overrides` (--set) go to
    every training run. (`launch` is the driver's, so tests can replace it.)"""
    if force:
        for folder in stage.folders():
            shutil.rmtree(folder, ignore_errors=True)
    elif stage.done():
        print(f"{name}: every run has finished; skipped (--force reruns it)")
        return
    argvs = [with_overrides(argv, overrides) for argv in stage.argvs()]
    if not concurrent:
        for argv in argvs:
            print("python " + " ".join(argv))
            launch(argv)
        return
    # A stage's processes are independent multiruns (one per width, per chosen rate, ...), each into
    # its own run folders; every one runs to its end before the first failure is raised.
    print("\n".join(f"python {' '.join(argv)} &" for argv in argvs))
    with ThreadPoolExecutor(max_workers=len(argvs) or 1) as pool:
        futures = [pool.submit(launch, argv) for argv in argvs]
    for future in futures:
        if future.exception():
            raise future.exception()
