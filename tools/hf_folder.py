"""What the Hugging Face tools (import_hf, export_hf, evaluate) share: reading a model folder safely,
its config.json through transformers (local files only, remote code disabled) and its weights from
safetensors, one file or shards with their index; writing a folder atomically; and running in a
megatron world of one process with one-line errors.

Pickled weights (`*.bin`, `*.pt`) can run code when loaded, so they are refused unless the caller
allows them (`--allow-pickle`), and then read with `torch.load(weights_only=True)`. Every problem is a
`FolderError` whose message is one line naming the file and the fix.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from pretrain.checkpoint.errors import CheckpointError
from pretrain.errors import BAD_INPUT, one_line

SAFE_INDEX, SAFE_FILE = "model.safetensors.index.json", "model.safetensors"
PICKLE_INDEX, PICKLE_FILES = "pytorch_model.bin.index.json", ("pytorch_model.bin", "model.pt", "pytorch_model.pt")
ALLOW_PICKLE = "--allow-pickle"


class FolderError(CheckpointError):
    """A Hugging Face folder keel cannot read; the message is the line the user sees."""


def check_folder(path: str | Path) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise FolderError(f"model folder {folder} not found; pass the folder holding config.json and the weights")
    if not (folder / "config.json").is_file():
        raise FolderError(f"{folder} has no config.json; pass a Hugging Face model folder")
    return folder


def read_config(folder: Path) -> dict:
    """config.json as transformers reads it (legacy rope keys moved under `rope_parameters`)."""
    from transformers import AutoConfig

    from models.hf import SUPPORTED

    try:
        return AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False).to_dict()
    except Exception as e:  # transformers raises many types for a config it cannot read
        raw = _json(folder / "config.json")
        arch = (raw.get("architectures") or [raw.get("model_type", "?")])[0]
        raise FolderError(f"{folder / 'config.json'} describes {arch}, which transformers cannot read without "
                          f"remote code ({_first_line(e)}); keel imports {SUPPORTED}") from None


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FolderError(f"{path} is not valid JSON ({_first_line(e)}); re-download it") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class Weights:
    """The folder's tensors by name, read one at a time (a shard is opened once, never loaded whole)."""

    def __init__(self, folder: Path, allow_pickle: bool = False):
        self.folder, self._handles = folder, {}
        # 1. safetensors: an index names each tensor's shard; else one file holds them all
        if (folder / SAFE_INDEX).exists():
            self.files = self._indexed(folder / SAFE_INDEX, allow_pickle)
        elif (folder / SAFE_FILE).exists():
            self.files = dict.fromkeys(self._open(folder / SAFE_FILE).keys(), folder / SAFE_FILE)
        # 2. pickles: only when allowed, and then without running code
        else:
            self.files = self._pickled(folder, allow_pickle)
        for f in sorted(set(self.files.values())):
            if not f.exists():
                raise FolderError(f"shard {f} named in {SAFE_INDEX} is missing; download every shard of the model")

    def _pickled(self, folder: Path, allow_pickle: bool) -> dict[str, Path]:
        index = folder / PICKLE_INDEX
        files = [folder / f for f in PICKLE_FILES if (folder / f).exists()]
        if not index.exists() and not files:
            raise FolderError(f"{folder} holds no weights ({SAFE_FILE}, {SAFE_INDEX} or {PICKLE_FILES[0]}); "
                              "download the model's weights into it")
        if not allow_pickle:
            found = index.name if index.exists() else files[0].name
            raise FolderError(f"{folder} has only pickled weights ({found}), which can run code when loaded; convert "
                              f"them to safetensors, or pass {ALLOW_PICKLE} to load them with weights_only=True")
        if index.exists():
            return self._indexed(index, allow_pickle)
        return dict.fromkeys(self._open(files[0]).keys(), files[0])

    @staticmethod
    def _indexed(index: Path, allow_pickle: bool) -> dict[str, Path]:
        """Tensor name -> shard, from an index: each shard a plain file name in the folder, and a
        safetensors file unless pickles are allowed (an index can name any file)."""
        weight_map = _json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise FolderError(f"{index} has no weight_map; re-download it")
        for shard in sorted(set(weight_map.values())):
            if not isinstance(shard, str) or Path(shard).name != shard or shard in (".", ".."):
                raise FolderError(f"{index} names shard {shard!r}, which is not a file of the model folder; "
                                  "re-download the model")
            if not shard.endswith(".safetensors") and not allow_pickle:
                raise FolderError(f"{index} names shard {shard}, which is not a safetensors file and can run code "
                                  f"when loaded; convert it to safetensors, or pass {ALLOW_PICKLE} to load it "
                                  "with weights_only=True")
        return {name: index.parent / shard for name, shard in weight_map.items()}

    def _open(self, path: Path):
        """A shard's handle (safetensors) or its tensors (a pickle, read with weights_only=True), cached."""
        cache = self._handles
        if path not in cache:
            try:
                if path.suffix == ".safetensors":
                    from safetensors import safe_open

                    cache[path] = safe_open(str(path), framework="pt")
                else:
                    cache[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # safetensors and torch raise their own types for a damaged file
                raise FolderError(f"cannot read {path} ({_first_line(e)}); re-download it") from None
        return cache[path]

    def _holder(self, name: str):
        if name not in self.files:
            raise FolderError(f"{self.folder} holds no tensor {name}, which config.json implies; the weights do "
                              "not belong to this config")
        handle = self._open(self.files[name])
        if name not in handle.keys():
            raise FolderError(f"shard {self.files[name].name} does not hold {name}, which its index puts there; "
                              "the shard belongs to another model: download it again")
        return handle

    def shape(self, name: str) -> tuple[int, ...]:
        handle = self._holder(name)
        return tuple(handle[name].shape if isinstance(handle, dict) else handle.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        handle = self._holder(name)
        return handle[name] if isinstance(handle, dict) else handle.get_tensor(name)

    def check_shapes(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Every tensor the config implies, with its shape: read from the headers, before any tensor."""
        for name, shape in expected.items():
            found = self.shape(name)
            if found != tuple(shape):
                raise FolderError(f"{self.files[name].name}: tensor {name} has shape {list(found)}, config.json "
                                  f"implies {list(shape)}; that shard belongs to another model")


@contextmanager
def atomic_folder(output: Path) -> Iterator[Path]:
    """A temporary folder beside `output` to fill; it replaces `output` only when the block completes,
    so an interrupted tool never leaves a folder that looks complete."""
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def in_tool_world(tool: str, work: Callable[[], object], parallel=None) -> tuple[int, object]:
    """(exit code, result) of `work` run in a megatron world at `parallel`'s layout (default: one process,
    gloo; pretrain.distributed.tool_world): the caller's, when it has one (a test), else one made for it; a
    bad input is one line on stderr and exit code 2."""
    from pretrain.distributed import tool_world

    try:
        with tool_world(parallel):
            return 0, work()
    except BAD_INPUT as e:  # keel's config, data, tokenizer, checkpoint and folder errors; a bug shows its traceback
        print(f"{tool}: error: {one_line(e)}", file=sys.stderr)
        return 2, None
