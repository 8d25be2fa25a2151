"""Independent moves from a CG flow inside an OpenMM simulation: barrier crossing that stays exact.

A CG potential trained as a normalizing flow, U_CG(X) = -kT log q(X) (+ priors), can be sampled
without dynamics. :class:`CGFlowMoves` lets an ordinary OpenMM CG simulation use that: every
``interval`` steps it draws X' ~ q (a uniform random rotation, placed on the centroid of the current
beads, for a density invariant under rigid motions) and accepts with probability min(1, exp(log a)),

    log a = -beta [U(X') - U(X)] - log q(X') + log q(X),

a Metropolis independence move. U is the energy of the force groups the integrator integrates, so
the simulation keeps sampling exp(-beta U) exactly whatever the System holds beyond the flow (other
forces, other molecules, a force field that is not the flow at all): the flow only sets how often a
move is accepted. When U is the flow's own potential, log a is the difference of the priors, and a
move is an independent sample of the CG ensemble: the run crosses every barrier the flow has mass
across, which Langevin dynamics on the same potential may take microseconds to do. The velocities
are kept (the moves leave the Maxwell-Boltzmann factor alone), so the trajectory between moves is
ordinary dynamics; time correlations across a move are not physical.

Like OpenMM's ``SimulatedTempering``, the moves ride on the reporter protocol:
``simulation.reporters.append(CGFlowMoves("cg.pt", 100))``. A move is made at the start of the
first step after its step is reached, after every reporter has reported that step, so reporters
(the :class:`~openmm_backmap.openmm.reporter.BackmapReporter` among them) always see configurations
of the chain, never a rejected proposal.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from openmm import unit

from openmm_backmap.geometry import random_placement
from openmm_backmap.io.model_files import is_compiled_package, load_cg_potential, load_model_bytes
from openmm_backmap.openmm.reporter import _copies
from openmm_backmap.rng import TorchStream
from openmm_backmap.units import kT

__all__ = ["CGFlowMoves"]


def _load_flow(model: Any) -> Any:
    """A CG flow with ``sample(n)`` and ``log_prob(X)`` from a CG potential model file or a module."""
    if isinstance(model, (str, os.PathLike)):
        data = load_model_bytes(model)
        if is_compiled_package(data):
            raise ValueError(
                f"{model}: a compiled force package cannot draw samples; give CGFlowMoves the CG potential "
                "file (.pt) it was compiled from"
            )
        return load_cg_potential(Path(model))[0]
    for name in ("sample", "log_prob"):
        if not hasattr(model, name):
            raise TypeError(
                f"CGFlowMoves needs a CG flow with sample(n) and log_prob(X); {type(model).__name__} has no {name}"
            )
    return model


class CGFlowMoves:
    """Metropolis independence moves X -> X' ~ q_CG in an OpenMM simulation (module docstring).

    Parameters
    ----------
    model
        The CG potential model file (``.pt``, from ``export`` or ``train-cg``) or a loaded CG flow
        (``sample(n) -> (X[n, n_cg, 3] nm, log_q[n])``, ``log_prob(X) -> [B]``). The compiled
        ``.pt2`` the simulation may run has no sampler: give the ``.pt`` it came from.
    interval
        Steps between moves.
    atomSubset
        The molecule's particle indices in the System, in the model's bead order (mdtraj's name,
        as in the reporter), or a list of such lists for several copies, each moved by its own
        test; None: the System is the molecule.
    temperature
        Kelvin; by default the integrator's (``getTemperature()``).
    seed
        Seeds the draws, the rotations and the Metropolis tests (None: fresh entropy).
    rigid
        Rotate the draw uniformly and place it on the current centroid (a density invariant under
        rigid motions: vacuum, implicit solvent, a molecule in a box). False uses the draw as it is.
    batch
        Draws made per call to the flow (independent draws: buffering them changes nothing).

    Attributes
    ----------
    nProposed, nAccepted
        Moves made and accepted (summed over copies).
    """

    def __init__(
        self,
        model: Any,
        interval: int,
        atomSubset: Any = None,
        temperature: float | None = None,
        seed: int | None = None,
        rigid: bool = True,
        batch: int = 256,
    ) -> None:
        if int(interval) < 1:
            raise ValueError(f"CGFlowMoves: interval must be >= 1 step, got {interval}")
        if int(batch) < 1:
            raise ValueError(f"CGFlowMoves: batch must be >= 1, got {batch}")
        self.model = _load_flow(model)
        self._interval = int(interval)
        self._copies = _copies(atomSubset)
        self._temperature = None if temperature is None else float(temperature)
        self._rng = np.random.default_rng(seed)
        self._stream = TorchStream(int(self._rng.integers(2**62)))  # the flow draws from torch's global generator
        self._rigid = bool(rigid)
        self._batch = int(batch)
        self._draws: list[tuple[np.ndarray, float]] = []
        self._due: int | None = None
        self._checked = False
        self._all = np.zeros((0, 0), dtype=np.int64)  # (copies, beads) particles moved, set by _check
        self._dtype = torch.float64  # the flow's dtype, set by its first draws
        self._beta = 0.0
        self._groups = -1
        self.nProposed = 0
        self.nAccepted = 0

    @property
    def acceptanceRate(self) -> float:
        """Fraction of the moves accepted so far (NaN before the first)."""
        return self.nAccepted / self.nProposed if self.nProposed else float("nan")

    # ------------------------------------------------------------------ the reporter protocol
    def describeNextReport(self, simulation) -> dict:
        step = int(simulation.currentStep)
        if self._due is not None and self._due == step:
            self._due = None
            self._move(simulation)
        return {"steps": self._interval - step % self._interval, "periodic": False, "include": []}

    def report(self, simulation, state) -> None:
        # every reporter of this step reports before the next describeNextReport, where the move is made
        self._due = int(simulation.currentStep)

    # ------------------------------------------------------------------ the move
    def _check(self, simulation) -> None:
        system, integrator = simulation.system, simulation.integrator
        n = system.getNumParticles()
        copies = self._copies if self._copies is not None else np.arange(n)[None]
        n_cg = self._n_cg()
        if copies.shape[1] != n_cg:
            what = "atomSubset selects" if self._copies is not None else "the System has"
            raise ValueError(
                f"CGFlowMoves: {what} {copies.shape[1]} particles per copy but the CG flow has {n_cg} beads"
                + ("" if self._copies is not None else "; pass atomSubset= for a System that holds other particles")
            )
        if int(copies.max()) >= n:
            raise ValueError(
                f"CGFlowMoves: atomSubset has particle {int(copies.max())}, but the System has {n} particles"
            )
        moved = set(int(i) for i in copies.ravel())
        for c in range(system.getNumConstraints()):
            i, j, _ = system.getConstraintParameters(c)
            if i in moved or j in moved:
                raise ValueError(
                    f"CGFlowMoves: constraint {c} holds particles {i} and {j}, which the moves would place "
                    "freely; flow moves need an unconstrained molecule"
                )
        for i in moved:
            if system.isVirtualSite(i):
                raise ValueError(f"CGFlowMoves: particle {i} is a virtual site and cannot be moved")
        temperature = self._temperature
        if temperature is None:
            if not hasattr(integrator, "getTemperature"):
                raise ValueError(
                    f"CGFlowMoves: {type(integrator).__name__} has no temperature; pass temperature= (kelvin)"
                )
            temperature = integrator.getTemperature().value_in_unit(unit.kelvin)
        self._beta = 1.0 / kT(temperature)
        groups = integrator.getIntegrationForceGroups() if hasattr(integrator, "getIntegrationForceGroups") else -1
        self._groups = -1 if (groups & 0xFFFFFFFF) == 0xFFFFFFFF else int(groups)
        self._all = copies
        self._checked = True

    def _n_cg(self) -> int:
        n_cg = getattr(self.model, "n_cg", None)
        if n_cg is None:
            n_cg = int(self._draw()[0].shape[0])
        return int(n_cg)

    def _draw(self) -> tuple[np.ndarray, float]:
        if not self._draws:
            with self._stream, torch.no_grad():
                X, log_q = self.model.sample(self._batch)
            self._dtype = X.dtype
            X, log_q = X.double().numpy(), log_q.double().numpy()
            self._draws = [(X[i], float(log_q[i])) for i in range(len(X) - 1, -1, -1)]
        return self._draws.pop()

    def _log_q(self, X: np.ndarray) -> float:
        with torch.no_grad():
            return float(self.model.log_prob(torch.as_tensor(X[None], dtype=self._dtype))[0])

    def _energy(self, context) -> float:
        state = context.getState(getEnergy=True, groups=self._groups)
        return state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)

    def _move(self, simulation) -> None:
        if not self._checked:
            self._check(simulation)
        context = simulation.context
        positions = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        positions = np.asarray(positions, dtype=np.float64)
        u_old = self._energy(context)
        for atoms in self._all:
            X_new, log_q_new = self._draw()
            X_old = positions[atoms]
            log_q_old = self._log_q(X_old)
            if self._rigid:
                X_new = random_placement(X_new, X_old.mean(0), self._rng)
            trial = positions.copy()
            trial[atoms] = X_new
            context.setPositions(trial)
            u_new = self._energy(context)
            log_a = -self._beta * (u_new - u_old) - log_q_new + log_q_old
            self.nProposed += 1
            if np.isfinite(log_a) and np.log(self._rng.uniform()) < min(log_a, 0.0):
                self.nAccepted += 1
                positions, u_old = trial, u_new
            else:
                context.setPositions(positions)
