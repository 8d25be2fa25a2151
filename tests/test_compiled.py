"""Tests of openmm_backmap.openmm.compiled: TorchScript energies compiled (AOTInductor) into .pt2 force packages.

Two packages are compiled once per module (about 15 s and 1-2 minutes on 2 cores): an analytic
periodic model with a global parameter, checked against its closed form in every backend that runs
packages, and the CG flow potential, checked against its TorchScript file and finite differences.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import openmm
import pytest
import torch
from _backmap_helpers import needs_compiler
from openmm import unit
from test_potentials import BRANCHED6, randomise, synthetic_chain

from openmm_backmap.io.checkpoints import make_cg_spec
from openmm_backmap.io.model_files import export_cg, is_compiled_package, load_model_bytes, read_compiled_metadata
from openmm_backmap.models.cg_potential import CGFlowPotential
from openmm_backmap.openmm import forces
from openmm_backmap.openmm.compiled import compile_model, load_compiled
from openmm_backmap.openmm.plugin import load_native_plugin, native_plugin_status

pytestmark = needs_compiler

N_HARMONIC = 5
KJ = unit.kilojoule_per_mole
KJ_NM = unit.kilojoule_per_mole / unit.nanometer


class PeriodicHarmonic(torch.nn.Module):
    """E = k sum_i |x_i - c|^2 with c the box centre (half the sum of the box vectors)."""

    def forward(self, positions: torch.Tensor, box: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        centre = 0.5 * torch.sum(box, dim=0)
        return k * torch.sum((positions - centre) ** 2)


def harmonic_reference(x: np.ndarray, box: np.ndarray, k: float) -> tuple[float, np.ndarray, float]:
    d = x - 0.5 * box.sum(axis=0)
    return k * float((d**2).sum()), -2.0 * k * d, float((d**2).sum())


BOX = np.diag([3.0, 3.5, 4.0])


@pytest.fixture(scope="module")
def harmonic_package(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("compiled") / "harmonic.pt2"
    compile_model(
        PeriodicHarmonic(), N_HARMONIC, path, usesPeriodicBoundaryConditions=True, globalParameters={"k": 2.0}, box=BOX
    )
    return path


@pytest.fixture(scope="module")
def cg_files(tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    """The six-bead CG flow potential (float32, random couplings) as TorchScript and compiled."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    X = synthetic_chain(1000, BRANCHED6, seed=4)
    model = randomise(CGFlowPotential.from_data(X, BRANCHED6, n_layers=4, hidden=16, n_bins=6, seed=5), seed=6).eval()
    folder = tmp_path_factory.mktemp("cg")
    spec = make_cg_spec(model)
    spec["masses"] = [12.0, 14.0, 12.0, 12.0, 14.0, 12.0]
    export_cg(model, spec, folder / "cg.pt")
    result = subprocess.run(
        [sys.executable, "-m", "openmm_backmap.cli", "compile", str(folder / "cg.pt"), "-o", str(folder / "cg.pt2")],
        capture_output=True,
        text=True,
    )
    torch.set_num_threads(before)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "compiled force (6 particles)" in result.stdout
    return folder / "cg.pt", folder / "cg.pt2", X


def _context(system: openmm.System, platform: str = "Reference") -> openmm.Context:
    return openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform))


def _harmonic_system(package: Path, backend: str, derivatives=()) -> openmm.System:
    return forces.create_cg_system(
        np.full(N_HARMONIC, 10.0),
        str(package),
        backend=backend,
        usesPeriodicBoundaryConditions=True,
        boxVectors=BOX,
        globalParameters={"k": 2.0},
        energyParameterDerivatives=derivatives,
    )


def package_backends() -> list[str]:
    return [b for b in forces.available_backends() if b != "openmm-torch"]


# ----------------------------------------------------------------------------- the package itself
def test_package_matches_closed_form(harmonic_package):
    data = harmonic_package.read_bytes()
    assert is_compiled_package(data)
    meta = read_compiled_metadata(harmonic_package)
    assert meta["num_particles"] == N_HARMONIC and meta["periodic"] and meta["global_parameters"] == ["k"]
    model = load_compiled(harmonic_package)
    x = np.random.default_rng(0).random((N_HARMONIC, 3)) * 3.0
    energy, force, derivs = model(x, BOX, [1.7])
    e_ref, f_ref, dk_ref = harmonic_reference(x, BOX, 1.7)
    assert energy == pytest.approx(e_ref, rel=1e-12)
    np.testing.assert_allclose(force, f_ref, rtol=1e-12, atol=1e-12)
    assert derivs == pytest.approx([dk_ref], rel=1e-12)
    with pytest.raises(ValueError, match=r"shape \(5, 3\)"):
        model(x[:4], BOX, [1.7])


@pytest.mark.parametrize("platform", ["Reference", "CPU"])
def test_backends_run_package(harmonic_package, platform):
    x = np.random.default_rng(1).random((N_HARMONIC, 3)) * 3.0
    e_ref, f_ref, dk_ref = harmonic_reference(x, BOX, 3.0)
    for backend in package_backends():
        derivatives = ["k"] if backend == "native" else []
        context = _context(_harmonic_system(harmonic_package, backend, derivatives), platform)
        context.setPositions(x)
        context.setParameter("k", 3.0)
        state = context.getState(getEnergy=True, getForces=True, getParameterDerivatives=bool(derivatives))
        assert state.getPotentialEnergy().value_in_unit(KJ) == pytest.approx(e_ref, rel=1e-10), backend
        np.testing.assert_allclose(state.getForces(asNumpy=True).value_in_unit(KJ_NM), f_ref, rtol=1e-10, atol=1e-10)
        if derivatives:
            assert state.getEnergyParameterDerivatives()["k"] == pytest.approx(dk_ref, rel=1e-10)


def test_native_package_survives_xml_round_trip(harmonic_package):
    if not native_plugin_status()[0]:
        pytest.skip("native plugin not built")
    plugin = load_native_plugin()
    system = _harmonic_system(harmonic_package, "native")
    force = plugin.BackmapTorchForce.cast(system.getForce(0))
    assert force.isCompiled()
    copy = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    restored = plugin.BackmapTorchForce.cast(copy.getForce(0))
    assert restored.isCompiled() and restored.getModuleBytes() == harmonic_package.read_bytes()
    x = np.random.default_rng(2).random((N_HARMONIC, 3))
    energies = []
    for s in (system, copy):
        context = _context(s)
        context.setPositions(x)
        energies.append(context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(KJ))
    assert energies[0] == energies[1] == pytest.approx(harmonic_reference(x, BOX, 2.0)[0], rel=1e-12)


# ----------------------------------------------------------------------------- bad input
def test_mismatches_are_named(harmonic_package):
    with pytest.raises(ValueError, match="built for 5 particles, but the System has 4"):
        forces.create_cg_system(
            np.full(4, 10.0),
            str(harmonic_package),
            backend="python",
            usesPeriodicBoundaryConditions=True,
            boxVectors=BOX,
            globalParameters={"k": 2.0},
        )
    with pytest.raises(ValueError, match=r"global parameters \['k'\]"):
        forces.create_force(
            harmonic_package, backend="python", usesPeriodicBoundaryConditions=True, globalParameters={"kappa": 2.0}
        )
    with pytest.raises(ValueError, match="with periodic boundary conditions"):
        forces.create_force(harmonic_package, backend="python", globalParameters={"k": 2.0})
    if native_plugin_status()[0]:
        # the plugin checks too, when the force is built by hand and the Context is created
        plugin = load_native_plugin()
        system = openmm.System()
        for _ in range(N_HARMONIC + 1):
            system.addParticle(10.0)
        force = plugin.BackmapTorchForce(str(harmonic_package))
        force.setUsesPeriodicBoundaryConditions(True)
        force.addGlobalParameter("k", 1.0)
        system.addForce(force)
        with pytest.raises(Exception, match="built for 5 particles, but the System has 6"):
            _context(system)


def test_corrupt_package_is_refused(harmonic_package, tmp_path):
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(harmonic_package.read_bytes()[:5000])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        forces.create_force(truncated, backend="python")
    with pytest.raises(ValueError, match="not a compiled force package"):
        load_compiled(truncated)


def test_value_dependent_branch_is_refused(tmp_path):
    class Branchy(torch.nn.Module):
        def forward(self, positions: torch.Tensor) -> torch.Tensor:
            if bool(positions.sum() > 0):
                return torch.sum(positions**2)
            return torch.sum(positions)

    with pytest.raises(ValueError, match="branches on tensor values"):
        compile_model(Branchy(), 3, tmp_path / "branchy.pt2")
    assert not (tmp_path / "branchy.pt2").exists()


# ----------------------------------------------------------------------------- the CG flow potential
def test_compiled_cg_flow_equals_torchscript(cg_files):
    pt, pt2, X = cg_files
    module = torch.jit.load(str(pt))
    model = load_compiled(pt2)
    assert model.metadata["model_metadata"]["kind"] == "cg-potential"
    for frame in (0, 17, 333):
        x = torch.as_tensor(X[frame], dtype=torch.float32).requires_grad_(True)
        e_ref = module(x)
        (g,) = torch.autograd.grad(e_ref, x)
        energy, force, _ = model(X[frame])
        assert energy == pytest.approx(float(e_ref), abs=1e-3 + 1e-5 * abs(float(e_ref)))
        scale = float(g.abs().max())
        assert np.abs(force + g.double().numpy()).max() <= 1e-4 * scale + 1e-3


def test_compiled_cg_forces_match_finite_differences(cg_files):
    _, pt2, X = cg_files
    model = load_compiled(pt2)
    x = X[5].astype(np.float64)
    _, force, _ = model(x)
    h = 2e-4  # the random flow is stiff: larger steps see its curvature; float32 noise is ~1e-5 kJ/mol
    numeric = np.zeros_like(x)
    for i in range(x.shape[0]):
        for k in range(3):
            plus, minus = x.copy(), x.copy()
            plus[i, k] += h
            minus[i, k] -= h
            numeric[i, k] = -(model(plus)[0] - model(minus)[0]) / (2 * h)
    scale = np.abs(force).max()
    assert np.abs(numeric - force).max() <= 0.01 * scale + 0.2


def test_compiled_cg_flow_in_openmm(cg_files):
    pt, pt2, X = cg_files
    masses = [12.0, 14.0, 12.0, 12.0, 14.0, 12.0]
    results = {}
    for label, path in (("torchscript", pt), ("compiled", pt2)):
        for backend in package_backends():
            context = _context(forces.create_cg_system(masses, str(path), backend=backend))
            context.setPositions(X[42])
            state = context.getState(getEnergy=True, getForces=True)
            results[label, backend] = (
                state.getPotentialEnergy().value_in_unit(KJ),
                state.getForces(asNumpy=True).value_in_unit(KJ_NM),
            )
    e0, f0 = results["torchscript", package_backends()[0]]
    for key, (e, f) in results.items():
        assert e == pytest.approx(e0, abs=1e-3 + 1e-5 * abs(e0)), key
        assert np.abs(f - f0).max() <= 1e-4 * np.abs(f0).max() + 1e-3, key


def test_info_reads_package(cg_files):
    _, pt2, _ = cg_files
    result = subprocess.run(
        [sys.executable, "-m", "openmm_backmap.cli", "info", str(pt2)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "num_particles: 6" in result.stdout and "model.kind: cg-potential" in result.stdout


def test_load_model_bytes_passes_packages_through(harmonic_package):
    data = harmonic_package.read_bytes()
    assert load_model_bytes(harmonic_package) == data
    assert load_model_bytes(io.BytesIO(data).getvalue()) == data


def test_parameter_names_the_plugin_cannot_read_are_refused(tmp_path):
    with pytest.raises(ValueError, match="free of quotes"):
        compile_model(
            PeriodicHarmonic(),
            2,
            tmp_path / "bad.pt2",
            usesPeriodicBoundaryConditions=True,
            globalParameters={'k"': 1.0},
        )
    assert not (tmp_path / "bad.pt2").exists()
