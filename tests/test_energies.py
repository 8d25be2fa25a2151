"""Energies: the torch re-implementation of a System against OpenMM, and the autograd bridge."""

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit

from openmm_backmap.openmm.energies import (
    OpenMMBridgeEnergy,
    ReducedEnergy,
    TorchSystemEnergy,
    aa_energy,
    load_system,
    unsupported_forces,
)
from openmm_backmap.systems.builtin import builtin_system
from openmm_backmap.units import kT


@pytest.fixture(scope="module")
def ala2_frames():
    """Alanine dipeptide frames from 4 ps of 600 K Langevin MD: a spread of geometries."""
    topology, system, positions = builtin_system("ala2")
    integ = openmm.LangevinMiddleIntegrator(600 * unit.kelvin, 5 / unit.picosecond, 0.001)
    integ.setRandomNumberSeed(5)
    sim = app.Simulation(topology, system, integ, openmm.Platform.getPlatformByName("Reference"))
    sim.context.setPositions(positions)
    sim.context.setVelocitiesToTemperature(600 * unit.kelvin, 5)
    frames = []
    for _ in range(16):
        sim.step(250)
        frames.append(sim.context.getState(getPositions=True).getPositions(asNumpy=True)._value)
    return system, np.array(frames)


def _openmm_energies_forces(system, frames):
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    e, f = [], []
    for x in frames:
        ctx.setPositions(x)
        s = ctx.getState(getEnergy=True, getForces=True)
        e.append(s.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
        f.append(s.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))
    return np.array(e), np.array(f)


def test_torch_energy_matches_openmm_energies_and_forces(ala2_frames):
    system, frames = ala2_frames
    ref_e, ref_f = _openmm_energies_forces(system, frames)
    energy = TorchSystemEnergy(system)
    x = torch.tensor(frames, dtype=torch.float64, requires_grad=True)
    u = energy(x)
    np.testing.assert_allclose(u.detach().numpy(), ref_e, rtol=1e-7, atol=1e-6)
    (grad,) = torch.autograd.grad(u.sum(), x)
    np.testing.assert_allclose(-grad.numpy(), ref_f, rtol=1e-6, atol=1e-5)
    # a single (n, 3) frame gives a scalar
    assert energy(x[0].detach()).shape == ()


def test_torch_energy_float32_close_to_float64(ala2_frames):
    system, frames = ala2_frames
    energy = TorchSystemEnergy(system)
    e64 = energy(torch.tensor(frames, dtype=torch.float64))
    e32 = energy(torch.tensor(frames, dtype=torch.float32))
    assert e32.dtype == torch.float32
    np.testing.assert_allclose(e32.numpy(), e64.numpy(), atol=2e-3)


def test_bridge_matches_openmm_and_backpropagates_forces(ala2_frames):
    system, frames = ala2_frames
    ref_e, ref_f = _openmm_energies_forces(system, frames[:4])
    bridge = OpenMMBridgeEnergy(system)
    x = torch.tensor(frames[:4], dtype=torch.float64, requires_grad=True)
    u = bridge(x)
    np.testing.assert_allclose(u.detach().numpy(), ref_e, rtol=1e-10)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    (grad,) = torch.autograd.grad((u * weights).sum(), x)
    np.testing.assert_allclose(grad.numpy(), -ref_f * weights.numpy()[:, None, None], rtol=1e-10)


def test_gradient_matches_finite_differences(ala2_frames):
    system, frames = ala2_frames
    energy = TorchSystemEnergy(system)
    x = torch.tensor(frames[3:4], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(energy(x).sum(), x)
    rng = np.random.default_rng(2)
    h = 1e-6
    for _ in range(6):
        a, c = int(rng.integers(22)), int(rng.integers(3))
        xp, xm = x.detach().clone(), x.detach().clone()
        xp[0, a, c] += h
        xm[0, a, c] -= h
        fd = (energy(xp) - energy(xm)).item() / (2 * h)
        assert abs(fd - grad[0, a, c].item()) < 1e-4 * max(1.0, abs(fd))


def test_linear_pair_core_keeps_the_energy_outside_and_a_steady_push_inside(ala2_frames):
    """`pair_core`: thermal frames (no pair near the core) keep the exact energy and forces; two atoms
    pushed into each other cost the core energy plus the tangent's (finite, continuous at r_c), with
    a gradient that matches finite differences and keeps pushing them apart; a bad core is refused."""
    system, frames = ala2_frames
    exact = TorchSystemEnergy(system)

    def cored(y: torch.Tensor) -> torch.Tensor:
        return exact(y, pair_core=100.0)

    x = torch.tensor(frames, dtype=torch.float64, requires_grad=True)
    u = cored(x)
    np.testing.assert_allclose(u.detach().numpy(), exact(x).detach().numpy(), rtol=1e-12)
    (g_core,) = torch.autograd.grad(u.sum(), x)
    (g_exact,) = torch.autograd.grad(exact(x).sum(), x)
    np.testing.assert_allclose(g_core.numpy(), g_exact.numpy(), rtol=1e-10, atol=1e-9)
    # two opposite charges with a Lennard-Jones wall, pushed into each other along x
    pair = openmm.System()
    nb = openmm.NonbondedForce()
    for q in (0.5, -0.5):
        pair.addParticle(12.0)
        nb.addParticle(q, 0.3, 0.5)
    pair.addForce(nb)
    two_exact = TorchSystemEnergy(pair)

    def two(y: torch.Tensor) -> torch.Tensor:
        return two_exact(y, pair_core=100.0)

    r_c = float(TorchSystemEnergy.core_distances(two_exact.pair_sig, two_exact.pair_4eps, 100.0)[0])
    y6 = (0.3 / r_c) ** 6
    assert 2.0 * y6 * (y6 - 1.0) == pytest.approx(100.0)  # 4 eps (y^2 - y) at r_c

    def at(r: float) -> torch.Tensor:
        return torch.tensor([[0.0, 0.0, 0.0], [r, 0.0, 0.0]], dtype=torch.float64)

    assert float(two(at(r_c + 1e-9))) == pytest.approx(float(two(at(r_c - 1e-9))), abs=1e-4)  # continuous
    assert float(two(at(1.5 * r_c))) == pytest.approx(float(two_exact(at(1.5 * r_c))), rel=1e-12)
    deep = [float(two(at(f * r_c))) for f in (0.9, 0.5, 0.1)]
    assert deep[0] < deep[1] < deep[2] < 1e4  # finite, rising steadily (the exact wall: ~1e12 at 0.1 r_c)
    for f in (0.9, 0.3):
        y = at(f * r_c).requires_grad_(True)
        (g,) = torch.autograd.grad(two(y), y)
        h = 1e-6
        fd = (float(two(at(f * r_c + h))) - float(two(at(f * r_c - h)))) / (2 * h)
        assert float(g[1, 0]) == pytest.approx(fd, rel=1e-6) and fd < -1000.0  # dU/dr: a steady push out
    with pytest.raises(ValueError, match="pair_core must be a positive energy"):
        exact(x, pair_core=0.0)


def test_implicit_solvent_system_falls_back_to_bridge():
    # GBn (Amber igb=7) is a CustomGBForce the torch energy does not implement (GBn2 and OBC2 it does)
    topology, _, positions = builtin_system("chignolin")
    ff = app.ForceField("amber14-all.xml", "implicit/gbn.xml")
    system = ff.createSystem(topology, nonbondedMethod=app.NoCutoff, constraints=app.HBonds)
    assert any("CustomGBForce" in name for name in unsupported_forces(system))
    with pytest.raises(ValueError, match="CustomGBForce"):
        TorchSystemEnergy(system)
    energy = aa_energy(system)
    assert isinstance(energy, OpenMMBridgeEnergy)
    x = torch.tensor(np.array(positions.value_in_unit(unit.nanometer))[None])
    assert torch.isfinite(energy(x)).all()


def test_auto_picks_torch_for_vacuum_and_reads_xml(tmp_path, ala2_frames):
    system, _ = ala2_frames
    path = tmp_path / "system.xml"
    path.write_text(openmm.XmlSerializer.serialize(system))
    assert isinstance(aa_energy(path), TorchSystemEnergy)
    assert load_system(str(path)).getNumParticles() == 22
    (tmp_path / "bad.xml").write_text("<System truncated")
    with pytest.raises(ValueError, match="cannot read the System XML"):
        load_system(tmp_path / "bad.xml")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_system(tmp_path / "missing.xml")


def test_bridge_flags_nonfinite_samples(ala2_frames):
    system, frames = ala2_frames
    bridge = OpenMMBridgeEnergy(system)
    x = frames[:3].copy()
    x[1, 4, 0] = np.nan
    e, f = bridge.evaluate(x)
    assert np.isfinite(e[[0, 2]]).all() and e[1] == np.inf and not f[1].any()
    with pytest.raises(ValueError, match="System has 22 atoms"):
        bridge.evaluate(x[:, :20])


def test_reduced_energy_and_clip(ala2_frames):
    system, frames = ala2_frames
    energy = TorchSystemEnergy(system)
    x = torch.tensor(frames, dtype=torch.float64)
    u = ReducedEnergy(energy, 300.0)(x)
    np.testing.assert_allclose(u.numpy(), energy(x).numpy() / kT(300.0), rtol=1e-12)
    assert abs(kT(300.0) - 2.494339) < 1e-5
    clipped = ReducedEnergy(energy, 300.0, clip=-40.0)(x)
    low = u <= -40.0
    np.testing.assert_allclose(clipped[low].numpy(), u[low].numpy())
    assert (clipped[~low] <= -40.0 + torch.log1p(u[~low] + 40.0) + 1e-12).all()
