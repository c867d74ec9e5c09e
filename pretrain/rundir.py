"""A run folder's files, read and written in one place: JSON written whole (temporary name, then
rename), metrics.jsonl read line by line (a line cut short by a killed run is skipped), and matplotlib
set up for PNG files. Trainer callbacks and every tool use these."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: Path, obj, **dumps_kwargs) -> None:
    """Write `obj` as JSON under a temporary name, then rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, **{"indent": 2, **dumps_kwargs}) + "\n")
    tmp.replace(path)


def find_run_folder(path: Path) -> Path | None:
    """The run folder holding `path` (a run folder, or a checkpoint below one): the first with a
    run_info.json, looking upward; None when there is none."""
    path = Path(path)
    return next((p for p in (path, *path.parents) if (p / "run_info.json").exists()), None)


def read_run_info(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "run_info.json").read_text())


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl ([] if there is none); a line cut short by a killed run is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def pyplot():
    """matplotlib's pyplot on the Agg backend: keel's plots are PNG files, never a window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
