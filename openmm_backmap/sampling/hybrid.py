"""Hybrid CG-to-AA sampling: exact all-atom Boltzmann samples driven by CG moves and the flow.

A resolution move takes the AA configuration x down to X = M x, moves X with a CG kernel, draws
x' ~ q(. | X') from the backmapper, and accepts with probability min(1, exp(log a)),

    log a = [-beta U_AA(x') - log q(x'|X') + c(X')] - [-beta U_AA(x) - log q(x|X) + c(X)]

where c(X) = beta U_CG(X) for a CG kernel that is reversible for exp(-beta U_CG) (Metropolised
dynamics, :class:`CGHamiltonianKernel`), and c(X) = -log q_CG(X) for an independent draw from a CG
flow (:class:`CGFlowKernel`). Detailed balance holds for any backmapper and any CG potential: their
quality sets the acceptance rate, never the correctness. :func:`log_acceptance` and
:func:`metropolis` are that test, for one chain (:class:`ResolutionMove`, an openmmtools ``MCMCMove``
that composes with ``LangevinDynamicsMove`` in ``SequenceMove`` / ``WeightedMove``) and for many
chains at once (:class:`BatchedHybridSampler`); :func:`run_hybrid` is ``openmm-backmap hybrid``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from openmm_backmap._compat import import_openmmtools
from openmm_backmap.analysis.basins import BASINS, backbone_torsions, basin_indicators, basin_populations, block_average
from openmm_backmap.geometry import random_placement, random_rotations
from openmm_backmap.io.backmap_model import load_model
from openmm_backmap.io.model_files import load_cg_potential, load_torchscript
from openmm_backmap.openmm.energies import aa_energy, check_system_matches, load_system
from openmm_backmap.openmm.forces import create_cg_system
from openmm_backmap.rng import TorchStream
from openmm_backmap.sampling.protein_chains import proposal_model, protein_system
from openmm_backmap.units import kT

import_openmmtools()
from openmm import unit  # noqa: E402
from openmmtools import mcmc  # noqa: E402


class Backmapper(Protocol):
    """What the move needs of a backmapper: the model file's interface (:mod:`openmm_backmap.io.model_files`)."""

    def sample(self, cg: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def log_prob(self, aa: torch.Tensor, cg: torch.Tensor) -> torch.Tensor: ...


def _matrix(mapping: Any) -> np.ndarray:
    m = getattr(mapping, "matrix", mapping)
    m = np.asarray(m, dtype=np.float64)
    if m.ndim != 2 or not np.allclose(m.sum(1), 1.0):
        raise ValueError("the mapping must be an (n_cg, n_aa) matrix whose rows sum to 1")
    return m


# ---------------------------------------------------------------------------- the acceptance test
def log_acceptance(u_new, log_q_new, c_new, u_old, log_q_old, c_old) -> np.ndarray:
    """log a = [-u(x') - log q(x'|X') + c(X')] - [-u(x) - log q(x|X) + c(X)] of resolution moves.

    ``u`` is the reduced AA energy beta U_AA, ``log q`` the backmapper's log density (nats) and
    ``c`` the CG kernel's term (beta U_CG for a kernel reversible for exp(-beta U_CG), -log q_CG for
    an independent draw from a CG flow). Array-likes of one value per chain; NaN (both states
    impossible) becomes -inf, a refusal.
    """
    with np.errstate(invalid="ignore"):  # inf - inf: both states impossible
        log_a = (-np.asarray(u_new) - log_q_new + c_new) - (-np.asarray(u_old) - log_q_old + c_old)
    return np.where(np.isnan(log_a), -np.inf, log_a)


def metropolis(log_a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Accept each proposal with probability min(1, exp(log_a)): one uniform draw per entry."""
    log_a = np.asarray(log_a, dtype=np.float64)
    return np.log(rng.uniform(size=log_a.shape)) < np.minimum(log_a, 0.0)


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
            Xn = random_placement(Xn, X.mean(0), rng)
        return Xn, -float(log_q_old[0]), -float(log_q_new[0])

    def __getstate__(self) -> dict:
        # a TorchScript module pickles as its file's bytes
        model = self.model
        if isinstance(model, torch.jit.ScriptModule):
            buffer = io.BytesIO()
            torch.jit.save(model, buffer)
            model = {"torchscript": buffer.getvalue()}
        return {"model": model, "rigid": self.rigid}

    def __setstate__(self, state: dict) -> None:
        model = state["model"]
        if isinstance(model, dict) and "torchscript" in model:
            model = load_torchscript(model["torchscript"])
        self.model, self.rigid = model, state["rigid"]


class CGHamiltonianKernel:
    """Hamiltonian Monte Carlo on the CG System: full momentum refresh, ``n_steps`` of velocity
    Verlet, Metropolis on the total energy. Reversible for exp(-beta U_CG); c(X) = beta U_CG(X).
    Its randomness (momenta, the Metropolis test) comes from the move's generator.

    Parameters
    ----------
    cg_system
        The CG openmm.System (bead masses and the CG potential as a force).
    timestep
        Integration step (ps); ``n_steps`` steps per proposal.
    platform
        OpenMM platform for the CG Context (Reference is fastest for a few dozen beads).
    """

    def __init__(self, cg_system, timestep: float = 0.002, n_steps: int = 20, platform: str = "Reference") -> None:
        self._setup(cg_system, timestep, n_steps, platform)
        self.n_accepted = 0
        self.n_proposed = 0

    def _setup(self, cg_system, timestep: float, n_steps: int, platform: str) -> None:
        import openmm

        self.system, self.timestep, self.platform = cg_system, float(timestep), platform
        self.n_steps = int(n_steps)
        self.integrator = openmm.VerletIntegrator(timestep)
        self.context = openmm.Context(cg_system, self.integrator, openmm.Platform.getPlatformByName(platform))
        self.masses = np.array(
            [cg_system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(cg_system.getNumParticles())]
        )

    def _energies(self) -> tuple[float, float]:
        s = self.context.getState(getEnergy=True)
        return (
            s.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
            s.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole),
        )

    def propose(self, X: np.ndarray, beta: float, rng: np.random.Generator) -> tuple[np.ndarray, float, float]:
        self.context.setPositions(X)
        sd = np.sqrt(1.0 / (beta * self.masses))[:, None]  # nm/ps, from kT in kJ/mol and mass in Da
        self.context.setVelocities(rng.normal(size=X.shape) * sd)
        u0, k0 = self._energies()
        self.integrator.step(self.n_steps)
        u1, k1 = self._energies()
        self.n_proposed += 1
        if metropolis(np.array([-beta * ((u1 + k1) - (u0 + k0))]), rng)[0]:
            self.n_accepted += 1
            Xn = self.context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
            return np.asarray(Xn), beta * u0, beta * u1
        return X.copy(), beta * u0, beta * u0

    def __getstate__(self) -> dict:
        import openmm

        return {
            "system": openmm.XmlSerializer.serialize(self.system),
            "timestep": self.timestep,
            "n_steps": self.n_steps,
            "platform": self.platform,
            "n_accepted": self.n_accepted,
            "n_proposed": self.n_proposed,
        }

    def __setstate__(self, state: dict) -> None:
        import openmm

        self._setup(
            openmm.XmlSerializer.deserialize(state["system"]), state["timestep"], state["n_steps"], state["platform"]
        )
        self.n_accepted, self.n_proposed = state["n_accepted"], state["n_proposed"]


# ---------------------------------------------------------------------------- the move
@dataclass
class ResolutionStats:
    """Acceptance counts of a :class:`ResolutionMove`, and the log of every attempt since the move
    was made (or its statistics were set)."""

    n_proposed: int = 0
    n_accepted: int = 0
    log_acceptance: list[float] = field(default_factory=list)
    accepted: list[bool] = field(default_factory=list)

    def record(self, log_a: float, accept: bool) -> None:
        self.n_proposed += 1
        self.n_accepted += int(accept)
        self.log_acceptance.append(float(log_a))
        self.accepted.append(bool(accept))

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
        Seeds the move's generators: numpy's for the acceptance test and the kernel, and a
        :class:`TorchStream` for the models' draws (torch's global generator is left as it was).

    Like openmmtools' moves it keeps ``statistics`` (``n_accepted``, ``n_proposed``; the per-attempt
    log is in :attr:`stats`) and serialises with ``__getstate__`` / ``__setstate__``, generators
    included, so a restored move continues the same chain. The backmapper and the CG kernel are
    part of the state: a model loaded from a file (:func:`~openmm_backmap.io.backmap_model.load_model`)
    is stored as its path, a TorchScript CG model as its bytes.
    """

    def __init__(
        self,
        backmapper: Any,
        mapping: Any,
        cg_kernel: Any,
        n_attempts: int = 1,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.backmapper = backmapper
        self.matrix = _matrix(mapping)
        self.cg_kernel = cg_kernel
        self.n_attempts = int(n_attempts)
        self.rng = np.random.default_rng(seed)
        self.torch_stream = TorchStream(seed)
        self.dtype = dtype
        self.stats = ResolutionStats()

    @property
    def statistics(self) -> dict[str, int]:
        """The acceptance counts, ``{"n_accepted", "n_proposed"}`` (openmmtools' convention)."""
        return {"n_accepted": self.stats.n_accepted, "n_proposed": self.stats.n_proposed}

    @statistics.setter
    def statistics(self, value: dict[str, int]) -> None:
        self.stats = ResolutionStats(n_proposed=int(value["n_proposed"]), n_accepted=int(value["n_accepted"]))

    def reset_statistics(self) -> None:
        """Zero the acceptance counts and the per-attempt log."""
        self.stats = ResolutionStats()

    def __getstate__(self) -> dict:
        stats = self.stats
        return {
            "backmapper": self.backmapper,
            "matrix": self.matrix,
            "cg_kernel": self.cg_kernel,
            "n_attempts": self.n_attempts,
            "dtype": str(self.dtype).replace("torch.", ""),
            "rng": self.rng.bit_generator.state,
            "torch_stream": self.torch_stream.__getstate__(),
            "statistics": self.statistics,
            "log_acceptance": list(stats.log_acceptance),
            "accepted": list(stats.accepted),
        }

    def __setstate__(self, state: dict) -> None:
        self.backmapper, self.matrix, self.cg_kernel = state["backmapper"], state["matrix"], state["cg_kernel"]
        self.n_attempts = int(state["n_attempts"])
        self.dtype = getattr(torch, state["dtype"])
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = state["rng"]
        self.torch_stream = TorchStream.__new__(TorchStream)
        self.torch_stream.__setstate__(state["torch_stream"])
        self.statistics = state["statistics"]
        self.stats.log_acceptance, self.stats.accepted = list(state["log_acceptance"]), list(state["accepted"])

    def _log_q(self, x: np.ndarray, X: np.ndarray) -> float:
        with torch.no_grad():
            lq = self.backmapper.log_prob(
                torch.as_tensor(x[None], dtype=self.dtype), torch.as_tensor(X[None], dtype=self.dtype)
            )
        return float(lq[0])

    def _reduced_potential(self, context, thermodynamic_state, x: np.ndarray) -> float:
        context.setPositions(x)
        return float(thermodynamic_state.reduced_potential(context))

    def apply(self, thermodynamic_state, sampler_state, context_cache=None) -> None:
        """``n_attempts`` resolution moves from the sampler state's positions; beta and the reduced
        AA energy are the thermodynamic state's."""
        cache = self._get_context_cache(context_cache)
        context, _ = cache.get_context(thermodynamic_state)
        beta = 1.0 / thermodynamic_state.kT.value_in_unit(unit.kilojoule_per_mole)
        x = np.asarray(sampler_state.positions.value_in_unit(unit.nanometer), dtype=np.float64)
        if x.shape[0] != self.matrix.shape[1]:
            raise ValueError(f"the sampler state has {x.shape[0]} atoms; the mapping expects {self.matrix.shape[1]}")
        u_x = self._reduced_potential(context, thermodynamic_state, x)
        with self.torch_stream:
            # the current state's log q(x | M x): computed once, then taken from the accepted proposal
            log_q_x = self._log_q(x, self.matrix @ x)
            for _ in range(self.n_attempts):
                Xn, c_old, c_new = self.cg_kernel.propose(self.matrix @ x, beta, self.rng)
                with torch.no_grad():
                    xn_t, log_q_new = self.backmapper.sample(torch.as_tensor(Xn[None], dtype=self.dtype), 1)
                xn = xn_t[0].double().numpy()
                u_xn = self._reduced_potential(context, thermodynamic_state, xn)
                log_a = log_acceptance([u_xn], [float(log_q_new[0])], [c_new], [u_x], [log_q_x], [c_old])
                accept = bool(metropolis(log_a, self.rng)[0])
                self.stats.record(log_a[0], accept)
                if accept:
                    x, u_x, log_q_x = xn, u_xn, float(log_q_new[0])
        sampler_state.positions = x * unit.nanometer


# ---------------------------------------------------------------------------- many chains at once
class BatchedHybridSampler:
    """``n_chains`` independent hybrid chains advanced together, so that every model and energy
    call is one batch instead of ``n_chains`` batch-1 calls.

    Each :meth:`step` is, for every chain, optional AA Langevin dynamics (``langevin_steps``, fresh
    Maxwell-Boltzmann velocities, one OpenMM Context reused across chains) followed by one
    resolution move with the CG-flow kernel: X' ~ q_CG (rotated uniformly and placed on the chain's
    centroid when ``rigid``), x' ~ q(. | X'), accepted by :func:`metropolis` on the
    :func:`log_acceptance` of :class:`ResolutionMove`, with c(X) = -log q_CG(X).

    Every chain is a valid Markov chain for exp(-u) on its own: the batch changes the cost, not the
    statistics. u is beta U_AA from ``energy`` (a batched module such as
    :func:`openmm_backmap.openmm.energies.aa_energy`, float64), so the AA System needs no OpenMM round
    trip per sample.

    Parameters
    ----------
    backmapper
        The model file's interface: ``sample(cg, n)`` and ``log_prob(aa, cg)`` on torch tensors.
    cg_model
        A CG flow with ``sample(n) -> (X, log_q)`` and ``log_prob(X)`` (a CG potential model file).
    mapping
        The CG mapping or its (n_cg, n_aa) matrix.
    energy
        U_AA(x[B, n_aa, 3] nm) -> [B] kJ/mol.
    x0
        Starting AA positions (n_aa, 3) nm, shared by all chains, or (n_chains, n_aa, 3).
    system
        The AA openmm.System, needed only when ``langevin_steps > 0``.
    seed
        Seeds numpy's generator (rotations, velocities, the acceptance test) and the
        :class:`TorchStream` of the models' draws.
    """

    def __init__(
        self,
        backmapper: Any,
        cg_model: Any,
        mapping: Any,
        energy: Any,
        x0: np.ndarray,
        n_chains: int,
        temperature: float,
        rigid: bool = True,
        langevin_steps: int = 0,
        system: Any = None,
        timestep_fs: float = 2.0,
        collision_rate: float = 1.0,
        platform: str = "Reference",
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if n_chains < 1:
            raise ValueError(f"n_chains must be positive, got {n_chains}")
        self.backmapper = backmapper
        self.cg_model = cg_model
        self.matrix = _matrix(mapping)
        self.energy = energy
        self.n_chains = int(n_chains)
        self.beta = 1.0 / kT(temperature)
        self.temperature = float(temperature)
        self.rigid = bool(rigid)
        self.dtype = dtype
        self.rng = np.random.default_rng(seed)
        self.torch_stream = TorchStream(seed)
        x0 = np.asarray(x0, dtype=np.float64)
        if x0.ndim == 2:
            x0 = np.repeat(x0[None], self.n_chains, axis=0)
        if x0.shape != (self.n_chains, self.matrix.shape[1], 3):
            raise ValueError(
                f"starting positions have shape {x0.shape}; expected ({self.n_chains}, "
                f"{self.matrix.shape[1]}, 3) or ({self.matrix.shape[1]}, 3)"
            )
        if not np.all(np.isfinite(x0)):
            raise ValueError("the starting positions contain NaN or infinite values")
        self.langevin_steps = int(langevin_steps)
        self._context = None
        if self.langevin_steps > 0:
            import openmm

            if system is None:
                raise ValueError("langevin_steps > 0 needs the AA System")
            integrator = openmm.LangevinMiddleIntegrator(
                temperature * unit.kelvin, collision_rate / unit.picosecond, timestep_fs * unit.femtoseconds
            )
            integrator.setRandomNumberSeed(int(self.rng.integers(1, 2**30)))
            self._context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName(platform))
        self.x = x0
        self.n_proposed = 0
        self.n_accepted = 0
        self._refresh()

    def _u(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.beta * self.energy(torch.as_tensor(x, dtype=torch.float64)).double().numpy()

    def _refresh(self) -> None:
        """Reduced energies and log densities of the current states."""
        X = np.einsum("ca,naj->ncj", self.matrix, self.x)
        with torch.no_grad():
            self.log_q = (
                self.backmapper.log_prob(
                    torch.as_tensor(self.x, dtype=self.dtype), torch.as_tensor(X, dtype=self.dtype)
                )
                .double()
                .numpy()
            )
            self.log_q_cg = self.cg_model.log_prob(torch.as_tensor(X)).double().numpy()
        self.u = self._u(self.x)

    def _langevin(self) -> None:
        ctx = self._context
        for c in range(self.n_chains):
            ctx.setPositions(self.x[c])
            ctx.setVelocitiesToTemperature(self.temperature * unit.kelvin, int(self.rng.integers(1, 2**30)))
            ctx.getIntegrator().step(self.langevin_steps)
            pos = ctx.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
            self.x[c] = np.asarray(pos)
        if not np.all(np.isfinite(self.x)):
            raise RuntimeError("AA Langevin dynamics produced non-finite positions")

    def step(self, attempts: int = 1) -> np.ndarray:
        """One iteration of every chain: Langevin dynamics (when configured), then ``attempts``
        resolution moves; returns how many resolution moves each chain accepted."""
        if self._context is not None:
            self._langevin()
            self._refresh()
        accepted = np.zeros(self.n_chains, dtype=np.int64)
        with self.torch_stream:
            for _ in range(int(attempts)):
                accepted += self._resolution()
        return accepted

    def _resolution(self) -> np.ndarray:
        n = self.n_chains
        with torch.no_grad():
            Xn, log_q_cg_new = self.cg_model.sample(n)
        Xn = Xn.double().numpy()
        if self.rigid:
            centroid = np.einsum("ca,naj->nj", self.matrix, self.x) / self.matrix.shape[0]
            Xn = np.einsum("nij,ncj->nci", random_rotations(n, self.rng), Xn - Xn.mean(1, keepdims=True))
            Xn += centroid[:, None, :]
        with torch.no_grad():
            xn_t, log_q_new = self.backmapper.sample(torch.as_tensor(Xn, dtype=self.dtype), 1)
        xn = xn_t.double().numpy()
        log_q_new = log_q_new.double().numpy()
        log_q_cg_new = log_q_cg_new.double().numpy()
        u_new = self._u(xn)
        log_a = log_acceptance(u_new, log_q_new, -log_q_cg_new, self.u, self.log_q, -self.log_q_cg)
        accept = metropolis(log_a, self.rng)
        self.x[accept] = xn[accept]
        self.u[accept] = u_new[accept]
        self.log_q[accept] = log_q_new[accept]
        self.log_q_cg[accept] = log_q_cg_new[accept]
        self.n_proposed += n
        self.n_accepted += int(accept.sum())
        return accept

    @property
    def acceptance_rate(self) -> float:
        return self.n_accepted / max(self.n_proposed, 1)


# ---------------------------------------------------------------------------- a whole run
@dataclass(frozen=True)
class HybridRun:
    """Settings of :func:`run_hybrid` (the options of ``openmm-backmap hybrid``).

    Attributes
    ----------
    iterations
        Chain iterations: ``langevin_steps`` of AA Langevin dynamics, then ``attempts`` resolution moves.
    kernel
        ``flow`` (independent draws from the CG flow) or ``hmc`` (Hamiltonian Monte Carlo on the
        CG System with the CG potential as a force: ``hmc_steps`` steps of ``hmc_timestep_fs``).
    timestep_fs, collision_rate
        AA Langevin dynamics: step (fs) and friction (1/ps).
    temperature
        Kelvin; None for the model's.
    seed, platform, progress
        Seeds every generator of the run; the OpenMM platform; a progress bar.
    chains, save_every, burn_in
        ``chains > 1`` (CG-flow kernel only) runs that many chains in a :class:`BatchedHybridSampler`,
        writes every chain's frame every ``save_every`` iterations and leaves the first ``burn_in``
        fraction of iterations out of the summary's populations.
    """

    iterations: int
    kernel: str = "flow"
    langevin_steps: int = 250
    timestep_fs: float = 2.0
    collision_rate: float = 1.0
    attempts: int = 1
    hmc_steps: int = 20
    hmc_timestep_fs: float = 2.0
    temperature: float | None = None
    seed: int = 0
    platform: str = "Reference"
    chains: int = 1
    save_every: int = 1
    burn_in: float = 0.1
    progress: bool = True

    def check(self) -> None:
        """Raise ValueError for settings no run can have."""
        if self.iterations < 1:
            raise ValueError(f"iterations must be positive, got {self.iterations}")
        if self.chains < 1:
            raise ValueError(f"chains must be positive, got {self.chains}")
        if self.kernel not in ("flow", "hmc"):
            raise ValueError(f"unknown CG kernel {self.kernel!r}; choose 'flow' or 'hmc'")
        if self.chains > 1 and self.kernel != "flow":
            raise ValueError(
                f"chains > 1 runs the CG-flow kernel only (the {self.kernel!r} kernel is one chain at a time)"
            )
        if self.save_every < 1:
            raise ValueError(f"save_every must be positive, got {self.save_every}")
        if not 0.0 <= self.burn_in < 1.0:
            raise ValueError(f"burn_in must be a fraction in [0, 1), got {self.burn_in}")


@dataclass
class _Inputs:
    """What a run samples with: the backmapper, the AA System, the start, the CG model."""

    model: Any
    system: Any
    topology: Any  # openmm.app.Topology of the AA system
    x0: np.ndarray
    cg_path: str
    cg_module: Any
    cg_meta: dict
    temperature: float


def _load_inputs(
    model: Any, cg_model: str, start: str, aa_system: Any, temperature: float | None, cg_topology: Any = None
) -> _Inputs:
    """Load and cross-check the backmapper, the AA System (default: the model file's; amber14 +
    GBn2 for a protein model, bound to the start's chain or to ``cg_topology``), the start
    structure and the CG potential model file."""
    from openmm import app

    from openmm_backmap.analysis.evaluate import bind_protein_model, chain_frames, is_protein_model

    pdb = app.PDBFile(str(start))
    topology = pdb.topology
    x0 = np.asarray(pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    if is_protein_model(model):
        bm, perm = bind_protein_model(model, topology, cg_topology)
        system = protein_system(bm, aa_system, perm)
        x0 = chain_frames(bm, x0[None], perm)[0]
        topology = bm.topology.to_openmm()
    else:
        bm = model if hasattr(model, "sample") else load_model(model, device="cpu")
        system_src = aa_system if aa_system is not None else bm.system_xml
        if system_src is None:
            raise ValueError("the hybrid sampler needs the AA System: the model file embeds none, pass --aa-system")
        system = load_system(system_src)
        check_system_matches(system, bm.metadata["elements"], "the AA System", f"the model {bm.path}")
        bm.check_topology(pdb.topology)
    cg_module, cg_meta = load_cg_potential(cg_model)
    if int(cg_meta["n_beads"]) != bm.n_cg:
        raise ValueError(f"the CG model has {cg_meta['n_beads']} beads but the backmapper expects {bm.n_cg}")
    temperature = float(temperature if temperature is not None else bm.temperature)
    return _Inputs(bm, system, topology, x0, str(cg_model), cg_module, cg_meta, temperature)


def run_hybrid(
    model: Any,
    cg_model: str,
    start: str,
    out_dir: str,
    settings: HybridRun,
    aa_system: Any = None,
    cg_topology: Any = None,
) -> dict:
    """Run the hybrid chain(s) of ``settings`` and write ``trajectory.dcd``, ``acceptance.csv`` and
    ``summary.json`` (basin populations with block-averaged errors) to ``out_dir``; returns the summary.

    One chain (:class:`ResolutionMove` after an openmmtools ``LangevinDynamicsMove``) writes one AA
    frame per iteration and one ``acceptance.csv`` row per resolution attempt. Many chains
    (:class:`BatchedHybridSampler`) write every chain's frame (chain-major within an iteration)
    every ``save_every`` iterations, one ``acceptance.csv`` row per iteration, and ``basins.csv``,
    the fraction of chains in each basin per iteration.

    Parameters
    ----------
    model
        Backmapper model file (or a loaded :class:`~openmm_backmap.io.backmap_model.BackmapModel`),
        or a protein model (``protein-ca``, ``protein-backbone``, a protein model file), bound to
        the chain of ``start`` (or of ``cg_topology``); frames are then written in the model's atom
        order (amber14 templates) and U_AA is amber14 + GBn2 with the model's constraint lengths.
    cg_model
        CG potential model file (``openmm-backmap train-cg`` + ``export``).
    start
        PDB file with the starting AA structure (of every chain).
    settings
        :class:`HybridRun`.
    aa_system
        AA System (object or XML path); by default the one embedded in the model file.
    cg_topology
        For a protein model: the CG topology to bind it to (default: the beads of ``start``).
    """
    import json

    settings.check()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    inputs = _load_inputs(model, cg_model, start, aa_system, settings.temperature, cg_topology)
    run = _run_batched if settings.chains > 1 else _run_single
    summary = run(inputs, settings, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _run_single(inputs: _Inputs, s: HybridRun, out: Path) -> dict:
    """One chain as openmmtools moves: Langevin dynamics, then the resolution move."""
    import csv
    import time

    import mdtraj as md
    import openmm
    from openmm import app
    from openmmtools import cache, states
    from tqdm.auto import tqdm

    bm, system = inputs.model, inputs.system
    if s.kernel == "flow":
        cg_kernel = CGFlowKernel(inputs.cg_module, rigid=not system.usesPeriodicBoundaryConditions())
    else:
        masses = inputs.cg_meta.get("masses") or bm.mapping.masses()
        cg_system = create_cg_system(np.asarray(masses, dtype=float), inputs.cg_path)
        cg_kernel = CGHamiltonianKernel(
            cg_system, timestep=s.hmc_timestep_fs / 1000.0, n_steps=s.hmc_steps, platform=s.platform
        )
    resolution = ResolutionMove(proposal_model(bm), bm.mapping, cg_kernel, n_attempts=s.attempts, seed=s.seed)
    moves = [resolution]
    if s.langevin_steps > 0:
        langevin = mcmc.LangevinDynamicsMove(
            timestep=s.timestep_fs * unit.femtoseconds,
            collision_rate=s.collision_rate / unit.picosecond,
            n_steps=s.langevin_steps,
        )
        moves.insert(0, langevin)
    move = mcmc.SequenceMove(moves)
    thermo = states.ThermodynamicState(system, temperature=inputs.temperature * unit.kelvin)
    sampler = states.SamplerState(inputs.x0 * unit.nanometer)
    context_cache = cache.ContextCache(platform=openmm.Platform.getPlatformByName(s.platform))

    stats = resolution.stats
    start_time = time.perf_counter()
    with open(out / "trajectory.dcd", "wb") as dcd_fh, open(out / "acceptance.csv", "w", newline="") as acc_fh:
        dcd = app.DCDFile(dcd_fh, inputs.topology, s.timestep_fs * unit.femtoseconds, 0, max(s.langevin_steps, 1))
        writer = csv.writer(acc_fh)
        writer.writerow(["iteration", "attempt", "log_acceptance", "accepted"])
        for it in tqdm(range(s.iterations), desc="hybrid", unit="it", disable=not s.progress):
            before = len(stats.log_acceptance)
            move.apply(thermo, sampler, context_cache)
            x = sampler.positions.value_in_unit(unit.nanometer)
            if not np.all(np.isfinite(x)):
                raise RuntimeError(f"the hybrid chain produced non-finite positions at iteration {it}")
            dcd.writeModel(np.asarray(x) * unit.nanometer)
            for a in range(before, len(stats.log_acceptance)):
                writer.writerow([it, a - before, f"{stats.log_acceptance[a]:.6g}", int(stats.accepted[a])])
            dcd_fh.flush()
            acc_fh.flush()
    wall = time.perf_counter() - start_time
    traj = md.load(str(out / "trajectory.dcd"), top=md.Topology.from_openmm(inputs.topology))
    summary: dict[str, Any] = {
        "iterations": int(s.iterations),
        "kernel": s.kernel,
        "langevin_steps_per_iteration": int(s.langevin_steps),
        "resolution_attempts_per_iteration": int(s.attempts),
        "acceptance_rate": stats.acceptance_rate,
        "temperature_K": inputs.temperature,
        "wall_seconds": wall,
    }
    if isinstance(cg_kernel, CGHamiltonianKernel):
        summary["cg_hmc_acceptance_rate"] = cg_kernel.n_accepted / max(cg_kernel.n_proposed, 1)
    try:
        summary["basins"] = basin_populations(traj)
    except ValueError:
        pass  # not a peptide: no (phi, psi)
    return summary


def _run_batched(inputs: _Inputs, s: HybridRun, out: Path) -> dict:
    """``s.chains`` chains in a :class:`BatchedHybridSampler`, with the basin log."""
    import csv
    import time

    import mdtraj as md
    from openmm import app
    from tqdm.auto import tqdm

    system, chains = inputs.system, s.chains
    sampler = BatchedHybridSampler(
        proposal_model(inputs.model),
        inputs.cg_module,
        inputs.model.mapping,
        aa_energy(system),
        inputs.x0,
        chains,
        inputs.temperature,
        rigid=not system.usesPeriodicBoundaryConditions(),
        langevin_steps=s.langevin_steps,
        system=system,
        timestep_fs=s.timestep_fs,
        collision_rate=s.collision_rate,
        platform=s.platform,
        seed=s.seed,
    )
    try:
        torsions = np.asarray(backbone_torsions(inputs.topology), dtype=np.int64)
    except ValueError:
        torsions = None  # not a peptide: no basins
    md_top = md.Topology.from_openmm(inputs.topology)
    fractions = np.zeros((s.iterations, len(BASINS)))
    start_time = time.perf_counter()
    with (
        open(out / "trajectory.dcd", "wb") as dcd_fh,
        open(out / "acceptance.csv", "w", newline="") as acc_fh,
        open(out / "basins.csv", "w", newline="") as basin_fh,
    ):
        dcd = app.DCDFile(
            dcd_fh, inputs.topology, s.timestep_fs * unit.femtoseconds, 0, max(s.langevin_steps, 1) * s.save_every
        )
        acc = csv.writer(acc_fh)
        acc.writerow(["iteration", "chains", "attempts", "accepted"])
        basins = csv.writer(basin_fh)
        basins.writerow(["iteration", *BASINS])
        for it in tqdm(range(s.iterations), desc=f"hybrid x{chains}", unit="it", disable=not s.progress):
            accepted = sampler.step(s.attempts)
            acc.writerow([it, chains, s.attempts, int(accepted.sum())])
            if torsions is not None:
                ang = np.degrees(md.compute_dihedrals(md.Trajectory(sampler.x.astype(np.float32), md_top), torsions))
                ind = basin_indicators(ang[:, 0::2], ang[:, 1::2])
                fractions[it] = [ind[b].mean() for b in BASINS]
                basins.writerow([it, *(f"{v:.6g}" for v in fractions[it])])
            if it % s.save_every == 0:
                for c in range(chains):
                    dcd.writeModel(sampler.x[c] * unit.nanometer)
                dcd_fh.flush()
            acc_fh.flush()
    wall = time.perf_counter() - start_time
    first = int(round(s.burn_in * s.iterations))
    summary: dict[str, Any] = {
        "iterations": int(s.iterations),
        "chains": int(chains),
        "kernel": "flow",
        "langevin_steps_per_iteration": int(s.langevin_steps),
        "resolution_attempts_per_iteration": int(s.attempts),
        "acceptance_rate": sampler.acceptance_rate,
        "temperature_K": float(inputs.temperature),
        "wall_seconds": wall,
        "burn_in_iterations": first,
        "samples": int((s.iterations - first) * chains),
    }
    if torsions is not None:
        summary["basins"] = {}
        for k, name in enumerate(BASINS):
            mean, err = block_average(fractions[first:, k], 10)
            summary["basins"][name] = {"population": mean, "error": err}
    return summary
