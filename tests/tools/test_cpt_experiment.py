"""tools/cpt_experiment.py: planning, the validation split, aggregation and the experiment presets (no training)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tools import cpt_experiment as cpt  # noqa: E402


def test_plan_runs_covers_every_method_and_seed_from_one_init():
    runs = cpt.plan_runs()
    assert runs[0].name == cpt.INIT_RUN and "trainer.max_steps=1" in runs[0].argv
    grid = [(r.method, r.seed) for r in runs[1:]]
    assert grid == [(m, s) for m in ("concat", "bfd", "sp") for s in (1, 2, 3)]
    for r in runs[1:]:
        assert f"data.pack_method={r.method}" in r.argv and f"seed={r.seed}" in r.argv
        assert r.run_dir == cpt.CPT_DIR / f"{r.method}-seed{r.seed}"
        assert not any(a.startswith(("init_from=", "trainer.max_steps=")) for a in r.argv)  # same init, same budget


def test_split_pieces_cover_every_token_once_without_mixing_documents():
    lengths = np.array([1, 5, 8, 9, 3])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    src, length, doc = cpt.split_pieces(offsets, 4)
    assert length.max() <= 4 and length.min() >= 1
    assert np.array_equal(np.bincount(doc, weights=length).astype(int), lengths)
    covered = np.concatenate([np.arange(s, s + k) for s, k in zip(src, length)])
    assert np.array_equal(np.sort(covered), np.arange(offsets[-1]))
    for s, k, d in zip(src, length, doc):
        assert offsets[d] <= s and s + k <= offsets[d + 1]
    assert list(np.diff(np.concatenate([[0], np.cumsum(-(-lengths // 4))]))) == [1, 2, 2, 3, 1]


def test_sample_rows_is_fixed_and_sorted():
    a, b = cpt.sample_rows(100, 10), cpt.sample_rows(100, 10)
    assert np.array_equal(a, b) and np.all(np.diff(a) > 0) and a.size == 10
    assert np.array_equal(cpt.sample_rows(5, 10), np.arange(5))


def test_aggregate_mean_spread_and_band():
    curves = {"concat": {1: {25: 3.0, 50: 2.0}, 2: {25: 3.2, 50: 2.4}, 3: {25: 3.1, 50: 2.2}},
              "sp": {1: {25: 2.9, 50: 1.9}, 2: {25: 3.0, 50: 2.1}, 3: {25: 2.8, 50: 2.0}},
              "bfd": {1: {25: 2.9, 50: 1.9}, 2: {25: 3.0}}}  # seed 2 missed step 50
    rep = cpt.aggregate(curves, init_loss=4.0)
    c = rep["methods"]["concat"]
    assert c["final_step"] == 50 and c["final_val_loss"]["values"] == [2.0, 2.4, 2.2]
    assert c["final_val_loss"]["mean"] == pytest.approx(2.2)
    assert c["final_val_loss"]["std"] == pytest.approx(0.2)  # sample std (ddof=1)
    assert c["final_val_loss"]["spread"] == pytest.approx(0.4)
    assert c["final_val_loss"]["perplexity_of_mean"] == pytest.approx(math.exp(2.2))
    assert c["curve"]["min"] == pytest.approx([3.0, 2.0]) and c["curve"]["max"] == pytest.approx([3.2, 2.4])
    assert c["curve_with_init"]["step"][0] == 0 and c["curve_with_init"]["mean"][0] == 4.0
    assert rep["methods"]["bfd"]["final_step"] == 25  # only steps every seed evaluated
    ranking = rep["ranking_by_mean_final_val_loss"]
    assert ranking.index("sp") < ranking.index("concat")


def test_plot_writes_a_png(tmp_path):
    rep = cpt.aggregate({"concat": {1: {20: 3.0, 40: 2.0}, 2: {20: 3.1, 40: 2.1}}, "sp": {1: {20: 2.9, 40: 1.9}}}, 4.0)
    cpt.plot(rep, tmp_path / "x.png")
    assert (tmp_path / "x.png").stat().st_size > 1000


def test_collect_reads_only_completed_runs(tmp_path):
    def write(name, status, vals):
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0, "val_loss": v}) + "\n"
                                                 for s, v in vals.items()))
        (d / "result.json").write_text(json.dumps({"status": status}))

    write("concat-seed1", "completed", {10: 2.5})
    write("concat-seed2", "diverged", {10: 9.0})
    write(cpt.INIT_RUN, "completed", {1: 4.2})
    curves, init = cpt.collect(("concat",), (1, 2), root=tmp_path)
    assert curves == {"concat": {1: {10: 2.5}}} and init == 4.2


@pytest.mark.parametrize("method", ["concat", "bfd", "sp"])
def test_presets_compose_and_match_the_pretrained_model(method):
    from pretrain.config import compose_config

    pre = compose_config(["+experiment=cpt_pretrain"])
    cfg = compose_config(["+experiment=cpt_packing", f"data.pack_method={method}", "seed=2"])
    assert cfg.model == pre.model and cfg.data.seq_len == pre.data.seq_len == cpt.SEQ_LEN
    assert pre.data.corpus == "stdlib:code" and cfg.init_from == str(cpt.PRETRAIN_DIR) == pre.run_dir
    assert cfg.data.path == str(cpt.train_prefix(method)) and cfg.data.val_path == str(cpt.val_prefix())
    assert cfg.run_dir == str(cpt.CPT_DIR / f"{method}-seed2")
    assert cfg.trainer.eval_batches * cfg.trainer.global_batch_size == cpt.VAL_ROWS  # whole val set, once
