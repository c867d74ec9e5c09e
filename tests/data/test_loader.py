"""The loader: deterministic, shuffled per epoch, sharded over DP ranks, resumable; masks and positions."""

import numpy as np
import torch

from data.format import PackedDataset
from data.loader import PackedLoader, document_attention_mask, document_positions, model_inputs


def test_document_positions_restart_at_each_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    assert document_positions(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 3, 4]]


def test_document_mask_against_hand_computed():
    doc_ids = torch.tensor([[0, 0, 1, 1]])
    allowed = [[1, 0, 0, 0],
               [1, 1, 0, 0],
               [0, 0, 1, 0],
               [0, 0, 1, 1]]
    expected_masked = ~torch.tensor(allowed, dtype=torch.bool)
    assert torch.equal(document_attention_mask(doc_ids)[0, 0], expected_masked)


def test_model_inputs_shift_and_mask_padding():
    batch = {"tokens": torch.tensor([[5, 6, 7, 8, 0, 0]]), "doc_ids": torch.tensor([[0, 0, 1, 1, 1, 1]]),
             "loss_mask": torch.tensor([[1, 1, 1, 1, 0, 0]], dtype=torch.float32)}
    out = model_inputs(batch, reset_position_ids=True, document_mask=True)
    assert out["labels"][0, :3].tolist() == [6, 7, 8]
    assert out["loss_mask"].tolist() == [[1, 1, 1, 0, 0, 0]]  # targets 6,7,8 count; padding and the end don't
    assert out["position_ids"].tolist() == [[0, 1, 0, 1, 2, 3]]
    assert out["attention_mask"].shape == (1, 1, 6, 6)
    plain = model_inputs(batch, reset_position_ids=False, document_mask=False)
    assert plain["attention_mask"] is None and plain["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5]]


def _rows(loader, steps):
    out = []
    for _ in range(steps):
        out.append(torch.cat([mb["tokens"] for mb in loader.next_global_batch()]))
    return torch.cat(out)


def test_loader_deterministic_sharded_and_resumable(tiny_data):
    ds = PackedDataset(tiny_data["train"])
    single = _rows(PackedLoader(ds, 8, 2, 0, 1, seed=3), 5)
    again = _rows(PackedLoader(ds, 8, 2, 0, 1, seed=3), 5)
    assert torch.equal(single, again)
    assert not torch.equal(single, _rows(PackedLoader(ds, 8, 2, 0, 1, seed=4), 5))
    # two DP ranks together see exactly the single-process global batches
    r0, r1 = (PackedLoader(ds, 8, 2, r, 2, seed=3) for r in (0, 1))
    for step in range(5):
        both = torch.cat([torch.cat([mb["tokens"] for mb in r.next_global_batch()]) for r in (r0, r1)])
        assert torch.equal(both, single[step * 8:(step + 1) * 8])
    # resuming from the state gives the same continuation
    a = PackedLoader(ds, 8, 2, 0, 1, seed=3)
    _rows(a, 2)
    b = PackedLoader(ds, 8, 2, 0, 1, seed=3)
    b.load_state_dict(a.state_dict())
    assert torch.equal(_rows(a, 3), _rows(b, 3))


def test_loader_reshuffles_each_epoch(tiny_data):
    ds = PackedDataset(tiny_data["train"])
    n = len(ds)
    loader = PackedLoader(ds, 1, 1, 0, 1, seed=0)
    first = [loader._row(k) for k in range(n)]
    second = [loader._row(k) for k in range(n, 2 * n)]
    assert sorted(first) == sorted(second) == list(range(n))
    assert first != second


def test_validation_rows_are_fixed_and_fingerprinted(tiny_data):
    from data.loader import scored_digest, scored_rows, validation_loader

    val, train = PackedDataset(tiny_data["val"]), PackedDataset(tiny_data["train"])
    one = validation_loader(val, 8, 4, 0, 1)
    # 1. every data-parallel layout reads the same rows in the same order: the evaluation's text
    ranks = [validation_loader(val, 8, 2, r, 2) for r in range(2)]
    per_rank = [[mb["tokens"] for mb in loader.next_global_batch()] for loader in ranks]
    assert torch.equal(torch.cat(per_rank[0] + per_rank[1]), torch.cat([mb["tokens"] for mb in one.next_global_batch()]))
    # 2. the digest is of those rows' tokens: the same for any run, different for other rows or another set
    assert scored_digest(validation_loader(val, 8, 8, 0, 1), 2) == scored_digest(validation_loader(val, 8, 4, 1, 2), 2)
    assert scored_digest(validation_loader(val, 8, 8, 0, 1), 1) != scored_digest(validation_loader(val, 8, 8, 0, 1), 2)
    assert scored_digest(validation_loader(train, 8, 8, 0, 1), 1) != scored_digest(validation_loader(val, 8, 8, 0, 1), 1)
    # 3. while a training loader's order is the run's seed
    rows = [[i for _, i in scored_rows(PackedLoader(train, 8, 8, 0, 1, seed), 1)] for seed in (1, 2)]
    assert rows[0] != rows[1]


def test_scored_tokens_leave_out_padding(tmp_path, tiny_data):
    from data.format import PackedWriter
    from data.loader import scored_tokens, validation_loader

    full = PackedDataset(tiny_data["val"])
    assert scored_tokens(validation_loader(full, 4, 4, 0, 1), 1) == 4 * full.seq_len  # concat rows: all content
    writer = PackedWriter(tmp_path / "split", 8, 100)  # one piece a row, padded, as split-packed sets are
    for k in (8, 3, 5, 1):
        writer.add_row(np.array([7] * k + [0] * (8 - k)), [0], k)
    writer.finalize({"tokenizer": {"vocab_size": 100}, "method": "split"})
    assert scored_tokens(validation_loader(PackedDataset(tmp_path / "split"), 4, 4, 0, 1), 1) == 8 + 3 + 5 + 1


def test_an_evaluation_never_scores_a_row_twice():
    from data.loader import evaluation_batches

    assert evaluation_batches(1000, 16, 96) == 62  # the set holds 62 whole global batches
    assert evaluation_batches(1000, 16, 8) == 8 and evaluation_batches(5, 16, 8) == 1
