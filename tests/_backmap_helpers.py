"""Shared test data: a short ALA2 reference run (made once per test process) and its six-bead mapping."""

from __future__ import annotations

import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import pytest


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
    from openmm_backmap.openmm.energies import constraints_from_system, load_system

    return constraints_from_system(load_system(ala2_reference()["system"]))


def ala2_six(topology):
    """The six-bead mapping of the package (:func:`~openmm_backmap.systems.builtin.ala2_six_bead_mapping`)."""
    from openmm_backmap.systems.builtin import ala2_six_bead_mapping

    return ala2_six_bead_mapping(topology)


def _have_cxx() -> bool:
    return any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++") if c)


# Compiled models (AOTInductor, torch.compile) need a C++ compiler at compile time.
needs_compiler = pytest.mark.skipif(not _have_cxx(), reason="no C++ compiler: models cannot be compiled")


def tiny_protein_model(mapping: str, names, x, steps: int = 15):
    """A ProteinBackmapper (hidden 16, 4 bins) fitted in seconds: statistics from 32 noisy copies
    (0.005 nm) of one structure x (1, n_atoms, 3) nm in chain order, then ``steps`` maximum-likelihood
    steps, which must lower the NLL. For tests of plumbing, never of the shipped weights' quality."""
    import numpy as np
    import torch

    from openmm_backmap.models.protein import ProteinBackmapper

    rng = np.random.default_rng(0)
    xs = x + rng.normal(0.0, 0.005, (32,) + x.shape[1:])
    torch.manual_seed(0)
    model = ProteinBackmapper(mapping, ProteinBackmapper.fit_statistics([(names, xs)], mapping), hidden=16, n_bins=4)
    chain = model.for_sequence(names)
    aa = torch.as_tensor(xs, dtype=torch.float32)
    cg = aa[:, chain.beads]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = -chain.log_prob(aa, cg).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    return model


def save_tiny_pretrained(folder, names, x):
    """Tiny ``protein-ca`` and ``protein-backbone`` files (:func:`tiny_protein_model`) in ``folder``,
    to stand in for the shipped ones (monkeypatch ``io.protein_models.PRETRAINED_DIR`` to it)."""
    for mapping, name in (("ca", "protein-ca"), ("backbone", "protein-backbone")):
        tiny_protein_model(mapping, names, x).save(folder / f"{name}.pt")
    return folder


def assert_amber_gbn2_energies(topology, xyz_nm, energies, frames) -> None:
    """Each of ``frames`` of ``xyz_nm`` (N, n_atoms, 3) has the amber14 + GBn2 energy (no cutoff,
    HBonds; OpenMM's Reference platform) given in ``energies`` (kJ/mol; rel 1e-4, abs 0.05):
    ``topology`` is an OpenMM topology with amber14 names."""
    import numpy as np
    import openmm
    import pytest
    from openmm import app, unit

    system = app.ForceField("amber14-all.xml", "implicit/gbn2.xml").createSystem(
        topology, nonbondedMethod=app.NoCutoff, constraints=app.HBonds
    )
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    for s in frames:
        ctx.setPositions(np.asarray(xyz_nm[s], dtype=np.float64))
        u = ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        assert energies[s] == pytest.approx(u, rel=1e-4, abs=0.05), s
