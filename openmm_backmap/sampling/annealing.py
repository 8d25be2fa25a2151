"""Annealed importance sampling (AIS) from a model density to the Boltzmann density.

Importance weights w = p(x) / q(x) of a model's own draws are exact but useless where the model
puts its draws in the wrong place: a CG flow that has never seen a basin draws there with the
wrong CG geometry (the cycle section of benchmarks/RESULTS.md: alanine dipeptide's alpha_L frames
20 nats below where they belong, because the flow keeps the bond angles of C7eq/C5 at phi > 0), and
no weight can move a draw. AIS (Neal, Statistics and Computing 11, 125, 2001) moves them: from
x_0 ~ q, through the intermediate densities

    pi_t(x) ~ q(x)^(1 - b_t) p(x)^(b_t),   0 = b_0 < b_1 < ... < b_T = 1,

each x_t drawn by a Markov kernel that leaves pi_t invariant from x_(t-1), with the log-weight

    log w = sum_(t=1..T) (b_t - b_(t-1)) [log p(x_(t-1)) - log q(x_(t-1))].

E_q[w f(x_T)] = Z E_p[f] for any kernels: the weights stay exact however poor the relaxation, and the
final states carry the relaxed geometry (bond angles, the atoms around them) that the model lacked,
so a weighted refit of the model on them learns it. With T = 1 (no move) this is plain importance
sampling.

The kernels are Hamiltonian Monte Carlo with unit masses: ``leapfrog`` steps of size ``step`` and
a Metropolis test on the total energy, which keeps pi_t exactly invariant. They move coordinates z
that a ``coordinates`` map turns into positions, x = x(z), the density of z being
pi_t(x(z)) |det dx/dz|: Cartesian nm by default, or a molecule's standardised internal coordinates
(:class:`~openmm_backmap.models.joint.JointCoordinates`: log bond lengths, logit bond angles,
dihedrals, each scaled by its spread in the data). Internal coordinates keep the bonds a System
constrains at their lengths (a Cartesian move would break them: with no bond term in U_AA to hold
them, the chains drift to states that neither density describes) and give every direction a unit
scale, so one step suits stiff bonds and soft torsions alike. The step is shared by a batch of
particles and adapted between levels towards the target acceptance; it depends on the batch's
previous level only, never on a particle's own future.

Both densities are callables on positions (B, n, 3) -> (B,) that autograd can differentiate
(the joint model's log q and -U_AA / kT), w.r.t. one measure (the one the coordinates' log |det|
refers to). This module never imports OpenMM.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["AnnealSettings", "CartesianCoordinates", "annealed_importance", "hmc_at_target"]

LogDensity = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class AnnealSettings:
    """Settings of :func:`annealed_importance`.

    Attributes
    ----------
    levels
        T, the number of density ratios between q and p (b_t = t / T); T - 1 levels of moves.
    leapfrog
        Leapfrog steps per HMC move (one move per level).
    step
        First leapfrog step, in the units of the moved coordinates (nm for Cartesian positions,
        standard deviations for standardised internal coordinates); adapted between levels.
    acceptance
        Target acceptance rate of the moves: the step grows by 10 % above it and shrinks by 10 % below.
    chunk
        Particles annealed together (each chunk adapts its own step from ``step``).
    """

    levels: int = 20
    leapfrog: int = 5
    step: float = 0.15  # the step ALA2's joint models adapt to (0.14-0.17)
    acceptance: float = 0.65
    chunk: int = 4096

    def __post_init__(self) -> None:
        for name in ("levels", "leapfrog", "chunk"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"AnnealSettings: {name} must be >= 1, got {getattr(self, name)}")
        if not self.step > 0.0:
            raise ValueError(f"AnnealSettings: step must be > 0, got {self.step}")
        if not 0.0 < self.acceptance < 1.0:
            raise ValueError(f"AnnealSettings: acceptance must be in (0, 1), got {self.acceptance}")


class CartesianCoordinates:
    """The identity map: HMC moves positions directly (no constraints)."""

    def to_internal(self, x: Tensor) -> Tensor:
        return x

    def from_internal(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return z, torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)


class _State:
    """Particles: coordinates z, positions x, log q(x), log p(x) and log |det dx/dz|."""

    def __init__(self, z: Tensor, x: Tensor, lq: Tensor, lp: Tensor, ladj: Tensor) -> None:
        self.z, self.x, self.lq, self.lp, self.ladj = z, x, lq, lp, ladj

    def log_density(self, b: float) -> Tensor:
        return (1.0 - b) * self.lq + b * self.lp + self.ladj

    def where(self, accept: Tensor, other: _State) -> _State:
        def pick(a: Tensor, o: Tensor) -> Tensor:
            return torch.where(accept.view(-1, *([1] * (a.dim() - 1))), o, a)

        return _State(*(pick(a, o) for a, o in zip(self.fields(), other.fields(), strict=True)))

    def fields(self) -> tuple[Tensor, ...]:
        return self.z, self.x, self.lq, self.lp, self.ladj


def _evaluate(z: Tensor, coordinates, log_q: LogDensity, log_p: LogDensity, b: float) -> tuple[_State, Tensor]:
    """The state at z and the gradient of its log density at b w.r.t. z (zero where not finite)."""
    z = z.detach().requires_grad_(True)
    with torch.enable_grad():
        x, ladj = coordinates.from_internal(z)
        lq, lp = log_q(x), log_p(x)
        f = (1.0 - b) * lq + b * lp + ladj
        ok = torch.isfinite(f)
        (grad,) = torch.autograd.grad(torch.where(ok, f, torch.zeros_like(f)).sum(), z)
    grad = torch.where(ok.view(-1, *([1] * (z.dim() - 1))) & torch.isfinite(grad), grad, torch.zeros_like(grad))
    return _State(z.detach(), x.detach(), lq.detach(), lp.detach(), ladj.detach()), grad


def _hmc_move(
    state: _State,
    coordinates,
    log_q: LogDensity,
    log_p: LogDensity,
    b: float,
    step: float,
    leapfrog: int,
    generator: torch.Generator | None,
    region: Callable[[Tensor], Tensor] | None = None,
) -> tuple[_State, Tensor]:
    """One HMC move of every particle at pi_b; returns the new states and the accepted mask. With
    ``region`` (positions -> labels), a move that changes a particle's label is rejected: the kernel
    then leaves pi_b restricted to the particle's region invariant."""
    _, g = _evaluate(state.z, coordinates, log_q, log_p, b)
    z = state.z
    p = torch.randn(z.shape, dtype=z.dtype, device=z.device, generator=generator)
    dims = tuple(range(1, z.dim()))
    h0 = -state.log_density(b) + 0.5 * torch.sum(p * p, dim=dims)
    p = p + 0.5 * step * g
    for i in range(leapfrog):
        z = z + step * p
        new, g = _evaluate(z, coordinates, log_q, log_p, b)
        p = p + (step if i < leapfrog - 1 else 0.5 * step) * g
    h1 = -new.log_density(b) + 0.5 * torch.sum(p * p, dim=dims)
    log_u = torch.log(torch.rand(h0.shape, dtype=h0.dtype, device=h0.device, generator=generator))
    accept = torch.isfinite(h0) & torch.isfinite(h1) & (log_u < h0 - h1)
    if region is not None:
        accept = accept & (region(new.x) == region(state.x))
    return state.where(accept, new), accept


def annealed_importance(
    x0: Tensor,
    log_q: LogDensity,
    log_p: LogDensity,
    settings: AnnealSettings = AnnealSettings(),
    generator: torch.Generator | None = None,
    coordinates=None,
) -> tuple[Tensor, Tensor, dict]:
    """Anneal draws ``x0`` (B, n, 3) of q to p (module docstring).

    Parameters
    ----------
    x0
        Draws of q (positions; their dtype is the dtype of the moves).
    log_q, log_p
        log q(x) and log p(x) up to constants, (B, n, 3) -> (B,), differentiable (p unnormalised:
        -U / kT).
    settings
        Levels, leapfrog steps, first step and target acceptance.
    generator
        Random numbers of the moves (None: torch's global generator).
    coordinates
        What HMC moves: an object with ``to_internal(x) -> z`` and ``from_internal(z) -> (x, log
        |det dx/dz|)``; None for Cartesian positions.

    Returns
    -------
    x, log_w, stats
        The final states (B, n, 3), their AIS log-weights (B,) (-inf where log q or log p of a state
        is not finite: such a particle is never moved and never counts), and ``stats``: ``levels``,
        ``leapfrog``, per chunk the ``acceptance`` averaged over levels and the ``final_step``.
    """
    s = settings
    coordinates = CartesianCoordinates() if coordinates is None else coordinates
    xs, ws, acc_means, steps = [], [], [], []
    for start in range(0, len(x0), s.chunk):
        with torch.no_grad():
            z = coordinates.to_internal(x0[start : start + s.chunk].detach())
            x, ladj = coordinates.from_internal(z)
            state = _State(z, x, log_q(x), log_p(x), ladj)
        alive = torch.isfinite(state.lq) & torch.isfinite(state.lp) & torch.isfinite(ladj)
        log_w = torch.zeros_like(state.lq)
        step, accepted = float(s.step), []
        for t in range(1, s.levels + 1):
            log_w = log_w + torch.where(alive, state.lp - state.lq, torch.zeros_like(log_w)) / s.levels
            if t == s.levels:
                break
            state, acc = _hmc_move(state, coordinates, log_q, log_p, t / s.levels, step, s.leapfrog, generator)
            rate = float(acc[alive].double().mean()) if alive.any() else 0.0
            accepted.append(rate)
            step *= 1.1 if rate > s.acceptance else 0.9
        xs.append(state.x)
        ws.append(torch.where(alive, log_w, torch.full_like(log_w, -math.inf)))
        acc_means.append(sum(accepted) / len(accepted) if accepted else float("nan"))
        steps.append(step)
    stats = {"levels": s.levels, "leapfrog": s.leapfrog, "acceptance": acc_means, "final_step": steps}
    return torch.cat(xs), torch.cat(ws), stats


def hmc_at_target(
    x0: Tensor,
    log_p: LogDensity,
    moves: int,
    settings: AnnealSettings = AnnealSettings(),
    generator: torch.Generator | None = None,
    coordinates=None,
    region: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, dict]:
    """``moves`` HMC moves of every particle x0 (B, n, 3) that leave p invariant (the kernels of
    :func:`annealed_importance` at b = 1), in ``coordinates``; the step starts at ``settings.step``
    and adapts between moves as there. Weighted samples of p stay weighted samples of p with their
    weights unchanged: the move step of a resample-move scheme. With ``region`` (positions (B, n, 3)
    -> labels (B,)) every particle stays in its region: a move that changes its label is rejected,
    so the kernel leaves p restricted to that region invariant (weighted samples of a basin stay
    samples of that basin, however shallow it is). Returns the moved positions and ``stats`` (per
    chunk the mean ``acceptance`` and the ``final_step``)."""
    s = settings
    coordinates = CartesianCoordinates() if coordinates is None else coordinates

    def no_q(x: Tensor) -> Tensor:
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)

    xs, acc_means, steps = [], [], []
    for start in range(0, len(x0), s.chunk):
        with torch.no_grad():
            z = coordinates.to_internal(x0[start : start + s.chunk].detach())
            x, ladj = coordinates.from_internal(z)
            state = _State(z, x, no_q(x), log_p(x), ladj)
        alive = torch.isfinite(state.lp) & torch.isfinite(ladj)
        step, accepted = float(s.step), []
        for _ in range(int(moves)):
            state, acc = _hmc_move(state, coordinates, no_q, log_p, 1.0, step, s.leapfrog, generator, region)
            rate = float(acc[alive].double().mean()) if alive.any() else 0.0
            accepted.append(rate)
            step *= 1.1 if rate > s.acceptance else 0.9
        xs.append(state.x)
        acc_means.append(sum(accepted) / len(accepted) if accepted else float("nan"))
        steps.append(step)
    return torch.cat(xs), {"moves": int(moves), "acceptance": acc_means, "final_step": steps}
