"""`meta.json`: what a checkpoint is (step, model signature, parallel layout, megatron-core release),
written with the checkpoint and checked before anything heavy is read."""

from __future__ import annotations

import json
from pathlib import Path

from models import megatron_release
from pretrain.checkpoint.errors import CheckpointError
from pretrain.checkpoint.manifest import FORMAT

META = "meta.json"
FIRST_RELEASE = "0.16.1"  # keel's first checkpoints did not record the release: they are this one's


def write_meta(folder: Path, step: int, signature: dict, layout: dict, world_size: int) -> None:
    meta = {"format": FORMAT, "step": step, "model": signature, "megatron_core": megatron_release.PINNED,
            "world_size": world_size, "layout": layout}
    (folder / META).write_text(json.dumps(meta, indent=2))


def read_meta(folder: Path) -> dict:
    try:
        return json.loads((folder / META).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {folder} has no {META}; it is incomplete: remove it") from None
    except ValueError as e:
        raise CheckpointError(f"{folder / META} is not valid JSON ({e}); the checkpoint is damaged: "
                              "remove it or resume from an earlier one") from None


def check_release(meta: dict, path: Path) -> None:
    written_by = meta.get("megatron_core", FIRST_RELEASE)
    if written_by != megatron_release.PINNED:
        raise CheckpointError(f"checkpoint {path} was written with megatron-core {written_by}; this keel reads "
                              f"checkpoints of megatron-core {megatron_release.PINNED} only: train anew or use the keel "
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
