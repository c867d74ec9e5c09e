"""Finished runs' records carried between machines: an experiment whose runs need more CPU than one session
has is split across sessions, and a session's machine keeps nothing but the repository.

A run's record is what the reports read, without its checkpoints: run_info.json (config, revision, versions,
validation digest), run_info_history.jsonl, result.json and metrics.jsonl. `pack` writes the records of the
finished runs (result.json: completed or diverged) below some folders into one .tar.xz, leaving out the runs
that earlier archives hold; the archives are committed under docs/results/runs/. `unpack` puts them back,
below the repository root. The driver then skips those runs: keel ends a launch of a finished run at once, from
its result.json (pretrain.run.finished_result).

    python tools/experiments/run_records.py unpack docs/results/runs/attention_d128_long-*.tar.xz
    python tools/experiments/attention_experiment.py --design long --jobs 2    # what the archives lack
    python tools/experiments/run_records.py pack runs/attention_d128_long \\
        --out docs/results/runs/attention_d128_long-2026-12-07.tar.xz --except docs/results/runs/attention_d128_long-*.tar.xz
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import tarfile
from pathlib import Path

from tools.experiments import ExperimentError
from tools.experiments.cli import guarded
from tools.experiments.runs import FINISHED, NoRuns, load_runs

RECORD = ("run_info.json", "run_info_history.jsonl", "result.json", "metrics.jsonl")  # a run's files kept


def finished_runs(roots: list[Path], base: Path) -> list[Path]:
    """The run folders below `roots` whose result.json says they finished, relative to `base`, in path order."""
    try:
        runs = load_runs(*roots, statuses=FINISHED)
    except NoRuns:
        return []
    return [run.folder.resolve().relative_to(base.resolve()) for run in runs]


def archived_runs(archives: list[Path]) -> set[Path]:
    """The run folders `archives` hold records of."""
    return {Path(m.name).parent for a in archives for m in _members(a)}


def pack(roots: list[Path], out: Path, earlier: list[Path], base: Path) -> list[Path]:
    """The records of the finished runs below `roots` that `earlier` archives lack, into `out` (written under a
    temporary name, then renamed); the runs packed. The archive is the same bytes for the same records."""
    if out.exists():
        raise ExperimentError(f"{out} exists; name a new archive (earlier ones go to --except)")
    if rule := ignored_by_git(out):
        raise ExperimentError(f"{out} is ignored by git ({rule}), so a commit would leave it out; "
                              "un-ignore its folder in .gitignore or name an --out git keeps")
    archived = archived_runs(earlier)  # once: each archive is read whole
    runs = [r for r in finished_runs(roots, base) if r not in archived]
    if not runs:
        raise ExperimentError(f"no finished run below {', '.join(map(str, roots))} that the archives lack")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w:xz") as tar:
        for run in runs:
            for name in RECORD:
                path = base / run / name
                if path.exists():
                    data = path.read_bytes()
                    info = tarfile.TarInfo(str(run / name))
                    info.size, info.mode, info.mtime = len(data), 0o644, 0  # no owner or time: reproducible
                    tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, out)
    return runs


def ignored_by_git(path: Path) -> str | None:
    """The .gitignore rule ("file:line:pattern") that keeps `path` out of the git repository it lies in; None
    where git keeps it, or where it lies in no repository. An archive that git ignores is lost with the machine."""
    folder = path.resolve().parent
    while not folder.exists():  # the archive's folder may not exist yet: ask from the nearest one that does
        folder = folder.parent
    try:
        found = subprocess.run(["git", "-C", str(folder), "check-ignore", "-v", str(path.resolve())],
                               capture_output=True, text=True)
    except FileNotFoundError:  # no git here: nothing to check against
        return None
    return found.stdout.split("\t")[0].strip() if found.returncode == 0 else None


def unpack(archives: list[Path], base: Path) -> int:
    """Every record of `archives` below `base`; a file already there must hold the same bytes. Each file is
    written under a temporary name, then renamed. The number of files written."""
    written, members = 0, {archive: _members(archive) for archive in archives}  # each checked before any is read
    for archive in archives:
        with tarfile.open(archive, "r:xz") as tar:
            for member in members[archive]:
                data = tar.extractfile(member).read()
                target = base / member.name
                if target.exists():
                    if target.read_bytes() != data:
                        raise ExperimentError(f"{target} differs from its record in {archive}; move the run folder "
                                              "aside or unpack into another folder (--into)")
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.name + ".tmp")
                tmp.write_bytes(data)
                os.replace(tmp, target)
                written += 1
    return written


def _members(archive: Path) -> list[tarfile.TarInfo]:
    """The archive's files, each a record file of one run folder at a relative path; anything else is refused."""
    try:
        with tarfile.open(archive, "r:xz") as tar:
            members = tar.getmembers()
    except (OSError, tarfile.TarError) as e:
        raise ExperimentError(f"{archive} is not a run-records archive ({e}); pack it again") from e
    for m in members:
        path = Path(m.name)
        if not m.isfile() or path.is_absolute() or ".." in path.parts or path.name not in RECORD:
            raise ExperimentError(f"{archive} holds {m.name!r}, which is not a run's record file; "
                                  "only run_records.py's own archives unpack")
    return members


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    pk = sub.add_parser("pack", help="finished runs' records into a new .tar.xz")
    pk.add_argument("roots", type=Path, nargs="+", help="folders holding run folders (any depth)")
    pk.add_argument("--out", type=Path, required=True, help="the new archive (.tar.xz)")
    pk.add_argument("--except", type=Path, nargs="*", default=[], dest="earlier",
                    help="earlier archives: the runs they hold are left out")
    pk.add_argument("--base", type=Path, default=Path("."), help="what run paths are relative to (default: here)")
    up = sub.add_parser("unpack", help="archives' records back into run folders")
    up.add_argument("archives", type=Path, nargs="+")
    up.add_argument("--into", type=Path, default=Path("."), help="the folder runs/ is below (default: here)")
    args = p.parse_args(argv)

    def run() -> None:
        if args.command == "pack":
            runs = pack(args.roots, args.out, args.earlier, args.base)
            print(f"packed the records of {len(runs)} finished runs into {args.out}")
        else:
            print(f"unpacked {unpack(args.archives, args.into)} files from {len(args.archives)} archives into {args.into}")

    return guarded(run)


if __name__ == "__main__":
    raise SystemExit(main())
