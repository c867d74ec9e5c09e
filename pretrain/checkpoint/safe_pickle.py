"""No code runs from a distributed checkpoint: the two pickles torch's checkpoint format reads, restricted.

megatron-core's `dist_checkpointing` stores the model and optimizer in torch's distributed checkpoint
format, which reads pickles in two places:
1. `.metadata`, the shard index, with a plain `pickle.load` (`FileSystemReader.read_metadata`): keel
   reads it with `MetadataUnpickler`, which admits only what that index is made of (the dataclasses and
   enums of torch's checkpoint metadata and planner, `torch.Size`, dtypes and the layout lookup, and
   pickle's own containers and scalars), in the manner of `torch.load(weights_only=True)`'s allowlist;
   anything else is refused in one line naming the file and the class. The index's file names must be
   plain names inside the folder.
2. each non-tensor object megatron saves (its `common_state`, the layers' `_extra_state`), inside the
   `*.distcp` shards, with `torch.load(weights_only=False)` (`DefaultLoadPlanner.load_bytes`): keel
   reads them with `weights_only=True`.

`restricted_readers()` puts both readers in place of torch's while a checkpoint loads
(`pretrain.checkpoint.io` wraps every load in it) and gives torch its own back afterwards.
"""

from __future__ import annotations

import io
import pickle
from contextlib import contextmanager
from functools import partialmethod
from pathlib import Path

import torch

from pretrain.checkpoint.errors import CheckpointError


class RefusedPickle(CheckpointError):
    """A checkpoint file holds something keel will not unpickle; the message is the line the user sees,
    `reason` the few words that say what (after the file's name)."""

    def __init__(self, source, reason: str):
        super().__init__(f"{source} {reason}; the checkpoint is forged or damaged: delete it, or use one you trust")
        self.reason = reason


def _metadata_globals() -> frozenset[tuple[str, str]]:
    """(module, name) of every global a distributed checkpoint's `.metadata` is made of."""
    names = {
        "torch.distributed.checkpoint.metadata": ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                                  "TensorStorageMetadata", "BytesStorageMetadata",
                                                  "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"),
        "torch.distributed.checkpoint.planner": ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData",
                                                 "BytesIOWriteData"),
        "torch.distributed.checkpoint.filesystem": ("_StorageInfo",),
        "torch.serialization": ("_get_layout",),  # a lookup of torch's layouts by name
        "torch": ("Size",),
        "builtins": ("set", "frozenset"),  # pickle protocols below 4 build sets through these
        "collections": ("OrderedDict",),
    }
    dtypes = {("torch", str(d).removeprefix("torch.")) for d in vars(torch).values() if isinstance(d, torch.dtype)}
    return frozenset({(module, name) for module, members in names.items() for name in members} | dtypes)


METADATA_GLOBALS = _metadata_globals()


class MetadataUnpickler(pickle.Unpickler):
    """pickle's own unpickler, restricted to `METADATA_GLOBALS` (Python's documented way to restrict
    globals): every class or function a pickle can name comes through `find_class`."""

    def __init__(self, file, source: Path):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) not in METADATA_GLOBALS:
            raise RefusedPickle(self.source, f"holds {module}.{name}, which no checkpoint index is made of")
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise RefusedPickle(self.source, "holds a persistent reference, which no checkpoint index has")


def read_metadata(path: Path):
    """The `Metadata` in the file at `path`, read with `MetadataUnpickler`, its file names checked."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(path)
    try:
        with open(path, "rb") as f:
            metadata = MetadataUnpickler(f, path).load()
    except RefusedPickle:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError) as e:
        raise RefusedPickle(path, f"is not a checkpoint index ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(metadata, Metadata):
        raise RefusedPickle(path, f"holds a {type(metadata).__name__}, not a checkpoint index")
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if not is_plain_name(name):
            raise RefusedPickle(path, f"points at {name!r}, which is not a file name inside the checkpoint")
    return metadata


def is_plain_name(name) -> bool:
    """A file name of one folder: no separator, not `.` or `..`, no NUL."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---- torch's readers, replaced while a checkpoint loads ------------------------------------------------
def _read_metadata(self, *args, **kwargs):
    """`FileSystemReader.read_metadata`, with `MetadataUnpickler` in place of `pickle.load`."""
    from torch.distributed.checkpoint.metadata import StorageMeta

    metadata = read_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    metadata.storage_meta.load_id = self.load_id
    return metadata


def _load_bytes(self, read_item, value: io.BytesIO, *, torch_load_bytes) -> None:
    """`DefaultLoadPlanner.load_bytes`, fed only what `torch.load(weights_only=True)` admits (tensors,
    numbers, strings, plain containers): the object is loaded that way, saved again and handed to torch's
    own method (`torch_load_bytes`), whose `weights_only=False` then meets nothing but those types."""
    try:
        loaded = torch.load(value, weights_only=True)
    except pickle.UnpicklingError as e:
        raise RefusedPickle("a shard (*.distcp)", "holds an object that only loads by running code "
                            f"({_first_line(e)})") from None
    clean = io.BytesIO()
    torch.save(loaded, clean)
    clean.seek(0)
    torch_load_bytes(self, read_item, clean)


@contextmanager
def restricted_readers():
    """torch's two pickle readers for distributed checkpoints replaced by the restricted ones inside the
    block, torch's own restored after it (re-entrant: an inner block changes nothing)."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    torch_read_metadata, torch_load_bytes = FileSystemReader.read_metadata, DefaultLoadPlanner.load_bytes
    if torch_read_metadata is _read_metadata:
        yield
        return
    FileSystemReader.read_metadata = _read_metadata
    DefaultLoadPlanner.load_bytes = partialmethod(_load_bytes, torch_load_bytes=torch_load_bytes)
    try:
        yield
    finally:
        FileSystemReader.read_metadata, DefaultLoadPlanner.load_bytes = torch_read_metadata, torch_load_bytes
