"""The specialization losses (Guo et al. 2025, eqs. 6-7), their attachment, and grouping by token."""


import pytest
import torch

from models.moe.layer import group_by_token, permuted_rows
from models.moe.losses import attach_loss, orthogonality_loss, variance_loss


# ---- orthogonality loss ------------------------------------------------------------------------
def test_orthogonality_loss_is_zero_for_orthogonal_outputs():
    basis = torch.eye(8, dtype=torch.float64)
    outputs = torch.stack([basis[[0, 3, 5]], basis[[1, 2, 7]]]) * torch.tensor([[[2.0], [0.5], [3.0]]])
    assert orthogonality_loss(outputs).item() == 0.0


def test_orthogonality_loss_matches_hand_computed_projections():
    # one token, k=2: x1 = (1, 0), x2 = (1, 1)
    # proj of x1 on x2 = (1/2)(1, 1): |.|^2 = 1/2; proj of x2 on x1 = (1, 0): |.|^2 = 1
    # (1/2 + 1) / (tokens * k = 2) = 0.75
    outputs = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]], dtype=torch.float64)
    assert orthogonality_loss(outputs, eps=0.0).item() == pytest.approx(0.75, rel=1e-12)
    assert orthogonality_loss(outputs).item() == pytest.approx(0.75, rel=1e-5)  # default eps barely moves it


def test_orthogonality_loss_equals_the_explicit_double_sum():
    torch.manual_seed(0)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    eps = 1e-6
    total = 0.0
    for i in range(5):
        for j in range(3):
            for m in range(3):
                if m != j:
                    c = (x[i, j] @ x[i, m]) / (x[i, m] @ x[i, m] + eps)
                    total += (c * x[i, m]).pow(2).sum().item()
    assert orthogonality_loss(x, eps).item() == pytest.approx(total / 15, rel=1e-12)


def test_orthogonality_loss_ignores_dropped_slots():
    x = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]], dtype=torch.float64)
    ref = orthogonality_loss(x[:, :2]).item() * 2 / 3  # same pairs, normalised by k=3
    assert orthogonality_loss(x).item() == pytest.approx(ref, rel=1e-12)
    assert torch.isfinite(torch.autograd.grad(orthogonality_loss(x.requires_grad_()), x)[0]).all()


def test_orthogonality_loss_gradcheck():
    torch.manual_seed(1)
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(orthogonality_loss, (x,))


# ---- variance loss -----------------------------------------------------------------------------
def test_variance_loss_hand_computed():
    one_hot = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    uniform = torch.full((1, 4), 0.25, dtype=torch.float64)
    # Var = mean(p^2) - 1/E^2 = 1/4 - 1/16
    assert variance_loss(one_hot).item() == pytest.approx(-3 / 16)
    assert variance_loss(uniform).item() == 0.0
    mixed = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    assert variance_loss(mixed).item() == pytest.approx(-(1 / 16 + 3 / 16) / 2)


def test_variance_loss_is_minimal_for_one_hot_routing():
    torch.manual_seed(2)
    experts = 8
    probs = torch.distributions.Dirichlet(torch.full((experts,), 0.3)).sample((1000,)).double()
    one_hot = variance_loss(torch.eye(experts, dtype=torch.float64)[:1]).item()
    per_token = torch.stack([variance_loss(p[None]) for p in probs])
    assert (per_token >= one_hot - 1e-12).all() and one_hot == pytest.approx(-(1 / experts - 1 / experts**2))


def test_variance_loss_gradcheck():
    torch.manual_seed(3)
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: variance_loss(torch.softmax(z, -1)), (logits,))


# ---- attachment and grouping -------------------------------------------------------------------
@pytest.mark.parametrize("per_token", [False, True])
def test_attach_loss_is_identity_forward_and_scaled_backward(per_token):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    a = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(3, requires_grad=True)
    loss = (w ** 2).sum()
    out = attach_loss(a, loss, coeff=0.5, num_tokens=4, per_token_loss=per_token)
    assert torch.equal(out, a)  # the value never reaches the LM loss
    out.sum().backward()
    assert torch.equal(a.grad, torch.ones_like(a))
    torch.testing.assert_close(w.grad, 0.5 * (4 if per_token else 1) * 2 * w.detach())


def test_group_by_token_inverts_megatrons_permutation():
    from megatron.core.transformer.moe.moe_utils import permute

    torch.manual_seed(4)
    tokens, experts, k, hidden = 7, 4, 2, 3
    routing_map = torch.zeros(tokens, experts, dtype=torch.bool)
    routing_map.scatter_(1, torch.randn(tokens, experts).topk(k, dim=1).indices, True)
    routing_map[2] = False
    routing_map[2, 1] = True  # token 2 lost one expert to capacity dropping
    x = torch.randn(tokens, hidden)
    per_expert = torch.randn(experts, hidden)  # "expert e" maps token t to x_t + per_expert[e]
    permuted, *_ = permute(x, routing_map, num_out_tokens=int(routing_map.sum()))
    expert_of_row = torch.repeat_interleave(torch.arange(experts), routing_map.sum(0))
    outputs = permuted + per_expert[expert_of_row]
    grouped, valid = group_by_token(outputs, permuted_rows(routing_map, k))
    assert valid.sum(1).tolist() == routing_map.sum(1).tolist()
    for t in range(tokens):
        got = {tuple(v.tolist()) for v, ok in zip(grouped[t], valid[t]) if ok}
        want = {tuple((x[t] + per_expert[e]).tolist()) for e in routing_map[t].nonzero().flatten().tolist()}
        assert got == want
    assert grouped[2][~valid[2]].abs().sum() == 0
