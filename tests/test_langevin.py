"""Batched Langevin dynamics against closed forms, and the dynamics check of a CG potential."""

import math

import numpy as np
import pytest
import torch

from openmm_backmap.sampling.langevin import dynamics_check, langevin
from openmm_backmap.units import kT

K_SPRING = 2.0e4  # kJ/mol/nm^2
MASS = 12.0  # daltons


def harmonic(x):
    return 0.5 * K_SPRING * (x * x).sum((-1, -2))


def test_langevin_samples_the_harmonic_boltzmann_distribution():
    """Each coordinate of a harmonic well has variance kT / k at equilibrium (closed form); the
    kinetic energy per degree of freedom is kT / 2."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.zeros(4000, 1, 3, dtype=torch.float64)
    seen = []

    def record(step, x, e):
        if step >= 300 and step % 20 == 0:
            seen.append(x.clone())
        return False

    langevin(harmonic, x0, [MASS], 300.0, 1000, 0.001, 10.0, g, record)
    x = torch.cat(seen)
    var = float(x.var())
    exact = kT(300.0) / K_SPRING
    # BAOAB's configurational sampling error for a harmonic well is O((omega dt)^2): omega dt = 0.04 here
    assert var == pytest.approx(exact, rel=0.03)


def test_langevin_refuses_mismatched_masses():
    with pytest.raises(ValueError, match="2 masses for 1 particles"):
        langevin(harmonic, torch.zeros(2, 1, 3), [1.0, 2.0], 300.0, 10)


def test_dynamics_check_passes_a_stable_well_and_catches_a_timestep_past_the_limit():
    """Verlet-type integrators are stable for omega dt < 2: at 1 fs the well (omega = 41/ps) is
    stable; at 60 fs (omega dt = 2.4) every replica's energy runs away, and the check says so."""
    omega = math.sqrt(K_SPRING / MASS)
    X = 0.005 * torch.randn(16, 1, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ok = dynamics_check(harmonic, X, [MASS], 300.0, steps=500, timestep_ps=0.001)
    assert ok["stable"] and ok["failed"] == 0 and ok["first_failure_step"] is None and ok["replicas"] == 16
    dt = 2.4 / omega
    bad = dynamics_check(harmonic, X, [MASS], 300.0, steps=200, timestep_ps=dt, friction_per_ps=0.0)
    assert not bad["stable"] and bad["failed"] == 16 and bad["first_failure_step"] < 100


def test_dynamics_check_refuses_bad_starting_frames():
    with pytest.raises(ValueError, match="starting frame 1"):
        X = torch.zeros(3, 1, 3, dtype=torch.float64)
        X[1, 0, 0] = float("nan")
        dynamics_check(harmonic, X, [MASS], 300.0, steps=5)
    with pytest.raises(ValueError, match="shape"):
        dynamics_check(harmonic, torch.zeros(0, 1, 3), [MASS], 300.0)


def test_dynamics_check_of_a_cg_flow_potential(tiny_ala2, tiny_cg):
    """The tiny CG potential runs stably for 200 steps of 1 fs from its data frames."""
    from openmm_backmap.io.model_files import load_cg_potential

    model, _ = load_cg_potential(tiny_cg)
    model = model.double().eval()
    X = torch.as_tensor(tiny_ala2["mapping"].project(tiny_ala2["traj"].xyz[:8].astype(np.float64)))
    out = dynamics_check(model.energy, X, tiny_ala2["mapping"].masses(), 300.0, steps=200)
    assert out["stable"], out
