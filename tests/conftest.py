"""Shared fixtures: a tiny tokenizer and packed corpus, and an in-process megatron world.
Helpers that tests import live in tests/helpers.py."""

from __future__ import annotations

import os

# nothing is downloaded in a test: the Hugging Face hub and datasets libraries (lm-eval's HF backend
# asks the hub for model info otherwise) read these when they are first imported
os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest  # noqa: E402

from pretrain import cpu_compat  # noqa: E402

# every test process (and each xdist worker) sees megatron-core with keel's CPU redirects, whichever
# test happens to run first
cpu_compat.apply()


def pytest_collection_modifyitems(items):
    """Modules with end-to-end runs (marked slow) first, each kept whole: xdist then hands the short tests
    out last, and its workers finish together instead of one waiting on another's minute-long run."""
    slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow_modules)  # stable: order kept within each


@pytest.fixture
def committed_checkout(monkeypatch):
    """Reports write a results JSON only from a committed tree (provenance.results_provenance); a test that runs one
    sees this checkout at tests.helpers.COMMIT, whatever its state while it is being edited."""
    from pretrain import rundir
    from tests.helpers import COMMIT

    monkeypatch.setattr(rundir, "git_revision", lambda root=rundir.ROOT: COMMIT)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    from data.corpus import stdlib_documents
    from data.tokenizer import load_tokenizer, train_tokenizer

    docs = [d.text for _, d in zip(range(80), stdlib_documents("code", "train"))]
    path = train_tokenizer(docs, tmp_path_factory.mktemp("tok") / "tiny.model", vocab_size=512)
    return load_tokenizer(path)


@pytest.fixture(scope="session")
def tiny_data(tiny_tokenizer, tmp_path_factory):
    """Packed train/validation sets of 64-token rows from a slice of the standard library."""
    from data.corpus import stdlib_documents
    from data.pipeline import pack_documents

    root = tmp_path_factory.mktemp("packed")
    for split, n in (("train", 120), ("val", 30)):
        docs = [d for _, d in zip(range(n), stdlib_documents("code", split))]
        pack_documents(docs, tiny_tokenizer, 64, "concat", str(root / split), progress=False)
    return {"train": str(root / "train"), "val": str(root / "val"), "tokenizer": str(tiny_tokenizer.path)}


@pytest.fixture(scope="session")
def megatron_world():
    """An in-process world of one (gloo) with megatron's parallel state, for model-level tests."""
    from pretrain import distributed
    from pretrain.config import ParallelConfig

    world = distributed.init(ParallelConfig())
    yield world
    distributed.shutdown()


@pytest.fixture(scope="session")
def packed_sp(tiny_tokenizer, tmp_path_factory):
    """A small Seamless-Packing dataset (64-token rows), for tests that damage copies of it."""
    from data.corpus import stdlib_documents
    from data.pipeline import pack_documents

    prefix = tmp_path_factory.mktemp("packed_sp") / "ds"
    docs = [d for _, d in zip(range(40), stdlib_documents("code", "train"))]
    pack_documents(docs, tiny_tokenizer, 64, "sp", str(prefix), progress=False)
    return prefix
