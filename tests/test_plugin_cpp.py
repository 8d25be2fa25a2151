"""Run the native plugin's C++ tests (cpp/tests, via ctest) from pytest.

They need a build with tests, made by ``python cpp/build_plugin.py --tests`` (into build/cpp); an
install without them skips here with that instruction.  The C++ tests check analytic energies and
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


def test_ctest_suite():
    ctest = _ctest()
    if ctest is None:
        pytest.skip("ctest not found (pip install cmake)")
    if not (BUILD_DIR / "CTestTestfile.cmake").exists():
        pytest.skip(f"no C++ build in {BUILD_DIR}: run `python cpp/build_plugin.py --tests`")
    tests = _listed_tests(ctest)
    if not EXPECTED <= tests:
        pytest.skip(f"the build in {BUILD_DIR} has no C++ tests: run `python cpp/build_plugin.py --tests`")
    result = subprocess.run([ctest, "--output-on-failure", "--timeout", "300"], cwd=BUILD_DIR,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "100% tests passed" in result.stdout
