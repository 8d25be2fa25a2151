"""Cycle coarse graining: the exact fixed point on a linear-Gaussian toy, the proposal densities of
the CG flow, and the refusal of inputs that cannot be cycled."""

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from torch import nn

from openmm_backmap.analysis.reweighting import kish_ess
from openmm_backmap.training.cycle import (
    CycleSettings,
    MixtureProposal,
    TemperedFlow,
    TorsionShiftedFlow,
    backmapped_pair_weights,
    cg_reverse_kl,
    ess_tempering,
    evaluate_weights,
    flow_estimate,
    frame_weights,
    resample_strata,
    run_cycles,
    stratify,
    stratum_population_term,
    weighted_refit,
    widen_priors,
)

# ---------------------------------------------------------------------------- linear-Gaussian toy
# AA: two particles a, b in 3D with u(x) = |a - MU|^2 / (2 SA^2) + |b - a - D|^2 / (2 SB^2) (reduced).
# Mapping X = a (a slice mapping). Exact CG marginal: X ~ N(MU, SA^2 I), closed form.
MU = torch.tensor([0.5, -0.2, 0.1], dtype=torch.float64)
SA, SB = 0.3, 0.1
D = torch.tensor([0.15, 0.0, -0.05], dtype=torch.float64)


def reduced_energy(x):
    a, b = x[:, 0], x[:, 1]
    return ((a - MU) ** 2).sum(-1) / (2 * SA**2) + ((b - a - D) ** 2).sum(-1) / (2 * SB**2)


def gaussian_log_density(v, mean, std):
    """Log density (nats) of independent normals, summed over the last axis."""
    return (-0.5 * ((v - mean) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)).sum(-1)


class Backmap:
    """q(b | X) = N(X + shift, (scale SB)^2), a = X: exact for shift = D and scale = 1."""

    def __init__(self, shift, scale):
        self.shift, self.scale = shift, scale

    def __call__(self, X, k):
        X = X.repeat_interleave(k, 0).reshape(-1, 3)
        std = torch.full((3,), self.scale * SB, dtype=torch.float64)
        b = X + self.shift + std * torch.randn_like(X)
        return torch.stack([X, b], 1), gaussian_log_density(b, X + self.shift, std)


class GaussianCG(nn.Module):
    """A Gaussian CG model over one bead with learnable mean and per-axis log standard deviation;
    ``sample(n, tau)`` / ``log_prob(X, tau)`` widen it by tau, like :class:`TemperedFlow`."""

    def __init__(self, mean, std):
        super().__init__()
        self.mean = nn.Parameter(torch.as_tensor(mean, dtype=torch.float64).clone())
        self.log_std = nn.Parameter(torch.log(torch.as_tensor(std, dtype=torch.float64)).clone())

    def log_prob(self, X, tau=1.0):
        return gaussian_log_density(X.reshape(-1, 3), self.mean, tau * torch.exp(self.log_std))

    def sample(self, n):
        """n reparameterised draws (n, 1, 3) and their log q: differentiable in the parameters."""
        X = self.mean + torch.exp(self.log_std) * torch.randn(n, 3, dtype=torch.float64)
        return X[:, None], self.log_prob(X)


class GaussianFamily:
    def __init__(self, module):
        self.module = module

    @torch.no_grad()
    def sample(self, n, tau):
        X = self.module.mean + tau * torch.exp(self.module.log_std) * torch.randn(n, 3, dtype=torch.float64)
        return X[:, None], self.module.log_prob(X, tau)

    def log_prob(self, X, tau):  # differentiable, like TemperedFlow's: the cycle's AIS anneals from it
        return self.module.log_prob(X, tau)


def project(x):
    return x[:, :1]


def test_exact_models_give_constant_weights():
    """With the exact CG marginal and the exact conditional, log w = -u - log q(x|X) - log q(X) is
    the constant log Z of the toy for every sample: ESS/N = 1 and both KL estimates vanish."""
    torch.manual_seed(0)
    family = GaussianFamily(GaussianCG(MU, [SA] * 3))
    X, log_q_cg = family.sample(500, 1.0)
    x, log_q = Backmap(D, 1.0)(X, 2)
    log_w = (-reduced_energy(x) - log_q - log_q_cg.repeat_interleave(2)).numpy()
    log_z = 6 * 0.5 * math.log(2 * math.pi) + 3 * math.log(SA) + 3 * math.log(SB)
    np.testing.assert_allclose(log_w, log_z, atol=1e-9)
    stats = evaluate_weights(log_w)
    assert stats["ess_fraction"] == pytest.approx(1.0, abs=1e-12)
    assert abs(stats["kl_forward"]) < 1e-9 and abs(stats["kl_reverse"]) < 1e-9
    # the cycle's own weighing of backmapped draws gives the same constant; a non-finite draw gets -inf
    X[3] = math.nan
    X_safe, x2, pair = backmapped_pair_weights(X, log_q_cg, Backmap(D, 1.0), reduced_energy, 2)
    assert torch.isfinite(X_safe).all() and x2.shape == (1000, 2, 3)
    np.testing.assert_allclose(np.delete(pair, [6, 7]), log_z, atol=1e-9)
    assert np.isneginf(pair[6:8]).all()


def test_frame_weights_average_the_reconstructions():
    """A CG draw's weight is the mean of its reconstructions' weights. With the exact CG marginal
    and a biased backmapper, the pair weights vary (ESS/N well under 1) while the draw weights, each
    the fibre integral by importance sampling over K = 64 reconstructions, are nearly constant:
    p_CG(X) / q(X) = Z. Observables are averaged by weight within a draw; a draw with no finite
    pair weight gets weight zero."""
    torch.manual_seed(4)
    family = GaussianFamily(GaussianCG(MU, [SA] * 3))
    X, log_q_cg = family.sample(400, 1.0)
    k = 64
    x, log_q = Backmap(D + 0.08, 1.3)(X, k)
    pair = (-reduced_energy(x) - log_q - log_q_cg.repeat_interleave(k)).numpy()
    log_w, frame_of = frame_weights(pair, k)
    np.testing.assert_allclose(log_w, logsumexp(pair.reshape(-1, k), 1) - math.log(k))
    assert kish_ess(pair) / pair.size < 0.6 and kish_ess(log_w) / log_w.size > 0.95
    log_z = 6 * 0.5 * math.log(2 * math.pi) + 3 * math.log(SA) + 3 * math.log(SB)
    assert abs(np.median(log_w) - log_z) < 0.1
    lw, avg = frame_weights(np.array([0.0, math.log(3.0), -np.inf, -np.inf]), 2)
    np.testing.assert_allclose(lw, [math.log(2.0), -np.inf])
    np.testing.assert_allclose(avg(np.array([1.0, 0.0, 1.0, 3.0])), [0.25, 2.0])


def test_cycle_reaches_the_exact_marginal_from_a_wrong_start():
    """From a CG model 1.3 sigma off and 40 % too narrow, with a biased and too broad backmapper,
    the cycle converges to the closed-form marginal N(MU, SA^2) within statistical error, and the
    ESS/N of its own samples rises from cycle to cycle."""
    torch.manual_seed(1)
    cg = GaussianCG(MU + 0.4, [0.6 * SA] * 3)
    settings = CycleSettings(
        cycles=6,
        samples=3000,
        defensive=0.2,
        tau=1.5,
        ess_target=0.2,
        pool=2,
        epochs=12,
        batch_size=500,
        lr=0.04,
        seed=3,
    )
    history = run_cycles(
        GaussianFamily(cg), Backmap(D + 0.05, 1.4), reduced_energy, project, settings, log=lambda s: None
    )
    ess = [r["ess_fraction"] for r in history]
    assert ess[0] < 0.2 and ess[-1] > 0.45, ess
    assert history[0]["lambda"] < 1.0 and history[-2]["lambda"] == 1.0
    # statistical error of the fitted moments: ~ SA / sqrt(ESS of the pooled samples)
    n_eff = history[-2]["ess"] * settings.pool
    with torch.no_grad():
        mean_err = (cg.mean - MU).abs().max().item()
        std = torch.exp(cg.log_std)
    assert mean_err < 5 * SA / math.sqrt(n_eff), (cg.mean, n_eff)
    np.testing.assert_allclose(std.numpy(), SA, rtol=5 / math.sqrt(2 * n_eff) + 0.01)
    # the start was far off: the cycle moved the mean by more than 30 standard errors
    assert (cg.mean - (MU + 0.4)).abs().min().item() > 30 * SA / math.sqrt(n_eff)


def test_flow_estimate_reweights_a_wrong_cg_model_to_the_exact_population():
    """flow_estimate of a CG model 0.1 nm off and 20 % too broad, with a biased backmapper: the raw
    population of {a_x > MU_x + SA} is the model's (1 - Phi(0.556) = 0.289), the reweighted one the
    exact 1 - Phi(1) = 0.1587 within four of its standard errors; draws made in chunks (the last one
    short) and K reconstructions each."""
    from scipy.stats import norm

    torch.manual_seed(6)
    family = GaussianFamily(GaussianCG(MU + 0.1, [1.2 * SA] * 3))
    k = 3

    def observables(x):
        return {"tail": x[:, 0, 0] > float(MU[0]) + SA}

    est = flow_estimate(family, Backmap(D + 0.03, 1.2), reduced_energy, 20000, k, observables, chunk=7000)
    assert est["n"] == 20000 and est["per_frame"] == k and 0.2 < est["ess_fraction"] < 0.95
    tail = est["basins"]["tail"]
    assert abs(tail["raw"] - (1 - norm.cdf(0.2 / 0.36))) < 4 * tail["raw_error"]
    assert abs(tail["reweighted"] - (1 - norm.cdf(1.0))) < 4 * tail["reweighted_error"]
    assert tail["reweighted_error"] < 0.01
    with pytest.raises(ValueError, match="n and k"):
        flow_estimate(family, Backmap(D, 1.0), reduced_energy, 0)


LOG_Z = 6 * 0.5 * math.log(2 * math.pi) + 3 * math.log(SA) + 3 * math.log(SB)  # of exp(-u) over the toy's x


def _gaussian_kl(m1, s1, m0, s0):
    """KL(N(m1, s1^2) || N(m0, s0^2)) summed over independent axes (nats)."""
    return float((torch.log(s0 / s1) + (s1**2 + (m1 - m0) ** 2) / (2 * s0**2) - 0.5).sum())


def test_cg_reverse_kl_and_its_gradient_match_the_closed_form():
    """With the exact conditional, the reverse KL estimate is KL(N(m, s^2) || N(MU, SA^2)) - log Z:
    its Monte-Carlo mean and its reparameterised gradient in m and log s agree with the closed forms
    (d/dm = (m - MU) / SA^2, d/dlog s = s^2 / SA^2 - 1 per axis) within their standard errors."""
    torch.manual_seed(11)
    m0, s0 = MU + torch.tensor([0.2, -0.1, 0.05], dtype=torch.float64), torch.tensor([0.2, 0.4, 0.3])
    cg = GaussianCG(m0, s0)
    kl = _gaussian_kl(m0, s0, MU, torch.tensor(SA))
    values, grads = [], []
    for _ in range(200):
        cg.zero_grad()
        loss = cg_reverse_kl(cg, lambda X: Backmap(D, 1.0)(X, 1), reduced_energy, 500)
        loss.backward()
        values.append(loss.item())
        grads.append(torch.cat([cg.mean.grad, cg.log_std.grad]).numpy().copy())
    values, grads = np.array(values), np.stack(grads)
    assert abs(values.mean() - (kl - LOG_Z)) < 4 * values.std() / math.sqrt(len(values)) + 1e-3
    exact = np.concatenate([((m0 - MU) / SA**2).numpy(), (s0**2 / SA**2 - 1).numpy()])
    err = grads.std(0) / math.sqrt(len(grads))
    assert np.all(np.abs(grads.mean(0) - exact) < 4 * err + 1e-3), (grads.mean(0), exact, err)
    with pytest.raises(ValueError, match="finite AA energy"):
        cg_reverse_kl(cg, lambda X: Backmap(D, 1.0)(X, 1), lambda x: torch.full((len(x),), math.nan), 8)


def test_cg_reverse_kl_excess_penalises_only_density_above_the_marginal():
    """The excess form, mean relu(log q - log p - c) with p normalised on the batch, against closed
    forms with the exact conditional: a flow narrower than the marginal (log q / p <= 3 log(1 / 0.7) =
    1.07 < c = 1.5 everywhere) costs exactly nothing and gets no gradient, so the term cannot drain a
    basin the flow underweights; a flow 1.5 times too broad has r = -3 log 1.5 + 0.625 chi2_3 and the
    penalty 0.625 E[(chi2_3 - t)+] = 0.625 (3 P(chi2_5 > t) - t P(chi2_3 > t)), t = (c + 3 log 1.5) /
    0.625, and its gradient narrows the flow without moving its mean."""
    from scipy.stats import chi2

    torch.manual_seed(13)
    narrow = GaussianCG(MU, [0.7 * SA] * 3)
    loss = cg_reverse_kl(narrow, lambda X: Backmap(D, 1.0)(X, 1), reduced_energy, 2000, excess=1.5)
    loss.backward()
    assert loss.item() == 0.0 and not narrow.mean.grad.any() and not narrow.log_std.grad.any()

    c = 1.0
    t = (c + 3 * math.log(1.5)) / 0.625
    exact = 0.625 * (3 * chi2.sf(t, 5) - t * chi2.sf(t, 3))
    broad = GaussianCG(MU, [1.5 * SA] * 3)
    values, grads = [], []
    for _ in range(40):
        broad.zero_grad()
        loss = cg_reverse_kl(broad, lambda X: Backmap(D, 1.0)(X, 1), reduced_energy, 2000, excess=c)
        loss.backward()
        values.append(loss.item())
        grads.append(torch.cat([broad.mean.grad, broad.log_std.grad]).numpy().copy())
    values, grads = np.array(values), np.stack(grads)
    assert abs(values.mean() - exact) < 4 * values.std() / math.sqrt(len(values)) + 0.01, (values.mean(), exact)
    err = grads.std(0) / math.sqrt(len(grads))
    assert np.all(grads.mean(0)[3:] > 4 * err[3:]) and np.all(np.abs(grads.mean(0)[:3]) < 4 * err[:3] + 1e-3)
    with pytest.raises(ValueError, match="needs reverse_kl_weight"):
        CycleSettings(reverse_kl_excess=1.0)
    with pytest.raises(ValueError, match="must be >= 0"):
        CycleSettings(reverse_kl_weight=1.0, reverse_kl_excess=-1.0)


def test_cg_reverse_kl_bias_from_the_backmapper_shrinks_with_reconstructions():
    """With a backmapper off by a constant shift and width, one reconstruction per draw estimates the
    joint reverse KL: the CG marginal's KL plus the conditional error KL_X (closed form, 0.81 nats).
    With 64 reconstructions the importance-sampled fibre integral leaves only a small bound gap."""
    torch.manual_seed(12)
    m0, s0 = MU + 0.1, torch.tensor([0.25, 0.35, 0.3])
    cg = GaussianCG(m0, s0)
    kl = _gaussian_kl(m0, s0, MU, torch.tensor(SA))
    backmap = Backmap(D + 0.05, 1.4)
    kl_x = _gaussian_kl(D + 0.05, torch.tensor(1.4 * SB), D, torch.tensor(SB))
    assert kl_x == pytest.approx(0.805, abs=0.01)
    with torch.no_grad():
        one = np.array([cg_reverse_kl(cg, lambda X: backmap(X, 1), reduced_energy, 2000).item() for _ in range(40)])
        many = np.array([cg_reverse_kl(cg, lambda X: backmap(X, 1), reduced_energy, 500, 64).item() for _ in range(40)])
    assert abs(one.mean() - (kl + kl_x - LOG_Z)) < 4 * one.std() / math.sqrt(len(one)) + 1e-3
    assert 0 <= many.mean() - (kl - LOG_Z) < 0.05, (many.mean(), kl - LOG_Z)


def test_cycle_with_the_reverse_kl_term_keeps_the_exact_marginal():
    """The refit with the joint reverse-KL term added (backmapper biased by a constant shift and
    width, so its conditional error is the same at every X and the term's minimiser is the exact
    marginal) still converges to N(MU, SA^2) from a wrong start; without fibre_sample it is refused."""
    torch.manual_seed(5)
    cg = GaussianCG(MU + 0.4, [0.6 * SA] * 3)
    settings = CycleSettings(
        cycles=5, samples=3000, pool=2, epochs=10, batch_size=500, lr=0.04, seed=3, reverse_kl_weight=1.0
    )
    backmap = Backmap(D + 0.05, 1.4)
    history = run_cycles(
        GaussianFamily(cg),
        backmap,
        reduced_energy,
        project,
        settings,
        log=lambda s: None,
        fibre_sample=lambda X: backmap(X, 1),
    )
    n_eff = history[-2]["ess"] * settings.pool
    with torch.no_grad():
        assert (cg.mean - MU).abs().max().item() < 5 * SA / math.sqrt(n_eff) + 0.01, cg.mean
        np.testing.assert_allclose(torch.exp(cg.log_std).numpy(), SA, rtol=5 / math.sqrt(2 * n_eff) + 0.03)
    with pytest.raises(ValueError, match="fibre_sample"):
        run_cycles(GaussianFamily(cg), backmap, reduced_energy, project, settings, log=lambda s: None)


def test_stratify_scales_the_weighed_up_basins_and_stiffens_the_populations():
    """Three strata of weighted pairs: the one above the floor and the one with too few pairs keep
    their population as the shape weight; the small one with enough pairs gets the floor, its pairs'
    weights scaled by floor / pi, and the population coefficients are c_b - Lambda pi_b with Lambda
    = floor / pi_small. With floor 0 nothing changes (plain weighted maximum likelihood)."""
    labels = np.array([0] * 80 + [1] * 30 + [2] * 5)
    w = np.concatenate([np.full(80, 1.0), np.full(30, 0.1), np.full(5, 0.2)])
    total = w.sum()
    scale, coef, summary = stratify(labels, w, 0.2, 3, min_ess=20.0)
    pi = np.array([80.0, 3.0, 1.0]) / total
    np.testing.assert_allclose([s["pi"] for s in summary], pi)
    np.testing.assert_allclose([s["ess"] for s in summary], [80.0, 30.0, 5.0])
    c = np.array([pi[0], 0.2, pi[2]])  # stratum 2: ESS 5 < 20
    np.testing.assert_allclose([s["c"] for s in summary], c)
    np.testing.assert_allclose(scale, np.concatenate([np.ones(80), np.full(30, 0.2 / pi[1]), np.ones(5)]))
    np.testing.assert_allclose(coef, c - (0.2 / pi[1]) * pi)
    assert coef[1] == pytest.approx(0.0, abs=1e-12) and np.all(coef[[0, 2]] < 0)
    # the scaled weights give each stratum its shape weight c_b
    np.testing.assert_allclose([np.sum((scale * w)[labels == b]) / total for b in range(3)], c)
    # the boost is bounded: c_b <= max_boost pi_b
    _, coef, summary = stratify(labels, w, 0.2, 3, min_ess=20.0, max_boost=2.0)
    assert summary[1]["c"] == pytest.approx(2.0 * pi[1])
    np.testing.assert_allclose(coef, np.array([pi[0], 2.0 * pi[1], pi[2]]) - 2.0 * pi)
    scale, coef, _ = stratify(labels, w, 0.0, 3)
    assert np.all(scale == 1.0) and np.all(coef == 0.0)
    with pytest.raises(ValueError, match="floor"):
        stratify(labels, w, 1.0, 3)
    with pytest.raises(ValueError, match="every weight is zero"):
        stratify(labels, np.zeros_like(w), 0.2, 3)


def test_resample_strata_keeps_every_stratum_weight_and_is_unbiased():
    """A stratum with even weights is kept as it is; one whose weight sits on a few samples is
    resampled within itself: every stratum's total weight is unchanged, the drawn samples get its
    mean weight, and over many draws each sample's expected count is n_b w_i / W_b (unbiased)."""
    rng = np.random.default_rng(0)
    labels = np.array([0] * 100 + [1] * 50)
    lw = np.concatenate([rng.normal(0.0, 0.1, 100), rng.normal(-3.0, 2.5, 50)])
    index, new_lw, moved = resample_strata(labels, lw, rng)
    assert not moved[:100].any() and moved[100:].all()
    assert np.array_equal(index[:100], np.arange(100)) and np.array_equal(new_lw[:100], lw[:100])
    assert np.all((index[100:] >= 100) & (index[100:] < 150))
    assert logsumexp(new_lw[100:]) == pytest.approx(logsumexp(lw[100:]))
    assert np.allclose(new_lw[100:], new_lw[100])
    counts = np.zeros(150)
    for _ in range(4000):
        index, _, _ = resample_strata(labels, lw, rng)
        counts += np.bincount(index[100:], minlength=150)
    expected = 50 * np.exp(lw[100:] - logsumexp(lw[100:]))
    np.testing.assert_allclose(counts[100:] / 4000, expected, atol=0.03)
    # a stratum whose every weight is zero, or of one sample, is left alone
    index, new_lw, moved = resample_strata(np.array([0, 0, 1]), np.array([-np.inf, -np.inf, 0.0]), rng)
    assert not moved.any() and np.array_equal(index, [0, 1, 2])


def test_stratum_population_term_gives_the_gradient_of_the_log_population():
    """On the Gaussian CG model, the surrogate's gradient is grad log Q_b of the stratum b = {X_x >
    MU_x + 1.5 SA}, Q_b = 1 - Phi(z): w.r.t. the mean phi(z) / (SA Q_b), w.r.t. log sigma
    z phi(z) / Q_b (closed forms); strata without draws, and coefficients 0, add nothing."""
    from scipy.stats import norm

    torch.manual_seed(0)
    cg = GaussianCG(MU, [SA] * 3)
    cut = float(MU[0]) + 1.5 * SA

    def tail(X):
        return (X.reshape(-1, 3)[:, 0] > cut).numpy().astype(int)

    stratum_population_term(cg, tail, np.array([0.0, 2.0, 5.0]), 200_000).backward()
    z, q = 1.5, 1.0 - norm.cdf(1.5)
    assert cg.mean.grad[0].item() == pytest.approx(2.0 * norm.pdf(z) / (SA * q), rel=0.03)
    assert cg.log_std.grad[0].item() == pytest.approx(2.0 * z * norm.pdf(z) / q, rel=0.05)
    # the other axes: zero within noise (the draws in b are not selected on them)
    assert cg.mean.grad[1:].abs().max().item() < 0.1 and cg.log_std.grad[1:].abs().max().item() < 0.1


def _chain_start(n: int, seed: int):
    """The first three beads (a, b, c) of n toy chains (bonds 0.15 nm, angle 1.9 rad, with noise) and
    the ``noisy(mean, sd)`` draws that place the rest, from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)

    def noisy(mean, sd):
        return mean + sd * torch.randn(n, generator=gen, dtype=torch.float64)

    zero = torch.zeros(n, dtype=torch.float64)
    a = torch.zeros(n, 3, dtype=torch.float64)
    b = torch.stack([noisy(0.15, 0.003), zero, zero], 1)
    theta, r = noisy(1.9, 0.05), noisy(0.15, 0.003)
    c = b + torch.stack([-r * torch.cos(theta), r * torch.sin(theta), zero], 1)
    return (a, b, c), noisy


def _two_torsion_chains(n: int, small: float, psi_small: float, seed: int) -> np.ndarray:
    """n five-bead chains with two dihedrals (phi, psi) around (-1.3, 1.2) rad, a fraction ``small``
    of them around (1.3, psi_small): alanine dipeptide's C7eq and a small alpha_L-like basin."""
    from openmm_backmap.geometry import nerf

    (a, b, c), noisy = _chain_start(n, seed)
    in_small = torch.arange(n) < round(small * n)
    phi = torch.where(in_small, noisy(1.3, 0.3), noisy(-1.3, 0.3))
    psi = torch.where(in_small, noisy(psi_small, 0.3), noisy(1.2, 0.3))
    d = nerf(c, b, a, noisy(0.15, 0.003), noisy(1.9, 0.05), phi)
    e = nerf(d, c, b, noisy(0.15, 0.003), noisy(1.9, 0.05), psi)
    return torch.stack([a, b, c, d, e], 1).numpy()


def test_stratified_refit_moves_a_small_basin_that_maximum_likelihood_leaves():
    """The failure the stratified refit is for: a flow whose small basin (3 %, phi > 0) sits at the
    big basin's psi, refitted to pairs whose small basin is at psi = -1 rad. In 10 epochs weighted
    maximum likelihood (3 % of the gradient) leaves most of the small basin at the old psi; the
    stratified refit (floor 0.3) moves most of it, and both keep its population at 3 %."""
    from openmm_backmap.geometry import dihedrals
    from openmm_backmap.models.cg_potential import CGFlowPotential

    def torsions(X):
        X = torch.as_tensor(X)
        return dihedrals(X[:, 0], X[:, 1], X[:, 2], X[:, 3]), dihedrals(X[:, 1], X[:, 2], X[:, 3], X[:, 4])

    def basin(X):
        return (torsions(X)[0] > 0).numpy().astype(int)

    start = _two_torsion_chains(4000, 0.03, 1.2, seed=1)
    X = _two_torsion_chains(6000, 0.03, -1.0, seed=2)
    w = np.ones(len(X))
    found = {}
    for floor in (0.0, 0.3):
        torch.manual_seed(0)
        model = CGFlowPotential.from_data(
            start, [(0, 1), (1, 2), (2, 3), (3, 4)], circular_spread=0.25, n_layers=4, hidden=32, n_hidden=1
        )
        weighted_refit(model, start, np.ones(len(start)), 20, 256, 5e-3, 0.1, 0)
        torch.manual_seed(5)
        scale, coef, summary = stratify(basin(X), w, floor, 2)
        assert summary[1]["pi"] == pytest.approx(0.03)
        loss = (lambda m=model, c=coef: stratum_population_term(m, basin, c, 1024)) if floor else None
        weighted_refit(model, X, w, 10, 256, 5e-3, 0.1, 0, loss, scale)
        with torch.no_grad():
            phi, psi = torsions(model.sample(20000)[0])
        small = phi > 0
        moved = (torch.remainder(psi[small] + 1.0 + math.pi, 2 * math.pi) - math.pi).abs() < 0.6
        found[floor] = (float(small.double().mean()), float(moved.double().mean()))
    assert found[0.0][1] < 0.2 and found[0.3][1] > 0.4, found
    for population, _ in found.values():
        assert population == pytest.approx(0.03, abs=0.006), found


def test_stratified_cycle_keeps_the_exact_marginal():
    """The stratified refit inside the cycle (strata: the toy's tail X_x > MU_x + SA and the rest,
    each draw labelled through one reconstruction) still converges to N(MU, SA^2) from a wrong
    start, records each stratum's population and shape weight, and is refused without observables."""
    torch.manual_seed(7)
    cg = GaussianCG(MU + 0.3, [0.7 * SA] * 3)
    settings = CycleSettings(
        cycles=5, samples=3000, pool=2, epochs=10, batch_size=500, lr=0.04, seed=3, stratify=0.5, stratify_draws=1000
    )

    def observables(x):
        tail = x[:, 0, 0] > float(MU[0]) + SA
        return {"rest": ~tail, "tail": tail}

    backmap = Backmap(D + 0.05, 1.4)
    history = run_cycles(
        GaussianFamily(cg), backmap, reduced_energy, project, settings, observables, log=lambda s: None
    )
    strata = history[-2]["refit"]["strata"]
    assert set(strata) == {"rest", "tail"} and sum(v["pi"] for v in strata.values()) == pytest.approx(1.0)
    assert strata["tail"]["c"] == 0.5 and strata["rest"]["c"] == pytest.approx(strata["rest"]["pi"])
    n_eff = history[-2]["ess"] * settings.pool
    with torch.no_grad():
        assert (cg.mean - MU).abs().max().item() < 5 * SA / math.sqrt(n_eff) + 0.01, cg.mean
        np.testing.assert_allclose(torch.exp(cg.log_std).numpy(), SA, rtol=5 / math.sqrt(2 * n_eff) + 0.03)
    with pytest.raises(ValueError, match="observables"):
        run_cycles(GaussianFamily(cg), backmap, reduced_energy, project, settings, log=lambda s: None)


@pytest.mark.parametrize(("resample_moves", "in_basin"), [(0, False), (5, False), (5, True)])
def test_annealed_cycle_reaches_the_exact_marginal_with_better_weights(resample_moves, in_basin):
    """With every pair annealed to exp(-u) (AIS, Cartesian moves) the cycle still has the exact
    marginal as its fixed point and reaches it from the wrong start; its weights are far more even
    than the plain importance weights of the same draws (a biased, too broad backmapper), and the
    raw populations stay those of the flow's own draws. The same with the resample-move step (the
    first cycle's degenerate halves resampled within themselves and moved at exp(-u), freely or kept
    in their halves)."""
    torch.manual_seed(1)
    cg = GaussianCG(MU + 0.4, [0.6 * SA] * 3)
    backmap = Backmap(D + 0.05, 1.4)
    settings = CycleSettings(
        cycles=4,
        samples=2000,
        defensive=0.2,
        tau=1.5,
        pool=2,
        epochs=12,
        batch_size=500,
        lr=0.04,
        seed=3,
        anneal_levels=10,
        anneal_leapfrog=5,
        anneal_step=0.1,
        resample_moves=resample_moves,
        resample_in_basin=in_basin,
        estimate_samples=3000,
        estimate_anneal=True,
    )

    def fibre_log_prob(x, X):
        std = torch.full((3,), backmap.scale * SB, dtype=torch.float64)
        return gaussian_log_density(x[:, 1], X[:, 0] + backmap.shift, std)

    def below_mean(x):
        low = x[:, 0, 0] < MU[0].item()
        return {"low": low, "high": ~low}

    history = run_cycles(
        GaussianFamily(cg),
        backmap,
        reduced_energy,
        project,
        settings,
        observables=below_mean,
        log=lambda s: None,
        fibre_log_prob=fibre_log_prob,
    )
    # the final estimate annealed: 3,000 fresh draws of the final flow, each pair annealed (k = 1)
    estimate = history[-1]["estimate"]
    assert estimate["annealed"] and estimate["n"] == 3000 and estimate["per_frame"] == 1
    assert abs(estimate["basins"]["low"]["reweighted"] - 0.5) < 4 * estimate["basins"]["low"]["reweighted_error"]
    assert estimate["ess_fraction"] > 0.5
    # cycle 0: ESS/N 0.16 against 0.005; then 0.71-0.76 against 0.45-0.51 (seed 3)
    assert history[0]["ess_fraction"] > 10 * history[0]["plain_ess_fraction"]
    assert all(r["ess_fraction"] > 1.3 * r["plain_ess_fraction"] for r in history)
    assert all(0.4 < r["anneal"]["acceptance"][0] < 0.95 for r in history)
    assert history[0]["basins"]["low"]["raw"] < 0.05  # the start sits 1.3 sigma above MU
    assert abs(history[0]["basins"]["low"]["reweighted"] - 0.5) < 0.1
    assert abs(history[-1]["basins"]["low"]["reweighted"] - 0.5) < 0.05
    if resample_moves:
        assert history[0]["resample"]["resampled"]["high"] and history[0]["resample"]["distinct"]["high"] > 10
    with torch.no_grad():
        assert (cg.mean - MU).abs().max().item() < 0.03
        np.testing.assert_allclose(torch.exp(cg.log_std).numpy(), SA, rtol=0.06)
    with pytest.raises(ValueError, match="fibre_log_prob"):
        run_cycles(GaussianFamily(cg), backmap, reduced_energy, project, settings, log=lambda s: None)


def test_a_refit_that_fails_the_dynamics_check_is_undone():
    """run_cycles hands each refitted model to ``check`` with frames drawn by weight; a refit whose
    check says unstable is undone (the parameters are the pre-refit ones, ``reverted`` is set), one
    that passes is kept."""
    seen = []

    def verdict(stable):
        def check(module, X):
            seen.append(np.asarray(X).shape)
            return {"stable": stable}

        return check

    settings = CycleSettings(cycles=1, samples=600, pool=1, epochs=4, batch_size=200, lr=0.05, seed=0, check_replicas=7)
    for stable in (False, True):
        torch.manual_seed(0)
        cg = GaussianCG(MU + 0.4, [0.6 * SA] * 3)
        start = {k: v.clone() for k, v in cg.state_dict().items()}
        history = run_cycles(
            GaussianFamily(cg),
            Backmap(D, 1.0),
            reduced_energy,
            project,
            settings,
            log=lambda s: None,
            check=verdict(stable),
        )
        refit = history[0]["refit"]
        assert refit["dynamics_check"] == {"stable": stable} and refit["reverted"] is (not stable)
        moved = any(not torch.equal(start[k], v) for k, v in cg.state_dict().items())
        assert moved is stable
    assert seen == [(7, 1, 3), (7, 1, 3)]


class BoxDensity(nn.Module):
    """Uniform density on [-h, h] (h = exp(log_h)): its weighted NLL, log 2h, falls as the box
    shrinks, so a refit shrinks it past the data, and held-out points end outside (density 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.log_h = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def log_prob(self, X: torch.Tensor) -> torch.Tensor:
        h = torch.exp(self.log_h)
        inside = torch.abs(X.flatten(1)).amax(1) < h if X.shape[0] else torch.zeros(0, dtype=torch.bool)
        return torch.where(inside, -torch.log(2.0 * h).expand(X.shape[0]), torch.full_like(h, -math.inf))


def test_a_refit_that_gives_held_out_pairs_no_density_is_undone():
    """A refit after which a held-out pair has density zero (held-out NLL infinite, its error not
    finite either) is undone, not kept."""
    X = np.random.default_rng(0).uniform(-0.99, 0.99, size=(400, 1, 1))
    model = BoxDensity()
    out = weighted_refit(model, X, np.ones(len(X)), epochs=30, batch_size=50, lr=0.05, val_fraction=0.2, seed=1)
    assert not math.isfinite(out["val_nll_end"])
    assert out["reverted"] and float(model.log_h) == 0.0


def test_cycle_keeps_the_exact_marginal():
    """Started at the exact marginal (the fixed point), refits stay on it within statistical error."""
    torch.manual_seed(2)
    cg = GaussianCG(MU, [SA] * 3)
    settings = CycleSettings(cycles=2, samples=4000, defensive=0.2, pool=2, epochs=8, batch_size=500, lr=0.01, seed=5)
    history = run_cycles(GaussianFamily(cg), Backmap(D, 1.0), reduced_energy, project, settings, log=lambda s: None)
    assert all(r["ess_fraction"] > 0.9 for r in history)
    with torch.no_grad():
        assert (cg.mean - MU).abs().max().item() < 5 * SA / math.sqrt(8000)
        np.testing.assert_allclose(torch.exp(cg.log_std).numpy(), SA, rtol=0.04)


def test_ess_tempering():
    """lambda = 1 when the weights are good enough, else the largest lambda reaching the target."""
    rng = np.random.default_rng(0)
    lw = rng.normal(0.0, 3.0, 2000)
    lam = ess_tempering(lw, 0.3)
    from openmm_backmap.analysis.reweighting import kish_ess

    assert 0 < lam < 1
    assert kish_ess(lam * lw) / lw.size == pytest.approx(0.3, abs=1e-3)
    assert ess_tempering(rng.normal(0.0, 0.1, 2000), 0.3) == 1.0
    with pytest.raises(ValueError, match="zero"):
        ess_tempering(np.full(5, -np.inf), 0.3)


def test_weighted_basin_statistics():
    """Reweighted populations and their delta-method errors against a direct computation."""
    rng = np.random.default_rng(1)
    lw = rng.normal(0.0, 1.0, 400)
    ind = {"A": rng.random(400) < 0.3}
    ind["B"] = ~ind["A"]
    own = np.arange(400) < 300
    s = evaluate_weights(lw, ind, own)
    w = np.exp(lw) / np.exp(lw).sum()
    f = ind["A"].astype(float)
    mu = (w * f).sum()
    assert s["basins"]["A"]["reweighted"] == pytest.approx(mu)
    assert s["basins"]["A"]["reweighted_error"] == pytest.approx(np.sqrt((w**2 * (f - mu) ** 2).sum()))
    assert s["basins"]["A"]["raw"] == pytest.approx(f[:300].mean())
    assert s["basins"]["A"]["reweighted"] + s["basins"]["B"]["reweighted"] == pytest.approx(1.0)
    assert s["kl_forward"] == pytest.approx((w * np.log(400 * w)).sum())


# ---------------------------------------------------------------------------- the CG flow as a proposal
@pytest.fixture(scope="module")
def small_flow():
    from openmm_backmap.models.cg_potential import CGFlowPotential

    rng = np.random.default_rng(0)
    base = np.array([[0, 0, 0], [0.15, 0, 0], [0.2, 0.14, 0], [0.35, 0.15, 0.05], [0.4, 0.3, 0.1]], dtype=np.float64)
    X = base + 0.01 * rng.normal(size=(300, 5, 3))
    torch.manual_seed(0)
    return CGFlowPotential.from_data(X, [(0, 1), (1, 2), (2, 3), (3, 4)], n_layers=2, hidden=16, n_hidden=1), X


def test_tempered_flow_densities(small_flow):
    """tau = 1 is the flow itself; the widened proposal's log density matches what its sampler
    reports; and it integrates to one over the latent space (a Monte Carlo check through the
    ratio identity E_q[q_tau / q] = 1)."""
    model, _ = small_flow
    fam = TemperedFlow(model)
    torch.manual_seed(1)
    X, lq = fam.sample(200, 1.0)
    torch.testing.assert_close(fam.log_prob(X, 1.0), model.log_prob(X).detach(), rtol=0, atol=1e-3)
    torch.testing.assert_close(lq, model.log_prob(X).detach(), rtol=0, atol=1e-3)
    Xw, lqw = fam.sample(200, 1.6)
    torch.testing.assert_close(fam.log_prob(Xw, 1.6), lqw, rtol=0, atol=1e-3)
    Xq, _ = fam.sample(20000, 1.0)
    ratio = torch.exp(fam.log_prob(Xq, 1.2).double() - fam.log_prob(Xq, 1.0).double())
    assert float(ratio.mean()) == pytest.approx(1.0, abs=0.05)
    mix = MixtureProposal(fam, 0.25, 1.6)
    Xm, lm, own = mix.sample(400)
    assert own.sum() == 300
    expect = torch.logaddexp(fam.log_prob(Xm, 1.0) + math.log(0.75), fam.log_prob(Xm, 1.6) + math.log(0.25))
    torch.testing.assert_close(lm, expect)


def _torsion_data(spread: float, n: int = 3000, turned: float = 0.0) -> np.ndarray:
    """n four-bead chains whose one dihedral sits in a basin of width ``spread`` rad around -1.3 rad;
    a fraction ``turned`` of them with the dihedral turned by 150 degrees (a second basin)."""
    from openmm_backmap.geometry import nerf

    (a, b, c), noisy = _chain_start(n, 0)
    phi = noisy(-1.3, spread)
    phi[: round(turned * n)] += 5.0 * math.pi / 6.0
    d = nerf(c, b, a, noisy(0.15, 0.003), noisy(1.9, 0.05), phi)
    return torch.stack([a, b, c, d], 1).numpy()


def _torsion_flow(spread: float, circular_spread: float | None = None, epochs: int = 30):
    """A flow on :func:`_torsion_data`, trained briefly by maximum likelihood."""
    from openmm_backmap.models.cg_potential import CGFlowPotential

    X = _torsion_data(spread)
    torch.manual_seed(0)
    model = CGFlowPotential.from_data(
        X, [(0, 1), (1, 2), (2, 3)], circular_spread=circular_spread, n_layers=2, hidden=16, n_hidden=1
    )
    weighted_refit(model, X, np.ones(len(X)), epochs, 256, 5e-3, 0.1, 0)
    return model


@pytest.fixture(scope="module")
def torsion_flow():
    """The flow has no mass across the barrier: its dihedral basin is 0.35 rad wide."""
    return _torsion_flow(0.35)


def _dihedral(X):
    from openmm_backmap.geometry import dihedrals

    X = torch.as_tensor(X)
    return dihedrals(X[:, 0], X[:, 1], X[:, 2], X[:, 3])


def test_torsion_shifted_flow_is_an_exact_density(torsion_flow):
    """q_S turns the rotatable dihedral of q's draws by 120 or 240 degrees: its draws' dihedrals are
    q's turned, and its log density is normalised with the right Jacobian. The normalisation is
    checked where q and q_S overlap (a flow whose dihedral spreads 1.2 rad), by E_m[q_S / m] = 1
    for m = (q + q_S) / 2 and stratified draws of m (the ratio is bounded by 2)."""
    from scipy.stats import ks_2samp

    model = torsion_flow
    shifted = TorsionShiftedFlow(model, steps=3)
    assert shifted.dims.tolist() == [int(torch.nonzero(model.ic.kind == 2).flatten()[0])]
    torch.manual_seed(3)
    Xs, lqs = shifted.sample(4000)
    with torch.no_grad():
        Xq, _ = model.sample(4000)
        torch.testing.assert_close(shifted.log_prob(Xs).detach(), lqs)
        # the geometry: q's dihedrals turned by a random one of the two shifts, wrapped
        turn = torch.where(torch.rand(4000) < 0.5, 2 * math.pi / 3, 4 * math.pi / 3).to(Xq.dtype)
        expected = torch.remainder(_dihedral(Xq) + turn + math.pi, 2 * math.pi) - math.pi
        assert ks_2samp(_dihedral(Xs).numpy(), expected.numpy()).pvalue > 1e-3
        # q_S puts (almost) nothing in q's basin
        assert float(((_dihedral(Xs) + 1.3).abs() < 0.5).double().mean()) < 0.01

    broad = _torsion_flow(1.2)
    with torch.no_grad():
        shifted = TorsionShiftedFlow(broad, steps=3)
        Xs, _ = shifted.sample(6000)
        X = torch.cat([broad.sample(6000)[0], Xs])
        lq, lqs = broad.log_prob(X).double(), shifted.log_prob(X).double()
        lm = torch.logaddexp(lq, lqs) - math.log(2.0)
        ratio = torch.exp(lqs - lm)
        error = float(ratio.std()) / math.sqrt(len(ratio))
        assert 0.1 < float(ratio[:6000].mean()) < 1.9  # the two densities overlap: the check has power
        assert float(ratio.mean()) == pytest.approx(1.0, abs=4 * error)
        # it can fail: the same check on a density 1.25 times too large
        wrong = torch.exp(lqs + math.log(1.25) - (torch.logaddexp(lq, lqs + math.log(1.25)) - math.log(2.0)))
        assert abs(float(wrong.mean()) - 1.0) > 6 * error


def test_circular_rotors_let_a_refit_grow_a_basin_across_the_barrier(torsion_flow):
    """By default a dihedral seen in one basin is a line variable standardised by its spread: the
    other side of the circle lies beyond the splines' bound, and a weighted refit toward a second
    basin there cannot grow it. Modelled as circular (``circular_spread``), the same refit does."""

    dih = int(torch.nonzero(torsion_flow.ic.kind == 2).flatten()[0])
    assert not bool(torsion_flow.ic.circular[dih])
    circular = _torsion_flow(0.35, circular_spread=0.25, epochs=0)
    assert bool(circular.ic.circular[dih]) and float(circular.ic.scale[dih]) == 1.0
    line = _torsion_flow(0.35, epochs=0)
    # the data of both: the one basin plus 30 % of the chains turned by 150 degrees
    X = _torsion_data(0.35, 4000, turned=0.3)
    torch.manual_seed(5)
    found = {}
    for name, model in (("line", line), ("circular", circular)):
        weighted_refit(model, X, np.ones(len(X)), 40, 256, 5e-3, 0.1, 0)
        with torch.no_grad():
            d = _dihedral(model.sample(4000)[0])
        found[name] = float(((d - (-1.3 + 5.0 * math.pi / 6.0)).abs() < 0.6).double().mean())
    assert 0.2 < found["circular"] < 0.4
    assert found["line"] < 0.1


def test_mixture_with_torsion_shifted_draws(torsion_flow):
    fam = TemperedFlow(torsion_flow)
    shifted = TorsionShiftedFlow(torsion_flow, steps=4)
    assert len(shifted.shifts) == 3
    mix = MixtureProposal(fam, 0.2, 1.5, 0.3, shifted)
    torch.manual_seed(4)
    X, lm, own = mix.sample(1000)
    assert own.sum() == 500 and own[:500].all()
    with torch.no_grad():
        expect = torch.logsumexp(
            torch.stack(
                [
                    fam.log_prob(X, 1.0) + math.log(0.5),
                    fam.log_prob(X, 1.5) + math.log(0.2),
                    shifted.log_prob(X) + math.log(0.3),
                ]
            ),
            0,
        )
    torch.testing.assert_close(lm, expect)
    # the last 300 draws are turned: their dihedrals left the flow's basin
    assert float(((_dihedral(X[700:]) + 1.3).abs() < 0.5).double().mean()) < 0.01
    with pytest.raises(ValueError, match="needs the TorsionShiftedFlow"):
        MixtureProposal(fam, 0.2, 1.5, 0.3)
    with pytest.raises(ValueError, match="defensive \\+ shifted < 1"):
        CycleSettings(defensive=0.5, shifted=0.5)
    with pytest.raises(ValueError, match="shift_steps must be >= 2"):
        CycleSettings(shifted=0.1, shift_steps=1)


def test_tempered_flow_can_leave_the_bond_lengths_as_they_are(small_flow):
    """With widen_lengths=False the widened proposal keeps the latents of bond lengths at scale 1:
    its log density still matches its sampler's and integrates to one, and its bond lengths spread
    as the flow's own while its bond angles spread wider."""
    from openmm_backmap.geometry import distances

    model, _ = small_flow
    fam = TemperedFlow(model, widen_lengths=False)
    torch.manual_seed(2)
    Xw, lqw = fam.sample(300, 1.6)
    torch.testing.assert_close(fam.log_prob(Xw, 1.6), lqw, rtol=0, atol=1e-3)
    Xq, _ = fam.sample(20000, 1.0)
    ratio = torch.exp(fam.log_prob(Xq, 1.3).double() - fam.log_prob(Xq, 1.0).double())
    assert float(ratio.mean()) == pytest.approx(1.0, abs=0.05)
    X1, _ = fam.sample(4000, 1.0)
    X3, _ = fam.sample(4000, 3.0)
    Xall, _ = TemperedFlow(model, widen_lengths=True).sample(4000, 3.0)

    def spread(X):
        b = distances(X[:, model.bond_idx[:, 0]], X[:, model.bond_idx[:, 1]]).std(0)
        return b, model._angles(X).std(0)

    (b1, a1), (b3, a3), (ball, _) = spread(X1), spread(X3), spread(Xall)
    assert torch.all(b3 < 1.3 * b1) and torch.all(ball > 2.0 * b1)
    assert torch.all(a3 > 1.8 * a1)


def test_widen_priors_only_widens(small_flow):
    """Samples outside the walls move them out to the samples plus the margin; samples inside leave
    them as they are, and the walls never move in."""
    import copy

    model, X = small_flow
    model = copy.deepcopy(model)
    before = {k: getattr(model, k).clone() for k in ("bond_lo", "bond_hi", "pair_min", "angle_lo", "angle_hi")}
    assert widen_priors(model, X[:50]) == {"bonds": 0, "angles": 0, "pairs": 0}
    far = X[:3].copy()
    far[:, 4] += np.array([0.2, 0.0, 0.0])  # stretch the last bond by up to 0.2 nm
    moved = widen_priors(model, far)
    assert moved["bonds"] >= 1
    r = np.linalg.norm(far[:, 4] - far[:, 3], axis=-1).max()
    assert float(model.bond_hi[3]) == pytest.approx(r + model.spec["priors"]["bond_margin_nm"], rel=1e-5)
    assert torch.all(model.bond_lo <= before["bond_lo"]) and torch.all(model.bond_hi >= before["bond_hi"])
    assert torch.all(model.pair_min <= before["pair_min"])
    assert float(model.prior_energy(torch.as_tensor(far, dtype=model.bond_lo.dtype)).abs().max()) == 0.0


def test_settings_refuse_nonsense():
    with pytest.raises(ValueError, match="defensive"):
        CycleSettings(defensive=1.0)
    with pytest.raises(ValueError, match="tau"):
        CycleSettings(tau=0.5)
    with pytest.raises(ValueError, match="cycles"):
        CycleSettings(cycles=0)
    with pytest.raises(ValueError, match="stratify"):
        CycleSettings(stratify=1.0)
    with pytest.raises(ValueError, match="anneal_levels"):
        CycleSettings(resample_moves=5)
    with pytest.raises(ValueError, match="resample_moves > 0"):
        CycleSettings(resample_in_basin=True)
    with pytest.raises(ValueError, match="estimate_samples > 0 and anneal_levels > 0"):
        CycleSettings(estimate_samples=100, estimate_anneal=True)


# ---------------------------------------------------------------------------- files and bad input
def _csv(path, log_w):
    from openmm_backmap.io.energy_file import ENERGY_COLUMNS

    rows = [",".join(ENERGY_COLUMNS)]
    rows += [f"{10 * k},{0.01 * k:.6f},0,-1.0,-50.0,10.0,{v}" for k, v in enumerate(log_w)]
    path.write_text("\n".join(rows) + "\n")
    return path


def _cg_file(tiny_ala2, path, groups):
    """A small CG flow potential of the tiny ALA2 run on the beads ``groups`` (atom indices)."""
    from openmm_backmap.io.checkpoints import make_cg_spec
    from openmm_backmap.io.model_files import export_cg
    from openmm_backmap.mapping import CGMapping
    from openmm_backmap.models.cg_potential import CGFlowPotential

    traj = tiny_ala2["traj"]
    mapping = CGMapping(traj.topology, [list(g) for g in groups])
    X = mapping.project(traj.xyz.astype(np.float64))
    torch.manual_seed(0)
    model = CGFlowPotential.from_data(X, mapping.cg_bonds(), n_layers=1, hidden=8, n_hidden=1)
    export_cg(model, make_cg_spec(model, mapping, reference_xyz=traj.xyz[0]), path)
    return path


def test_cycle_command_anneals_with_an_exported_backmapper(tiny_ala2, tiny_cg, tmp_path):
    """`cycle --anneal-levels` runs the AIS through the model file's TorchScript backmapper (its
    exported internal-coordinate map): every pair is its own weighted sample, with the annealing's
    acceptance and the plain weights' ESS/N in the record, and the raw populations of the draws."""
    import json

    from openmm_backmap.cli import main

    out = tmp_path / "cyc_ais"
    argv = ["cycle", "--model", str(tiny_ala2["model"]), "--cg-model", str(tiny_cg), "--cycles", "1"]
    argv += ["--samples", "64", "--per-frame", "2", "--epochs", "1", "--batch-size", "64", "--out", str(out)]
    argv += ["--anneal-levels", "3", "--anneal-leapfrog", "2", "--check-steps", "0", "--threads", "1"]
    assert main(argv) == 0
    first = json.loads((out / "cycle.json").read_text())["cycles"][0]
    assert first["n"] == 128 and first["per_frame"] == 2
    assert first["anneal"]["levels"] == 3 and 0 < first["anneal"]["acceptance"][0] <= 1
    assert 0 < first["ess_fraction"] <= 1 and 0 < first["plain_ess_fraction"] <= 1
    assert sum(b["reweighted"] for b in first["basins"].values()) == pytest.approx(1.0)
    # raw: the reconstructions of the flow's own draws (64 less the 20 % defensive share), before annealing
    assert sum(b["raw_count"] for b in first["basins"].values()) == 2 * (64 - round(0.2 * 64))


def test_cycle_command_end_to_end(tiny_ala2, tiny_cg, tmp_path):
    """`openmm-backmap cycle` on the small models: one record per evaluation with ESS, KL and the
    four basins, a PNG, and a last-cycle CG potential that loads as a model file and gives the
    refitted flow's energies (its flow is the input's only when the refit was reverted)."""
    import json

    from openmm_backmap.cli import main
    from openmm_backmap.io.model_files import load_cg_potential

    out = tmp_path / "cyc"
    argv = ["cycle", "--model", str(tiny_ala2["model"]), "--cg-model", str(tiny_cg), "--cycles", "1"]
    argv += ["--samples", "128", "--per-frame", "2", "--epochs", "1", "--batch-size", "64", "--out", str(out)]
    assert main([*argv, "--stratify", "0.3", "--stratify-draws", "64", "--threads", "1"]) == 0
    rec = json.loads((out / "cycle.json").read_text())
    assert [r["cycle"] for r in rec["cycles"]] == [0, 1]
    first = rec["cycles"][0]
    assert first["n"] == 128 and first["per_frame"] == 2 and 0 < first["pair_ess_fraction"] <= 1
    assert 0 < first["ess_fraction"] <= 1 and set(first["basins"]) == {"C7eq", "C5", "alpha_R", "alpha_L"}
    assert sum(b["reweighted"] for b in first["basins"].values()) == pytest.approx(1.0)
    strata = first["refit"]["strata"]  # the refit's strata are the basins, their populations the pool's
    assert set(strata) == set(first["basins"]) and sum(v["pi"] for v in strata.values()) == pytest.approx(1.0)
    assert all(v["c"] >= v["pi"] for v in strata.values())
    assert (out / "cycle.png").stat().st_size > 0 and (out / "backmapper.pt").is_file()
    new, meta = load_cg_potential(out / "cg.pt")
    old, _ = load_cg_potential(tiny_cg)
    assert meta["training"]["cycle"]["cycles"] == 1
    X = torch.as_tensor(tiny_ala2["mapping"].project(tiny_ala2["traj"].xyz[:5].astype(np.float64)), dtype=torch.float32)
    assert torch.isfinite(new.energy(X)).all()
    if not first["refit"]["reverted"]:
        assert not torch.allclose(new.log_prob(X), old.log_prob(X))
    else:
        torch.testing.assert_close(new.log_prob(X), old.log_prob(X))


def test_cycle_refuses_models_of_other_mappings(tiny_ala2, tmp_path, capsys):
    """A CG potential of other beads, or of fewer beads, than the backmapper's is refused by name."""
    from openmm_backmap.cli import main

    other = _cg_file(tiny_ala2, tmp_path / "other.pt", [[4], [6], [8], [10], [14], [18]])
    five = _cg_file(tiny_ala2, tmp_path / "five.pt", [[4], [6], [8], [14], [16]])
    base = ["cycle", "--model", str(tiny_ala2["model"]), "--out", str(tmp_path / "o"), "--cycles", "1"]
    assert main([*base, "--cg-model", str(other)]) == 2
    assert "bead 5" in capsys.readouterr().err
    assert main([*base, "--cg-model", str(five)]) == 2
    err = capsys.readouterr().err
    assert "6 beads" in err and "5" in err and "different mappings" in err


def test_from_run_refits_and_refuses_bad_runs(tiny_ala2, tiny_cg, tmp_path, capsys):
    """--from-run refits to a run whose rows match the trajectory's frames; a file with fewer rows,
    and a run whose weights are all zero (saying which frames and basins), are refused."""
    import json

    from openmm_backmap.cli import main
    from openmm_backmap.io.model_files import load_cg_potential

    dcd = str(tiny_ala2["paths"]["dcd"])
    n = tiny_ala2["traj"].n_frames
    rng = np.random.default_rng(0)
    good = _csv(tmp_path / "good.csv", rng.normal(0.0, 1.0, n))
    base = ["cycle", "--cg-model", str(tiny_cg), "--model", str(tiny_ala2["model"]), "--epochs", "1"]
    assert main([*base, "--from-run", str(good), dcd, "--out", str(tmp_path / "r")]) == 0
    summary = json.loads((tmp_path / "r" / "refit.json").read_text())
    assert summary["run"]["n"] == n and 0 < summary["run"]["ess_fraction"] <= 1
    load_cg_potential(tmp_path / "r" / "cg.pt")

    short = _csv(tmp_path / "short.csv", rng.normal(0.0, 1.0, n - 3))
    assert main([*base, "--from-run", str(short), dcd, "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert f"{n - 3} rows" in err and f"{n} frames" in err

    zero = _csv(tmp_path / "zero.csv", [float("-inf")] * n)
    assert main([*base, "--from-run", str(zero), dcd, "--out", str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err
    assert "every importance weight" in err and f"frames 0-{n - 1}" in err and "never visits" in err

    for flag, value in (("--reverse-kl", "1"), ("--estimate-samples", "1"), ("--stratify", "0.3")):
        assert main([*base, "--from-run", str(good), dcd, flag, value, "--out", str(tmp_path / "k")]) == 2
        assert flag in capsys.readouterr().err


def test_cycle_refines_a_backmapper_checkpoint(tiny_ala2, tiny_cg, tmp_path, capsys):
    """With --refine-backmapper the backmapper checkpoint is refined each cycle and exported as the
    last cycle's backmapper.pt (its log q changes) and backmapper.ckpt (the same model, which a later
    cycle refines further); a .pt backmapper cannot be refined. The refit's reverse-KL term runs
    through the command (--reverse-kl, as an excess penalty), and --estimate-samples adds the final
    flow's estimate to the last record only."""
    import json

    from openmm_backmap.cli import main
    from openmm_backmap.io.backmap_model import load_model
    from openmm_backmap.io.checkpoints import make_spec, save_checkpoint
    from openmm_backmap.models.backmapper import Backmapper
    from openmm_backmap.openmm.energies import constraints_from_system, load_system

    traj, mapping = tiny_ala2["traj"], tiny_ala2["mapping"]
    torch.manual_seed(0)
    net = Backmapper.from_data(
        mapping,
        traj.xyz.astype(np.float64),
        constraints=constraints_from_system(load_system(tiny_ala2["system_xml"])),
        n_layers=2,
        hidden=16,
        n_hidden=1,
    )
    ckpt = tmp_path / "bm.ckpt"
    save_checkpoint(ckpt, net, make_spec(net, 300.0, reference_xyz=traj.xyz[0], system_xml=tiny_ala2["system_xml"]))
    out = tmp_path / "ref"
    argv = ["cycle", "--model", str(ckpt), "--cg-model", str(tiny_cg), "--cycles", "1", "--samples", "64"]
    argv += ["--epochs", "1", "--batch-size", "64", "--refine-backmapper", "3", "--refine-spread", "0.5"]
    argv += ["--check-steps", "20", "--reverse-kl", "0.5", "--reverse-kl-batch", "8", "--out", str(out)]
    assert main([*argv, "--reverse-kl-excess", "1", "--estimate-samples", "96"]) == 0
    rec = json.loads((out / "cycle.json").read_text())
    assert rec["settings"]["reverse_kl_excess"] == 1.0
    estimate = rec["cycles"][-1]["estimate"]
    assert estimate["n"] == 96 and set(estimate["basins"]) == set(rec["cycles"][-1]["basins"])
    assert "estimate" not in rec["cycles"][0] and "estimate of 96 draws" in capsys.readouterr().out
    assert rec["cycles"][0]["backmapper_refit"]["steps"] == 3 and rec["settings"]["refine_spread"] == 0.5
    assert rec["settings"]["reverse_kl_weight"] == 0.5 and rec["settings"]["reverse_kl_batch"] == 8
    check = rec["cycles"][0]["refit"].get("dynamics_check")
    assert rec["cycles"][0]["refit"]["reverted"] or (check["replicas"] == 32 and check["steps"] == 20)
    refined = load_model(out / "backmapper.pt", device="cpu")
    X = torch.as_tensor(mapping.project(traj.xyz[:4].astype(np.float64)), dtype=torch.float32)
    x = torch.as_tensor(traj.xyz[:4])
    assert not torch.allclose(refined.module.log_prob(x, X), net.float().log_prob(x, X).detach())
    from openmm_backmap.io.checkpoints import load_checkpoint

    again, _ = load_checkpoint(out / "backmapper.ckpt")
    torch.testing.assert_close(again.float().log_prob(x, X).detach(), refined.module.log_prob(x, X))
    bad = ["cycle", "--model", str(tiny_ala2["model"]), "--cg-model", str(tiny_cg), "--refine-backmapper", "3"]
    assert main([*bad, "--out", str(tmp_path / "bad")]) == 2
    assert ".ckpt" in capsys.readouterr().err


def test_spread_torsions_redraws_only_the_rotatable_dihedrals(tiny_ala2, tiny_cg):
    """spread_torsions keeps every bond, angle and stiff dihedral (the chirality improper) of the CG
    frames and redraws the rotatable dihedrals uniformly on the circle."""
    from openmm_backmap.io.model_files import load_cg_potential
    from openmm_backmap.training.cycle import ROTATABLE_SPREAD, spread_torsions

    model, _ = load_cg_potential(tiny_cg)
    model = model.double()
    X = torch.as_tensor(tiny_ala2["mapping"].project(tiny_ala2["traj"].xyz.astype(np.float64)))
    X = X[torch.arange(4000) % len(X)]
    Y = spread_torsions(model, X, torch.Generator().manual_seed(0))
    ic = model.ic
    zx, zy = ic(X)[0], ic(Y)[0]
    rotatable = (ic.kind == 2) & ((ic.scale > ROTATABLE_SPREAD) | ic.circular)
    assert rotatable.any() and ((ic.kind == 2) & ~rotatable).any()
    torch.testing.assert_close(zy[:, ~rotatable], zx[:, ~rotatable], atol=1e-6, rtol=0)
    angle = zy[:, rotatable] * ic.scale[rotatable] + ic.shift[rotatable]
    n = len(Y)
    # uniform on the circle: first two circular moments vanish, every quarter holds about n / 4
    for k in (1, 2):
        assert torch.cos(k * angle).mean(0).abs().max() < 4.0 / math.sqrt(n)
        assert torch.sin(k * angle).mean(0).abs().max() < 4.0 / math.sqrt(n)
    quarter = torch.floor((torch.remainder(angle, 2 * math.pi)) / (math.pi / 2))
    for q in range(4):
        frac = (quarter == q).double().mean(0)
        assert (frac - 0.25).abs().max() < 4.0 * math.sqrt(0.25 * 0.75 / n)
    with pytest.raises(ValueError, match="rotatable"):
        spread_torsions(model, X[:3], min_spread=10.0)
