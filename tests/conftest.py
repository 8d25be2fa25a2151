"""Shared fixtures: one torch thread per test, a short alanine-dipeptide reference run and a small
exported backmapper and CG potential."""

import numpy as np
import pytest
import torch

T = 300.0


@pytest.fixture(autouse=True)
def one_thread():
    """Small models run fastest on one thread, and a shared 2-core machine makes two threads spin:
    pin torch to one thread for each test, restoring the setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_ala2(tmp_path_factory):
    """0.1 ns of ALA2 (0.5 ps frames) and a small six-bead backmapper fitted to its statistics
    (untrained: the tests that use it check plumbing and bookkeeping against independent
    recomputation, not reconstruction quality), exported with the AA System embedded."""
    from openmm_backmap.io.checkpoints import make_spec
    from openmm_backmap.io.model_files import export_model
    from openmm_backmap.io.trajectories import load_trajectory
    from openmm_backmap.models.backmapper import Backmapper
    from openmm_backmap.openmm.energies import constraints_from_system, load_system
    from openmm_backmap.systems.builtin import ala2_six_bead_mapping
    from openmm_backmap.systems.reference import generate_reference

    out = tmp_path_factory.mktemp("tiny_ala2")
    paths = generate_reference("ala2", 0.1, out, seed=4, save_every_ps=0.5, equilibrate_ps=5.0, progress=False)
    traj = load_trajectory(paths["dcd"], paths["pdb"])
    mapping = ala2_six_bead_mapping(traj.topology)
    system_xml = paths["system"].read_text()
    torch.manual_seed(0)
    model = Backmapper.from_data(
        mapping,
        traj.xyz.astype(np.float64),
        constraints=constraints_from_system(load_system(system_xml)),
        n_layers=2,
        hidden=16,
        n_hidden=1,
    )
    spec = make_spec(model, T, reference_xyz=traj.xyz[0], system_xml=system_xml)
    model_path = export_model(model, spec, out / "model.pt")
    return {"paths": paths, "traj": traj, "mapping": mapping, "model": model_path, "system_xml": system_xml, "dir": out}


@pytest.fixture(scope="session")
def tiny_cg(tiny_ala2):
    """A small CG flow potential over the six beads of :func:`tiny_ala2`, fitted to its statistics
    and trained for a few epochs, exported as a model file."""
    from openmm_backmap.io.checkpoints import make_cg_spec
    from openmm_backmap.io.model_files import export_cg
    from openmm_backmap.models.cg_potential import CGFlowPotential
    from openmm_backmap.training.cg_potential import train_cg

    mapping, traj = tiny_ala2["mapping"], tiny_ala2["traj"]
    X = mapping.project(traj.xyz.astype(np.float64))
    torch.manual_seed(0)
    model = CGFlowPotential.from_data(X, mapping.cg_bonds(), temperature=T, n_layers=2, hidden=16, n_hidden=1)
    spec = make_cg_spec(model, mapping, reference_xyz=traj.xyz[0])
    train_cg(model, spec, X[:160], X[160:], epochs=3, progress=False)
    path = tiny_ala2["dir"] / "cg.pt"
    export_cg(model, spec, path)
    return path


@pytest.fixture(scope="session")
def setup(tiny_ala2):
    """The shared small ALA2 backmapper, and a CG System of harmonic bonds and angles between the
    beads fitted to the reference data."""
    import mdtraj as md
    import openmm

    traj, mapping, system_xml, out = tiny_ala2["traj"], tiny_ala2["mapping"], tiny_ala2["system_xml"], tiny_ala2["dir"]
    model_path = tiny_ala2["model"]
    X = mapping.project(traj.xyz.astype(np.float64))
    cg = openmm.System()
    for m in mapping.masses():
        cg.addParticle(m)
    bonds = openmm.HarmonicBondForce()
    for i, j in mapping.cg_bonds():
        bonds.addBond(i, j, float(np.linalg.norm(X[:, i] - X[:, j], axis=-1).mean()), 5.0e4)
    cg.addForce(bonds)
    angles = openmm.HarmonicAngleForce()
    neighbours = {b: [] for b in range(mapping.n_cg)}
    for i, j in mapping.cg_bonds():
        neighbours[i].append(j)
        neighbours[j].append(i)
    triples = [(i, j, k) for j in range(mapping.n_cg) for i in neighbours[j] for k in neighbours[j] if i < k]
    for i, j, k in triples:
        a = md.compute_angles(mapping.cg_trajectory(traj), [[i, j, k]]).mean()
        angles.addAngle(i, j, k, float(a), 400.0)
    cg.addForce(angles)
    return {
        "model": model_path,
        "mapping": mapping,
        "cg_system": cg,
        "X0": X[0],
        "aa_system": system_xml,
        "cg_top": mapping.cg_topology,
        "dir": out,
    }
