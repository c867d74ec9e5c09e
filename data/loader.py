"""A deterministic, resumable loader over a packed dataset, sharded across data-parallel ranks.

The loader's whole state is one integer, the number of rows consumed: row k of the stream is row
``perm_e[k % n]`` of the dataset, where ``perm_e`` is epoch ``e = k // n``'s permutation drawn
from the seed. Every rank computes the same stream and takes its own slice of each global batch,
so resuming only needs that integer.
"""

from __future__ import annotations

import numpy as np
import torch

from data.format import PackedDataset


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
            raise ValueError(f"trainer.global_batch_size={global_batch} must be a multiple of "
                             f"micro_batch_size*data_parallel_size={micro_batch * dp_size}")
        if len(dataset) == 0:
            raise ValueError(f"dataset {dataset.prefix} has no rows; pack a larger corpus or a shorter seq_len")
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

    def next_global_batch(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the next global batch."""
        per_rank = self.global_batch // self.dp_size
        start = self.consumed + self.dp_rank * per_rank
        rows = [self._row(k) for k in range(start, start + per_rank)]
        self.consumed += self.global_batch
        return [self.dataset.batch(np.array(rows[i:i + self.micro_batch]))
                for i in range(0, per_rank, self.micro_batch)]

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = int(state["consumed"])
