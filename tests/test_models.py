"""Backmapper: exact log-densities (closed-form toy, normalisation), M x = X, equivariance, chirality,
gradients, scripting."""

import math

import mdtraj as md
import numpy as np
import pytest
import torch
from _backmap_helpers import ala2_constraints, ala2_six, ala2_traj

from openmm_backmap.geometry import random_rotation
from openmm_backmap.io.checkpoints import make_spec
from openmm_backmap.mapping import CGMapping
from openmm_backmap.models.backmapper import Backmapper
from openmm_backmap.training.backmapper import train_ml


def _toy_topology(n_atoms, bonds, elements=None):
    top = md.Topology()
    res = top.add_residue("TOY", top.add_chain())
    atoms = [top.add_atom(f"A{i}", (elements or [md.element.carbon] * n_atoms)[i], res) for i in range(n_atoms)]
    for i, j in bonds:
        top.add_bond(atoms[i], atoms[j])
    return top


def _toy_frames(rng, n, extra):
    """Beads A, B, C in a fixed triangle, randomly rotated and translated; ``extra`` (n, k, 3)
    offsets in the local frame are added to A."""
    tri = np.array([[0.0, 0.0, 0.0], [0.15, 0.0, 0.0], [0.2, 0.13, 0.0]])
    out = []
    for b in range(n):
        rot = random_rotation(rng)
        t = rng.normal(size=3)
        pts = np.concatenate([tri, tri[0] + extra[b]], axis=0)
        out.append(pts @ rot.T + t)
    return np.array(out)


def _perturb(model, scale, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.flow.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_toy_log_q_matches_closed_form_density():
    """D ~ A + N(mu, sigma^2 I) in Cartesian: after training, log q(x|X) equals the Gaussian's
    log-density in nm^-3 pointwise (which needs every Jacobian right)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    mu, sigma = np.array([-0.05, -0.14, 0.03]), 0.02
    top = _toy_topology(4, [(0, 1), (1, 2), (0, 3)])
    mapping = CGMapping(top, [[0], [1], [2]])

    def draw(n):
        return _toy_frames(rng, n, (mu + sigma * rng.normal(size=(n, 3)))[:, None])

    x_tr, x_va, x_te = draw(3000), draw(500), draw(1000)
    model = Backmapper.from_data(mapping, x_tr, hidden=32, n_layers=4).double()
    spec = make_spec(model, 300.0)
    train_ml(
        model,
        spec,
        (x_tr, mapping.project(x_tr)),
        (x_va, mapping.project(x_va)),
        epochs=20,
        lr=3e-3,
        progress=False,
        augment=False,
    )
    x = torch.tensor(x_te)
    with torch.no_grad():
        lq = model.log_prob(x, model.project(x)).numpy()
    # closed form: the local frame of the beads maps mu to the rotated offset
    d = x_te[:, 3] - x_te[:, 0]
    frame_mu = []
    tri = np.array([[0.0, 0.0, 0.0], [0.15, 0.0, 0.0], [0.2, 0.13, 0.0]])
    for b in range(len(x_te)):
        # rotation from the beads (Kabsch on A, B, C)
        p = x_te[b, :3] - x_te[b, :3].mean(0)
        q = tri - tri.mean(0)
        u, _, vt = np.linalg.svd(q.T @ p)
        s = np.diag([1, 1, np.sign(np.linalg.det(u @ vt))])
        rot = (u @ s @ vt).T
        frame_mu.append(rot @ mu)
    diff = d - np.array(frame_mu)
    lp = -0.5 * (diff**2).sum(1) / sigma**2 - 3 * math.log(sigma * math.sqrt(2 * math.pi))
    gap = lq - lp
    assert abs(gap.mean()) < 0.05, gap.mean()  # = -KL(p||q) estimate up to noise
    assert np.median(np.abs(gap)) < 0.1


def _importance_integral(model, X, sample_free, log_r, n, fixed=None):
    """E_r[q / r]: ∫ q(x|X) dx over the free atoms' Cartesian coordinates."""
    x = sample_free(n)
    with torch.no_grad():
        lq = model.log_prob(x, X.expand(n, -1, -1))
    w = torch.exp(lq - log_r(x))
    return float(w.mean()), float(w.std() / math.sqrt(n))


def test_density_integrates_to_one_two_free_atoms():
    """Two free atoms (6-D), a perturbed (non-trivial) flow: importance sampling from a Cartesian
    Gaussian gives ∫ q(x|X) dx = 1 within error."""
    torch.manual_seed(1)
    rng = np.random.default_rng(1)
    top = _toy_topology(5, [(0, 1), (1, 2), (0, 3), (3, 4)])
    mapping = CGMapping(top, [[0], [1], [2]])
    off = np.array([-0.05, -0.14, 0.03])
    data = _toy_frames(
        rng, 2000, np.stack([off + 0.02 * rng.normal(size=(2000, 3)), 2 * off + 0.03 * rng.normal(size=(2000, 3))], 1)
    )
    model = Backmapper.from_data(mapping, data, hidden=16, n_layers=4).double()
    _perturb(model, 0.1, 0)
    x0 = torch.tensor(data[0])
    X = model.project(x0[None])
    centre = x0[3:].clone()
    s = 0.06
    g = torch.Generator().manual_seed(2)

    def sample_free(n):
        x = x0.repeat(n, 1, 1)
        x[:, 3:] = centre + s * torch.randn(n, 2, 3, generator=g, dtype=torch.float64)
        return x

    def log_r(x):
        d = x[:, 3:] - centre
        return (-0.5 * (d**2).sum((1, 2)) / s**2) - 6 * math.log(s * math.sqrt(2 * math.pi))

    est, se = _importance_integral(model, X, sample_free, log_r, 100_000)
    assert abs(est - 1) < 4 * se + 0.01, (est, se)


def test_centre_of_mass_bead_is_exact_and_normalised():
    """A bead at the centre of mass of atoms 2 and 3: M x = X exactly, and ∫ q(x|X) dmu = 1 on the
    fibre, with dx = dX dmu (dmu = dx_3 / w_pivot^3 parameterising the fibre by the non-pivot atom)."""
    torch.manual_seed(3)
    rng = np.random.default_rng(3)
    el = [md.element.carbon, md.element.carbon, md.element.carbon, md.element.oxygen]
    top = _toy_topology(4, [(0, 1), (1, 2), (2, 3)], el)
    mapping = CGMapping(top, [[0], [1], [2, 3]])
    tri = np.array([[0.0, 0.0, 0.0], [0.15, 0.0, 0.0], [0.2, 0.13, 0.0]])
    data = np.repeat(np.concatenate([tri, [[0.3, 0.2, 0.05]]])[None], 1000, 0)
    data[:, 3] += 0.02 * rng.normal(size=(1000, 3))
    model = Backmapper.from_data(mapping, data, hidden=16, n_layers=2).double()
    _perturb(model, 0.1, 1)
    X = torch.tensor(mapping.project(data[:1]))
    aa, lq = model.sample(X, 64)
    assert torch.allclose(model.project(aa), X.expand(64, -1, -1), atol=1e-12)
    assert torch.allclose(model.log_prob(aa, X.expand(64, -1, -1)), lq, atol=1e-8)
    pivot = int(model.pivots[2])
    other = 3 if pivot == 2 else 2
    w = torch.tensor(mapping.weights[2], dtype=torch.float64)
    w_p, w_o = float(w[[2, 3].index(pivot)]), float(w[[2, 3].index(other)])
    centre = aa[0, other].detach()
    s = 0.05
    g = torch.Generator().manual_seed(4)
    n = 300_000
    xo = centre + s * torch.randn(n, 3, generator=g, dtype=torch.float64)
    x = torch.tensor(data[:1]).repeat(n, 1, 1)
    x[:, other] = xo
    x[:, pivot] = (X[0, 2] - w_o * xo) / w_p
    log_r = -0.5 * ((xo - centre) ** 2).sum(1) / s**2 - 3 * math.log(s * math.sqrt(2 * math.pi))
    with torch.no_grad():
        wts = torch.exp(model.log_prob(x, X.expand(n, -1, -1)) - log_r - 3 * math.log(w_p))
    est, se = float(wts.mean()), float(wts.std() / math.sqrt(n))
    assert abs(est - 1) < 4 * se + 0.01, (est, se)


@pytest.fixture(scope="module")
def ala2_model():
    traj = ala2_traj()
    mapping = ala2_six(traj.topology)
    torch.manual_seed(0)
    model = Backmapper.from_data(mapping, traj.xyz, constraints=ala2_constraints(), hidden=32, n_layers=4).double()
    _perturb(model, 0.05, 2)
    return model, torch.tensor(traj.xyz, dtype=torch.float64)


def test_ala2_samples_respect_mapping_constraints_and_density(ala2_model):
    model, x = ala2_model
    X = model.project(x[:5])
    aa, lq = model.sample(X, 8)
    Xr = torch.repeat_interleave(X, 8, 0)
    assert aa.shape == (40, 22, 3) and lq.shape == (40,)
    assert torch.allclose(model.project(aa), Xr, atol=1e-12)
    assert torch.allclose(model.log_prob(aa, Xr), lq, atol=1e-8)
    for i, j, d in ala2_constraints():
        assert torch.allclose((aa[:, i] - aa[:, j]).norm(dim=-1), torch.tensor(d, dtype=torch.float64), atol=1e-9)


def test_ala2_equivariance(ala2_model):
    model, x = ala2_model
    rng = np.random.default_rng(5)
    X = model.project(x[:4])
    u = model.base.sample(4, torch.float64, torch.device("cpu"))
    aa, lq = model.sample_with_noise(X, u)
    for _ in range(3):
        rot = torch.tensor(random_rotation(rng))
        t = torch.tensor(rng.normal(size=3))
        aa2, lq2 = model.sample_with_noise(X @ rot.T + t, u)
        assert torch.allclose(aa2, aa @ rot.T + t, atol=1e-10)
        assert torch.allclose(lq2, lq, atol=1e-8)
        assert torch.allclose(model.log_prob(x[:4] @ rot.T + t, X @ rot.T + t), model.log_prob(x[:4], X), atol=1e-8)


def test_ala2_chirality_of_ca_follows_beads(ala2_model):
    model, x = ala2_model
    from openmm_backmap.geometry import dihedrals

    X = model.project(x[:20])
    aa, _ = model.sample(X, 4)
    xr = torch.repeat_interleave(x[:20], 4, 0)
    n, ca, c, ha = 6, 8, 14, 9
    ref = torch.sign(dihedrals(xr[:, ha], xr[:, ca], xr[:, n], xr[:, c]))
    got = torch.sign(dihedrals(aa[:, ha], aa[:, ca], aa[:, n], aa[:, c]))
    assert torch.equal(ref, got)


def test_ala2_every_parameter_gets_a_gradient(ala2_model):
    model, x = ala2_model
    model.zero_grad()
    model.log_prob(x[:64], model.project(x[:64])).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.zero_grad()


def test_ala2_scripted_equals_eager_on_same_noise(ala2_model):
    model, x = ala2_model
    scripted = torch.jit.script(model)
    for b in (1, 7):
        X = model.project(x[:b])
        u = model.base.sample(b, torch.float64, torch.device("cpu"))
        aa, lq = model.sample_with_noise(X, u)
        aa_s, lq_s = scripted.sample_with_noise(X, u)
        assert torch.allclose(aa, aa_s, atol=1e-12) and torch.allclose(lq, lq_s, atol=1e-10)
        assert torch.allclose(scripted.log_prob(x[:b], X), model.log_prob(x[:b], X), atol=1e-10)


def test_wrong_bead_count_raises(ala2_model):
    model, x = ala2_model
    with pytest.raises(ValueError, match="n_cg"):
        model.sample(torch.zeros(2, 5, 3, dtype=torch.float64), 1)


def test_temporal_model_conditions_on_previous_frame():
    traj = ala2_traj()
    mapping = ala2_six(traj.topology)
    torch.manual_seed(0)
    model = Backmapper.from_data(
        mapping, traj.xyz, constraints=ala2_constraints(), hidden=16, n_layers=2, temporal=True
    ).double()
    _perturb(model, 0.05, 3)
    x = torch.tensor(traj.xyz[:6], dtype=torch.float64)
    X = model.project(x[1:])
    aa, lq = model.sample_next(X, x[:-1])
    assert aa.shape == (5, 22, 3)
    assert torch.allclose(model.log_prob_next(aa, X, x[:-1]), lq, atol=1e-8)
    # the previous frame changes the density
    assert not torch.allclose(model.log_prob_next(aa, X, x[:-1]), model.log_prob_next(aa, X, x[:-1].flip(0)))
    scripted = torch.jit.script(model)
    assert torch.allclose(scripted.log_prob_next(aa, X, x[:-1]), lq, atol=1e-8)
    plain = Backmapper(mapping, hidden=16, n_layers=2)
    with pytest.raises(RuntimeError, match="temporal"):
        plain.sample_next(X.float(), x[:-1].float())
