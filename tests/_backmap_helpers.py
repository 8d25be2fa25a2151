"""Shared fixtures data for the backmapper tests: a short ALA2 reference run and its mapping."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
import tempfile


# C(ACE), N, CA, C, N(NME), CB: the six-atom mapping of the quality bars
ALA2_SIX = [[4], [6], [8], [14], [16], [10]]


@lru_cache(maxsize=1)
def ala2_reference() -> dict:
    """A 0.2 ns ALA2 run saved every 0.2 ps (1000 frames), generated once per test process."""
    from openmm_backmap.systems.reference import generate_reference

    out = Path(tempfile.mkdtemp(prefix="bm_ala2_"))
    paths = generate_reference("ala2", 0.2, out, seed=3, save_every_ps=0.2, equilibrate_ps=5.0, progress=False)
    return {k: Path(v) for k, v in paths.items()}


def ala2_traj():
    import mdtraj as md

    p = ala2_reference()
    return md.load(str(p["dcd"]), top=str(p["pdb"]))


def ala2_constraints() -> list:
    from openmm_backmap.openmm.energies import constraints_from_system
    from openmm_backmap.openmm.energies import load_system

    return constraints_from_system(load_system(ala2_reference()["system"]))


from openmm_backmap.geometry import random_rotation  # noqa: E402,F401 - re-exported for the tests


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Small models run fastest on one thread, and a shared 2-core machine makes two threads spin:
    pin torch to one thread for each test, restoring the setting after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _have_cxx() -> bool:
    import os
    import shutil

    return any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++") if c)


# Compiled models (AOTInductor, torch.compile) need a C++ compiler at compile time.
needs_compiler = pytest.mark.skipif(not _have_cxx(), reason="no C++ compiler: models cannot be compiled")
