"""Settings of the file-to-model pipelines, one dataclass per model kind.

The defaults are the command line's: ``openmm-backmap train`` and ``train-cg`` read their option
defaults from these classes, so the CLI, the demo and Python callers share one set of numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["BackmapperTraining", "CGPotentialTraining", "ProteinFinetuning"]


def _require_counts(settings, names: tuple[str, ...]) -> None:
    """ValueError naming each count setting below 1 (0 epochs would write an untrained model)."""
    bad = [f"{n} = {getattr(settings, n)}" for n in names if int(getattr(settings, n)) < 1]
    if bad:
        raise ValueError(f"{type(settings).__name__}: these counts must be >= 1: {', '.join(bad)}")


@dataclass(frozen=True)
class BackmapperTraining:
    """Settings of :func:`~openmm_backmap.training.pipeline.train_from_files`.

    Attributes
    ----------
    stride, val_fraction
        Use every ``stride``-th frame; the fraction of each file held out for validation, in
        contiguous time blocks.
    temperature
        Kelvin: the model's temperature and the energy refinement's target.
    seed
        Seeds the split, the model's initialisation, training and refinement.
    temporal
        Also condition on the previous AA frame.
    hidden, layers, bins
        Hidden units per coupling network layer, coupling layers, spline bins.
    epochs, batch_size, lr
        Maximum-likelihood training (:func:`~openmm_backmap.training.backmapper.train_ml`).
    energy_steps, energy_lr, ml_weight
        Energy refinement (:func:`~openmm_backmap.training.backmapper.refine_energy`) when an AA
        System is given: steps (0 = none), learning rate, weight of the data NLL kept in the loss.
    """

    stride: int = 1
    val_fraction: float = 0.1
    temperature: float = 300.0
    seed: int = 0
    temporal: bool = False
    hidden: int = 128
    layers: int = 6
    bins: int = 8
    epochs: int = 15
    batch_size: int = 256
    lr: float = 2e-3
    energy_steps: int = 2000
    energy_lr: float = 3e-4
    ml_weight: float = 0.3

    def __post_init__(self) -> None:
        _require_counts(self, ("stride", "hidden", "layers", "bins", "epochs", "batch_size"))
        if self.energy_steps < 0:
            raise ValueError(f"BackmapperTraining: energy_steps must be >= 0, got {self.energy_steps}")


@dataclass(frozen=True)
class CGPotentialTraining:
    """Settings of :func:`~openmm_backmap.training.pipeline.train_cg_from_files`.

    Attributes
    ----------
    stride
        Use every ``stride``-th frame.
    temperature
        Kelvin: U_CG = -kT log q(X) at this temperature.
    seed
        Seeds the train / validation / test blocks, the coupling masks and training (the networks'
        initial weights come from torch's global generator).
    hidden, layers, bins
        Hidden units per coupling network layer, coupling layers, spline bins.
    epochs, batch_size, lr, time_limit
        Maximum-likelihood training (:func:`~openmm_backmap.training.cg_potential.train_cg`);
        ``time_limit`` in seconds, None for none.
    allow_restrained
        Accept trajectories of restrained runs: the potential then samples a broadened X
        distribution (a proposal for reweighting and hybrid sampling), not the potential of mean force.
    circular_spread
        Model every CG dihedral whose spread on the data exceeds this (rad) as a circular variable
        (:meth:`~openmm_backmap.models.cg_potential.CGFlowPotential.from_data`); None: only the
        dihedrals that spread widely. A potential that ``cycle`` is to grow basins of needs its
        torsions circular.
    """

    stride: int = 1
    temperature: float = 300.0
    seed: int = 1
    hidden: int = 64
    layers: int = 6
    bins: int = 8
    epochs: int = 150
    batch_size: int = 256
    lr: float = 2e-3
    time_limit: float | None = None
    allow_restrained: bool = False
    circular_spread: float | None = None

    def __post_init__(self) -> None:
        _require_counts(self, ("stride", "hidden", "layers", "bins", "epochs", "batch_size"))


@dataclass
class ProteinFinetuning:
    """Settings of :func:`~openmm_backmap.training.finetune.finetune` (``openmm-backmap finetune``).

    Attributes
    ----------
    steps, batch_frames, lr
        Optimiser steps, CG frames per step (one sample each), Adam learning rate.
    temperature, t_start, anneal_fraction
        Target and starting temperature (K); the geometric anneal takes this fraction of the steps.
    cap_dof
        Reduced energies grow logarithmically above the minimised energy plus this many kT per free
        degree of freedom.
    grad_clip
        Gradient-norm clip.
    pair_core_kt
        When > 0, the loss's energy gives non-bonded pairs a linear core above this many kT (the
        ``pair_core`` of :class:`~openmm_backmap.openmm.energies.TorchSystemEnergy`), so atoms inside
        each other keep a gradient that pushes them apart; evaluations use the exact energy.
    val_fraction, val_frames, val_samples, eval_every
        The last fraction of the CG frames is held out; up to ``val_frames`` of them, with
        ``val_samples`` samples each, are evaluated every ``eval_every`` steps after the anneal.
    seed, threads, time_limit
        Random seed, torch CPU threads, wall-clock limit (s).
    """

    steps: int = 1000
    batch_frames: int = 16
    lr: float = 2e-4
    temperature: float = 300.0
    t_start: float = 1200.0
    anneal_fraction: float = 0.5
    cap_dof: float = 2.0
    grad_clip: float = 10.0
    pair_core_kt: float = 0.0
    val_fraction: float = 0.2
    val_frames: int = 16
    val_samples: int = 8
    eval_every: int = 50
    seed: int = 0
    threads: int = 1
    time_limit: float = math.inf

    def check(self) -> None:
        """Raise ValueError naming the first setting that cannot work."""
        if self.steps < 1 or self.batch_frames < 1:
            raise ValueError(f"steps and batch_frames must be >= 1, got {self.steps} and {self.batch_frames}")
        if not (self.temperature > 0 and self.t_start >= self.temperature):
            raise ValueError(
                f"the tempering starts at {self.t_start} K and must end at {self.temperature} K: "
                "t_start must be at least the temperature, both positive"
            )
        if not 0.0 < self.anneal_fraction <= 1.0:
            raise ValueError(f"anneal_fraction must be in (0, 1], got {self.anneal_fraction}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not self.lr > 0 or not self.cap_dof > 0 or not self.grad_clip > 0:
            raise ValueError("lr, cap_dof and grad_clip must be positive")
        if not self.pair_core_kt >= 0:
            raise ValueError(f"pair_core_kt must be >= 0 (0: the exact energy), got {self.pair_core_kt}")
