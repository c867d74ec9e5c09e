"""Tests for optim/spectral.py: power iteration, the Weyl bound, exactness, resume, TP=2 over gloo."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from optim.spectral import (
    SpectralBound,
    bound_update,
    matrix_params,
    power_iteration,
)

torch.set_num_threads(1)


# ---------------------------------------------------------------------------- helpers
def _gapped(m: int, n: int, sv: list[float], seed: int = 0) -> torch.Tensor:
    """Matrix with prescribed leading singular values (rest small) so σ1 is well separated."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    s = torch.full((min(m, n),), 0.01)
    s[: len(sv)] = torch.tensor(sv)
    return u[:, : len(s)] @ torch.diag(s) @ v[:, : len(s)].T


def _sigma1(w: torch.Tensor) -> float:
    return float(torch.linalg.svdvals(w.detach().double())[0])


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))


def _train(model, opt, steps: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 12, generator=g), torch.randn(8, 8, generator=g)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def _params_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# ---------------------------------------------------------------------------- power iteration
def test_power_iteration_matches_svdvals() -> None:
    w = _gapped(20, 14, [5.0, 2.0, 1.0])
    est = power_iteration(w, {}, iters=20)
    assert est == pytest.approx(_sigma1(w), rel=1e-5)


def test_power_iteration_warm_start_converges_and_underestimates() -> None:
    w = torch.randn(32, 24, generator=torch.Generator().manual_seed(3))
    state: dict = {}
    true = _sigma1(w)
    ests = [float(power_iteration(w, state, iters=2)) for _ in range(60)]
    assert all(e <= true * (1 + 1e-6) for e in ests)  # Rayleigh quotient: never above σ1
    assert ests[-1] == pytest.approx(true, rel=1e-3)  # warm start keeps improving across calls
    assert ests[-1] >= ests[0]


def test_power_iteration_batched_and_zero() -> None:
    ws = torch.stack([_gapped(10, 6, [3.0, 1.0], seed=s) for s in range(4)])
    est = power_iteration(ws, {}, iters=30)
    assert torch.allclose(est.double(), torch.linalg.svdvals(ws.double())[:, 0], rtol=1e-5)
    state: dict = {}
    assert float(power_iteration(torch.zeros(5, 4), state, iters=3)) == 0.0
    assert torch.isfinite(state["u"]).all() and torch.isfinite(state["v"]).all()


# ---------------------------------------------------------------------------- the bound
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_weyl_bound_holds_where_bare_update_breaks_it(kind: str) -> None:
    tau = 0.1

    def make(model):
        if kind == "sgd":
            return torch.optim.SGD(model.parameters(), lr=50.0, momentum=0.9)
        return torch.optim.AdamW(model.parameters(), lr=1.0, weight_decay=0.0)

    bare_model, model = _mlp(), _mlp()
    bare = make(bare_model)
    opt = SpectralBound(make(model), tau=tau, power_iters=10)
    before = [_sigma1(p) for p in bare_model.parameters() if p.ndim == 2]
    _train(bare_model, bare, 1)
    after = [_sigma1(p) for p in bare_model.parameters() if p.ndim == 2]
    assert any(a > (1 + tau) * b for a, b in zip(after, before)), "test must stress the bound"
    g = torch.Generator().manual_seed(1)
    for _ in range(15):
        prev = [_sigma1(p) for p in model.parameters() if p.ndim == 2]
        x, y = torch.randn(8, 12, generator=g), torch.randn(8, 8, generator=g)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        now = [_sigma1(p) for p in model.parameters() if p.ndim == 2]
        for a, b in zip(now, prev):
            assert a <= (1 + tau) * b * (1 + 1e-5)
    stats = opt.pop_stats()
    assert stats["spectral/clip_rate/all"] > 0 and stats["spectral/min_scale/all"] < 1
    assert opt.pop_stats() == {}


def test_zero_matrix_first_step_uses_floor() -> None:
    w = torch.nn.Parameter(torch.zeros(6, 5))
    opt = SpectralBound(torch.optim.SGD([w], lr=1.0), tau=0.1, sigma_floor=1e-2, power_iters=10)
    w.grad = -_gapped(6, 5, [4.0, 1.0])
    opt.step()
    assert 0 < _sigma1(w) <= 0.1 * 1e-2 * (1 + 1e-5)
    for _ in range(5):  # then it may grow geometrically, not stay frozen
        prev = _sigma1(w)
        opt.step()
        assert prev < _sigma1(w) <= 1.1 * max(prev, 1e-2) * (1 + 1e-5)


def test_bound_update_exact_when_not_clipped() -> None:
    w_old = _gapped(8, 6, [2.0, 1.0])
    w_new = w_old + 1e-4 * torch.randn(8, 6)
    expected = w_new.clone()
    scale = bound_update(w_old, w_new, {}, tau=0.1)
    assert float(scale) == 1.0 and torch.equal(w_new, expected)


def test_unbounded_params_equal_bare_optimizer() -> None:
    names = dict(_mlp().named_parameters())
    bare_model, model = _mlp(), _mlp()
    bare = torch.optim.AdamW(bare_model.parameters(), lr=1.0, weight_decay=0.1)
    named = dict(model.named_parameters())
    opt = SpectralBound(torch.optim.AdamW(model.parameters(), lr=1.0, weight_decay=0.1), tau=0.01,
                        params=matrix_params(exclude=("2.",)), names=named)
    g = torch.Generator().manual_seed(5)
    for _ in range(4):  # fixed gradients so bounded layers cannot influence the others
        grads = {n: torch.randn(p.shape, generator=g) for n, p in names.items()}
        for m in (bare_model, model):
            for n, p in m.named_parameters():
                p.grad = grads[n].clone()
        bare.step()
        opt.step()
    for (n, p), q in zip(model.named_parameters(), bare_model.parameters()):
        if n == "0.weight":
            assert not torch.equal(p, q)  # bounded and clipped
        else:
            assert torch.equal(p, q), n
    stats = opt.pop_stats()
    assert set(stats) == {f"spectral/{k}/0.weight" for k in
                          ("bounded", "clipped", "clip_rate", "mean_scale", "min_scale", "max_ratio")}
    assert stats["spectral/bounded/0.weight"] == 4.0


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_tau_inf_is_bit_exact(kind: str) -> None:
    def make(model):
        if kind == "sgd":
            return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
        return torch.optim.AdamW(model.parameters(), lr=1e-2)

    bare_model, model = _mlp(), _mlp()
    _train(bare_model, make(bare_model), 6)
    opt = SpectralBound(make(model), tau=math.inf)
    _train(model, opt, 6)
    assert _params_equal(model, bare_model)
    assert opt.spectral_state == {}


def test_state_dict_roundtrip_is_exact() -> None:
    def make(model):
        return SpectralBound(torch.optim.AdamW(model.parameters(), lr=0.3), tau=0.02)

    ref_model = _mlp()
    ref = make(ref_model)
    _train(ref_model, ref, 3, seed=1)
    buf = io.BytesIO()
    torch.save({"model": ref_model.state_dict(), "opt": ref.state_dict()}, buf)
    _train(ref_model, ref, 4, seed=2)

    buf.seek(0)
    ckpt = torch.load(buf)
    model = _mlp(seed=99)
    model.load_state_dict(ckpt["model"])
    opt = make(model)
    opt.load_state_dict(ckpt["opt"])
    _train(model, opt, 4, seed=2)
    assert ref.pop_stats()["spectral/clip_rate/all"] > 0  # the bound was active throughout
    assert _params_equal(model, ref_model)


def test_works_with_lr_scheduler() -> None:
    model = _mlp()
    opt = SpectralBound(torch.optim.AdamW(model.parameters(), lr=1.0), tau=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    _train(model, opt, 1)
    sched.step()
    assert opt.optimizer.param_groups[0]["lr"] == 0.5 and opt.param_groups is opt.optimizer.param_groups


# ---------------------------------------------------------------------------- TP=2 over gloo
def _shard(t: torch.Tensor, dim: int, rank: int) -> torch.Tensor:
    return t.chunk(2, dim=dim)[rank].clone()


def _tp_worker(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        group = dist.group.WORLD
        full_old = _gapped(12, 8, [3.0, 2.0, 1.0], seed=7)
        full_new = full_old + _gapped(12, 8, [2.0, 1.5], seed=8)
        for dim in (0, 1):
            # 1. σ1 of the full matrix from shards equals the unsharded estimate (same start vectors)
            ref = power_iteration(full_old, {}, iters=5)
            est = power_iteration(_shard(full_old, dim, rank), {}, iters=5, group=group, shard_dim=dim)
            assert torch.allclose(est, ref, rtol=1e-5), (dim, est, ref)
            exact = power_iteration(_shard(full_old, dim, rank), {}, 40, group, dim)
            assert float(exact) == pytest.approx(_sigma1(full_old), rel=1e-5)
            # 2. the bounded update of a shard equals the slice of the single-process bounded update
            ref_new, shard_new = full_new.clone(), _shard(full_new, dim, rank)
            s_ref = bound_update(full_old, ref_new, {}, tau=0.1)
            s_tp = bound_update(_shard(full_old, dim, rank), shard_new, {}, 0.1, group=group, shard_dim=dim)
            assert float(s_ref) < 1 and torch.allclose(s_tp, s_ref, rtol=1e-5)
            assert torch.allclose(shard_new, _shard(ref_new, dim, rank), atol=1e-6)
        _tp_wrapper_check(rank, group)
    finally:
        dist.destroy_process_group()


def _tp_wrapper_check(rank: int, group) -> None:
    """SpectralBound over megatron-style TP params (tensor_model_parallel/partition_dim attrs)."""
    fulls = [_gapped(12, 8, [1.0, 0.5], seed=s) for s in (1, 2)]
    full_params = [torch.nn.Parameter(f.clone()) for f in fulls]
    tp_params = []
    for dim, f in zip((0, 1), fulls):
        p = torch.nn.Parameter(_shard(f, dim, rank))
        p.tensor_model_parallel, p.partition_dim = True, dim
        tp_params.append(p)
    ref = SpectralBound(torch.optim.SGD(full_params, lr=2.0, momentum=0.9), tau=0.05)
    tp = SpectralBound(torch.optim.SGD(tp_params, lr=2.0, momentum=0.9), tau=0.05, tp_group=group)
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        for dim, fp, tpp in zip((0, 1), full_params, tp_params):
            grad = torch.randn(12, 8, generator=g)
            fp.grad, tpp.grad = grad, _shard(grad, dim, rank)
        ref.step()
        tp.step()
    for dim, fp, tpp in zip((0, 1), full_params, tp_params):
        assert torch.allclose(tpp, _shard(fp.detach(), dim, rank), atol=1e-6)
    assert ref.pop_stats()["spectral/clip_rate/all"] > 0


def test_tensor_parallel_two_gloo_ranks(tmp_path) -> None:
    mp.spawn(_tp_worker, args=(str(tmp_path / "store"),), nprocs=2, join=True)
