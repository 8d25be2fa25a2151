"""Run the native plugin's C++ tests (cpp/tests, via ctest) from pytest.

They run in the build tree build/cpp (``python cpp/build_plugin.py --tests`` makes it); when there
is none, this test makes it first (a few minutes on 2 cores, incremental afterwards). It is marked
``build`` and left out of the default run: ``pytest -m build`` runs it. Only a machine without a
compiler or CMake skips, with the reason.  The C++ tests check analytic energies and
forces, F = -dE/dx by finite differences, global parameters and dE/dk, periodic boxes, float32
modules and errors on the Reference and CPU platforms, and the XML round trip.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
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
    result = subprocess.run([ctest, "--output-on-failure", "--timeout", "300"], cwd=BUILD_DIR,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "100% tests passed" in result.stdout
