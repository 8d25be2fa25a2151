"""Tests of openmm_backmap.openmm.forces: every backend gives eager torch's energies and forces.

Models are float64.  The native backend must be built here (``python cpp/build_plugin.py``); where
it is not, its tests skip with the reason recorded at build time.
"""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import openmm
import openmm.app
import pytest
import torch

import openmm_backmap.openmm.plugin as native_plugin
from openmm_backmap.io.model_files import load_model_bytes
from openmm_backmap.openmm import forces
from openmm_backmap.openmm.plugin import PLUGIN_DIR, load_native_plugin, native_plugin_status

PLATFORMS = ["Reference", "CPU"]
NATIVE_OK, NATIVE_REASON = native_plugin_status()
OPENMMTORCH_OK = "openmm-torch" in forces.available_backends()


def _backend_param(name: str):
    marks = []
    if name == "native" and not NATIVE_OK:
        marks.append(pytest.mark.skip(reason=f"native plugin unavailable: {NATIVE_REASON}"))
    if name == "openmm-torch" and not OPENMMTORCH_OK:
        marks.append(pytest.mark.skip(reason="openmm-torch does not import here (optional)"))
    return pytest.param(name, marks=marks, id=name)


BACKENDS = [_backend_param(name) for name in forces.BACKENDS]
DERIVATIVE_BACKENDS = [_backend_param(name) for name in ("native", "openmm-torch")]


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class Harmonic(torch.nn.Module):
    """E = k sum |r|^2, F = -2 k r."""

    def __init__(self, k: float = 2.5):
        super().__init__()
        self.k = k

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.k * torch.sum(positions * positions)


class HarmonicParameter(torch.nn.Module):
    """E = k sum |r|^2 with k a global parameter: dE/dk = sum |r|^2."""

    def forward(self, positions: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return k * torch.sum(positions * positions)


class DistanceMLP(torch.nn.Module):
    """A tiny MLP on all pair distances (nonlinear, many parameters), in float64."""

    def __init__(self, n: int, hidden: int = 16, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        pairs = torch.triu_indices(n, n, 1)
        self.register_buffer("i", pairs[0])
        self.register_buffer("j", pairs[1])
        self.net = torch.nn.Sequential(
            torch.nn.Linear(pairs.shape[1], hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
        ).double()

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        delta = positions[self.i] - positions[self.j]
        d = torch.sqrt(torch.sum(delta * delta, dim=-1))
        lj = torch.sum((0.3 / d) ** 12 - (0.3 / d) ** 6)
        return self.net(d).sum() + 0.1 * lj


class PeriodicPairs(torch.nn.Module):
    """Gaussian pair energies under the minimum image convention (rectangular box)."""

    def forward(self, positions: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        lengths = torch.diagonal(box)
        delta = positions.unsqueeze(0) - positions.unsqueeze(1)
        delta = delta - lengths * torch.round(delta / lengths)
        d2 = torch.sum(delta * delta, dim=-1)
        return 0.5 * torch.sum(torch.exp(-d2 / 0.25)) + torch.sum(lengths)


def _positions(n: int, seed: int = 1) -> np.ndarray:
    # Beads on a jittered line so no pair is close enough for the r^-12 term to dominate.
    rng = np.random.default_rng(seed)
    base = np.stack([np.arange(n) * 0.38, np.zeros(n), np.zeros(n)], axis=1)
    return base + rng.uniform(-0.08, 0.08, size=(n, 3))


def _eager(module: torch.nn.Module, positions: np.ndarray, *extra: torch.Tensor) -> tuple[float, np.ndarray]:
    x = torch.tensor(positions, dtype=torch.float64, requires_grad=True)
    energy = module(x, *extra)
    (grad,) = torch.autograd.grad(energy, x)
    return float(energy.detach()), -grad.numpy()


def _system(n: int, force: openmm.Force, box: float | None = None) -> openmm.System:
    system = openmm.System()
    for _ in range(n):
        system.addParticle(12.0)
    if box is not None:
        system.setDefaultPeriodicBoxVectors(openmm.Vec3(box, 0, 0), openmm.Vec3(0, box, 0), openmm.Vec3(0, 0, box))
    system.addForce(force)
    return system


def _context(system: openmm.System, platform: str) -> openmm.Context:
    return openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform))


def _energy_forces(context: openmm.Context, positions: np.ndarray) -> tuple[float, np.ndarray]:
    context.setPositions(positions)
    state = context.getState(getEnergy=True, getForces=True)
    energy = state.getPotentialEnergy().value_in_unit(openmm.unit.kilojoule_per_mole)
    return energy, state.getForces(asNumpy=True).value_in_unit(openmm.unit.kilojoule_per_mole / openmm.unit.nanometer)


def _assert_close(expected: float | np.ndarray, actual: float | np.ndarray, rel: float = 1e-5) -> None:
    expected, actual = np.asarray(expected, dtype=float), np.asarray(actual, dtype=float)
    scale = max(np.abs(expected).max(), 1e-12)
    assert np.abs(actual - expected).max() <= rel * scale, (expected, actual)


# --------------------------------------------------------------------------------------------
# Availability
# --------------------------------------------------------------------------------------------


def test_python_backend_always_available(monkeypatch):
    # with neither the native plugin nor openmm-torch, "auto" falls back to a PythonForce that works
    assert forces.available_backends()[-1] == "python"
    monkeypatch.setattr(forces, "load_native_plugin", lambda: None)
    monkeypatch.setattr(forces, "native_plugin_status", lambda: (False, "hidden by the test"))
    monkeypatch.setattr(forces, "_import_openmmtorch", lambda: (None, "hidden by the test"))
    assert forces.available_backends() == ["python"]
    n, module = 5, DistanceMLP(5)
    force = forces.create_force(module, backend="auto", numParticles=n)
    assert isinstance(force, openmm.PythonForce)
    positions = _positions(n, seed=14)
    energy, f = _energy_forces(_context(_system(n, force), "Reference"), positions)
    expected_energy, expected_forces = _eager(module, positions)
    _assert_close(expected_energy, energy)
    _assert_close(expected_forces, f)


def test_native_plugin_loads_when_built():
    # A built plugin that does not load is a bug; an unbuilt one (BUILD_FAILED, or skipped) is not.
    built = (PLUGIN_DIR / "libBackmapPluginReference.so").exists()
    if not built or os.environ.get("OPENMM_BACKMAP_DISABLE_NATIVE") == "1":
        pytest.skip(f"native plugin not built or disabled: {NATIVE_REASON}")
    assert NATIVE_OK, NATIVE_REASON
    assert forces.available_backends()[0] == "native"


# --------------------------------------------------------------------------------------------
# Energies and forces against eager torch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_harmonic_matches_analytic(backend, platform):
    n, k = 7, 2.5
    positions = _positions(n)
    force = forces.create_force(Harmonic(k), backend=backend)
    energy, f = _energy_forces(_context(_system(n, force), platform), positions)
    _assert_close(k * np.sum(positions**2), energy)
    _assert_close(-2 * k * positions, f)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mlp_matches_eager_torch(backend, platform, tmp_path):
    n = 6
    module = DistanceMLP(n)
    positions = _positions(n, seed=2)
    path = tmp_path / "mlp.pt"
    torch.jit.save(torch.jit.script(module), str(path))
    force = forces.create_force(path, backend=backend, numParticles=n)
    energy, f = _energy_forces(_context(_system(n, force), platform), positions)
    expected_energy, expected_forces = _eager(module, positions)
    _assert_close(expected_energy, energy)
    _assert_close(expected_forces, f)


@pytest.mark.parametrize("backend", BACKENDS)
def test_periodic_model_gets_box(backend):
    n, box = 6, 2.0
    positions = _positions(n, seed=3)
    force = forces.create_force(PeriodicPairs(), backend=backend, usesPeriodicBoundaryConditions=True)
    assert force.usesPeriodicBoundaryConditions()
    energy, f = _energy_forces(_context(_system(n, force, box=box), "Reference"), positions)
    expected_energy, expected_forces = _eager(PeriodicPairs(), positions, torch.eye(3, dtype=torch.float64) * box)
    _assert_close(expected_energy, energy)
    _assert_close(expected_forces, f)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_model_runs_in_float32(backend):
    n = 5
    module = DistanceMLP(n).float()
    positions = _positions(n, seed=4)
    force = forces.create_force(module, backend=backend)
    energy, f = _energy_forces(_context(_system(n, force), "Reference"), positions)
    x = torch.tensor(positions, dtype=torch.float32, requires_grad=True)
    expected = module(x)
    (grad,) = torch.autograd.grad(expected, x)
    _assert_close(float(expected.detach()), energy, rel=1e-5)
    _assert_close(-grad.numpy(), f, rel=1e-5)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forces_are_minus_energy_gradient(backend, platform):
    """F = -dE/dx through an OpenMM Context: central differences along F."""
    n = 6
    positions = _positions(n, seed=5)
    context = _context(_system(n, forces.create_force(DistanceMLP(n), backend=backend)), platform)
    _, f = _energy_forces(context, positions)
    norm = np.linalg.norm(f)
    h = 1e-5  # the central difference's truncation error is ~1e-7 relative here
    e_plus, _ = _energy_forces(context, positions + h * f / norm)
    e_minus, _ = _energy_forces(context, positions - h * f / norm)
    assert (e_minus - e_plus) / (2 * h) == pytest.approx(norm, rel=1e-6)


# --------------------------------------------------------------------------------------------
# Global parameters
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("backend", DERIVATIVE_BACKENDS)
def test_global_parameter_and_derivative(backend, platform):
    n = 5
    positions = _positions(n, seed=6)
    sum2 = float(np.sum(positions**2))
    force = forces.create_force(
        HarmonicParameter(), backend=backend, globalParameters={"k": 1.5}, energyParameterDerivatives=["k"]
    )
    context = _context(_system(n, force), platform)
    context.setPositions(positions)
    for k in (1.5, 4.0):
        context.setParameter("k", k)
        state = context.getState(getEnergy=True, getForces=True, getParameterDerivatives=True)
        _assert_close(k * sum2, state.getPotentialEnergy().value_in_unit(openmm.unit.kilojoule_per_mole))
        _assert_close(-2 * k * positions, state.getForces(asNumpy=True)._value)
        assert state.getEnergyParameterDerivatives()["k"] == pytest.approx(sum2, rel=1e-10)


def test_python_backend_global_parameter():
    n = 5
    positions = _positions(n, seed=7)
    force = forces.create_force(HarmonicParameter(), backend="python", globalParameters={"k": 1.5})
    context = _context(_system(n, force), "Reference")
    energy, _ = _energy_forces(context, positions)
    _assert_close(1.5 * np.sum(positions**2), energy)
    context.setParameter("k", 3.0)
    energy, f = _energy_forces(context, positions)
    _assert_close(3.0 * np.sum(positions**2), energy)
    _assert_close(-6.0 * positions, f)
    with pytest.raises(ValueError, match="cannot report energy parameter derivatives"):
        forces.create_force(
            HarmonicParameter(), backend="python", globalParameters={"k": 1.5}, energyParameterDerivatives=["k"]
        )


def test_derivative_of_unknown_parameter_is_rejected():
    with pytest.raises(ValueError, match="not in globalParameters"):
        forces.create_force(
            HarmonicParameter(), backend="python", globalParameters={"k": 1.0}, energyParameterDerivatives=["q"]
        )


# --------------------------------------------------------------------------------------------
# Serialization, systems, simulation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_xml_round_trip(backend):
    n = 6
    positions = _positions(n, seed=8)
    system = forces.create_cg_system(np.full(n, 12.0), DistanceMLP(n), backend=backend, forceGroup=2)
    copy = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    e1, f1 = _energy_forces(_context(system, "Reference"), positions)
    e2, f2 = _energy_forces(_context(copy, "Reference"), positions)
    assert e1 == e2
    np.testing.assert_array_equal(f1, f2)
    assert copy.getForce(0).getForceGroup() == 2


@pytest.mark.skipif(not NATIVE_OK, reason=f"native plugin unavailable: {NATIVE_REASON}")
def test_native_force_keeps_module_bytes_and_settings():
    data = load_model_bytes(HarmonicParameter())
    force = forces.create_force(
        data,
        backend="native",
        globalParameters={"k": 2.0},
        energyParameterDerivatives=["k"],
        usesPeriodicBoundaryConditions=True,
        name="cg potential",
    )
    plugin = load_native_plugin()
    copy = plugin.BackmapTorchForce.cast(openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(force)))
    assert copy.getModuleBytes() == data
    assert copy.usesPeriodicBoundaryConditions()
    assert copy.getName() == "cg potential"
    assert (copy.getGlobalParameterName(0), copy.getGlobalParameterDefaultValue(0)) == ("k", 2.0)
    assert copy.getEnergyParameterDerivativeName(0) == "k"


@pytest.mark.skipif(not NATIVE_OK, reason=f"native plugin unavailable: {NATIVE_REASON}")
def test_saved_system_deserializes_in_a_fresh_process(tmp_path):
    """Importing openmm_backmap.openmm.forces is enough to read a System with a BackmapTorchForce."""
    n = 5
    positions = _positions(n, seed=13)
    system = forces.create_cg_system(np.full(n, 12.0), DistanceMLP(n), backend="native")
    expected, _ = _energy_forces(_context(system, "Reference"), positions)
    (tmp_path / "system.xml").write_text(openmm.XmlSerializer.serialize(system))
    np.save(tmp_path / "positions.npy", positions)
    script = (
        "import sys, numpy as np, openmm\n"
        "import openmm_backmap.openmm.forces\n"
        "d = sys.argv[1]\n"
        "system = openmm.XmlSerializer.deserialize(open(d + '/system.xml').read())\n"
        "platform = openmm.Platform.getPlatformByName('Reference')\n"
        "context = openmm.Context(system, openmm.VerletIntegrator(0.001), platform)\n"
        "context.setPositions(np.load(d + '/positions.npy'))\n"
        "print(repr(context.getState(getEnergy=True).getPotentialEnergy()._value))\n"
    )
    root = Path(forces.__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.strip().splitlines()[-1]) == expected


class _Beads:
    """Stands in for a CGMapping: anything with masses() in daltons."""

    def masses(self) -> np.ndarray:
        return np.array([14.0, 12.0, 12.0, 16.0])


def test_create_cg_system_masses_and_extra_forces():
    bonds = openmm.HarmonicBondForce()
    bonds.addBond(0, 1, 0.38, 1000.0)
    system = forces.create_cg_system(_Beads(), Harmonic(1.0), backend="python", extraForces=[bonds])
    assert [system.getParticleMass(i).value_in_unit(openmm.unit.dalton) for i in range(4)] == [14.0, 12.0, 12.0, 16.0]
    assert system.getNumForces() == 2
    assert isinstance(system.getForce(1), openmm.HarmonicBondForce)


def test_create_cg_system_periodic_box():
    box = [openmm.Vec3(2.0, 0, 0), openmm.Vec3(0, 2.5, 0), openmm.Vec3(0, 0, 3.0)] * openmm.unit.nanometer
    system = forces.create_cg_system(
        np.full(4, 12.0), PeriodicPairs(), backend="python", usesPeriodicBoundaryConditions=True, boxVectors=box
    )
    vectors = system.getDefaultPeriodicBoxVectors()
    assert [vectors[i][i].value_in_unit(openmm.unit.nanometer) for i in range(3)] == [2.0, 2.5, 3.0]
    with pytest.raises(ValueError, match="boxVectors"):
        forces.create_cg_system(np.full(4, 12.0), PeriodicPairs(), usesPeriodicBoundaryConditions=True)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_langevin_simulation_runs(backend, platform):
    n = 6
    bonds = openmm.HarmonicBondForce()
    for i in range(n - 1):
        bonds.addBond(i, i + 1, 0.38, 2000.0)
    system = forces.create_cg_system(np.full(n, 50.0), DistanceMLP(n), backend=backend, extraForces=[bonds])
    integrator = openmm.LangevinMiddleIntegrator(
        300 * openmm.unit.kelvin, 1.0 / openmm.unit.picosecond, 0.002 * openmm.unit.picoseconds
    )
    integrator.setRandomNumberSeed(11)
    simulation = openmm.app.Simulation(
        openmm.app.Topology(), system, integrator, openmm.Platform.getPlatformByName(platform)
    )
    simulation.context.setPositions(_positions(n, seed=9))
    simulation.minimizeEnergy(maxIterations=50)
    simulation.step(1000)
    state = simulation.context.getState(getEnergy=True, getPositions=True)
    assert math.isfinite(state.getPotentialEnergy().value_in_unit(openmm.unit.kilojoule_per_mole))
    assert np.all(np.isfinite(state.getPositions(asNumpy=True)._value))
    assert simulation.currentStep == 1000


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_corrupt_and_truncated_files_are_rejected(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a TorchScript archive")
    with pytest.raises(ValueError, match="not a TorchScript module"):
        forces.create_force(corrupt, backend="python")
    good = load_model_bytes(Harmonic())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="not a TorchScript module"):
        forces.create_force(truncated, backend="auto")
    with pytest.raises(FileNotFoundError):
        forces.create_force(tmp_path / "missing.pt")
    with pytest.raises(TypeError):
        forces.create_force(3.0)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        forces.create_force(Harmonic(), backend="tensorflow")


def test_unavailable_backend_says_what_to_do(monkeypatch):
    monkeypatch.setattr(native_plugin, "_native_state", (None, "not built (test)"))
    with pytest.raises(RuntimeError, match="native backend is not available: not built"):
        forces.create_force(Harmonic(), backend="native")
    if not OPENMMTORCH_OK:
        with pytest.raises(RuntimeError, match="install openmm-torch"):
            forces.create_force(Harmonic(), backend="openmm-torch")


class FixedSize(torch.nn.Module):
    """Only works for 4 particles (weights per particle)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4, 3, dtype=torch.float64))

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return torch.sum(self.w * positions * positions)


def test_wrong_particle_count_is_caught_early():
    with pytest.raises(ValueError, match="test input of 6 particles"):
        forces.create_force(FixedSize(), backend="python", numParticles=6)
    forces.create_force(FixedSize(), backend="python", numParticles=4)
    with pytest.raises(ValueError, match="test input of 6 particles"):
        forces.create_cg_system(np.full(6, 12.0), FixedSize(), backend="python")


@pytest.mark.skipif(not NATIVE_OK, reason=f"native plugin unavailable: {NATIVE_REASON}")
def test_native_reports_forward_errors_at_context_creation():
    force = forces.create_force(Harmonic(), backend="native")
    force.addGlobalParameter("extra", 1.0)  # forward() takes no parameter
    with pytest.raises(Exception, match="forward\\(\\) takes 1 argument"):
        _context(_system(3, force), "Reference")


def test_script_module_and_bytes_inputs_agree():
    module = torch.jit.script(DistanceMLP(5))
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    positions = _positions(5, seed=10)
    e1, _ = _energy_forces(_context(_system(5, forces.create_force(module, backend="python")), "Reference"), positions)
    e2, _ = _energy_forces(
        _context(_system(5, forces.create_force(buffer.getvalue(), backend="python")), "Reference"), positions
    )
    assert e1 == e2


# --------------------------------------------------------------------------------------------
# CUDA (only where a GPU, OpenMM's CUDA platform and the plugin's CUDA kernels exist)
# --------------------------------------------------------------------------------------------


def _cuda_available() -> bool:
    try:
        openmm.Platform.getPlatformByName("CUDA")
    except Exception:  # noqa: BLE001 - OpenMMException: no CUDA platform
        return False
    return NATIVE_OK and (PLUGIN_DIR / "libBackmapPluginCUDA.so").exists() and torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_available(), reason="needs a GPU, OpenMM's CUDA platform and the plugin's CUDA kernels")
def test_native_cuda_matches_reference():
    n = 6
    module = DistanceMLP(n)
    positions = _positions(n, seed=12)
    force = forces.create_force(module, backend="native", globalParameters={}, numParticles=n)
    expected_energy, expected_forces = _eager(module, positions)
    energy, f = _energy_forces(_context(_system(n, force), "CUDA"), positions)
    _assert_close(expected_energy, energy, rel=1e-4)
    _assert_close(expected_forces, f, rel=1e-4)
