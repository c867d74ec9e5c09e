"""Resolve the training data: a tokenizer and packed train/validation sets, cached when derived.

With `data.path` set, the packed sets are used as they are (after validation). Otherwise the named
corpus (the Python standard library) is tokenized with a cached tokenizer trained on it, split by
file, and packed once into the cache; later runs reuse it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from data.corpus import stdlib_documents
from data.format import PackedDataset, dataset_exists
from data.tokenizer import Tokenizer, train_tokenizer
from data.config import DataConfig


def cache_dir(cfg: DataConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("KEEL_CACHE") or Path.home() / ".cache" / "keel"
    return Path(root).expanduser()


def _python_tag() -> str:
    return f"py{sys.version_info.major}{sys.version_info.minor}"


def tokenizer_path(cfg: DataConfig) -> Path:
    if cfg.tokenizer:
        return Path(cfg.tokenizer)
    return cache_dir(cfg) / "tokenizers" / f"stdlib-{_python_tag()}-bpe{cfg.vocab_size}.model"


def ensure_tokenizer(cfg: DataConfig) -> Tokenizer:
    path = tokenizer_path(cfg)
    if not cfg.tokenizer and not path.exists():
        # trained on the training side of the split only, so validation text stays unseen
        train_tokenizer((d.text for d in stdlib_documents("all", "train", cfg.val_percent)), path, cfg.vocab_size)
    return Tokenizer(path)


def packed_prefixes(cfg: DataConfig, tokenizer: Tokenizer) -> tuple[str, str]:
    if cfg.path:
        return cfg.path, cfg.val_path or cfg.path
    subset = cfg.corpus.split(":")[1] if ":" in cfg.corpus else "all"
    tag = f"stdlib-{subset}-{_python_tag()}-{tokenizer.fingerprint()}-L{cfg.seq_len}-{cfg.pack_method}-v{cfg.val_percent:g}"
    root = cache_dir(cfg) / "packed" / tag
    return str(root / "train"), str(root / "val")


def ensure_packed(cfg: DataConfig, tokenizer: Tokenizer) -> tuple[str, str]:
    """Build the cached packed sets for a named corpus when they are missing."""
    train, val = packed_prefixes(cfg, tokenizer)
    if cfg.path:
        return train, val
    subset = cfg.corpus.split(":")[1] if ":" in cfg.corpus else "all"
    for split, prefix in (("train", train), ("val", val)):
        if not Path(f"{prefix}.json").exists():
            from data.pipeline import pack_documents

            docs = stdlib_documents(subset, split, cfg.val_percent)
            pack_documents(docs, tokenizer, cfg.seq_len, cfg.pack_method, prefix, overwrite=dataset_exists(prefix),
                           progress=False)
    return train, val


def open_checked(prefix: str, cfg: DataConfig, tokenizer: Tokenizer, role: str) -> PackedDataset:
    """Open a packed set and check it against the tokenizer and the configured sequence length."""
    ds = PackedDataset(prefix)
    if ds.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"{role} data {prefix} was packed with a {ds.vocab_size}-token vocabulary but the tokenizer "
                         f"{tokenizer.path} has {tokenizer.vocab_size}; re-pack with this tokenizer or set data.tokenizer")
    if ds.seq_len != cfg.seq_len:
        raise ValueError(f"{role} data {prefix} has rows of {ds.seq_len} tokens but data.seq_len={cfg.seq_len}; "
                         f"set data.seq_len={ds.seq_len} or re-pack")
    return ds
