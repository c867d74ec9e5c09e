"""Where a staged pack's tasks run (data/staged.py): processes on this machine, Slurm job arrays through
submitit, or a Ray cluster. keel schedules nothing itself: each executor hands a stage's tasks to an
existing scheduler, and `run_stage` waits for them, shows progress, and retries a failed task.

A task is a picklable callable with a ``name``; its result is a dict (``tokens``: what it processed,
``skipped``: it was already complete).
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from data.errors import DataError

EXECUTORS = ("local", "slurm", "submitit-local", "ray")
STAGES = ("tokenize", "plan", "write")  # of a staged pack (data/staged.py); write ends with the merge


class Handle(Protocol):
    def done(self) -> bool: ...

    def result(self) -> dict: ...


class Executor(Protocol):
    def submit(self, tasks: Sequence[Callable[[], dict]]) -> list[Handle]: ...


class StageFailed(DataError):
    """A task failed on every attempt; the message names it."""


def _call(task: Callable[[], dict]) -> dict:
    return task()


class LocalExecutor:
    """Processes on this machine (forked, so a test's patches and the parent's imports carry over)."""

    def __init__(self, jobs: int):
        self.jobs = jobs
        self._pool: ProcessPoolExecutor | None = None

    def submit(self, tasks):
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.jobs, mp_context=mp.get_context("fork"))
        try:
            return [self._pool.submit(_call, t) for t in tasks]
        except BrokenProcessPool:  # a killed worker breaks the pool: retries go to a new one
            self._pool.shutdown(wait=False)
            self._pool = None
            return self.submit(tasks)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


class SubmititExecutor:
    """Slurm job arrays through submitit (``cluster="local"``: submitit's own processes, no Slurm needed).
    ``options`` go to submitit's ``update_parameters`` (e.g. slurm_partition, cpus_per_task, timeout_min)."""

    def __init__(self, folder: str | Path, cluster: str = "slurm", **options: Any):
        import submitit

        self._executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
        self._executor.update_parameters(**options)

    def submit(self, tasks):
        return self._executor.map_array(_call, list(tasks))  # one array job per stage (per retry)

    def close(self) -> None:
        pass


class _RayHandle:
    def __init__(self, ref):
        self.ref = ref

    def done(self) -> bool:
        import ray

        return bool(ray.wait([self.ref], timeout=0)[0])

    def result(self) -> dict:
        import ray

        return ray.get(self.ref)


class RayExecutor:
    """Ray tasks (the optional ``ray`` extra; not exercised in CI). ``options``: ``address`` for ray.init,
    ``num_cpus`` per task."""

    def __init__(self, address: str | None = None, num_cpus: float = 1, **_: Any):
        import ray

        ray.init(address=address, ignore_reinit_error=True)
        self._remote = ray.remote(num_cpus=num_cpus)(_call)

    def submit(self, tasks):
        return [_RayHandle(self._remote.remote(t)) for t in tasks]

    def close(self) -> None:
        pass


def make_executor(kind: str, *, jobs: int, folder: str | Path, options: dict[str, Any]) -> Executor:
    if kind == "local":
        return LocalExecutor(jobs)
    if kind in ("slurm", "submitit-local"):
        try:
            return SubmititExecutor(folder, "slurm" if kind == "slurm" else "local", **options)
        except ImportError:
            raise DataError("--executor slurm needs submitit: pip install 'keel[slurm]'") from None
    if kind == "ray":
        try:
            return RayExecutor(**options)
        except ImportError:
            raise DataError("--executor ray needs ray: pip install 'keel[ray]'") from None
    raise DataError(f"unknown executor {kind!r}; choose one of {', '.join(EXECUTORS)}")


def _reason(error: BaseException) -> str:
    """One line: the last line of a remote traceback (submitit's and Ray's errors quote the whole of it)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def run_stage(executor: Executor, stage: str, tasks: Sequence, *, retries: int = 2, progress: bool = True,
              poll_s: float = 0.2, unit: str = "tasks") -> list[dict]:
    """Run ``tasks`` to completion, results in task order. A failed task is retried ``retries`` times, each
    retry reported by its name; a task failing every time stops the stage with one line naming it. An input
    error (`DataError` raised in this process's children) is not retried: it would fail again."""
    from data.pipeline import _progress

    results: dict[int, dict] = {}
    attempts = {i: 1 for i in range(len(tasks))}
    pending = dict(enumerate(executor.submit(tasks)))
    start, tokens = time.perf_counter(), 0
    with _progress(progress) as bar:
        bar_task = bar.add_task(stage, total=len(tasks), info="")
        while pending:
            for i, handle in list(pending.items()):
                if not handle.done():
                    continue
                del pending[i]
                try:
                    results[i] = handle.result()
                except Exception as e:  # noqa: BLE001  (any failure of a task is reported, then retried)
                    if isinstance(e, DataError) or attempts[i] > retries:
                        tried = f" after {attempts[i]} attempts" if attempts[i] > 1 else ""
                        raise StageFailed(f"{stage}: {tasks[i].name} failed{tried}: {_reason(e)}") from None
                    print(f"{stage}: {tasks[i].name} failed ({_reason(e)}); retry {attempts[i]} of {retries}",
                          file=sys.stderr)
                    attempts[i] += 1
                    pending[i] = executor.submit([tasks[i]])[0]
                    continue
                if not results[i].get("skipped"):
                    tokens += results[i].get("tokens", results[i].get("corpus_tokens", 0))
                rate = tokens / max(time.perf_counter() - start, 1e-9)
                bar.update(bar_task, completed=len(results),
                           info=f"{len(results)}/{len(tasks)} {unit} done  {rate:,.0f} tokens/s")
            if pending:
                time.sleep(poll_s)
    return [results[i] for i in range(len(tasks))]
