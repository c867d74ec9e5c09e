"""The data's configuration: which corpus or packed set, the tokenizer, the row length and packing.

Validation as in `models/config.py`: one `ValueError` line per problem, choices as `StrEnum`s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Optional

PackMethod = StrEnum("PackMethod", [(m, m) for m in ("sp", "bfd", "concat", "pad")])  # data/packing.py plans each one
NAMED_CORPORA = ("stdlib", "stdlib:code", "stdlib:tests")  # the standard library of the running Python


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class DataConfig:
    """Packed datasets. With `path` unset, the named corpus is tokenized and packed into the cache."""

    corpus: str = "stdlib"  # stdlib | stdlib:code | stdlib:tests
    path: Optional[str] = None  # prefix of a packed training set (tools/pack.py --output)
    val_path: Optional[str] = None  # prefix of a packed validation set
    tokenizer: Optional[str] = None  # sentencepiece model; None: train one on the stdlib and cache it
    vocab_size: int = 8192  # for the auto-trained tokenizer
    seq_len: int = 256
    pack_method: str = field(default=PackMethod.concat, metadata={"choices": PackMethod})  # for auto-packed corpora
    val_percent: float = 5.0
    reset_position_ids: bool = False  # restart positions at each document
    document_mask: bool = False  # attend only within the current document
    cache_dir: Optional[str] = None  # None: $KEEL_CACHE or ~/.cache/keel

    def __post_init__(self):
        _check(self.pack_method in tuple(PackMethod),
               f"data.pack_method={self.pack_method!r} is unknown; choose one of {', '.join(PackMethod)}")
        self.pack_method = PackMethod(self.pack_method)
        _check(self.seq_len >= 2, f"data.seq_len must be >= 2, got {self.seq_len}")
        _check(self.vocab_size >= 16, f"data.vocab_size must be >= 16, got {self.vocab_size}")
        _check(0 < self.val_percent < 50, f"data.val_percent must be in (0, 50), got {self.val_percent}")
        _check(self.path is not None or self.corpus in NAMED_CORPORA,
               f"data.corpus={self.corpus!r} is not a named corpus ({', '.join(NAMED_CORPORA)}); "
               "pack it with tools/pack.py and set data.path")
