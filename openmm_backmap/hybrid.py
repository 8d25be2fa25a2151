"""Hybrid CG-to-AA sampling: exact all-atom Boltzmann samples driven by CG moves and the flow.

A resolution move takes the AA configuration x down to X = M x, moves X with a CG kernel, draws
x' ~ q(. | X') from the backmapper, and accepts with (DESIGN.md)

    log a = [-beta U_AA(x') - log q(x'|X') + c(X')] - [-beta U_AA(x) - log q(x|X) + c(X)]

where c(X) = beta U_CG(X) for a CG kernel that is reversible for exp(-beta U_CG) (Metropolised
dynamics, :class:`CGHamiltonianKernel`), and c(X) = -log q_CG(X) for an independent draw from a CG
flow (:class:`CGFlowKernel`). Detailed balance holds for any backmapper and any CG potential: their
quality sets the acceptance rate, never the correctness. :class:`ResolutionMove` is an openmmtools
``MCMCMove``, so it composes with ``LangevinDynamicsMove`` in ``SequenceMove`` / ``WeightedMove``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from openmm_backmap._compat import import_openmmtools

import_openmmtools()
from openmmtools import mcmc  # noqa: E402
from openmm import unit  # noqa: E402


class Backmapper(Protocol):
    """What the move needs of a backmapper: the model file's interface (DESIGN.md)."""

    def sample(self, cg: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def log_prob(self, aa: torch.Tensor, cg: torch.Tensor) -> torch.Tensor: ...


def _matrix(mapping: Any) -> np.ndarray:
    m = getattr(mapping, "matrix", mapping)
    m = np.asarray(m, dtype=np.float64)
    if m.ndim != 2 or not np.allclose(m.sum(1), 1.0):
        raise ValueError("the mapping must be an (n_cg, n_aa) matrix whose rows sum to 1")
    return m


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A rotation matrix drawn uniformly from SO(3)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


# ---------------------------------------------------------------------------- CG kernels
class CGFlowKernel:
    """Independent proposals X' ~ q_CG from a CG flow, with c(X) = -log q_CG(X).

    ``cg_model`` has ``sample(n) -> (X[n, n_cg, 3], log_q[n])`` and ``log_prob(X[B, n_cg, 3]) ->
    [B]`` (a CG potential model file). With ``rigid=True`` (molecules in vacuum or implicit
    solvent, whose densities are invariant under rigid motions) the draw gets a uniform random
    rotation and is placed on the centroid of the current X, a proposal symmetric in centroid and
    orientation; ``rigid=False`` uses the draw as it is (densities with an external field).
    """

    def __init__(self, cg_model: Any, rigid: bool = True) -> None:
        self.model = cg_model
        self.rigid = rigid

    def propose(self, X: np.ndarray, beta: float, rng: np.random.Generator) -> tuple[np.ndarray, float, float]:
        with torch.no_grad():
            Xn, log_q_new = self.model.sample(1)
            log_q_old = self.model.log_prob(torch.as_tensor(X[None], dtype=Xn.dtype))
        Xn = Xn[0].double().numpy()
        if self.rigid:
            Xn = (Xn - Xn.mean(0)) @ random_rotation(rng).T + X.mean(0)
        return Xn, -float(log_q_old[0]), -float(log_q_new[0])


class CGHamiltonianKernel:
    """Hamiltonian Monte Carlo on the CG System: full momentum refresh, ``n_steps`` of velocity
    Verlet, Metropolis on the total energy. Reversible for exp(-beta U_CG); c(X) = beta U_CG(X).

    Parameters
    ----------
    cg_system
        The CG openmm.System (bead masses and the CG potential as a force).
    timestep
        Integration step (ps); ``n_steps`` steps per proposal.
    platform
        OpenMM platform for the CG Context (Reference is fastest for a few dozen beads).
    """

    def __init__(self, cg_system, timestep: float = 0.002, n_steps: int = 20, platform: str = "Reference",
                 seed: int = 0) -> None:
        import openmm

        self.n_steps = int(n_steps)
        self.integrator = openmm.VerletIntegrator(timestep)
        self.context = openmm.Context(cg_system, self.integrator, openmm.Platform.getPlatformByName(platform))
        self.masses = np.array([cg_system.getParticleMass(i).value_in_unit(unit.dalton)
                                for i in range(cg_system.getNumParticles())])
        self.n_accepted = 0
        self.n_proposed = 0

    def _energies(self) -> tuple[float, float]:
        s = self.context.getState(getEnergy=True)
        return (s.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
                s.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole))

    def propose(self, X: np.ndarray, beta: float, rng: np.random.Generator) -> tuple[np.ndarray, float, float]:
        self.context.setPositions(X)
        sd = np.sqrt(1.0 / (beta * self.masses))[:, None]  # nm/ps, from kT in kJ/mol and mass in Da
        self.context.setVelocities(rng.normal(size=X.shape) * sd)
        u0, k0 = self._energies()
        self.integrator.step(self.n_steps)
        u1, k1 = self._energies()
        self.n_proposed += 1
        log_a = -beta * ((u1 + k1) - (u0 + k0))
        if np.isfinite(log_a) and math.log(rng.uniform()) < log_a:
            self.n_accepted += 1
            Xn = self.context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
            return np.asarray(Xn), beta * u0, beta * u1
        return X.copy(), beta * u0, beta * u0


# ---------------------------------------------------------------------------- the move
@dataclass
class ResolutionStats:
    """Acceptance log of a :class:`ResolutionMove`: one entry per attempt."""

    log_acceptance: list[float] = field(default_factory=list)
    accepted: list[bool] = field(default_factory=list)

    @property
    def n_proposed(self) -> int:
        return len(self.accepted)

    @property
    def n_accepted(self) -> int:
        return int(sum(self.accepted))

    @property
    def acceptance_rate(self) -> float:
        return self.n_accepted / max(self.n_proposed, 1)


class ResolutionMove(mcmc.MCMCMove):
    """The resolution move of the hybrid sampler, as an openmmtools ``MCMCMove``.

    Parameters
    ----------
    backmapper
        An object with the model file's ``sample(cg, n)`` and ``log_prob(aa, cg)`` (e.g. a loaded
        TorchScript backmapper), positions in nm, log densities in nats.
    mapping
        The CG mapping (a :class:`~openmm_backmap.mapping.CGMapping` or its (n_cg, n_aa) matrix).
    cg_kernel
        :class:`CGFlowKernel` or :class:`CGHamiltonianKernel` (anything with the same ``propose``).
    n_attempts
        Resolution attempts per ``apply``.
    seed
        Seeds the acceptance test and the kernel's randomness (torch's generator is seeded once).
    """

    def __init__(self, backmapper: Any, mapping: Any, cg_kernel: Any, n_attempts: int = 1, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> None:
        self.backmapper = backmapper
        self.matrix = _matrix(mapping)
        self.cg_kernel = cg_kernel
        self.n_attempts = int(n_attempts)
        self.rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        self.dtype = dtype
        self.stats = ResolutionStats()

    def _log_q(self, x: np.ndarray, X: np.ndarray) -> float:
        with torch.no_grad():
            lq = self.backmapper.log_prob(torch.as_tensor(x[None], dtype=self.dtype),
                                          torch.as_tensor(X[None], dtype=self.dtype))
        return float(lq[0])

    def _reduced_potential(self, context, thermodynamic_state, x: np.ndarray) -> float:
        context.setPositions(x)
        return float(thermodynamic_state.reduced_potential(context))

    def apply(self, thermodynamic_state, sampler_state, context_cache=None) -> None:
        cache = self._get_context_cache(context_cache)
        context, _ = cache.get_context(thermodynamic_state)
        beta = 1.0 / thermodynamic_state.kT.value_in_unit(unit.kilojoule_per_mole)
        x = np.asarray(sampler_state.positions.value_in_unit(unit.nanometer), dtype=np.float64)
        if x.shape[0] != self.matrix.shape[1]:
            raise ValueError(f"the sampler state has {x.shape[0]} atoms; the mapping expects {self.matrix.shape[1]}")
        u_x = self._reduced_potential(context, thermodynamic_state, x)
        for _ in range(self.n_attempts):
            X = self.matrix @ x
            Xn, c_old, c_new = self.cg_kernel.propose(X, beta, self.rng)
            with torch.no_grad():
                xn_t, log_q_new = self.backmapper.sample(torch.as_tensor(Xn[None], dtype=self.dtype), 1)
            xn = xn_t[0].double().numpy()
            log_q_old = self._log_q(x, X)
            u_xn = self._reduced_potential(context, thermodynamic_state, xn)
            log_a = (-u_xn - float(log_q_new[0]) + c_new) - (-u_x - log_q_old + c_old)
            accept = bool(np.isfinite(log_a) and math.log(self.rng.uniform()) < min(0.0, log_a))
            self.stats.log_acceptance.append(float(log_a) if np.isfinite(log_a) else -math.inf)
            self.stats.accepted.append(accept)
            if accept:
                x, u_x = xn, u_xn
        sampler_state.positions = x * unit.nanometer
