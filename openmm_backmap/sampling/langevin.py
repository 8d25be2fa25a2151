"""Batched Langevin dynamics of a CG potential in torch, and the dynamics check built on it.

:func:`langevin` integrates many replicas at once with the BAOAB splitting of OpenMM's
``LangevinMiddleIntegrator`` (half kick, half drift, Ornstein-Uhlenbeck velocity update, half
drift, force, half kick), in kJ/mol, nm, ps and daltons, on any differentiable energy
``energy(x[B, n, 3]) -> (B,)``. It is the same dynamics an OpenMM simulation of the exported force
runs, without a Context per replica, so that a learned CG potential can be checked for stability
in seconds before it is exported.

:func:`dynamics_check` runs it from given CG frames and calls a replica failed when its energy rises
``margin_kT`` above the highest starting energy or turns non-finite: a learned surface that is
stiff or rough off the data heats the dynamics until the molecule comes apart, and that shows first
as a runaway energy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from openmm_backmap.units import kT as thermal_energy

__all__ = ["dynamics_check", "langevin"]


def _forces(energy: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        e = energy(xg)
        (grad,) = torch.autograd.grad(e.sum(), xg)
    return -grad.detach(), e.detach()


def langevin(
    energy: Callable[[Tensor], Tensor],
    x0: Tensor,
    masses: Any,
    temperature: float,
    steps: int,
    timestep_ps: float = 0.001,
    friction_per_ps: float = 10.0,
    generator: torch.Generator | None = None,
    on_step: Callable[[int, Tensor, Tensor], bool] | None = None,
) -> tuple[Tensor, Tensor]:
    """Integrate replicas x0 (B, n, 3) nm for ``steps`` BAOAB steps at ``temperature`` (K).

    Velocities start from the Maxwell-Boltzmann distribution. ``on_step(step, x, energy)`` is called
    after every step; returning True stops the run. Returns the last positions and energies (kJ/mol).
    """
    x = torch.as_tensor(x0).clone()
    dtype = x.dtype
    m = torch.as_tensor(np.asarray(masses, dtype=np.float64), dtype=dtype).reshape(1, -1, 1)
    if m.shape[1] != x.shape[1]:
        raise ValueError(f"{m.shape[1]} masses for {x.shape[1]} particles")
    if steps < 0 or timestep_ps <= 0 or friction_per_ps < 0:
        raise ValueError("langevin: steps >= 0, timestep_ps > 0 and friction_per_ps >= 0 required")
    kt = thermal_energy(temperature)
    sigma = torch.sqrt(kt / m)
    a = math.exp(-friction_per_ps * timestep_ps)
    b = math.sqrt(1.0 - a * a)
    dt = float(timestep_ps)
    v = sigma * torch.randn(x.shape, generator=generator, dtype=dtype)
    f, e = _forces(energy, x)
    for step in range(int(steps)):
        v = v + 0.5 * dt * f / m
        x = x + 0.5 * dt * v
        v = a * v + b * sigma * torch.randn(x.shape, generator=generator, dtype=dtype)
        x = x + 0.5 * dt * v
        f, e = _forces(energy, x)
        v = v + 0.5 * dt * f / m
        if on_step is not None and on_step(step, x, e):
            break
    return x, e


def dynamics_check(
    energy: Callable[[Tensor], Tensor],
    X: Tensor,
    masses: Any,
    temperature: float,
    steps: int = 1000,
    timestep_ps: float = 0.001,
    friction_per_ps: float = 10.0,
    margin_kT: float = 100.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Run :func:`langevin` from the CG frames X (B, n, 3) nm and count the replicas that fail.

    A replica fails when its energy exceeds the highest energy of the starting frames by
    ``margin_kT`` kT or is not finite. Returns ``replicas``, ``failed``, ``first_failure_step``
    (None when none failed), ``stable`` (no failure), the run's ``steps`` and ``timestep_fs``, and the
    starting and final median energies (kJ/mol).
    """
    X = torch.as_tensor(X)
    if X.ndim != 3 or X.shape[0] == 0:
        raise ValueError(f"dynamics check: need frames (B, n, 3), got shape {tuple(X.shape)}")
    with torch.no_grad():
        e0 = energy(X)
    if not bool(torch.isfinite(e0).all()):
        bad = int(torch.nonzero(~torch.isfinite(e0))[0])
        raise ValueError(f"dynamics check: the energy of starting frame {bad} is not finite")
    limit = float(e0.max()) + margin_kT * thermal_energy(temperature)
    failed = torch.zeros(X.shape[0], dtype=torch.bool)
    first: list[int] = []

    def watch(step: int, x: Tensor, e: Tensor) -> bool:
        bad = ~torch.isfinite(e) | (e > limit)
        if bool(bad.any()) and not first:
            first.append(step)
        failed.logical_or_(bad)
        return False

    _, e_end = langevin(
        energy,
        X,
        masses,
        temperature,
        steps,
        timestep_ps,
        friction_per_ps,
        torch.Generator().manual_seed(seed),
        watch,
    )
    ok = torch.isfinite(e_end)
    return {
        "replicas": int(X.shape[0]),
        "failed": int(failed.sum()),
        "first_failure_step": first[0] if first else None,
        "stable": not bool(failed.any()),
        "steps": int(steps),
        "timestep_fs": 1000.0 * float(timestep_ps),
        "energy_start_median": float(e0.median()),
        "energy_end_median": float(e_end[ok].median()) if bool(ok.any()) else float("nan"),
    }
