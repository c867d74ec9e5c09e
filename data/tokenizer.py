"""SentencePiece tokenizer: loading with validation, and training on a corpus."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

import sentencepiece as spm


class Tokenizer:
    """A sentencepiece model with the ids keel needs: end-of-document and padding."""

    def __init__(self, model_path: str | Path):
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer {path} not found; train one with `python tools/train_tokenizer.py`")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(str(path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"tokenizer {path} is not a valid sentencepiece model ({e}); retrain it") from None
        self.path = path
        self.vocab_size = self.sp.get_piece_size()
        self.eod = self.sp.eos_id() if self.sp.eos_id() >= 0 else self.vocab_size - 1
        # Padding is masked out of the loss, so any id works when the model defines none.
        self.pad = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eod

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]

    def describe(self) -> dict:
        return {"path": str(self.path.resolve()), "vocab_size": self.vocab_size, "eod": self.eod,
                "pad": self.pad, "sha256_16": self.fingerprint()}


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
