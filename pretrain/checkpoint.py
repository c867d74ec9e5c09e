"""Atomic, resumable checkpoints through megatron-core's dist_checkpointing.

Layout: ``run_dir/checkpoints/step_00000100/`` holds the sharded model and optimizer (torch_dist),
one ``extra_rank*.pt`` per rank (RNG, loader, schedule and callback state) and ``meta.json``.
Everything is written under ``step_N.tmp`` and renamed once every rank has finished, so a crash
mid-save (even ``kill -9``) never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

_STEP_DIR = re.compile(r"^step_(\d{8})$")


class _DropSyncSaveNotice(logging.Filter):
    """megatron-core 0.19's synchronous torch_dist save runs through its own async writer and then
    warns that this writer is deprecated; keel saves synchronously, so the notice says nothing to a user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("MCore's async save is deprecated")


logging.getLogger("megatron.core.dist_checkpointing.strategies.torch").addFilter(_DropSyncSaveNotice())


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest(root: Path) -> Path | None:
    dirs = step_dirs(root)
    return dirs[-1][1] if dirs else None


def resolve(path: str | Path) -> Path:
    """A step folder, a `checkpoints` folder or a run folder -> the step folder to load."""
    p = Path(path)
    if _STEP_DIR.match(p.name) and (p / "meta.json").exists():
        return p
    for root in (p, p / "checkpoints"):
        if (found := latest(root)) is not None:
            return found
    raise FileNotFoundError(f"no complete checkpoint at {p}; point at a run folder or a checkpoints/step_N folder")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def check_compatible(meta: dict, model_signature: dict, path: Path) -> None:
    from pretrain.cpu_compat import MEGATRON_VERSION

    written_by = meta.get("megatron_core", "0.16.1")  # keel's first checkpoints did not record it
    if written_by != MEGATRON_VERSION:
        raise ValueError(f"checkpoint {path} was written with megatron-core {written_by}; this keel reads "
                         f"checkpoints of megatron-core {MEGATRON_VERSION} only: train anew or use the keel release "
                         f"that wrote it")
    saved = meta.get("model", {})
    diffs = [f"{k} {saved.get(k)!r} vs {v!r}" for k, v in model_signature.items() if saved.get(k) != v]
    if diffs:
        raise ValueError(f"checkpoint {path} is from an incompatible model ({'; '.join(diffs)}); "
                         "use a matching model config or a different run_dir")


def _sharded(model, optimizer, is_loading: bool) -> dict:
    state = {"model": model.sharded_state_dict()}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state["model"], is_loading=is_loading)
    return state


def save(root: Path, step: int, model, optimizer, extra: dict, model_signature: dict, keep_last: int) -> Path:
    from megatron.core import dist_checkpointing

    from pretrain.cpu_compat import MEGATRON_VERSION

    rank = dist.get_rank()
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    # 1. a clean temporary folder, seen by every rank
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    # 2. sharded model and optimizer, then each rank's own extras
    dist_checkpointing.save(_sharded(model, optimizer, is_loading=False), str(tmp))
    torch.save({**extra, "rng": rng_state()}, tmp / f"extra_rank{rank:05d}.pt")
    dist.barrier()
    # 3. publish atomically, then prune old checkpoints
    if rank == 0:
        (tmp / "meta.json").write_text(json.dumps({"step": step, "model": model_signature,
                                                   "megatron_core": MEGATRON_VERSION,
                                                   "world_size": dist.get_world_size()}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in step_dirs(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load(path: Path, model, optimizer, model_signature: dict) -> dict:
    """Restore model (and optimizer, when given) in place; returns this rank's extras."""
    from megatron.core import dist_checkpointing

    meta = json.loads((path / "meta.json").read_text())
    check_compatible(meta, model_signature, path)
    state = dist_checkpointing.load(_sharded(model, optimizer, is_loading=True), str(path))
    model.load_state_dict(state["model"])
    if optimizer is None:
        return {}
    optimizer.load_sharded_state_dict(state["optimizer"])
    extra_file = path / f"extra_rank{dist.get_rank():05d}.pt"
    if meta.get("world_size") != dist.get_world_size() or not extra_file.exists():
        raise ValueError(f"checkpoint {path} was saved by {meta.get('world_size')} processes, this run has "
                         f"{dist.get_world_size()}; resume with the same world size or use init_from={path}")
    extra = torch.load(extra_file, weights_only=False)
    set_rng_state(extra.pop("rng"))
    return extra
