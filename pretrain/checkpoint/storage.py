"""Where checkpoints live and how many are kept: `run_dir/checkpoints/step_00000100/`, written as
`step_N.tmp` and renamed when complete, a failed one moved aside to `step_N.bad` (never deleted), the
newest `keep_last` good ones kept. A write the storage refuses is one line naming the cause."""

from __future__ import annotations

import errno
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from pretrain.checkpoint.errors import CheckpointError
from pretrain.checkpoint.manifest import rank_world, verify
from pretrain.checkpoint.meta import check_release, read_meta

_STEP_DIR = re.compile(r"^step_(\d{8})$")


# ---- finding checkpoints -------------------------------------------------------------------------
def step_folder(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest(root: Path) -> Path | None:
    dirs = step_dirs(root)
    return dirs[-1][1] if dirs else None


def resolve(path: str | Path) -> Path:
    """A step folder, a `checkpoints` folder or a run folder -> the newest step folder in it."""
    p = Path(path)
    if _STEP_DIR.match(p.name) and p.is_dir():
        return p
    for root in (p, p / "checkpoints"):
        if (found := latest(root)) is not None:
            return found
    raise CheckpointError(f"no checkpoint at {p}; point at a run folder or a checkpoints/step_N folder")


# ---- setting aside, choosing what to resume, pruning ---------------------------------------------
def move_aside(folder: Path) -> Path:
    """Rename a failed checkpoint to step_N.bad (step_N.bad2, ... if taken); nothing is deleted."""
    target, n = folder.with_name(folder.name + ".bad"), 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}.bad{n}")
    os.replace(folder, target)
    return target


def _meta_problem(folder: Path) -> str | None:
    """A meta.json that cannot be read is damage (the folder is set aside); one from another
    megatron-core release is not: it stops the run with its own line."""
    try:
        meta = read_meta(folder)
    except CheckpointError:
        return "meta.json is missing or unreadable"
    check_release(meta, folder)
    return None


@dataclass
class Selection:
    """The checkpoint a run resumes from, and what was passed over on the way (one line each)."""

    path: Path | None
    notes: list[str] = field(default_factory=list)


def select_resume(root: Path, verified: set[Path]) -> Selection:
    """The newest checkpoint under `root` that passes verification (added to `verified`); every newer
    one that fails is moved aside. Collective: all ranks call it and get the same answer (rank 0 moves
    folders). Raises CheckpointError when checkpoints exist and none passes."""
    rank, world = rank_world()
    notes: list[str] = []
    for _, folder in reversed(step_dirs(root)):
        problem = _meta_problem(folder) or verify(folder)
        if problem is None:
            verified.add(folder.resolve())
            return Selection(folder, notes)
        if rank == 0:
            moved = move_aside(folder)
            notes.append(f"checkpoint {folder} failed verification ({problem}); moved to {moved.name}")
        if world > 1:
            dist.barrier()
    bad = sorted(p.name for p in root.glob("step_*.bad*")) if root.is_dir() else []
    if bad:
        raise CheckpointError(f"no checkpoint in {root} passes verification (set aside: {', '.join(bad)}); "
                              "restore a good one, or use a new run_dir to start from scratch")
    return Selection(None, notes)


def set_aside_after(root: Path, step: int, suffix: str) -> list[Path]:
    """Rename every checkpoint newer than `step` to step_N.<suffix> (rank 0; nothing is deleted): a rewind
    (pretrain.recovery) leaves them, and the run writes those steps again."""
    moved = []
    for s, folder in step_dirs(root):
        if s > step:
            target, n = folder.with_name(f"{folder.name}.{suffix}"), 1
            while target.exists():
                n += 1
                target = folder.with_name(f"{folder.name}.{suffix}{n}")
            os.replace(folder, target)
            moved.append(target)
    return moved


def prune(root: Path, keep_last: int, verified: set[Path]) -> None:
    """Keep the newest `keep_last` checkpoints that pass verification (those in `verified` are not hashed
    again): a failing one is moved aside and not counted; past `keep_last`, older folders are deleted."""
    good = 0
    for _, folder in reversed(step_dirs(root)):
        if good >= keep_last:
            shutil.rmtree(folder, ignore_errors=True)
        elif folder.resolve() in verified or verify(folder, collective=False) is None:
            verified.add(folder.resolve())
            good += 1
        else:
            move_aside(folder)


# ---- what the storage refused ----------------------------------------------------------------------
# what a storage device or its limits refuse, as opposed to what a program asks wrongly
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS,
                            errno.ENOTDIR, errno.EEXIST, errno.EIO})


def storage_limit(folder: Path) -> OSError | None:
    """The storage limit a failed write most likely ran into (no space, or the file-size limit that a
    file of `folder` has reached), or None when neither explains it."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    largest = max((p.stat().st_size for p in folder.rglob("*") if p.is_file()), default=0) if folder.is_dir() else 0
    if soft != resource.RLIM_INFINITY and largest >= soft:
        return OSError(errno.EFBIG, os.strerror(errno.EFBIG))
    if folder.exists() and shutil.disk_usage(folder).free < (64 << 20):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


def storage_problem(error: OSError, path: Path) -> str:
    """One line naming the cause of a failed write (space, file-size limit, permissions) and the path."""
    import resource

    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device writing {path}; free space or choose another run_dir"
    if error.errno == errno.EFBIG:
        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        return (f"a file-size limit (ulimit -f: {soft} bytes) stopped the write of {path}; raise the limit "
                "or choose another run_dir")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{path} is not writable ({error.strerror}); choose a writable run_dir"
    if error.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"{path} cannot be a folder: a file is in the way ({error.strerror}); choose another run_dir"
    return f"writing {path} failed ({error.strerror or error}); check the device and the path"


@contextmanager
def storage_errors(path: Path):
    """A failed write becomes one line naming its cause and `path` (space, file-size limit, rights)."""
    try:
        yield
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # a writer's OSError comes back as torch's own
        # CheckpointException (a BaseException), which says nothing of the cause: look for it
        cause = e if isinstance(e, OSError) else storage_limit(path)
        if cause is None:
            raise
        raise CheckpointError(storage_problem(cause, path)) from e
