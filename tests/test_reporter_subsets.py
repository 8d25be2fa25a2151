"""BackmapReporter on CG Systems that hold more than the molecule: atomSubset (one or several copies),
U_CG from chosen force groups, and the errors that say what does not match."""

from __future__ import annotations

import mdtraj as md
import numpy as np
import openmm
import pytest
from openmm import app, unit

from openmm_backmap.io.backmap_model import load_model
from openmm_backmap.io.energy_file import read_energy_file
from openmm_backmap.openmm.energies import load_system
from openmm_backmap.openmm.reporter import BackmapReporter
from openmm_backmap.units import kT

T = 300.0
EXTRA = 3  # other particles: before, between and after the copies


def _system(setup, offsets: list[int], n_particles: int):
    """The molecule's CG forces (group 0) for a copy at each offset, and a harmonic tether of every
    other particle to the origin (group 1): a CG System holding the molecule and something else."""
    mol = setup["cg_system"]
    n_cg = mol.getNumParticles()
    system = openmm.System()
    masses = [mol.getParticleMass(i) for i in range(n_cg)]
    owner = {}
    for o in offsets:
        owner.update({o + i: i for i in range(n_cg)})
    for p in range(n_particles):
        system.addParticle(masses[owner[p]] if p in owner else 12.0 * unit.amu)
    for force in mol.getForces():
        f = type(force)()
        for o in offsets:
            if isinstance(force, openmm.HarmonicBondForce):
                for b in range(force.getNumBonds()):
                    i, j, r, k = force.getBondParameters(b)
                    f.addBond(i + o, j + o, r, k)
            else:
                for a in range(force.getNumAngles()):
                    i, j, m, th, k = force.getAngleParameters(a)
                    f.addAngle(i + o, j + o, m + o, th, k)
        f.setForceGroup(0)
        system.addForce(f)
    tether = openmm.CustomExternalForce("50*(x^2+y^2+z^2)")
    for p in range(n_particles):
        if p not in owner:
            tether.addParticle(p, [])
    tether.setForceGroup(1)
    system.addForce(tether)
    return system


def _simulation(setup, offsets, n_particles, seed=3):
    system = _system(setup, offsets, n_particles)
    top = app.Topology()
    chain = top.addChain()
    for _ in range(n_particles):
        top.addAtom("P", None, top.addResidue("X", chain))
    integ = openmm.LangevinMiddleIntegrator(T * unit.kelvin, 5.0 / unit.picosecond, 0.001 * unit.picoseconds)
    integ.setRandomNumberSeed(seed)
    sim = app.Simulation(top, system, integ, openmm.Platform.getPlatformByName("Reference"))
    x = np.random.default_rng(seed).normal(0.0, 0.2, (n_particles, 3))
    for k, o in enumerate(offsets):
        x[o : o + len(setup["X0"])] = setup["X0"] + 1.5 * k
    sim.context.setPositions(x)
    sim.context.setVelocitiesToTemperature(T * unit.kelvin, seed)
    return sim, system


def _group_energy(system, xyz, groups):
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(xyz)
    return ctx.getState(getEnergy=True, groups=groups).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)


@pytest.mark.parametrize("copies", [1, 2])
def test_atom_subset_copies_and_force_groups(setup, tmp_path, copies):
    """One copy (a flat index list) or two (a list of lists) of the molecule among other particles:
    every frame holds every copy, each copy's atoms map onto its own beads, u_cg is the energy of the
    chosen force group alone, u_aa and log q are the sums of the copies' own values, and log w
    follows from them."""
    n_cg = len(setup["X0"])
    offsets = [EXTRA, 2 * EXTRA + n_cg][:copies]
    n_particles = offsets[-1] + n_cg + EXTRA
    subset = [list(range(o, o + n_cg)) for o in offsets]
    sim, system = _simulation(setup, offsets, n_particles)
    k, interval = 2, 20
    reporter = BackmapReporter(
        tmp_path / "aa.dcd",
        interval,
        model=setup["model"],
        samplesPerFrame=k,
        energyFile=tmp_path / "w.csv",
        atomSubset=subset[0] if copies == 1 else subset,
        cgForceGroups=[0],
        seed=1,
    )
    sim.reporters.append(reporter)
    sim.reporters.append(app.DCDReporter(str(tmp_path / "cg.dcd"), interval))
    sim.step(3 * interval)
    reporter.close()
    model = load_model(setup["model"], device="cpu")
    n_aa = model.n_aa
    cg = md.load_dcd(str(tmp_path / "cg.dcd"), top=md.Topology.from_openmm(sim.topology)).xyz.astype(np.float64)
    aa = md.load_dcd(
        str(tmp_path / "aa.dcd"), top=model.topology.join(model.topology) if copies == 2 else model.topology
    )
    assert aa.n_atoms == copies * n_aa and aa.n_frames == 3 * k
    rows = read_energy_file(tmp_path / "w.csv")
    ctx = openmm.Context(
        load_system(setup["aa_system"]), openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference")
    )
    u_aa = np.zeros(len(aa.xyz))
    log_q = np.zeros(len(aa.xyz))
    for c in range(copies):
        part = aa.xyz[:, c * n_aa : (c + 1) * n_aa].astype(np.float64)
        X = np.repeat(cg[:, subset[c]], k, axis=0)
        np.testing.assert_allclose(setup["mapping"].project(part), X, atol=2e-6)
        log_q += model.log_prob(part.astype(np.float32), X.astype(np.float32))
        for s, xyz in enumerate(part):
            ctx.setPositions(xyz)
            u_aa[s] += ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    u_cg = np.repeat([_group_energy(system, x, {0}) for x in cg], k)
    all_groups = np.repeat([_group_energy(system, x, {0, 1}) for x in cg], k)
    assert np.all(np.abs(all_groups - u_cg) > 1.0)  # the tethered particles do contribute elsewhere
    np.testing.assert_allclose(rows["u_cg_kjmol"], u_cg, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(rows["u_aa_kjmol"], u_aa, rtol=1e-4, atol=0.05)
    np.testing.assert_allclose(rows["log_q"], log_q, rtol=1e-4, atol=2e-2)
    beta = 1.0 / kT(T)
    np.testing.assert_allclose(rows["log_w"], -beta * rows["u_aa_kjmol"] + beta * u_cg - rows["log_q"], atol=1e-3)


def test_subset_and_group_errors_say_what_does_not_match(setup, tmp_path):
    n_cg = len(setup["X0"])
    n_particles = 2 * EXTRA + n_cg
    sim, _ = _simulation(setup, [EXTRA], n_particles)

    def reporter(name, **kw):
        return BackmapReporter(tmp_path / f"{name}.dcd", 10, model=setup["model"], **kw)

    with pytest.raises(
        ValueError, match=rf"atomSubset selects {n_cg - 1} particles per copy but the model has {n_cg} beads"
    ):
        reporter("a", atomSubset=list(range(EXTRA, EXTRA + n_cg - 1)))
    with pytest.raises(ValueError, match=r"same number of beads, got copies of \[5, 6\] particles"):
        reporter("b", atomSubset=[list(range(6)), list(range(6, 11))])
    with pytest.raises(ValueError, match="lists particle 3 twice"):
        reporter("c", atomSubset=[list(range(6)), list(range(3, 9))])
    with pytest.raises(ValueError, match="cgForceGroups must be force groups 0-31"):
        reporter("d", cgForceGroups=[40])
    last = n_particles + n_cg - 3
    groups = r"group\(s\) \[5\] that no force of the CG System is in \(its forces are in groups \[0, 1\]\)"
    cases = [
        ({"atomSubset": list(range(last - n_cg + 1, last + 1))}, rf"has particle {last}, but the CG System has "),
        ({"atomSubset": list(range(EXTRA, EXTRA + n_cg)), "cgForceGroups": [0, 5]}, groups),
        ({}, rf"simulation has {n_particles} particles but the model expects {n_cg} CG beads; pass atomSubset="),
    ]
    for n, (kw, message) in enumerate(cases):
        rep = reporter(f"e{n}", **kw)
        with pytest.raises(ValueError, match=message):
            rep.describeNextReport(sim)
            rep.report(sim, sim.context.getState(getPositions=True, getEnergy=True))
        rep.close()


def test_temporal_refuses_copies(setup, tmp_path):
    with pytest.raises(ValueError, match="temporal=True works for one molecule"):
        BackmapReporter(tmp_path / "t.dcd", 10, model=setup["model"], temporal=True, atomSubset=[[0, 1], [2, 3]])
