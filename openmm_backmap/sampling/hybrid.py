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
from openmm_backmap.geometry import random_rotation, random_rotations

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
        # the current state's log q(x | M x): computed once, then taken from the accepted proposal
        log_q_x = self._log_q(x, self.matrix @ x)
        for _ in range(self.n_attempts):
            X = self.matrix @ x
            Xn, c_old, c_new = self.cg_kernel.propose(X, beta, self.rng)
            with torch.no_grad():
                xn_t, log_q_new = self.backmapper.sample(torch.as_tensor(Xn[None], dtype=self.dtype), 1)
            xn = xn_t[0].double().numpy()
            u_xn = self._reduced_potential(context, thermodynamic_state, xn)
            log_a = (-u_xn - float(log_q_new[0]) + c_new) - (-u_x - log_q_x + c_old)
            accept = bool(np.isfinite(log_a) and math.log(self.rng.uniform()) < min(0.0, log_a))
            self.stats.log_acceptance.append(float(log_a) if np.isfinite(log_a) else -math.inf)
            self.stats.accepted.append(accept)
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
    centroid when ``rigid``), x' ~ q(. | X'), accepted with

        log a = [-u(x') - log q(x'|X') - log q_CG(X')] - [-u(x) - log q(x|X) - log q_CG(X)].

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
    """

    def __init__(self, backmapper: Any, cg_model: Any, mapping: Any, energy: Any, x0: np.ndarray, n_chains: int,
                 temperature: float, rigid: bool = True, langevin_steps: int = 0, system: Any = None,
                 timestep_fs: float = 2.0, collision_rate: float = 1.0, platform: str = "Reference",
                 seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        from openmm_backmap.openmm.energies import kT

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
        torch.manual_seed(seed)
        x0 = np.asarray(x0, dtype=np.float64)
        if x0.ndim == 2:
            x0 = np.repeat(x0[None], self.n_chains, axis=0)
        if x0.shape != (self.n_chains, self.matrix.shape[1], 3):
            raise ValueError(f"starting positions have shape {x0.shape}; expected ({self.n_chains}, "
                             f"{self.matrix.shape[1]}, 3) or ({self.matrix.shape[1]}, 3)")
        if not np.all(np.isfinite(x0)):
            raise ValueError("the starting positions contain NaN or infinite values")
        self.langevin_steps = int(langevin_steps)
        self._context = None
        if self.langevin_steps > 0:
            import openmm

            if system is None:
                raise ValueError("langevin_steps > 0 needs the AA System")
            integrator = openmm.LangevinMiddleIntegrator(temperature * unit.kelvin, collision_rate / unit.picosecond,
                                                         timestep_fs * unit.femtoseconds)
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
            self.log_q = self.backmapper.log_prob(torch.as_tensor(self.x, dtype=self.dtype),
                                                  torch.as_tensor(X, dtype=self.dtype)).double().numpy()
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
        with np.errstate(invalid="ignore"):  # inf - inf: both states impossible, refused below
            log_a = (-u_new - log_q_new - log_q_cg_new) - (-self.u - self.log_q - self.log_q_cg)
        log_a = np.where(np.isnan(log_a), -np.inf, log_a)
        accept = np.log(self.rng.uniform(size=n)) < np.minimum(log_a, 0.0)
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
def block_average(values: np.ndarray, n_blocks: int = 10) -> tuple[float, float]:
    """Mean of a time series and its standard error from ``n_blocks`` contiguous block means."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values) // n_blocks * n_blocks
    if n < n_blocks:
        return float(values.mean()) if len(values) else float("nan"), float("nan")
    blocks = values[:n].reshape(n_blocks, -1).mean(1)
    return float(values.mean()), float(blocks.std(ddof=1) / np.sqrt(n_blocks))


def basin_populations(traj, n_blocks: int = 10) -> dict[str, dict[str, float]]:
    """Basin populations (:data:`openmm_backmap.systems.builtin.BASINS`) of a peptide trajectory with
    block-averaged standard errors, pooled over the residues that have both phi and psi."""
    from openmm_backmap.systems.builtin import backbone_dihedrals, basin_indicators

    phi, psi = backbone_dihedrals(traj)
    out = {}
    for name, ind in basin_indicators(phi, psi).items():
        mean, err = block_average(ind.mean(1), n_blocks)
        out[name] = {"population": mean, "error": err}
    return out


def run_hybrid(
    model: Any,
    cg_model: str,
    start: str,
    iterations: int,
    out_dir: str,
    aa_system: Any = None,
    kernel: str = "flow",
    langevin_steps: int = 250,
    timestep_fs: float = 2.0,
    collision_rate: float = 1.0,
    attempts: int = 1,
    hmc_steps: int = 20,
    hmc_timestep_fs: float = 2.0,
    temperature: float | None = None,
    seed: int = 0,
    platform: str = "Reference",
    progress: bool = True,
    chains: int = 1,
    save_every: int = 1,
    burn_in: float = 0.1,
) -> dict:
    """Run the hybrid chain: per iteration ``langevin_steps`` of AA Langevin dynamics, then
    ``attempts`` resolution moves. Writes ``trajectory.dcd`` (one AA frame per iteration),
    ``acceptance.csv`` (one row per resolution attempt) and ``summary.json``; returns the summary.

    With ``chains > 1`` (CG-flow kernel only) that many chains run together in a
    :class:`BatchedHybridSampler`: ``trajectory.dcd`` holds every chain's frame (chain-major within
    an iteration) every ``save_every`` iterations, ``acceptance.csv`` one row per iteration, and
    ``basins.csv`` the fraction of chains in each basin per iteration; the summary's populations
    leave out the first ``burn_in`` fraction of iterations (all chains start from ``start``).

    Parameters
    ----------
    model
        Backmapper model file (or a loaded :class:`~openmm_backmap.io.model_files.BackmapModel`).
    cg_model
        CG potential model file (``openmm-backmap train-cg`` + ``export``).
    start
        PDB file with the starting AA structure.
    kernel
        ``flow`` (independent draws from the CG flow) or ``hmc`` (Hamiltonian Monte Carlo on the
        CG System with the CG potential as a force).
    aa_system
        AA System (object or XML path); by default the one embedded in the model file.
    """
    import csv
    import json
    import time
    from pathlib import Path

    import mdtraj as md
    import openmm
    from openmm import app
    from tqdm.auto import tqdm

    from openmm_backmap.openmm.energies import load_system
    from openmm_backmap.io.model_files import load_model
    from openmm_backmap.models.cg_potential import load_cg_potential

    from openmmtools import cache, states

    if iterations < 1:
        raise ValueError(f"iterations must be positive, got {iterations}")
    if chains < 1:
        raise ValueError(f"chains must be positive, got {chains}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bm = model if hasattr(model, "sample") else load_model(model, device="cpu")
    system_src = aa_system if aa_system is not None else bm.system_xml
    if system_src is None:
        raise ValueError("the hybrid sampler needs the AA System: the model file embeds none, pass --aa-system")
    system = load_system(system_src)
    if system.getNumParticles() != bm.n_aa:
        raise ValueError(f"the AA System has {system.getNumParticles()} particles but the model has {bm.n_aa} atoms")
    pdb = app.PDBFile(str(start))
    bm.check_topology(pdb.topology)
    x0 = np.asarray(pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    cg_module, cg_meta = load_cg_potential(cg_model)
    if int(cg_meta["n_beads"]) != bm.n_cg:
        raise ValueError(f"the CG model has {cg_meta['n_beads']} beads but the backmapper expects {bm.n_cg}")
    temperature = float(temperature if temperature is not None else bm.temperature)
    rng_seed = int(seed)
    if chains > 1:
        if kernel != "flow":
            raise ValueError(f"chains > 1 runs the CG-flow kernel only (the {kernel!r} kernel is one chain at a time)")
        return _run_batched(bm, system, pdb.topology, x0, cg_module, out, iterations, chains, attempts,
                            langevin_steps, timestep_fs, collision_rate, temperature, rng_seed, platform, progress,
                            save_every, burn_in)
    if kernel == "flow":
        cg_kernel = CGFlowKernel(cg_module, rigid=not system.usesPeriodicBoundaryConditions())
    elif kernel == "hmc":
        from openmm_backmap.openmm.forces import create_cg_system

        masses = cg_meta.get("masses") or bm.mapping.masses()
        cg_system = create_cg_system(np.asarray(masses, dtype=float), str(cg_model))
        cg_kernel = CGHamiltonianKernel(cg_system, timestep=hmc_timestep_fs / 1000.0, n_steps=hmc_steps,
                                        platform=platform, seed=rng_seed)
    else:
        raise ValueError(f"unknown CG kernel {kernel!r}; choose 'flow' or 'hmc'")
    resolution = ResolutionMove(bm, bm.mapping, cg_kernel, n_attempts=attempts, seed=rng_seed)
    moves = [resolution]
    if langevin_steps > 0:
        langevin = mcmc.LangevinDynamicsMove(timestep=timestep_fs * unit.femtoseconds,
                                             collision_rate=collision_rate / unit.picosecond, n_steps=langevin_steps)
        moves.insert(0, langevin)
    move = mcmc.SequenceMove(moves)
    thermo = states.ThermodynamicState(system, temperature=temperature * unit.kelvin)
    sampler = states.SamplerState(x0 * unit.nanometer)
    context_cache = cache.ContextCache(platform=openmm.Platform.getPlatformByName(platform))
    torch.manual_seed(rng_seed)

    start_time = time.perf_counter()
    with open(out / "trajectory.dcd", "wb") as dcd_fh, open(out / "acceptance.csv", "w", newline="") as acc_fh:
        dcd = app.DCDFile(dcd_fh, pdb.topology, timestep_fs * unit.femtoseconds, 0, max(langevin_steps, 1))
        writer = csv.writer(acc_fh)
        writer.writerow(["iteration", "attempt", "log_acceptance", "accepted"])
        for it in tqdm(range(iterations), desc="hybrid", unit="it", disable=not progress):
            before = resolution.stats.n_proposed
            move.apply(thermo, sampler, context_cache)
            x = sampler.positions.value_in_unit(unit.nanometer)
            if not np.all(np.isfinite(x)):
                raise RuntimeError(f"the hybrid chain produced non-finite positions at iteration {it}")
            dcd.writeModel(np.asarray(x) * unit.nanometer)
            for a in range(before, resolution.stats.n_proposed):
                writer.writerow([it, a - before, f"{resolution.stats.log_acceptance[a]:.6g}",
                                 int(resolution.stats.accepted[a])])
            dcd_fh.flush()
            acc_fh.flush()
    wall = time.perf_counter() - start_time
    traj = md.load(str(out / "trajectory.dcd"), top=md.Topology.from_openmm(pdb.topology))
    summary: dict[str, Any] = {
        "iterations": int(iterations),
        "kernel": kernel,
        "langevin_steps_per_iteration": int(langevin_steps),
        "resolution_attempts_per_iteration": int(attempts),
        "acceptance_rate": resolution.stats.acceptance_rate,
        "temperature_K": temperature,
        "wall_seconds": wall,
    }
    if isinstance(cg_kernel, CGHamiltonianKernel):
        summary["cg_hmc_acceptance_rate"] = cg_kernel.n_accepted / max(cg_kernel.n_proposed, 1)
    try:
        summary["basins"] = basin_populations(traj)
    except ValueError:
        pass  # not a peptide: no (phi, psi)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _run_batched(bm, system, topology, x0, cg_module, out, iterations, chains, attempts, langevin_steps, timestep_fs,
                 collision_rate, temperature, seed, platform, progress, save_every, burn_in) -> dict:
    """run_hybrid with ``chains`` chains in a :class:`BatchedHybridSampler`."""
    import csv
    import json
    import time

    import mdtraj as md
    from openmm import app
    from tqdm.auto import tqdm

    from openmm_backmap.systems.builtin import BASINS, backbone_torsions, basin_indicators
    from openmm_backmap.openmm.energies import aa_energy

    if save_every < 1:
        raise ValueError(f"save_every must be positive, got {save_every}")
    if not 0.0 <= burn_in < 1.0:
        raise ValueError(f"burn_in must be a fraction in [0, 1), got {burn_in}")
    sampler = BatchedHybridSampler(bm, cg_module, bm.mapping, aa_energy(system), x0, chains, temperature,
                                   rigid=not system.usesPeriodicBoundaryConditions(), langevin_steps=langevin_steps,
                                   system=system, timestep_fs=timestep_fs, collision_rate=collision_rate,
                                   platform=platform, seed=seed)
    try:
        torsions = np.asarray(backbone_torsions(topology), dtype=np.int64)
    except ValueError:
        torsions = None  # not a peptide: no basins
    md_top = md.Topology.from_openmm(topology)
    fractions = np.zeros((iterations, len(BASINS)))
    start_time = time.perf_counter()
    with (open(out / "trajectory.dcd", "wb") as dcd_fh, open(out / "acceptance.csv", "w", newline="") as acc_fh,
          open(out / "basins.csv", "w", newline="") as basin_fh):
        dcd = app.DCDFile(dcd_fh, topology, timestep_fs * unit.femtoseconds, 0, max(langevin_steps, 1) * save_every)
        acc = csv.writer(acc_fh)
        acc.writerow(["iteration", "chains", "attempts", "accepted"])
        basins = csv.writer(basin_fh)
        basins.writerow(["iteration", *BASINS])
        for it in tqdm(range(iterations), desc=f"hybrid x{chains}", unit="it", disable=not progress):
            accepted = sampler.step(attempts)
            acc.writerow([it, chains, attempts, int(accepted.sum())])
            if torsions is not None:
                ang = np.degrees(md.compute_dihedrals(md.Trajectory(sampler.x.astype(np.float32), md_top), torsions))
                ind = basin_indicators(ang[:, 0::2], ang[:, 1::2])
                fractions[it] = [ind[b].mean() for b in BASINS]
                basins.writerow([it, *(f"{v:.6g}" for v in fractions[it])])
            if it % save_every == 0:
                for c in range(chains):
                    dcd.writeModel(sampler.x[c] * unit.nanometer)
                dcd_fh.flush()
            acc_fh.flush()
    wall = time.perf_counter() - start_time
    first = int(round(burn_in * iterations))
    summary: dict[str, Any] = {
        "iterations": int(iterations),
        "chains": int(chains),
        "kernel": "flow",
        "langevin_steps_per_iteration": int(langevin_steps),
        "resolution_attempts_per_iteration": int(attempts),
        "acceptance_rate": sampler.acceptance_rate,
        "temperature_K": float(temperature),
        "wall_seconds": wall,
        "burn_in_iterations": first,
        "samples": int((iterations - first) * chains),
    }
    if torsions is not None:
        summary["basins"] = {}
        for k, name in enumerate(BASINS):
            mean, err = block_average(fractions[first:, k], 10)
            summary["basins"][name] = {"population": mean, "error": err}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
