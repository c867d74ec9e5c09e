"""Skip-step on the device (optim/skip_step.py): its statistics against the host detector, a dropped
update leaving everything bit-identical (one process, and DP=2, DP=2 with the distributed optimizer and
TP=2 in one two-process world), and keel's gradient norm against megatron's."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from optim.megatron_private import chained
from optim.skip_step import RECORD, SkipDecider, SkipRule, grad_norm
from pretrain.callbacks.spike import SpikeDetector
from tests.pretrain.test_spike import SPIKES, _series


def test_device_statistics_equal_the_host_detectors():
    det = SpikeDetector(window=50, z_threshold=6.0, min_history=20, action="skip")
    dev = SkipDecider(SkipRule(window=50, loss_z=6.0, grad_z=math.inf, min_count=20), torch.device("cpu"))
    flagged = []
    for t, x in enumerate(_series()):
        mean, std = det._moments()
        n_before = len(det.history)
        event = det.observe(t, x)
        record = dict(zip(RECORD, dev.decide(torch.tensor(x, dtype=torch.float64), torch.tensor(1.0)).tolist()))
        assert bool(record["skipped"]) == (event is not None), t
        n, dmean, dstd = dev.loss.moments()
        assert int(n) == len(det.history)
        if n_before >= 20 and math.isfinite(x):  # where the host judged by a z-score, the same z
            assert record["loss_z"] == pytest.approx((x - mean) / max(std, 1e-6), rel=1e-9)
        if len(det.history):
            host_mean, host_std = det._moments()
            assert float(dmean) == pytest.approx(host_mean, rel=1e-12)
            assert float(dstd) == pytest.approx(host_std, rel=1e-9, abs=1e-12)
        flagged += [t] if record["skipped"] else []
    assert flagged == sorted([*SPIKES, 250])


def test_the_gradient_norm_rule_fires_on_its_own_and_a_restored_decider_decides_the_same():
    rule = SkipRule(window=16, loss_z=math.inf, grad_z=6.0, min_count=4)
    a, b = SkipDecider(rule, torch.device("cpu")), SkipDecider(rule, torch.device("cpu"))
    norms = [1.0 + 0.01 * (t % 5) for t in range(30)] + [10.0] + [1.0 + 0.01 * (t % 5) for t in range(10)]
    out = []
    for t, g in enumerate(norms):
        if t == 20:
            b.load_state_dict(a.state_dict())
        record = a.decide(torch.tensor(2.0), torch.tensor(g))
        if t >= 20:
            assert torch.equal(record, b.decide(torch.tensor(2.0), torch.tensor(g)))
        out.append(int(record[2]))
    assert [t for t, s in enumerate(out) if s] == [30]


# ---- a dropped update leaves everything bit-identical -------------------------------------------------
def _everything(optimizer, gpt) -> dict[str, torch.Tensor]:
    """Model parameters, the optimizers' parameters (main copies, shards) and states, the rule's state."""
    out = {f"model.{n}": p.detach().clone() for n, p in gpt.named_parameters()}
    for i, opt in enumerate(chained(optimizer.megatron)):
        for j, group in enumerate(opt.optimizer.param_groups):
            for k, p in enumerate(group["params"]):
                out[f"main.{i}.{j}.{k}"] = p.detach().clone()
                for key, v in opt.optimizer.state.get(p, {}).items():
                    out[f"state.{i}.{j}.{k}.{key}"] = v.clone() if isinstance(v, torch.Tensor) else torch.tensor(v)
    if optimizer.rule is not None:
        for name, state in optimizer.rule.state_dict().items():
            for key, v in (state.items() if isinstance(state, dict) else enumerate(state)):
                for sub, t in (v.items() if isinstance(v, dict) else [("", v)]):
                    out[f"rule.{name}.{key}.{sub}"] = torch.as_tensor(t).clone()
    return out


def _fill_grads(ddp, seed: float) -> None:
    for buffer in ddp.buffers:
        n = buffer.grad_data.numel()
        buffer.grad_data.copy_(torch.sin(torch.arange(n, dtype=torch.float32) * 0.37 + seed) * 1e-2)


def _check_layout(overrides: list[str]) -> None:
    """Build a tiny model and optimizer at the current megatron layout, take one update, then drop two
    (a non-finite loss; a spike by the loss rule): everything stays bit-identical. Also keel's gradient
    norm against megatron's."""
    from megatron.core import parallel_state

    from models.builder import build_model
    from optim.optimizer import build_optimizer
    from tests.helpers import DEVICE, build_tiny_gpt

    cfg, _ = build_tiny_gpt(overrides)
    built = build_model(cfg.model, cfg.attention, 128, DEVICE, torch.float32, cfg.seed,
                        distributed_optimizer=cfg.optim.distributed)
    tp_group = parallel_state.get_tensor_model_parallel_group() if cfg.parallel.tensor > 1 else None
    optimizer = build_optimizer(cfg.optim, cfg.model, built.ddp, built.gpt, torch.float32, tp_group)
    optimizer.use_skip_rule(SkipRule(window=8, loss_z=3.0, grad_z=math.inf, min_count=2), DEVICE)
    for step in range(3):  # applied updates: moments, steps and the rule's state exist
        _fill_grads(built.ddp, step)
        optimizer.megatron.prepare_grads()
        assert float(grad_norm(optimizer.megatron)) == pytest.approx(optimizer.megatron.get_grad_norm(), rel=1e-5)
        assert optimizer.step(torch.tensor(2.0 + 0.01 * step, device=DEVICE))[2] == 0
    before = _everything(optimizer, built.gpt)
    for loss in (float("nan"), 50.0):  # non-finite; then 50 against a window of ~2 is a spike
        _fill_grads(built.ddp, 7)
        record = optimizer.step(torch.tensor(loss, device=DEVICE))
        assert record[2] == 1, (overrides, loss, record)
        after = _everything(optimizer, built.gpt)
        assert after.keys() == before.keys()
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert not changed, (overrides, loss, changed[:5])
    _fill_grads(built.ddp, 8)
    assert optimizer.step(torch.tensor(2.0, device=DEVICE))[2] == 0  # and the next update applies
    assert not torch.equal(_everything(optimizer, built.gpt)["model.embedding.word_embeddings.weight"],
                           before["model.embedding.word_embeddings.weight"])


@pytest.mark.parametrize("overrides", [[], ["optim.spectral.enabled=true"], ["optim.quack=true"]])
def test_a_dropped_update_is_bit_identical_in_one_process(megatron_world, overrides):
    _check_layout(overrides + ["optim.weight_decay=0.1"])


def _two_process_worker(rank: int, init_file: str) -> None:
    from pretrain import distributed
    from pretrain.config import ParallelConfig

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    try:
        for tp, overrides in ((1, []), (1, ["optim.distributed=true"]), (2, ["optim.spectral.enabled=true"])):
            distributed.init(ParallelConfig(tensor=tp), init_method=f"file://{init_file}")
            _check_layout(overrides + [f"parallel.tensor={tp}", "optim.weight_decay=0.1"])
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
    finally:
        distributed.shutdown()


def test_a_dropped_update_is_bit_identical_at_dp2_distributed_optimizer_and_tp2(tmp_path):
    mp.spawn(_two_process_worker, args=(str(tmp_path / "store"),), nprocs=2, join=True)
