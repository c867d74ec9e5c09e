"""Deterministic, resumable loaders over packed datasets, sharded across data-parallel ranks.

The loader's whole state is one integer, the number of rows consumed: row k of the stream is row
``perm_e[k % n]`` of the dataset, where ``perm_e`` is epoch ``e = k // n``'s permutation drawn
from the seed. Every rank computes the same stream and takes its own slice of each global batch,
so resuming only needs that integer.

Validation loaders draw their order from `VALIDATION_SEED`, never from the run's seed, so every seed
and every arm of an experiment scores the same rows; `scored_digest` fingerprints them (run_info.json's
val_digest), so anyone can check that two runs scored the same text.

`MixedLoader` blends several datasets by weight (data.sources). Which source row k comes from is
megatron-core's blending rule (`helpers.build_blending_indices`: each row goes to the source
furthest below its share so far), computed once for a block of `BLEND_BLOCK` rows and repeated, so
row k is found in O(1) and the state is still that one integer. Each source then streams its own
rows as above, with its own permutations.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from data.errors import DataError
from data.format import PackedDataset
from models import megatron_release


def model_inputs(batch: dict[str, torch.Tensor], reset_position_ids: bool, document_mask: bool) -> dict:
    """Turn packed rows into GPT inputs: labels shifted by one, padding and the last position masked."""
    tokens, doc_ids, content = batch["tokens"], batch["doc_ids"], batch["loss_mask"]
    b, s = tokens.shape
    labels = torch.roll(tokens, -1, dims=1)
    loss_mask = torch.roll(content, -1, dims=1)  # predicting a padded token earns no loss
    loss_mask[:, -1] = 0.0  # the last position has no next token in this row
    positions = torch.arange(s).expand(b, s)
    if reset_position_ids:
        positions = document_positions(doc_ids)
    attention_mask = document_attention_mask(doc_ids) if document_mask else None
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
            "position_ids": positions.contiguous(), "attention_mask": attention_mask}


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token within its own document: [b, s] -> [b, s]."""
    s = doc_ids.shape[1]
    idx = torch.arange(s).expand_as(doc_ids)
    is_start = torch.ones_like(doc_ids, dtype=torch.bool)
    is_start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_idx = torch.where(is_start, idx, torch.zeros_like(idx))
    return idx - torch.cummax(start_idx, dim=1).values


def document_attention_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """megatron's convention, True = masked: [b, 1, s, s], causal and within the same document."""
    s = doc_ids.shape[1]
    future = torch.ones(s, s, dtype=torch.bool).triu(1)
    other_doc = doc_ids[:, :, None] != doc_ids[:, None, :]
    return (future[None] | other_doc).unsqueeze(1)


class PackedLoader:
    def __init__(self, dataset: PackedDataset, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
                 seed: int):
        if global_batch % (micro_batch * dp_size):
            raise DataError(f"trainer.global_batch_size={global_batch} must be a multiple of "
                             f"micro_batch_size*data_parallel_size={micro_batch * dp_size}")
        if len(dataset) == 0:
            raise DataError(f"dataset {dataset.prefix} has no rows; pack a larger corpus or a shorter seq_len")
        self.dataset, self.global_batch, self.micro_batch = dataset, global_batch, micro_batch
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.consumed = 0
        self._perm_epoch, self._perm = -1, None

    @property
    def num_microbatches(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp_size)

    def _row(self, k: int) -> int:
        n = len(self.dataset)
        epoch = k // n
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            self._perm_epoch = epoch
        return int(self._perm[k % n])

    def _rows(self, stream: range) -> list[tuple[PackedDataset, int]]:
        """(dataset, row) of each position of the stream."""
        return [(self.dataset, self._row(k)) for k in stream]

    def rows_of_steps(self, first: int, count: int) -> list[tuple[PackedDataset, int]]:
        """(dataset, row) of every row that steps first .. first+count-1 (1-based, each one global batch,
        every data-parallel rank) read from the start of the stream: for faults planted at known steps."""
        return self._rows(range((first - 1) * self.global_batch, (first - 1 + count) * self.global_batch))

    def next_global_batch(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the next global batch."""
        per_rank = self.global_batch // self.dp_size
        start = self.consumed + self.dp_rank * per_rank
        rows = self._rows(range(start, start + per_rank))
        self.consumed += self.global_batch
        return [_batch(rows[i:i + self.micro_batch]) for i in range(0, per_rank, self.micro_batch)]

    def tokens_seen(self) -> dict[str, int]:
        """Token positions consumed per source (metrics): nothing to split for one dataset."""
        return {}

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = int(state["consumed"])


VALIDATION_SEED = 0  # one fixed order for every validation set: paired comparisons score the same text


def validation_loader(dataset: PackedDataset, global_batch: int, micro_batch: int, dp_rank: int,
                      dp_size: int) -> PackedLoader:
    """The loader evaluation reads from the start each time, in the order every run shares."""
    return PackedLoader(dataset, global_batch, micro_batch, dp_rank, dp_size, VALIDATION_SEED)


def evaluation_batches(set_rows: int, global_batch: int, requested: int) -> int:
    """Global batches one evaluation scores: `requested` (trainer.eval_batches), fewer when the set is
    smaller, so no row counts twice; at least one."""
    return max(1, min(requested, set_rows // global_batch))


def scored_rows(loader: PackedLoader, global_batches: int) -> list[tuple[PackedDataset, int]]:
    """(dataset, row) of every row `global_batches` evaluations from the start score, over all ranks."""
    return loader._rows(range(global_batches * loader.global_batch))


def scored_digest(loader: PackedLoader, global_batches: int) -> str:
    """sha256 of the token ids of the rows an evaluation scores, in order (as int64, whatever the
    stored dtype): equal digests mean the same text was scored."""
    h = hashlib.sha256()
    for ds, i in scored_rows(loader, global_batches):
        h.update(ds.tokens[i].astype(np.int64).tobytes())
    return h.hexdigest()


def scored_tokens(loader: PackedLoader, global_batches: int) -> int:
    """Tokens those rows hold before their padding: what an evaluation scores (a split-packed set's rows
    are partly padding, a concat-packed set's are full)."""
    return sum(ds.row(i).content_end for ds, i in scored_rows(loader, global_batches))


def _batch(rows: list[tuple[PackedDataset, int]]) -> dict[str, torch.Tensor]:
    """One micro-batch of rows, each from its own dataset."""
    datasets = {id(ds) for ds, _ in rows}
    if len(datasets) == 1:
        return rows[0][0].batch(np.array([i for _, i in rows]))
    parts = [ds.batch(np.array([i])) for ds, i in rows]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


BLEND_BLOCK = 1 << 16  # rows per repeat of the blend: every source's share is exact to one row per block


@dataclass
class WeightedDataset:
    """One packed training set and its share of the rows (data.sources; a lone training set has weight 1)."""

    name: str  # in the metrics: tokens_seen/NAME
    dataset: PackedDataset
    weight: float


class MixedLoader(PackedLoader):
    """Rows of several packed datasets, blended by weight; same interface and state as PackedLoader."""

    def __init__(self, sources: list[WeightedDataset], global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
                 seed: int):
        megatron_release.import_megatron()
        from megatron.core.datasets import helpers
        from megatron.core.datasets.utils import normalize

        super().__init__(sources[0].dataset, global_batch, micro_batch, dp_rank, dp_size, seed)
        for s in sources:
            if len(s.dataset) == 0:
                raise DataError(f"dataset {s.dataset.prefix} (source {s.name}) has no rows; pack a larger corpus")
        self.sources = sources
        # 1. megatron's blend of one block: which source each row takes, and its index within that source
        self._source = np.zeros(BLEND_BLOCK, dtype=np.int16)
        self._index = np.zeros(BLEND_BLOCK, dtype=np.int64)
        weights = np.array(normalize([s.weight for s in sources]), dtype=np.float64)
        helpers.build_blending_indices(self._source, self._index, weights, len(sources), BLEND_BLOCK, False)
        self._per_block = np.bincount(self._source, minlength=len(sources)).astype(np.int64)
        self._perms: dict[int, tuple[int, np.ndarray]] = {}  # source -> (epoch, its permutation)

    def _source_row(self, k: int) -> tuple[int, int]:
        """(source, how many of its rows came before) for stream position k."""
        block, r = divmod(k, BLEND_BLOCK)
        d = int(self._source[r])
        return d, int(block * self._per_block[d] + self._index[r])

    def _dataset_row(self, d: int, j: int) -> int:
        """Row of source d's dataset at position j of that source's own stream (epochs permuted by seed)."""
        n = len(self.sources[d].dataset)
        epoch = j // n
        if self._perms.get(d, (None,))[0] != epoch:
            self._perms[d] = (epoch, np.random.default_rng([self.seed, d, epoch]).permutation(n))
        return int(self._perms[d][1][j % n])

    def _rows(self, stream: range) -> list[tuple[PackedDataset, int]]:
        return [(self.sources[d].dataset, self._dataset_row(d, j)) for d, j in map(self._source_row, stream)]

    def rows_seen(self) -> np.ndarray:
        """Rows consumed so far from each source (over every data-parallel rank)."""
        block, r = divmod(self.consumed, BLEND_BLOCK)
        return block * self._per_block + np.bincount(self._source[:r], minlength=len(self.sources))

    def tokens_seen(self) -> dict[str, int]:
        seq_len = self.dataset.seq_len
        return {f"tokens_seen/{s.name}": int(n) * seq_len for s, n in zip(self.sources, self.rows_seen())}


def build_loader(sources: list[WeightedDataset], global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
                 seed: int) -> PackedLoader:
    """One dataset's loader, or the blend of several."""
    if len(sources) == 1:
        return PackedLoader(sources[0].dataset, global_batch, micro_batch, dp_rank, dp_size, seed)
    return MixedLoader(sources, global_batch, micro_batch, dp_rank, dp_size, seed)
