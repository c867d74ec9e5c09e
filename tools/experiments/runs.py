"""Run folders: `load_runs` finds the finished ones below some roots (the resolved config of run_info.json,
the status of result.json, the rows of metrics.jsonl), `Run` reads metrics from them, `by_arm` groups them
into arms of one run per seed and `per_seed` takes one number per seed."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable, Iterable

from pretrain.rundir import read_metrics
from tools.experiments import ExperimentError

# a run that ended by itself: a diverged run is a finished point of a grid (rerunning it would diverge again),
# not a missing one
FINISHED = ("completed", "diverged")


class NoRuns(ExperimentError):
    """No finished run below the roots a report was given."""


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
        return {int(r["step"]): float(r[key]) for r in self.rows if is_number(r.get(key))}

    def values(self, key: str, after: int = 0) -> list[float]:
        """The logged values of `key` after step `after`, in step order."""
        return [v for step, v in sorted(self.series(key).items()) if step > after]

    def last(self, key: str) -> float | None:
        """The value of `key` at the last step that logged it (the final evaluation for val_loss)."""
        values = self.values(key)
        return values[-1] if values else None


def is_number(value) -> bool:
    """A logged number: keel logs a non-finite value as a string."""
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


def completed(run_dir: Path) -> bool:
    """The run in `run_dir` finished with status completed (result.json)."""
    result = run_dir / "result.json"
    return result.exists() and json.loads(result.read_text()).get("status") == "completed"


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
