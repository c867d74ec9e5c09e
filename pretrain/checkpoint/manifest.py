"""The one gate every checkpoint passes before anything in it is deserialised: its manifest.

`manifest.json`, written last into a checkpoint folder, holds the size and SHA-256 of every other file.
`verify` accepts a folder only when
1. the manifest is a JSON object whose `files` maps plain file names (no `/`, no `..`) to size and hash;
2. with a signing key configured (`KEEL_CHECKPOINT_KEY`, or `KEEL_CHECKPOINT_KEY_FILE` naming a file that
   holds it), its HMAC-SHA256 `signature` verifies: only a holder of the key can have written it;
3. the folder holds exactly the files it lists, no more and no fewer, each of a kind keel or
   megatron-core writes (nothing else in the folder is ever read);
4. every file has its size and checksum (the ranks share the hashing);
5. megatron's shard index (`.metadata`) reads through `safe_pickle`'s allowlist.

Resume, `init_from`, tools/generate.py, evaluate.py, export_hf.py and `tools/ckpt.py verify` all pass
through it (`pretrain.checkpoint.load` calls `require_verified`; a run's `Checkpoints` remembers what it
verified or wrote itself, so a folder is hashed once per run). Without a key, the manifest proves
integrity (damage, truncation, a missing or extra file), not authenticity: whoever can write the folder
can write a matching manifest, and then the restricted readers are what keeps a forged file from running
code.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from pathlib import Path

import torch.distributed as dist

from pretrain.checkpoint.errors import CheckpointError
from pretrain.checkpoint.safe_pickle import RefusedPickle, is_plain_name, read_metadata

MANIFEST = "manifest.json"
FORMAT = 2  # 1: keel on megatron-core 0.16.1 and before the manifest (pickled extras)
KEY_ENV, KEY_FILE_ENV = "KEEL_CHECKPOINT_KEY", "KEEL_CHECKPOINT_KEY_FILE"
DCP_INDEX = ".metadata"
# every kind of file a checkpoint folder holds: torch's shard index and shards, megatron's description,
# keel's state per rank and keel's description
_KINDS = re.compile(r"^(\.metadata|metadata\.json|__\d+_\d+\.distcp|keel_rank\d{5}\.safetensors|meta\.json)$")
_HASH_CHUNK = 8 << 20


# ---- the signing key ---------------------------------------------------------------------------------
def signing_key() -> bytes | None:
    """The secret that signs and checks manifests, from the environment; None when none is configured."""
    value, path = os.environ.get(KEY_ENV), os.environ.get(KEY_FILE_ENV)
    if value and path:
        raise CheckpointError(f"both {KEY_ENV} and {KEY_FILE_ENV} are set; keep the one that holds the key")
    if path:
        try:
            key = Path(path).read_bytes().strip()
        except OSError as e:
            raise CheckpointError(f"{KEY_FILE_ENV}={path} cannot be read ({e.strerror}); point it at the file "
                                  "holding the checkpoint key") from None
        if not key:
            raise CheckpointError(f"{KEY_FILE_ENV}={path} is empty; put the checkpoint key in it")
        return key
    return value.encode() if value else None


def _signature(key: bytes, format_: int, files: dict) -> str:
    body = json.dumps({"format": format_, "files": files}, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


# ---- hashing, shared among the ranks ------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _hash_share(folder: Path, names: list[str], rank: int, world: int) -> dict[str, dict]:
    """Size and SHA-256 of this rank's share of `names` (every world-th file), so ranks hash in parallel."""
    return {n: {"size": (folder / n).stat().st_size, "sha256": _sha256(folder / n)} for n in names[rank::world]}


def _gather_hashes(folder: Path, names: list[str], collective: bool = True) -> dict[str, dict]:
    rank, world = rank_world() if collective else (0, 1)
    mine = _hash_share(folder, names, rank, world)
    if world == 1:
        return mine
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def _contents(folder: Path) -> list[str]:
    """Every entry of `folder` but the manifest (a subfolder too: a checkpoint holds none)."""
    return sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)


# ---- writing and verifying ------------------------------------------------------------------------------
def write_manifest(folder: Path) -> None:
    """Hash every file of `folder` (all ranks share the work) and write manifest.json last, atomically;
    signed when a key is configured."""
    files = _gather_hashes(folder, _contents(folder))
    if rank_world()[0] == 0:
        manifest = {"format": FORMAT, "files": files}
        if (key := signing_key()) is not None:
            manifest["signature"] = _signature(key, FORMAT, files)
        tmp = folder / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        os.replace(tmp, folder / MANIFEST)


def _read_manifest(folder: Path) -> tuple[dict | None, str | None]:
    """(the manifest's files, None), or (None, what is wrong with it)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return None, "no manifest.json (an incomplete save, or a keel from before checksums)"
    except (ValueError, OSError) as e:  # not JSON, not UTF-8, or not a file
        return None, f"manifest.json is unreadable ({type(e).__name__})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(e, dict) for e in files.values()):
        return None, "manifest.json is unreadable (no table of files)"
    if (key := signing_key()) is not None:
        signature = manifest.get("signature")
        if not isinstance(signature, str):
            return None, f"manifest.json is not signed, and {KEY_ENV} asks for signed checkpoints"
        if not hmac.compare_digest(signature, _signature(key, manifest.get("format"), files)):
            return None, "manifest.json's signature does not match the checkpoint key (forged, or another key)"
    return files, None


def verify(folder: Path, collective: bool = True) -> str | None:
    """None when the folder is exactly what its manifest lists, every file intact; else why not, in a few
    words. `collective`: every rank of the process group calls it and hashes its share."""
    folder = Path(folder)
    # 1. the manifest itself, and its signature when a key is configured
    listed, problem = _read_manifest(folder)
    if problem:
        return problem
    # 2. plain names, and exactly the files that are there
    for name in sorted(listed):
        if not is_plain_name(name):
            return f"manifest.json names {name!r}, which is not a file name inside the checkpoint"
    present = _contents(folder)
    for name in present:
        if name not in listed:
            return f"{name} is in the folder but not in manifest.json"
        if not _KINDS.match(name) or not (folder / name).is_file():
            return f"{name} is not a file keel or megatron-core writes into a checkpoint"
    for name, entry in sorted(listed.items()):
        if name not in present:
            return f"{name} is missing"
        # 3. sizes first: cheap, and they catch truncation without reading anything
        size = (folder / name).stat().st_size
        if size != entry.get("size"):
            return f"{name} has {size} bytes, the manifest says {entry.get('size')}"
    # 4. checksums, shared among the ranks
    actual = _gather_hashes(folder, sorted(listed), collective)
    for name in sorted(listed):
        if actual[name]["sha256"] != listed[name].get("sha256"):
            return f"{name} does not match its checksum"
    # 5. the shard index holds nothing but an index
    if DCP_INDEX in listed:
        try:
            read_metadata(folder / DCP_INDEX)
        except RefusedPickle as e:
            return f"{DCP_INDEX} {e.reason}"
    return None


def require_verified(folder: Path, collective: bool = True) -> None:
    """The gate before anything of `folder` is deserialised: a checkpoint that fails verification is one
    line. Every loader calls it (through `Checkpoints.require_verified` in a run)."""
    problem = verify(folder, collective)
    if problem is not None:
        raise CheckpointError(f"checkpoint {folder} failed verification ({problem}); nothing of it was loaded: "
                              "use a good checkpoint (`python tools/ckpt.py verify` checks one)")
