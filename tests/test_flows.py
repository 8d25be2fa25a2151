"""Flow building blocks: spline and coupling inverses, log-dets vs autograd, gradients, scripting."""

import math

import pytest
import torch

from openmm_backmap.flows import CouplingFlow, MixedBase, rq_spline


def _spline_params(g, m, k, dtype=torch.float64):
    w = torch.randn(m, k, generator=g, dtype=dtype)
    h = torch.randn(m, k, generator=g, dtype=dtype)
    d = torch.rand(m, k + 1, generator=g, dtype=dtype) * 3 + 0.1
    return w, h, d


@pytest.mark.parametrize("circular", [False, True])
def test_rq_spline_inverse_and_derivative(circular):
    g = torch.Generator().manual_seed(0)
    m, k = 200, 8
    w, h, d = _spline_params(g, m, k)
    if circular:
        d[:, -1] = d[:, 0]
        left, right = torch.full((m,), -math.pi, dtype=torch.float64), torch.full((m,), math.pi, dtype=torch.float64)
        x = (torch.rand(m, generator=g, dtype=torch.float64) * 2 - 1) * math.pi
    else:
        left, right = torch.full((m,), -3.0, dtype=torch.float64), torch.full((m,), 3.0, dtype=torch.float64)
        x = torch.randn(m, generator=g, dtype=torch.float64) * 3  # some in the identity tails
    y, ladj = rq_spline(x, torch.stack([w, h], -2), d, left, right, inverse=False)
    x2, ladj2 = rq_spline(y, torch.stack([w, h], -2), d, left, right, inverse=True)
    assert torch.allclose(x2, x, atol=1e-10)
    assert torch.allclose(ladj + ladj2, torch.zeros_like(ladj), atol=1e-10)
    xg = x.clone().requires_grad_(True)
    yg, _ = rq_spline(xg, torch.stack([w, h], -2), d, left, right, inverse=False)
    (grad,) = torch.autograd.grad(yg.sum(), xg)
    assert torch.allclose(torch.log(grad), ladj, atol=1e-8)
    # monotone and onto the interval
    assert torch.all(grad > 0)
    lo, _ = rq_spline(left, torch.stack([w, h], -2), d, left, right, inverse=False)
    hi, _ = rq_spline(right, torch.stack([w, h], -2), d, left, right, inverse=False)
    assert torch.allclose(lo, left) and torch.allclose(hi, right)


def _flow(context_dim=4, seed=0):
    torch.manual_seed(seed)
    circ = torch.tensor([0, 1, 0, 0, 1, 0, 0], dtype=torch.bool)
    flow = CouplingFlow(circ, context_dim, n_layers=4, hidden=16, n_bins=6).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return flow, circ


def _inputs(circ, n, context_dim, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, circ.numel(), generator=g, dtype=torch.float64) * 2
    z[:, circ] = (torch.rand(n, int(circ.sum()), generator=g, dtype=torch.float64) * 2 - 1) * math.pi
    c = torch.randn(n, context_dim, generator=g, dtype=torch.float64)
    return z, c


@pytest.mark.parametrize("context_dim", [0, 4])
def test_coupling_flow_inverse_and_logdet(context_dim):
    flow, circ = _flow(context_dim)
    z, c = _inputs(circ, 6, context_dim)
    u, ladj = flow(z, c)
    z2, ladj2 = flow.inverse(u, c)
    assert torch.allclose(z2, z, atol=1e-10)
    assert torch.allclose(ladj + ladj2, torch.zeros_like(ladj), atol=1e-9)
    for b in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: flow(v[None], c[b : b + 1])[0][0], z[b])
        assert torch.allclose(torch.linalg.slogdet(jac)[1], ladj[b], atol=1e-9)
    # circular variables stay on the circle
    assert u[:, circ].abs().max() <= math.pi + 1e-12


def test_every_parameter_gets_a_gradient_and_modes_agree():
    flow, circ = _flow()
    z, c = _inputs(circ, 32, 4)
    u, ladj = flow(z, c)
    (MixedBase(circ).double().log_prob(u) + ladj).mean().backward()
    for name, p in flow.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    flow.eval()
    u2, _ = flow(z, c)
    assert torch.equal(u, u2)


def test_coupling_flow_scripts_and_matches_eager():
    flow, circ = _flow()
    z, c = _inputs(circ, 9, 4)
    scripted = torch.jit.script(flow)
    u, ladj = flow(z, c)
    us, ladjs = scripted(z, c)
    assert torch.allclose(u, us) and torch.allclose(ladj, ladjs)
    zs, _ = scripted.inverse(u, c)
    assert torch.allclose(zs, z, atol=1e-10)


def test_state_dict_round_trip():
    flow, circ = _flow(seed=0)
    other, _ = _flow(seed=5)
    other.load_state_dict(flow.state_dict())
    z, c = _inputs(circ, 5, 4)
    assert torch.equal(flow(z, c)[0], other(z, c)[0])


def test_flow_density_integrates_to_one():
    # 2-D: one line and one circular variable; importance sampling from a wide proposal
    torch.manual_seed(0)
    circ = torch.tensor([False, True])
    flow = CouplingFlow(circ, 0, n_layers=4, hidden=16, n_bins=6).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.5 * torch.randn_like(p))
    base = MixedBase(circ).double()
    g = torch.Generator().manual_seed(3)
    n = 200_000
    s = 4.0
    z = torch.stack(
        [
            torch.randn(n, generator=g, dtype=torch.float64) * s,
            (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * math.pi,
        ],
        1,
    )
    log_r = -0.5 * (z[:, 0] / s) ** 2 - math.log(s * math.sqrt(2 * math.pi)) - math.log(2 * math.pi)
    with torch.no_grad():
        u, ladj = flow(z, torch.zeros(n, 0, dtype=torch.float64))
        w = torch.exp(base.log_prob(u) + ladj - log_r)
    est, se = float(w.mean()), float(w.std() / math.sqrt(n))
    assert abs(est - 1) < 4 * se + 1e-3, (est, se)


def test_mixed_base_samples_in_range_and_normalised():
    circ = torch.tensor([True, False, True])
    base = MixedBase(circ).double()
    torch.manual_seed(0)
    u = base.sample(1000, torch.float64, torch.device("cpu"))
    assert u[:, circ].abs().max() <= math.pi
    x = torch.tensor([[0.0, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(
        base.log_prob(x), torch.tensor([-2 * math.log(2 * math.pi) - 0.5 * math.log(2 * math.pi)], dtype=torch.float64)
    )
    assert torch.isinf(base.log_prob(torch.tensor([[4.0, 0.0, 0.0]], dtype=torch.float64))).all()
