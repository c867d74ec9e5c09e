"""QuacK's per-head query/key learning rates (optim/rules/quack.py)."""

import pytest
import torch

from optim.rules.quack import head_norms, rate_factors, row_scales
from pretrain.config import compose_config
from tests.helpers import build_tiny_gpt, losses, metrics, resume_folder, run_keel, tiny_overrides

QUACK = ["optim.quack=true", "optim.lr=1e-2"]


def test_head_norms_and_row_scales_by_hand():
    # 4 query heads in 2 groups (GQA), head dim 1, model dim 2; rows per group: q, q, k, v
    w = torch.tensor([[3., 4.], [0., 1.], [0., 2.], [9., 9.],     # group 0: |q| 5 and 1, |k| 2
                      [1., 0.], [0., 0.], [6., 8.], [9., 9.]])    # group 1: |q| 1 and 0, |k| 10
    q, k = head_norms(w, heads=4, kv_heads=2, head_dim=1)
    assert q.tolist() == [5.0, 1.0] and k.tolist() == [2.0, 10.0]
    # the key weights doubled and the query weights halved since the first step
    s_q, s_k = rate_factors((q, k), (2 * q, k / 2))
    assert s_q.tolist() == [0.5, 0.5] and s_k.tolist() == [2.0, 2.0]
    assert row_scales(s_q, s_k, heads=4, head_dim=1).tolist() == [0.5, 0.5, 2.0, 1.0, 0.5, 0.5, 2.0, 1.0]


@pytest.mark.parametrize("attention", ["mha", "gqa", "mqa"])
def test_step_scales_query_and_key_updates_and_leaves_the_rest(megatron_world, attention):
    from models.builder import build_model
    from optim.optimizer import build_optimizer

    def one_step(quack: bool):
        cfg, _ = build_tiny_gpt([f"attention={attention}", "optim.weight_decay=0.1", f"optim.quack={quack}"])
        built = build_model(cfg.model, cfg.attention, 128, torch.device("cpu"), torch.float32, cfg.seed)
        optimizer = build_optimizer(cfg.optim, cfg.model, built.ddp, built.gpt, torch.float32)
        if quack:
            # as if the weights had grown since the first step: query/key rates halve
            for name, p, (heads, kv, d) in optimizer.rule.qkv:
                q, k = head_norms(p, heads, kv, d)
                optimizer.rule.initial_norms[name] = (q / 2, k / 2)
        before = {n: p.detach().clone() for n, p in built.gpt.named_parameters()}
        for n, p in built.gpt.named_parameters():
            p.main_grad = torch.sin(torch.arange(p.numel(), dtype=torch.float32) + len(n)).view_as(p)
        optimizer.step(torch.tensor(1.0))
        return {n: p.detach() - before[n] for n, p in built.gpt.named_parameters()}, optimizer

    (plain, _), (quacked, optimizer) = one_step(False), one_step(True)
    for name, p, (heads, kv, d) in optimizer.rule.qkv:
        key = f"decoder.layers.{int(name[5:]) - 1}.self_attention.linear_qkv.weight"
        per_group = heads // kv
        a, b = plain[key].view(kv, per_group + 2, d, -1), quacked[key].view(kv, per_group + 2, d, -1)
        torch.testing.assert_close(b[:, :per_group + 1], 0.5 * a[:, :per_group + 1], rtol=1e-5, atol=1e-9)
        assert torch.equal(b[:, per_group + 1], a[:, per_group + 1])  # value rows: bit for bit
    for n in plain:
        if "linear_qkv" not in n:
            assert torch.equal(plain[n], quacked[n]), n
    assert optimizer.pop_stats()["quack/min_factor"] == pytest.approx(0.5)


def test_quack_is_refused_where_it_does_not_apply():
    with pytest.raises(ValueError, match="optim.quack needs attention=mha, gqa or mqa"):
        compose_config(["optim.quack=true", "attention=gla"])
    with pytest.raises(ValueError, match="alternatives"):
        compose_config(["optim.quack=true", "optim.spectral.enabled=true"])


@pytest.mark.slow
def test_quack_logs_resumes_exactly_and_matches_across_processes(tiny_data, tmp_path):
    run_keel(tiny_overrides(tiny_data, tmp_path / "a", steps=6) + QUACK)
    rows = metrics(tmp_path / "a")
    assert rows[0]["quack/min_factor"] == rows[0]["quack/max_factor"] == 1.0  # the first step is at the base rate
    assert rows[-1]["quack/min_factor"] != rows[-1]["quack/max_factor"]
    # exact resume from a's step-3 checkpoint: the initial norms are in the checkpoint
    run_keel(tiny_overrides(tiny_data, resume_folder(tmp_path / "a", 3, tmp_path / "b"), steps=6) + QUACK)
    resumed = losses(tmp_path / "b")
    assert sorted(resumed) == [4, 5, 6]
    assert resumed == {step: loss for step, loss in losses(tmp_path / "a").items() if step > 3}
    # the distributed optimizer over two ranks and TP=2 take the same steps as one process
    for name, parallel, rel in (("dp", ["optim.distributed=true"], 1e-5), ("tp", ["parallel.tensor=2"], 1e-4)):
        run_keel(tiny_overrides(tiny_data, tmp_path / name, steps=6) + QUACK + ["trainer.stop_at=3"] + parallel, nproc=2)
        for a, b in zip(rows[:3], metrics(tmp_path / name), strict=True):
            assert b["loss"] == pytest.approx(a["loss"], rel=rel), name
