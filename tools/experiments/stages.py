"""The drivers' training stages: `TrainingStage` (its commands, whether its runs are done, what --force
removes), `print_commands` (--dry-run), `run_stage` (skip when done, else launch, in order or --concurrent),
`run_rounds` (a stage planned again from its own finished runs until its plan is done) and `launch` (one
process from the repository root, one thread per BLAS pool)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from tools.experiments import ExperimentError

ROOT = Path(__file__).resolve().parents[2]  # the drivers' commands run from the repository root


@dataclass(frozen=True)
class TrainingStage:
    argvs: Callable[[], list[list[str]]]  # its processes, one after another
    done: Callable[[], bool]  # have all its runs finished?
    folders: Callable[[], list[Path]]  # what --force removes


def launch(argv: list[str]) -> None:
    """One process of a stage, its output on this terminal (each run also logs to its folder's main.log).
    One thread per BLAS pool: the multiruns put one run on each core."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env)
    if proc.returncode:
        raise ExperimentError(f"`python {' '.join(argv)}` exited {proc.returncode}; see its output above")


def sweep_values(values) -> str:
    """A Hydra sweep's values, e.g. optim.lr=0.001,0.003 (each as %g)."""
    return ",".join(f"{v:g}" for v in values)


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


def run_rounds(name: str, plan: Callable[[], TrainingStage], launch: Callable[[list[str]], None] = launch,
               overrides: Iterable[str] = (), concurrent: bool = False, dry: bool = False, then: str = "") -> None:
    """A stage whose runs depend on its own finished runs (a tuning grid extended past the edge its choice sits
    on): plan it, launch what the plan lacks, plan again, until a plan's runs have all finished. --dry-run
    prints the first round and `then`, what later rounds would add. (--force is the caller's: remove first.)"""
    launched = False
    while True:
        stage = plan()
        if dry:
            print_commands(name, stage, overrides)
            if then:
                print(f"({name}) then {then}")
            return
        if stage.done():
            if not launched:
                print(f"{name}: every run has finished; skipped (--force reruns it)")
            return
        run_stage(name, stage, False, launch, overrides, concurrent)
        launched = True
        if not stage.done():
            raise ExperimentError(f"{name}: the multiruns ended without every run of the stage; see their output")
