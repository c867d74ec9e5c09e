"""Resolve the training data: a tokenizer and packed train/validation sets, cached when derived.

With `data.path` or `data.sources` set, the packed sets are used as they are (after validation).
Otherwise the named corpus (the Python standard library) is tokenized with a cached tokenizer trained
on it, split by file, and packed once into the cache; later runs reuse it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from filelock import FileLock

from data.corpus import stdlib_documents
from data.errors import DataError, DataNotFound
from data.format import PackedDataset, dataset_exists, remove_leftovers
from data.loader import WeightedDataset
from data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from data.config import DataConfig


def cache_dir(cfg: DataConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("KEEL_CACHE") or Path.home() / ".cache" / "keel"
    return Path(root).expanduser()


def _python_tag() -> str:
    return f"py{sys.version_info.major}{sys.version_info.minor}"


def tokenizer_path(cfg: DataConfig) -> Path:
    if cfg.tokenizer:
        return Path(cfg.tokenizer)
    # named for its training text too: the training side of a data.val_percent split
    return cache_dir(cfg) / "tokenizers" / f"stdlib-{_python_tag()}-bpe{cfg.vocab_size}-v{cfg.val_percent:g}.model"


def ensure_tokenizer(cfg: DataConfig) -> Tokenizer:
    path = tokenizer_path(cfg)
    if not cfg.tokenizer and not path.exists():
        with _building(path):
            remove_leftovers(path.with_suffix(""))  # of a training that was killed
            if not path.exists():  # another process may have trained it while this one waited
                # trained on the training side of the split only, so validation text stays unseen
                train_tokenizer((d.text for d in stdlib_documents("all", "train", cfg.val_percent)), path,
                                cfg.vocab_size)
    return load_tokenizer(path)


def _building(path: str | Path) -> FileLock:
    """One builder per cache entry: a multirun's workers on an empty cache wait for the first to finish
    it, then use what it wrote, rather than each building (and racing to rename) the same files."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return FileLock(f"{path}.lock")


def packed_prefixes(cfg: DataConfig, tokenizer: Tokenizer) -> tuple[str | None, str]:
    """(training set, validation set); the training set is None for a mixture (data.sources)."""
    if cfg.path or cfg.sources:
        return cfg.path, cfg.val_path or cfg.path
    subset = cfg.corpus.split(":")[1] if ":" in cfg.corpus else "all"
    tag = f"stdlib-{subset}-{_python_tag()}-{tokenizer.fingerprint()}-L{cfg.seq_len}-{cfg.pack_method}-v{cfg.val_percent:g}"
    root = cache_dir(cfg) / "packed" / tag
    return str(root / "train"), str(root / "val")


def ensure_packed(cfg: DataConfig, tokenizer: Tokenizer) -> tuple[str, str]:
    """Build the cached packed sets for a named corpus when they are missing."""
    train, val = packed_prefixes(cfg, tokenizer)
    if cfg.path or cfg.sources:
        return train, val
    subset = cfg.corpus.split(":")[1] if ":" in cfg.corpus else "all"
    for split, prefix in (("train", train), ("val", val)):
        if Path(f"{prefix}.json").exists():  # complete: the JSON is renamed into place last
            continue
        with _building(prefix):
            remove_leftovers(prefix)  # of a build that was killed
            if not Path(f"{prefix}.json").exists():
                from data.pipeline import pack_documents

                docs = stdlib_documents(subset, split, cfg.val_percent)
                pack_documents(docs, tokenizer, cfg.seq_len, cfg.pack_method, prefix,
                               overwrite=dataset_exists(prefix), progress=False)
    return train, val


def open_checked(prefix: str, cfg: DataConfig, tokenizer: Tokenizer, role: str) -> PackedDataset:
    """Open a packed set and check it against the tokenizer and the configured sequence length."""
    ds = PackedDataset(prefix)
    packed_with = ds.meta["tokenizer"]
    if "sha256_16" not in packed_with:
        raise DataError(f"{role} data {prefix}.json records no tokenizer fingerprint (it was packed by an older "
                        f"keel), so nothing shows it was packed with {tokenizer.path}; re-pack it with tools/pack.py")
    if ds.vocab_size != tokenizer.vocab_size or packed_with["sha256_16"] != tokenizer.fingerprint():
        raise DataError(f"{role} data {prefix} was packed with another tokenizer ({packed_with.get('path')}: "
                        f"{ds.vocab_size}-token vocabulary, fingerprint {packed_with.get('sha256_16')}) than "
                        f"{tokenizer.path} ({tokenizer.vocab_size}-token vocabulary, fingerprint "
                        f"{tokenizer.fingerprint()}); re-pack with this tokenizer or set data.tokenizer to the one it "
                        "was packed with")
    if ds.max_token_id() >= tokenizer.vocab_size:
        raise DataError(f"{role} data {prefix} holds token id {ds.max_token_id()}, past the "
                        f"{tokenizer.vocab_size}-token vocabulary of {tokenizer.path}; the data is damaged or was not "
                        "packed with this tokenizer: re-pack it")
    if ds.seq_len != cfg.seq_len:
        raise DataError(f"{role} data {prefix} has rows of {ds.seq_len} tokens but data.seq_len={cfg.seq_len}; "
                        f"set data.seq_len={ds.seq_len} or re-pack")
    return ds


def training_sources(cfg: DataConfig, tokenizer: Tokenizer, train_prefix: str | None) -> list[WeightedDataset]:
    """The training set, or each set of the mixture with its weight, opened and checked."""
    if not cfg.sources:
        return [WeightedDataset("train", open_checked(train_prefix, cfg, tokenizer, "training"), 1.0)]
    sources = []
    for i, s in enumerate(cfg.sources):
        try:
            dataset = open_checked(s.path, cfg, tokenizer, f"data.sources[{i}]")
            sources.append(WeightedDataset(s.label, dataset, s.weight))
        except FileNotFoundError as e:
            raise DataNotFound(f"data.sources[{i}].path: {e}") from None
    return sources


def validation_sets(cfg: DataConfig, tokenizer: Tokenizer, val_prefix: str) -> tuple[PackedDataset, dict]:
    """The validation set (val_loss) and each of data.val_sets by name (val_loss/NAME), opened and checked."""
    named = {}
    for v in cfg.val_sets:
        try:
            named[v.name] = open_checked(v.path, cfg, tokenizer, f"data.val_sets {v.name}")
        except FileNotFoundError as e:
            raise DataNotFound(f"data.val_sets {v.name}: {e}") from None
    return open_checked(val_prefix, cfg, tokenizer, "validation"), named
