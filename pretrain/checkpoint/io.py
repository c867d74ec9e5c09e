"""Saving and loading: the one way keel writes a checkpoint (`Checkpoints.save`) and reads one (`load`,
`Checkpoints.load`).

A save writes everything under `step_N.tmp` (megatron's shards, keel's state per rank, meta.json) and
publishes it once every rank has finished: the manifest is written last, the folder renamed into place,
older checkpoints pruned. A load verifies the folder first, reads the small files (meta.json, keel's
state) before megatron reads the shards, and reads the shards' pickles through `safe_pickle`'s
restricted readers.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from pretrain.checkpoint import megatron_private
from pretrain.checkpoint.async_save import ASYNC, AsyncSaver
from pretrain.checkpoint.errors import CheckpointError
from pretrain.checkpoint.manifest import require_verified, verify, write_manifest
from pretrain.checkpoint.meta import check_compatible, check_layout, read_meta, write_meta
from pretrain.checkpoint.safe_pickle import RefusedPickle, restricted_readers
from pretrain.checkpoint.state import load_state, rng_state, save_state, set_rng_state, state_file
from pretrain.checkpoint.storage import (Selection, prune, select_resume, set_aside_after, step_dirs, step_folder,
                                         storage_errors)


@dataclass(frozen=True)
class Snapshot:
    """What one checkpoint holds: the bare model, its optimizer (None: the weights only), keel's state of
    this rank (the trainer's counters, data position, update rule and callbacks; the RNG is added), the
    model's signature and the parallel layout, both checked at every load."""

    step: int
    model: torch.nn.Module
    optimizer: object | None = None  # optim.optimizer.KeelOptimizer
    state: dict = field(default_factory=dict)
    signature: dict = field(default_factory=dict)
    layout: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Restored:
    """What a load gives back besides the model and optimizer it restored in place."""

    state: dict  # keel's state as saved ({} when only weights were loaded): this rank's, or rank 0's at another layout
    same_layout: bool  # False: resharded; the RNG was not restored and the caller derives it (state.derive_rng)
    saved_lr: float | None = None  # the checkpoint's optim.lr, when this run's differs


def _sharded(model, optimizer, is_loading: bool) -> dict:
    state = {"model": model.sharded_state_dict()}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state["model"], is_loading=is_loading)
    return state


class Checkpoints:
    """The checkpoints folder of one run: what it saves, resumes from and keeps. It remembers the folders
    this process wrote or verified (they are not hashed again) and, with `background`, the save in flight."""

    def __init__(self, root: Path, keep_last: int, background: bool = False):
        self.root, self.keep_last = Path(root), keep_last
        self.verified: set[Path] = set()
        self.saver = AsyncSaver() if background else None

    # ---- choosing and verifying ------------------------------------------------------------------
    def select_resume(self) -> Selection:
        """The newest checkpoint that passes verification; newer failing ones are moved aside."""
        return select_resume(self.root, self.verified)

    def newest_before(self, step: int) -> Path | None:
        """The newest checkpoint of a step below `step` that passes verification, or None. Collective."""
        for s, folder in reversed(step_dirs(self.root)):
            if s < step and (folder.resolve() in self.verified or verify(folder) is None):
                self.mark_verified(folder)
                return folder
        return None

    def set_aside_after(self, step: int) -> None:
        """Checkpoints newer than `step` renamed to step_N.rewound (by rank 0). Collective."""
        self.wait()
        if dist.get_rank() == 0:
            set_aside_after(self.root, step, "rewound")
        dist.barrier()

    def require_verified(self, folder: Path) -> None:
        """`manifest.require_verified`, once per folder in this run."""
        if Path(folder).resolve() not in self.verified:
            require_verified(folder)
            self.mark_verified(folder)

    def mark_verified(self, folder: Path) -> None:
        self.verified.add(Path(folder).resolve())

    def load(self, path: Path, model, optimizer, signature: dict, layout: dict | None = None) -> Restored:
        """`load`, with what this run has verified already not hashed again."""
        self.require_verified(path)
        return _restore(path, model, optimizer, signature, layout)

    # ---- saving ----------------------------------------------------------------------------------
    def save(self, snapshot: Snapshot) -> Path:
        """Write `snapshot` as checkpoint `step` (every rank calls this), publish it atomically, prune.

        In the background, megatron's part is written by its async writer and published when `poll`
        finds it done; keel's small state and meta.json are written before this returns, so what the
        checkpoint holds is this step's, whenever it is published."""
        from megatron.core import dist_checkpointing

        rank = dist.get_rank()
        final = step_folder(self.root, snapshot.step)
        tmp = final.with_name(f"{final.name}.tmp")
        megatron_private.use_results_queue(background=self.saver is not None)
        self.wait()  # one save in flight: the previous one is published before this one starts
        with storage_errors(tmp):
            # 1. a clean temporary folder, seen by every rank
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            dist.barrier()
            # 2. megatron's shards (in the background: megatron wants the folder empty when it starts),
            #    then keel's state and the description, all of this step
            sharded = _sharded(snapshot.model, snapshot.optimizer, is_loading=False)
            with megatron_private.quiet_sync_save_notice():
                request = dist_checkpointing.save(sharded, str(tmp), **({} if self.saver is None else ASYNC))
            save_state(state_file(tmp, rank), {**snapshot.state, "rng": rng_state()})
            if rank == 0:
                write_meta(tmp, snapshot.step, snapshot.signature, snapshot.layout, dist.get_world_size())
            if self.saver is None:
                self._publish(tmp, final)
            else:
                request.add_finalize_fn(lambda: self._publish(tmp, final))
                self.saver.schedule(request, tmp)
        return final

    def poll(self) -> None:
        """Publish a background save once every rank has written it (collective; nothing to do without one)."""
        if self.saver is not None:
            self.saver.poll()

    def wait(self) -> None:
        """Until the save in flight, if any, is published."""
        if self.saver is not None:
            self.saver.wait()

    def _publish(self, tmp: Path, final: Path) -> None:
        """Every rank's files are in `tmp`: checksum them, rename into place, prune. Collective."""
        with storage_errors(tmp):
            dist.barrier()
            write_manifest(tmp)
            if dist.get_rank() == 0:
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
            dist.barrier()
            self.mark_verified(final)
            if dist.get_rank() == 0:
                prune(self.root, self.keep_last, self.verified)
            dist.barrier()


def load(path: Path, model, optimizer, signature: dict, layout: dict | None = None) -> Restored:
    """Restore `model` (and `optimizer`, when given) in place from the checkpoint at `path`.

    The one way keel loads a checkpoint (resume, init_from and every tool): nothing is read before the
    folder passes `require_verified`, and the pickles inside are read through `safe_pickle`'s restricted
    readers. With `layout` unchanged every rank reads its own state file; at another layout every rank
    reads rank 0's (counters and data position are global) and the caller re-derives the RNG. The small
    files are read first, so a bad one stops the load before megatron reads the shards."""
    require_verified(path)
    return _restore(path, model, optimizer, signature, layout)


def _restore(path: Path, model, optimizer, signature: dict, layout: dict | None) -> Restored:
    from megatron.core import dist_checkpointing

    meta = read_meta(path)
    check_compatible(meta, signature, path)
    same_layout = layout is None or check_layout(meta, layout, path)
    state = load_state(state_file(path, dist.get_rank() if same_layout else 0)) if optimizer is not None else {}
    with _loading_errors(path), restricted_readers():
        sharded = dist_checkpointing.load(_sharded(model, optimizer, is_loading=True), str(path))
    model.load_state_dict(sharded["model"])
    if optimizer is None:
        return Restored(state={}, same_layout=same_layout)
    saved_lr = optimizer.load_sharded_state_dict(sharded["optimizer"])
    rng = state.pop("rng")
    if same_layout:
        set_rng_state(rng)
    return Restored(state=state, same_layout=same_layout, saved_lr=saved_lr)


@contextmanager
def _loading_errors(path: Path):
    """What megatron's or torch's reader refuses becomes one line naming the checkpoint. torch wraps a
    reader's error in its CheckpointException (a BaseException), with the original per rank inside."""
    try:
        yield
    except (Exception, CheckpointException) as e:
        failures = getattr(e, "failures", {}) or {}
        causes = [getattr(f, "exc", f) for f in failures.values()] or [e]
        refused = next((c for c in causes if isinstance(c, RefusedPickle)), None)
        if refused is not None:
            raise CheckpointError(str(refused) if str(path) in str(refused) else f"checkpoint {path}: {refused}") from e
        text = str(causes[0]).strip().splitlines()
        raise CheckpointError(f"checkpoint {path} could not be loaded ({type(causes[0]).__name__}: "
                              f"{text[0] if text else 'no detail'}); it is damaged or was written for another "
                              "model: use a good checkpoint") from e
