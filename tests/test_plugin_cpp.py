"""Run the native plugin's C++ tests (cpp/tests, via ctest) from pytest, and check that installing
the package builds the plugin.

The C++ tests run in the build tree build/cpp (``python cpp/build_plugin.py --tests`` makes it);
when there is none, :func:`test_ctest_suite` makes it first (a few minutes on 2 cores, incremental
afterwards). Both tests here are marked ``build`` and left out of the default run: ``pytest -m build``
runs them. Only a machine without a compiler or CMake skips, with the reason.  The C++ tests check analytic energies and
forces, F = -dE/dx by finite differences, global parameters and dE/dk, periodic boxes, float32
modules and errors on the Reference and CPU platforms, and the XML round trip and versions.

:func:`test_install_builds_plugin` (marked slow and build: it compiles the plugin from scratch)
installs a copy of the source tree into a fresh virtual environment with ``pip install
--no-build-isolation --no-deps [-e]``, reusing this interpreter's torch and OpenMM, and checks that
the installed package loads the plugin and that the plugin computes a known energy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD_DIR = ROOT / "build" / "cpp"
EXPECTED = {"BackmapTorchForceReference", "BackmapTorchForceCPU", "SerializeBackmapTorchForce"}


def _ctest() -> str | None:
    local = Path(sys.executable).parent / "ctest"
    return str(local) if local.exists() else shutil.which("ctest")


def _listed_tests(ctest: str) -> set[str]:
    listing = subprocess.run([ctest, "-N"], cwd=BUILD_DIR, capture_output=True, text=True, check=False)
    return set(re.findall(r"Test\s+#\d+:\s+(\S+)", listing.stdout))


def _build_with_tests(tmp_path: Path) -> str:
    """Configure and build plugin + C++ tests in BUILD_DIR; returns the build log's reason on failure."""
    sys.path.insert(0, str(ROOT / "cpp"))
    try:
        from build_plugin import build_plugin
    finally:
        sys.path.pop(0)
    # run_tests=True builds the test executables (and runs ctest once; a test failure there is
    # asserted below, not skipped)
    build_plugin(ROOT / "cpp", BUILD_DIR, tmp_path / "_plugin", run_tests=True, verbose=False)
    failed = tmp_path / "_plugin" / "BUILD_FAILED"
    return failed.read_text().strip()[:500] if failed.exists() else ""


@pytest.mark.build
def test_ctest_suite(tmp_path):
    ctest = _ctest()
    if ctest is None:
        pytest.skip("ctest not found (pip install cmake)")
    if not (BUILD_DIR / "CTestTestfile.cmake").exists() or not EXPECTED <= _listed_tests(ctest):
        reason = _build_with_tests(tmp_path)
        if not (BUILD_DIR / "CTestTestfile.cmake").exists() or not EXPECTED <= _listed_tests(ctest):
            pytest.skip(f"the C++ tests could not be built here: {reason}")
    result = subprocess.run(
        [ctest, "--output-on-failure", "--timeout", "300"], cwd=BUILD_DIR, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "100% tests passed" in result.stdout


# Not copied into the test's source tree: build outputs, environments, caches and the top-level
# data/demo output directories (.gitignore).
_SKIP_NAMES = {".git", "build", "dist", ".venv", "_plugin", "__pycache__", ".pytest_cache", ".ruff_cache"}
_SKIP_TOP = {"data", "demo", "demo-out"}

# Run by the fresh environment's interpreter from a directory outside the source tree.  It loads
# the plugin (the function lives in openmm_backmap.forces, or openmm_backmap.openmm.plugin) and
# evaluates E = sum |x_i|^2 with it on the Reference platform.
_CHECK_INSTALLED = textwrap.dedent(
    """
    import importlib, importlib.metadata, io, json, pathlib
    import numpy as np, openmm, torch
    from openmm import unit
    import openmm_backmap
    for name in ("openmm_backmap.openmm.plugin", "openmm_backmap.forces"):
        try:
            plugin_module = importlib.import_module(name)
            break
        except ImportError:
            continue
    plugin = plugin_module.load_native_plugin()
    failed = pathlib.Path(openmm_backmap.__file__).parent / "_plugin" / "BUILD_FAILED"
    report = {
        "package": openmm_backmap.__file__,
        "version": openmm_backmap.__version__,
        "distribution_version": importlib.metadata.version("openmm-backmap"),
        "plugin": getattr(plugin, "__file__", None),
        "build_failed": failed.read_text() if failed.exists() else None,
    }
    if plugin is not None:
        class Square(torch.nn.Module):
            def forward(self, positions):
                return torch.sum(positions**2)
        buffer = io.BytesIO()
        torch.jit.save(torch.jit.script(Square()), buffer)
        system = openmm.System()
        for _ in range(3):
            system.addParticle(1.0)
        system.addForce(plugin.BackmapTorchForce.fromBytes(buffer.getvalue()))
        context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
        x = np.array([[0.1, 0.2, 0.3], [-0.4, 0.5, 0.0], [1.0, -1.0, 0.5]])
        context.setPositions(x)
        state = context.getState(getEnergy=True, getForces=True)
        report["energy"] = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        report["expected_energy"] = float((x**2).sum())
        forces = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
        report["force_error"] = float(np.abs(forces + 2 * x).max())
    print("REPORT " + json.dumps(report))
    """
)


def _copy_source(destination: Path) -> None:
    def ignore(directory: str, names: list[str]) -> set[str]:
        skipped = {n for n in names if n in _SKIP_NAMES or n.endswith(".egg-info")}
        if Path(directory).resolve() == ROOT:
            skipped |= _SKIP_TOP & set(names)
        return skipped

    shutil.copytree(ROOT, destination, ignore=ignore)


@pytest.mark.slow
@pytest.mark.build
@pytest.mark.parametrize("editable", [True, False], ids=["editable", "regular"])
def test_install_builds_plugin(tmp_path, editable):
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler: the plugin cannot be built")
    source = tmp_path / "src"
    _copy_source(source)
    # A fresh environment that sees this interpreter's packages (torch, OpenMM, setuptools, pip)
    # through a .pth file: `venv --system-site-packages` would expose the base interpreter's
    # packages instead when the tests run inside a virtual environment.
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    env_purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    parent_paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (Path(env_purelib) / "parent-environment.pth").write_text("\n".join(parent_paths) + "\n")
    # cmake, swig and ctest of this environment (pip packages) are found on PATH.
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    env.pop("PYTHONPATH", None)
    env.pop("OPENMM_BACKMAP_SKIP_PLUGIN", None)
    env.pop("OPENMM_BACKMAP_DISABLE_NATIVE", None)
    command = [str(python), "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index"]
    command += ["-e", str(source)] if editable else [str(source)]
    install = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    # A file rather than `-c`: torch.jit.script reads the model's source.
    script = tmp_path / "check_installed.py"
    script.write_text(_CHECK_INSTALLED)
    check = subprocess.run(
        [str(python), str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]
    report = json.loads(check.stdout.split("REPORT ", 1)[1])
    package_dir = Path(report["package"]).parent
    assert report["build_failed"] is None, report["build_failed"]
    assert report["plugin"] is not None, report
    # Editable: the source tree is imported and holds the plugin; regular: site-packages holds both.
    if editable:
        assert package_dir == source / "openmm_backmap"
    else:
        assert package_dir.is_relative_to(env_dir), package_dir
    assert Path(report["plugin"]).parent == package_dir / "_plugin"
    assert report["distribution_version"] == report["version"]
    assert report["energy"] == pytest.approx(report["expected_energy"], rel=1e-12)
    assert report["force_error"] < 1e-12
