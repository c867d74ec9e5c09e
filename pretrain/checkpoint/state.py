"""keel's own state in a checkpoint: tensors plus JSON in one safetensors file per rank, never pickle.

What a resume needs besides megatron's model and optimizer (the trainer's counters, the loader's
position, the optimizer's update rule, each callback's state, every generator's RNG) is a tree of
dicts, lists, numbers, strings and tensors. `save_state` stores the tensors as safetensors and the
tree, with each tensor replaced by its key, as JSON in the file's metadata; `load_state` joins them
again. Nothing in such a file can run code when it is read.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import torch

from pretrain.checkpoint.errors import CheckpointError
from pretrain.checkpoint.manifest import rank_world


def state_file(folder: Path, rank: int) -> Path:
    return folder / f"keel_rank{rank:05d}.safetensors"


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


# ---- the random generators --------------------------------------------------------------------------
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
