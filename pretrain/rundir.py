"""A run folder's files, read and written in one place: JSON written whole (temporary name, then
rename), metrics.jsonl read line by line (a line cut short by a killed run is skipped), and matplotlib
set up for PNG files. Trainer callbacks and every tool use these."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Iterable

from models.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]  # the repository: its git revision is the code's


def write_text(path: Path, text: str) -> None:
    """Write `text` under a temporary name, then rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: Path, obj, **dumps_kwargs) -> None:
    """`obj` as JSON, written whole (`write_text`)."""
    write_text(path, json.dumps(obj, **{"indent": 2, **dumps_kwargs}) + "\n")


REVISION = "KEEL_REVISION"  # outside a git checkout: the commit the tree was copied from, as its copier says


def git_revision(root: Path = ROOT) -> str:
    """HEAD's commit, with "+dirty" when tracked files have uncommitted changes. Untracked files do not
    count (as in `git describe --dirty`): a report's own new plots, written before its JSON, would otherwise
    mark every first report dirty. Outside git (a tree copied to a lent GPU without its history) the
    KEEL_REVISION environment variable's commit, set by whoever copied a clean tree; else "unknown"."""
    fallback = os.environ.get(REVISION) or "unknown"
    try:
        git = ["git", "-C", str(root)]
        out = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else fallback
    except (OSError, subprocess.SubprocessError):
        return fallback


def versions() -> dict[str, str]:
    """What produced a number besides the code: the interpreter, torch, megatron-core and CUDA."""
    import torch
    from megatron.core import __version__ as megatron_core

    return {"python": platform.python_version(), "torch": torch.__version__, "megatron_core": megatron_core,
            "cuda": torch.version.cuda or "none"}


def device_name() -> str:
    """The accelerator that ran the numbers, or the host CPU's architecture and core count."""
    import os

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def provenance(commands: list[str], dtype: str, device: str | None = None) -> dict:
    """Where a results JSON came from: code revision, the command lines, device, dtype and versions."""
    return {"git_revision": git_revision(), "commands": list(commands), "device": device or device_name(),
            "dtype": dtype, "versions": versions(), "argv": " ".join(sys.argv)}


def runs_provenance(infos: list[dict]) -> dict:
    """A report's provenance: this code's revision and versions, with the distinct commands, devices,
    dtypes, revisions and versions its runs' run_info.json recorded ("unrecorded" for runs from
    before keel recorded them)."""
    def distinct(key: str) -> list:
        values = {json.dumps(i.get(key, "unrecorded"), sort_keys=True) for i in infos}
        return [json.loads(v) for v in sorted(values)]

    out = provenance(distinct("command"), dtype=", ".join(map(str, distinct("dtype"))),
                     device=", ".join(map(str, distinct("device"))))
    return {**out, "runs": len(infos), "run_git_revisions": distinct("git_revision"),
            "run_versions": distinct("versions"), "validation": scored_validation(infos)}


def scored_validation(infos: Iterable[dict]) -> dict[str, dict[str, list]]:
    """Validation set -> the distinct digests of the text the runs scored and the distinct token counts,
    from their run_info.json: one digest a set when every run scored the same text."""
    found: dict[str, dict[str, set]] = {}
    for info in infos:
        for name, v in info.get("validation", {}).items():
            seen = found.setdefault(name, {"digests": set(), "tokens": set()})
            seen["digests"].add(v["digest"])
            seen["tokens"].add(v["tokens"])
    return {name: {key: sorted(values) for key, values in seen.items()} for name, seen in found.items()}


def find_run_folder(path: Path) -> Path | None:
    """The run folder holding `path` (a run folder, or a checkpoint below one): the first with a
    run_info.json, looking upward; None when there is none."""
    path = Path(path)
    return next((p for p in (path, *path.parents) if (p / "run_info.json").exists()), None)


def read_run_info(run_dir: Path) -> dict:
    path = Path(run_dir) / "run_info.json"
    try:
        return json.loads(path.read_text())
    except ValueError as e:  # not JSON, or not UTF-8
        raise ConfigError(f"{path} is not a run's description ({type(e).__name__}: {str(e).splitlines()[0]}); "
                          "point at a keel run folder, or restore the file") from None


def metrics_row(line: str) -> dict | None:
    """One line of metrics.jsonl as a row (a JSON object with an integer step), or None when it is not one."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and type(row.get("step")) is int else None


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl ([] if there is none); a line that is not a row (cut short by a
    killed run, say) is skipped: the run's own logger refuses such a line anywhere but last on resume."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = [metrics_row(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in rows if r is not None]


class RunLock:
    """One run per run folder: rank 0 holds an exclusive lock (`flock`) on `.keel.lock` in the run folder
    while it runs, and writes its host and pid into the file. The kernel drops the lock when the holder
    exits or dies, however it dies, so a lock left by a dead process is free: the next run takes it
    (atomically: two contenders never both win) and says whose it was."""

    NAME = ".keel.lock"

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / self.NAME
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Hold the lock; returns a note when it was left by a process that died holding it. Raises
        ConfigError (one line naming the holder) when another run holds it."""
        import fcntl
        import os
        import socket
        import time

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise ConfigError(f"{self.path.parent} is in use by another keel run ({holder}); wait for it to end or "
                              "stop it, or choose another run_dir") from None
        previous = self._holder(fd) if os.fstat(fd).st_size else None  # released cleanly: emptied
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}).encode(), 0)
        self._fd = fd
        if previous is None:
            return None
        return f"took over {self.path}, left by a run that ended without releasing it ({previous})"

    @staticmethod
    def _holder(fd: int) -> str:
        import os
        import time

        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"{}")
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["since"])))
            return f"host {info['host']}, pid {info['pid']}, since {since}"
        except (ValueError, KeyError, TypeError):
            return "its holder did not record itself"

    def release(self) -> None:
        import os

        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the last descriptor drops the lock
            self._fd = None


def pyplot():
    """matplotlib's pyplot on the Agg backend: keel's plots are PNG files, never a window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
