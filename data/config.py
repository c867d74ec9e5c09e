"""The data's configuration: which corpus or packed set, the tokenizer, the row length and packing.

Validation as in `models/config.py`: one `ValueError` line per problem, choices as `StrEnum`s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Optional

from data.corpus import STDLIB, STDLIB_SUBSETS
from data.errors import DataError

PackMethod = StrEnum("PackMethod", [(m, m) for m in ("sp", "bfd", "concat", "pad")])  # data/packing.py plans each one
NAMED_CORPORA = (STDLIB, *(f"{STDLIB}:{s}" for s in STDLIB_SUBSETS if s != "all"))  # the running Python's standard library


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise DataError(message)


@dataclass
class SourceConfig:
    """One packed training set of a weighted mixture (data.sources)."""

    path: str  # prefix of a packed set (tools/pack.py --output)
    weight: float = 1.0  # share of the rows, relative to the other sources
    name: Optional[str] = None  # in the metrics (tokens_seen/NAME); None: the file name of `path`

    @property
    def label(self) -> str:
        return self.name or Path(self.path).name


@dataclass
class ValSetConfig:
    """One more validation set (data.val_sets), logged as val_loss/NAME."""

    name: str
    path: str  # prefix of a packed set

    def __post_init__(self):
        _check(self.name and "/" not in self.name, f"data.val_sets: name {self.name!r} must be non-empty, without '/'")


@dataclass
class DataConfig:
    """Packed datasets. With neither `path` nor `sources` set, the named corpus is tokenized and packed
    into the cache."""

    corpus: str = "stdlib"  # stdlib | stdlib:SUBSET, a subset of data.corpus.STDLIB_SUBSETS (code, tests, prose, ...)
    path: Optional[str] = None  # prefix of a packed training set (tools/pack.py --output)
    sources: list[SourceConfig] = field(default_factory=list)  # a weighted mixture of packed sets, instead of path
    val_path: Optional[str] = None  # prefix of a packed validation set: val_loss
    val_sets: list[ValSetConfig] = field(default_factory=list)  # more validation sets: val_loss/NAME each
    tokenizer: Optional[str] = None  # sentencepiece .model, tokenizer.json or a Hugging Face model folder;
    #                                  None: train a sentencepiece model on the stdlib and cache it
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
        _check(self.path is not None or bool(self.sources) or self.corpus in NAMED_CORPORA,
               f"data.corpus={self.corpus!r} is not a named corpus ({', '.join(NAMED_CORPORA)}); "
               "pack it with tools/pack.py and set data.path")
        self._check_sources()
        names = [v.name for v in self.val_sets]
        _check(len(set(names)) == len(names), f"data.val_sets names {names} repeat; give each set its own name")

    def _check_sources(self) -> None:
        """A mixture's weights are shares: each must be positive (so they never sum to 0); one label each."""
        if not self.sources:
            return
        _check(self.path is None, "set data.path or data.sources, not both")
        _check(self.val_path is not None,
               "data.sources needs data.val_path (the validation set logged as val_loss)")
        for i, source in enumerate(self.sources):
            _check(source.weight > 0, f"data.sources[{i}].weight must be > 0, got {source.weight}")
        labels = [s.label for s in self.sources]
        twice = sorted({x for x in labels if labels.count(x) > 1})
        _check(not twice, f"data.sources has two sources named {twice[0] if twice else ''!r}; "
                          "give them different names (data.sources[i].name)")
