"""Checkpoints that cannot lie: atomic, checksummed, verified before loading, reshardable.

Layout of ``run_dir/checkpoints/step_00000100/``:
- megatron's dist_checkpointing files (torch_dist): the sharded model and optimizer. The distributed
  optimizer's state is saved `fully_reshardable`, so a checkpoint resumes at another TP/PP/DP layout;
  its two pickles (the shard index and the shards' objects) are read restricted (`pretrain.safe_pickle`);
- ``keel_rank00000.safetensors`` per rank: keel's own state (trainer counters, loader position, RNG,
  the optimizer's update rule, callbacks) as tensors plus a JSON tree in the file's metadata — plain
  data that loads without unpickling anything;
- ``meta.json``: step, model signature, parallel layout, megatron-core release;
- ``manifest.json``, written last: the size and SHA-256 of every other file (`pretrain.manifest`), signed
  when a checkpoint key is configured.

Everything is written under ``step_N.tmp`` and renamed once every rank has finished, so a crash
mid-save (even ``kill -9``) never leaves a folder that looks complete. Every load (`load`: resume,
init_from, the tools) verifies the manifest first; at resume a checkpoint that fails is moved aside to ``step_N.bad`` (never deleted) and the newest one
that passes is used. If checkpoints exist but none passes, the run stops: it never silently starts
from scratch.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from pretrain import safe_pickle
from pretrain.manifest import (FORMAT, MANIFEST, CheckpointError, is_verified, mark_verified, rank_world,  # noqa: F401
                               require_verified, verify, write_manifest)

safe_pickle.install()  # torch's pickle readers for distributed checkpoints, restricted in every keel process

_STEP_DIR = re.compile(r"^step_(\d{8})$")
META = "meta.json"


class _DropSyncSaveNotice(logging.Filter):
    """megatron-core 0.19's synchronous torch_dist save runs through its own async writer and then
    warns that this writer is deprecated; keel saves synchronously, so the notice says nothing to a user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("MCore's async save is deprecated")


logging.getLogger("megatron.core.dist_checkpointing.strategies.torch").addFilter(_DropSyncSaveNotice())


def _writer_results_queue_dies_with_us() -> None:
    """megatron's checkpoint writer collects results through a multiprocessing Manager that it starts
    on first use, which would die of the SIGTERM that preempts the job (losing the checkpoint) and outlive
    a `kill -9` of the training process (keeping multiprocessing's resource tracker alive with it). keel
    starts that Manager itself, set up by `pretrain.helper_process`."""
    from multiprocessing import get_context
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from pretrain import helper_process

    if filesystem_async._results_queue is None:
        manager = SyncManager(ctx=get_context("spawn"))
        manager.start(initializer=helper_process.setup)
        filesystem_async._results_queue = manager.Queue()


# ---- finding checkpoints -------------------------------------------------------------------------
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
    raise FileNotFoundError(f"no checkpoint at {p}; point at a run folder or a checkpoints/step_N folder")


# ---- setting aside, choosing what to resume -------------------------------------------------------
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
        return f"{META} is missing or unreadable"
    check_release(meta, folder)
    return None


@dataclass
class Selection:
    """The checkpoint a run resumes from, and what was passed over on the way (one line each)."""

    path: Path | None
    notes: list[str] = field(default_factory=list)


def select_resume(root: Path) -> Selection:
    """The newest checkpoint under `root` that passes verification; every newer one that fails is
    moved aside. Collective: all ranks call it and get the same answer (rank 0 moves folders).
    Raises CheckpointError when checkpoints exist and none passes."""
    rank, world = rank_world()
    notes: list[str] = []
    for _, folder in reversed(step_dirs(root)):
        problem = _meta_problem(folder) or verify(folder)
        if problem is None:
            mark_verified(folder)
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


# ---- keel's own state: tensors plus JSON, never pickle -------------------------------------------------
def _split_tensors(obj, tensors: dict, path: str = "s"):
    """`obj` with every tensor replaced by {"__tensor__": key} (the tensor goes to `tensors`)."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"keel state at {path} has a non-string key; state dicts use string keys")
        return {k: _split_tensors(v, tensors, f"{path}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split_tensors(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"keel state at {path} is a {type(obj).__name__}; only tensors, numbers, strings, "
                    "lists and dicts are saved")


def _join_tensors(obj, tensors: dict):
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: _join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


def save_state(path: Path, state: dict) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _split_tensors(state, tensors)
    save_file(tensors, str(path), metadata={"keel": json.dumps(tree)})


def load_state(path: Path) -> dict:
    """keel's state from a safetensors file: no code runs, whatever the file holds."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            tree = json.loads(f.metadata()["keel"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for any malformed file
        raise CheckpointError(f"{path} is not a keel state file ({type(e).__name__}: {str(e).splitlines()[0]}); "
                              "the checkpoint is damaged: remove it or resume from an earlier one") from None
    return _join_tensors(tree, tensors)


def rng_state() -> dict:
    """Every generator's state as plain data (tensors, numbers, lists)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss],
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def derive_rng(seed: int, step: int) -> None:
    """Fresh generators for a resume at another parallel layout, from the seed, step and rank."""
    mixed = int.from_bytes(hashlib.sha256(f"{seed}:{step}:{rank_world()[0]}".encode()).digest()[:8], "little")
    random.seed(mixed)
    np.random.seed(mixed % (2**32))
    torch.manual_seed(mixed)


# ---- meta: what a checkpoint is, checked before anything heavy ---------------------------------------
def read_meta(folder: Path) -> dict:
    try:
        return json.loads((folder / META).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {folder} has no {META}; it is incomplete: remove it") from None
    except ValueError as e:
        raise CheckpointError(f"{folder / META} is not valid JSON ({e}); the checkpoint is damaged: "
                              "remove it or resume from an earlier one") from None


def check_release(meta: dict, path: Path) -> None:
    from pretrain.cpu_compat import MEGATRON_VERSION

    written_by = meta.get("megatron_core", "0.16.1")  # keel's first checkpoints did not record it
    if written_by != MEGATRON_VERSION:
        raise CheckpointError(f"checkpoint {path} was written with megatron-core {written_by}; this keel reads "
                              f"checkpoints of megatron-core {MEGATRON_VERSION} only: train anew or use the keel "
                              "release that wrote it")


def check_compatible(meta: dict, model_signature: dict, path: Path) -> None:
    check_release(meta, path)
    saved = meta.get("model", {})
    diffs = [f"{k} {saved.get(k)!r} vs {v!r}" for k, v in model_signature.items() if saved.get(k) != v]
    if diffs:
        # checkpoints from before the final norm became the default say nothing of it
        hint = (" (it predates model.final_norm=true as the default: add model.final_norm=false)"
                if model_signature.get("final_norm") and "final_norm" not in saved else "")
        raise CheckpointError(f"checkpoint {path} is from an incompatible model ({'; '.join(diffs)}){hint}; "
                              "use a matching model config or a different run_dir")


def check_layout(meta: dict, layout: dict, path: Path) -> bool:
    """True when `layout` is the one the checkpoint was saved at; a layout keel cannot reshard into is
    one line (today: switching the distributed optimizer on or off)."""
    saved = meta.get("layout", {})
    if saved.get("distributed_optimizer") != layout["distributed_optimizer"]:
        raise CheckpointError(f"checkpoint {path} was saved with optim.distributed="
                              f"{str(saved.get('distributed_optimizer')).lower()}; resume with the same setting, "
                              f"or start a new run_dir with init_from={path}")
    return saved == layout


# ---- save and load ---------------------------------------------------------------------------------
def _sharded(model, optimizer, is_loading: bool) -> dict:
    state = {"model": model.sharded_state_dict()}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state["model"], is_loading=is_loading)
    return state


def _state_file(folder: Path, rank: int) -> Path:
    return folder / f"keel_rank{rank:05d}.safetensors"


def save(root: Path, step: int, model, optimizer, extra: dict, model_signature: dict, keep_last: int,
         layout: dict | None = None, saver: "AsyncSaver | None" = None) -> Path:
    """Write checkpoint `step` under `root` (every rank calls this), publish it atomically, prune.

    With `saver`, megatron's part is written in the background and published when `saver.poll()`
    finds it done; keel's small state and meta.json are written before this returns, so what the
    checkpoint holds is this step's, whenever it is published."""
    from megatron.core import dist_checkpointing

    rank = dist.get_rank()
    final, tmp = root / f"step_{step:08d}", root / f"step_{step:08d}.tmp"
    _writer_results_queue_dies_with_us()
    if saver is not None:
        saver.wait()  # one save in flight: the previous one is published before this one starts
    with _storage_errors(tmp):
        # 1. a clean temporary folder, seen by every rank
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        # 2. megatron's shards (in the background with a saver: megatron wants the folder empty when it
        #    starts), then keel's state and the description, all of this step
        sharded = _sharded(model, optimizer, is_loading=False)
        request = dist_checkpointing.save(sharded, str(tmp), **({} if saver is None else ASYNC))
        save_state(_state_file(tmp, rank), {**extra, "rng": rng_state()})
        if rank == 0:
            _write_meta(tmp, step, model_signature, layout)
        if saver is None:
            _publish(tmp, final, root, keep_last)
        else:
            request.add_finalize_fn(lambda: _publish(tmp, final, root, keep_last))
            saver.schedule(request, tmp)
    return final


def _write_meta(folder: Path, step: int, model_signature: dict, layout: dict | None) -> None:
    from pretrain.cpu_compat import MEGATRON_VERSION

    meta = {"format": FORMAT, "step": step, "model": model_signature, "megatron_core": MEGATRON_VERSION,
            "world_size": dist.get_world_size(), "layout": layout or {}}
    (folder / META).write_text(json.dumps(meta, indent=2))


def _publish(tmp: Path, final: Path, root: Path, keep_last: int) -> None:
    """Every rank's files are in `tmp`: checksum them, rename into place, prune. Collective."""
    with _storage_errors(tmp):
        dist.barrier()
        write_manifest(tmp)
        if dist.get_rank() == 0:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        dist.barrier()
        if dist.get_rank() == 0:
            prune(root, keep_last, keep=final)
        dist.barrier()


@contextmanager
def _storage_errors(path: Path):
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


ASYNC = {"async_sharded_save": True, "async_strategy": "mcore"}  # megatron's own writer: NVRx is not installed


class AsyncSaver:
    """Checkpoints written in the background (`checkpoint.async_save`): megatron's async writer, one
    save in flight at a time, published (manifest, rename, prune) once every rank's writer is done.
    `poll` runs each step on every rank (finalizing is collective)."""

    def __init__(self):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.queue = AsyncCallsQueue(persistent=False)
        self.in_flight: Path | None = None

    def schedule(self, request, tmp: Path) -> None:
        self.queue.schedule_async_request(request)
        self.in_flight = tmp

    def poll(self, blocking: bool = False) -> None:
        if self.in_flight is None:
            return
        with _storage_errors(self.in_flight):
            self.queue.maybe_finalize_async_calls(blocking=blocking)
        if not self.queue.get_num_unfinalized_calls():
            self.in_flight = None

    def wait(self) -> None:
        self.poll(blocking=True)


def prune(root: Path, keep_last: int, keep: Path) -> None:
    """Keep the newest `keep_last` checkpoints that pass verification (`keep` was just written):
    a failing one is moved aside and not counted; past `keep_last`, older folders are deleted."""
    mark_verified(keep)
    good = 0
    for _, folder in reversed(step_dirs(root)):
        if good >= keep_last:
            shutil.rmtree(folder, ignore_errors=True)
        elif is_verified(folder) or verify(folder, collective=False) is None:
            mark_verified(folder)
            good += 1
        else:
            move_aside(folder)


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


def load(path: Path, model, optimizer, model_signature: dict, layout: dict | None = None) -> dict:
    """Restore model (and optimizer, when given) in place; returns keel's state for this rank.

    The one way keel loads a checkpoint (resume, init_from and every tool): nothing is read before the
    folder passes `require_verified`, and the pickles inside are read through `pretrain.safe_pickle`.
    With `layout` unchanged every rank reads its own state file; at another layout every rank reads
    rank 0's (counters and data position are global) and the caller re-derives the RNG. The small
    files are read first, so a bad one stops the load before megatron reads the shards."""
    from megatron.core import dist_checkpointing

    require_verified(path)
    meta = read_meta(path)
    check_compatible(meta, model_signature, path)
    same_layout = layout is None or check_layout(meta, layout, path)
    extra = load_state(_state_file(path, dist.get_rank() if same_layout else 0)) if optimizer is not None else {}
    with _loading_errors(path):
        state = dist_checkpointing.load(_sharded(model, optimizer, is_loading=True), str(path))
    model.load_state_dict(state["model"])
    if optimizer is None:
        return {}
    extra["saved_lr"] = optimizer.load_sharded_state_dict(state["optimizer"])
    rng = extra.pop("rng")
    if same_layout:
        set_rng_state(rng)
    extra["same_layout"] = same_layout
    return extra


@contextmanager
def _loading_errors(path: Path):
    """What megatron's or torch's reader refuses becomes one line naming the checkpoint. torch wraps a
    reader's error in its CheckpointException (a BaseException), with the original per rank inside."""
    try:
        yield
    except (Exception, CheckpointException) as e:
        failures = getattr(e, "failures", {}) or {}
        causes = [getattr(f, "exc", f) for f in failures.values()] or [e]
        refused = next((c for c in causes if isinstance(c, safe_pickle.RefusedPickle)), None)
        if refused is not None:
            raise CheckpointError(str(refused) if str(path) in str(refused) else f"checkpoint {path}: {refused}") from e
        text = str(causes[0]).strip().splitlines()
        raise CheckpointError(f"checkpoint {path} could not be loaded ({type(causes[0]).__name__}: "
                              f"{text[0] if text else 'no detail'}); it is damaged or was written for another "
                              "model: use a good checkpoint") from e
