"""Tokenizers: keel's sentencepiece models (trained by `train_tokenizer`) and Hugging Face tokenizers
(a tokenizer.json, or a model folder), behind one small protocol; `load_tokenizer` picks the kind.

The packer encodes each document with `encode_batch` and appends `eod` after it. Each tokenizer's
`fingerprint` names its vocabulary and special ids, so packed data records which tokenizer made it
(`describe()` in the metadata) and training refuses data made with another.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Protocol

import sentencepiece as spm

from data.errors import TokenizerError, TokenizerNotFound


class Tokenizer(Protocol):
    """What keel needs of a tokenizer: the packer, the trainer's checks and the tools use only this."""

    path: Path  # the file or folder it was loaded from
    vocab_size: int  # ids are in [0, vocab_size)
    eod: int  # appended after every document
    pad: int  # fills rows after their content (masked out of the loss)
    bos: int | None  # the tokenizer's beginning-of-text id, if it has one

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str: ...

    def fingerprint(self) -> str: ...

    def describe(self) -> dict: ...

    def save(self, folder: Path) -> Path:
        """Copy the tokenizer into `folder`; returns the path `load_tokenizer` takes."""


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A Hugging Face tokenizer for a folder or a .json file, else a sentencepiece model."""
    path = Path(path)
    if not path.exists():
        raise TokenizerNotFound(f"tokenizer {path} not found; pass a sentencepiece .model (tools/train_tokenizer.py), "
                                "a tokenizer.json or a Hugging Face model folder")
    if path.is_dir() or path.suffix == ".json":
        return HFTokenizer(path)
    return SentencePieceTokenizer(path)


def _describe(tok: Tokenizer, kind: str) -> dict:
    return {"kind": kind, "path": str(tok.path.resolve()), "vocab_size": tok.vocab_size, "eod": tok.eod,
            "pad": tok.pad, "sha256_16": tok.fingerprint()}


class SentencePieceTokenizer:
    """A sentencepiece model with the ids keel needs: end-of-document and padding. No BOS: documents are
    separated by EOD alone (keel's packed data has always been made this way)."""

    def __init__(self, model_path: str | Path):
        path = Path(model_path)
        if not path.is_file():
            raise TokenizerNotFound(f"tokenizer {path} not found; train one with `python tools/train_tokenizer.py`")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(str(path))
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"tokenizer {path} is not a valid sentencepiece model ({e}); retrain it") from None
        self.path = path
        self.vocab_size = self.sp.get_piece_size()
        self.eod = self.sp.eos_id() if self.sp.eos_id() >= 0 else self.vocab_size - 1
        # Padding is masked out of the loss, so any id works when the model defines none.
        self.pad = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eod
        self.bos = self.sp.bos_id() if self.sp.bos_id() >= 0 else None  # defined, but keel does not add it

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def fingerprint(self) -> str:
        """The model less the trainer's own file names (its input and its temporary output prefix, which
        holds a process id): two trainings that learnt the same model agree, wherever the file lives."""
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self.sp.serialized_model_proto())
        for bookkeeping in ("input", "model_prefix"):
            proto.trainer_spec.ClearField(bookkeeping)
        return hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()[:16]

    def describe(self) -> dict:
        return _describe(self, "sentencepiece")

    def save(self, folder: Path) -> Path:
        Path(folder).mkdir(parents=True, exist_ok=True)
        return Path(shutil.copyfile(self.path, Path(folder) / "tokenizer.model"))


class HFTokenizer:
    """A Hugging Face tokenizer from local files only, remote code disabled: a model folder (its
    tokenizer_config.json names BOS/EOS/padding) or a tokenizer.json (with tokenizer_config.json beside
    it, else without special tokens but an end-of-text one it must be told). Documents are encoded as the
    tokenizer's own template says (e.g. BOS first); a trailing EOS it adds is dropped, since the packer
    appends EOD after every document."""

    def __init__(self, path: str | Path):
        # 1. the folder transformers loads, or the bare tokenizer.json
        self.path = Path(path)
        self.hf = _load_hf(self.path)
        # 2. the ids keel needs
        self.vocab_size = len(self.hf)
        if self.hf.eos_token_id is None:
            raise TokenizerError(f"tokenizer {self.path} names no end-of-text token (eos_token); pass the model folder "
                                 "whose tokenizer_config.json sets it")
        self.eod = int(self.hf.eos_token_id)
        self.pad = int(self.hf.pad_token_id) if self.hf.pad_token_id is not None else self.eod
        self.bos = self.hf.bos_token_id
        # 3. does the template end a text with EOS? (the empty text holds the template's tokens only)
        template = self.hf("", add_special_tokens=True)["input_ids"]
        self._template_eos = bool(template) and template[-1] == self.eod

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        ids = self.hf(texts, add_special_tokens=True)["input_ids"] if texts else []
        # an empty document stays empty (not a lone BOS), and the packer appends EOD itself
        return [(x[:-1] if self._template_eos else x) if text else [] for text, x in zip(texts, ids)]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False)

    def fingerprint(self) -> str:
        """The vocabulary, merges, template and special ids: the same for a copy of the files, wherever it lives."""
        state = {"tokenizer": json.loads(self.hf.backend_tokenizer.to_str()), "eod": self.eod, "pad": self.pad,
                 "bos": self.bos}
        return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> dict:
        return _describe(self, "huggingface")

    def save(self, folder: Path) -> Path:
        """The tokenizer files in transformers' own format."""
        self.hf.save_pretrained(str(folder))
        return Path(folder)


def _load_hf(path: Path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    folder = path if path.is_dir() else path.parent
    # a tokenizer.json beside its tokenizer_config.json loads as the folder, which names the special tokens
    whole_folder = path.is_dir() or (path.name == "tokenizer.json" and (folder / "tokenizer_config.json").exists())
    try:
        if whole_folder:
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        return PreTrainedTokenizerFast(tokenizer_file=str(path))
    except Exception as e:  # transformers raises many types (OSError, ValueError, JSON errors) for a bad folder
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TokenizerError(f"tokenizer {path} is not a Hugging Face tokenizer ({reason}); pass a tokenizer.json, "
                                 "a model folder that holds one, or a sentencepiece .model") from None


def train_tokenizer(texts: Iterable[str], output: str | Path, vocab_size: int,
                    max_lines: int = 400_000) -> Path:
    """Train a BPE model for source code and prose: whitespace kept, bytes as fallback.

    Written to a temporary name and renamed, so an interrupted run leaves no model behind.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)

    def lines() -> Iterable[str]:
        n = 0
        for text in texts:
            for line in text.splitlines():
                if line.strip():
                    yield line
                    n += 1
                    if n >= max_lines:
                        return

    tmp_prefix = f"{output.with_suffix('')}.tmp{os.getpid()}"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines()), model_prefix=tmp_prefix, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True,
        pad_id=3, unk_id=0, bos_id=1, eos_id=2, max_sentence_length=8192,
        num_threads=1, minloglevel=2,
        user_defined_symbols=["\n", "    ", "\t"])
    os.replace(f"{tmp_prefix}.model", output)
    Path(f"{tmp_prefix}.vocab").unlink(missing_ok=True)
    return output
