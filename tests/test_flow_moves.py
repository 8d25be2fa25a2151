"""CGFlowMoves: Metropolis independence moves from a CG flow inside an OpenMM simulation.

Checked against physics: with the flow's own potential as the force a move is accepted unless a
prior differs (log a = the prior difference), and with an extra restraint the chain of moves samples
exp(-beta (U_flow + U_restraint)), whose mean is recomputed independently by importance sampling of
the flow's own draws."""

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit

from openmm_backmap.io.model_files import load_cg_potential
from openmm_backmap.openmm.flow_moves import CGFlowMoves
from openmm_backmap.openmm.forces import create_cg_system
from openmm_backmap.units import kT

T = 300.0


def _simulation(system, topology, X0, dynamics=True, seed=1):
    """Langevin dynamics at T, or (dynamics=False) an integrator whose steps do nothing: the chain
    then moves by the flow moves alone."""
    if dynamics:
        integrator = openmm.LangevinMiddleIntegrator(T * unit.kelvin, 10.0 / unit.picosecond, 1.0 * unit.femtoseconds)
        integrator.setRandomNumberSeed(seed)
    else:
        integrator = openmm.CustomIntegrator(0.001)
        integrator.addGlobalVariable("idle", 0.0)
        integrator.addComputeGlobal("idle", "0")
    sim = app.Simulation(topology, system, integrator, openmm.Platform.getPlatformByName("Reference"))
    sim.context.setPositions(X0)
    sim.context.setVelocitiesToTemperature(T * unit.kelvin, seed)
    return sim


def _cg(tiny_ala2, tiny_cg):
    mapping = tiny_ala2["mapping"]
    X = mapping.project(tiny_ala2["traj"].xyz.astype(np.float64))
    return mapping, X, create_cg_system(mapping.masses(), str(tiny_cg), backend="python")


def test_moves_with_the_flows_own_potential_are_accepted_by_the_priors(tiny_ala2, tiny_cg):
    mapping, X, system = _cg(tiny_ala2, tiny_cg)
    sim = _simulation(system, mapping.cg_topology.to_openmm(), X[0])
    moves = CGFlowMoves(tiny_cg, 5, seed=3)
    sim.reporters.append(moves)
    sim.step(400)
    assert moves.nProposed == 79  # steps 5, 10, ..., 395; the move of step 400 waits for the next step
    # U = -kT log q + priors: log a is the difference of the priors, zero inside their flat bottoms
    assert moves.acceptanceRate > 0.9
    state = sim.context.getState(getPositions=True, getEnergy=True)
    assert np.isfinite(state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))


def test_a_chain_of_moves_samples_the_restrained_ensemble(tiny_ala2, tiny_cg):
    """Moves alone (zero time step) on U_flow + k (r_05 - r0)^2 against importance sampling of the
    flow's draws with w = exp(-beta U_flow - log q - beta U_restraint)."""
    mapping, X, system = _cg(tiny_ala2, tiny_cg)
    r = np.linalg.norm(X[:, 0] - X[:, 5], axis=-1)
    r0, k = float(r.mean() + r.std()), 0.5 / (kT(T) ** -1 * r.var())  # pulls the mean by about a standard deviation
    restraint = openmm.CustomBondForce("k * (r - r0)^2")
    restraint.addGlobalParameter("k", k)
    restraint.addGlobalParameter("r0", r0)
    restraint.addBond(0, 5, [])
    system.addForce(restraint)
    sim = _simulation(system, mapping.cg_topology.to_openmm(), X[0], dynamics=False)
    moves = CGFlowMoves(tiny_cg, 1, temperature=T, seed=5)
    sim.reporters.append(moves)
    chain = []
    for _ in range(6000):
        sim.step(1)
        x = sim.context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        chain.append(np.linalg.norm(x[0] - x[5]))
    chain = np.asarray(chain[100:])
    assert 0.05 < moves.acceptanceRate < 0.98

    model, _ = load_cg_potential(tiny_cg)
    torch.manual_seed(11)
    with torch.no_grad():
        Y, log_q = model.sample(40000)
        u_flow = model.energy(Y).double().numpy()
    Y, log_q = Y.double().numpy(), log_q.double().numpy()
    d = np.linalg.norm(Y[:, 0] - Y[:, 5], axis=-1)
    log_w = -(u_flow + k * (d - r0) ** 2) / kT(T) - log_q
    w = np.exp(log_w - log_w.max())
    w /= w.sum()
    expected = float((w * d).sum())
    assert 1.0 / (w**2).sum() > 2000  # the reference estimate itself is sound
    # batch means for the chain's standard error (the moves are correlated by rejections)
    batches = chain[: len(chain) // 20 * 20].reshape(20, -1).mean(1)
    error = batches.std(ddof=1) / np.sqrt(len(batches))
    unrestrained = float(np.mean(d))
    assert abs(chain.mean() - expected) < 4 * error + 1e-4
    assert abs(unrestrained - expected) > 8 * error  # the restraint moved the mean: the test can fail


def test_moves_leave_reports_of_the_same_step_alone(tiny_ala2, tiny_cg):
    """A reporter at the move's step sees the configuration the chain is in, never a proposal."""
    mapping, X, system = _cg(tiny_ala2, tiny_cg)
    sim = _simulation(system, mapping.cg_topology.to_openmm(), X[0], dynamics=False)
    seen = []

    class Spy:
        def describeNextReport(self, simulation):
            return {"steps": 1, "periodic": False, "include": ["positions"]}

        def report(self, simulation, state):
            now = simulation.context.getState(getPositions=True).getPositions(asNumpy=True)
            seen.append(np.allclose(state.getPositions(asNumpy=True)._value, now._value))

    moves = CGFlowMoves(tiny_cg, 2, temperature=T, seed=1)
    sim.reporters.extend([moves, Spy()])
    sim.step(40)
    assert moves.nAccepted > 5 and all(seen) and len(seen) == 40


def test_seeded_moves_are_reproducible(tiny_ala2, tiny_cg):
    mapping, X, system = _cg(tiny_ala2, tiny_cg)
    out = []
    for _ in range(2):
        sim = _simulation(system, mapping.cg_topology.to_openmm(), X[0], dynamics=False)
        sim.reporters.append(CGFlowMoves(tiny_cg, 1, temperature=T, seed=8))
        sim.step(20)
        out.append(sim.context.getState(getPositions=True).getPositions(asNumpy=True)._value)
    np.testing.assert_array_equal(out[0], out[1])


def test_several_copies_in_a_larger_system(tiny_ala2, tiny_cg):
    mapping, X = tiny_ala2["mapping"], tiny_ala2["mapping"].project(tiny_ala2["traj"].xyz.astype(np.float64))
    # two copies held by harmonic bonds, and a particle of something else that is never moved
    system = openmm.System()
    for _ in range(2):
        for m in mapping.masses():
            system.addParticle(m)
    system.addParticle(1.0)
    bonds = openmm.HarmonicBondForce()
    for c in range(2):
        for i, j in mapping.cg_bonds():
            bonds.addBond(6 * c + i, 6 * c + j, float(np.linalg.norm(X[:, i] - X[:, j], axis=-1).mean()), 5e4)
    system.addForce(bonds)
    top = app.Topology()
    chain = top.addChain()
    for _ in range(13):
        top.addAtom("B", app.element.carbon, top.addResidue("BEA", chain))
    start = np.concatenate([X[0], X[1] + 2.0, [[5.0, 5.0, 5.0]]])
    sim = _simulation(system, top, start, dynamics=False)
    moves = CGFlowMoves(tiny_cg, 1, atomSubset=[list(range(6)), list(range(6, 12))], temperature=T, seed=2)
    sim.reporters.append(moves)
    sim.step(30)
    assert moves.nProposed == 2 * 29
    x = sim.context.getState(getPositions=True).getPositions(asNumpy=True)._value
    np.testing.assert_allclose(x[12], [5.0, 5.0, 5.0])
    # rigid placement: each copy keeps its centroid
    np.testing.assert_allclose(x[:6].mean(0), X[0].mean(0), atol=1e-9)
    np.testing.assert_allclose(x[6:12].mean(0), X[1].mean(0) + 2.0, atol=1e-9)


def test_bad_input_is_refused_by_name(tiny_ala2, tiny_cg, tmp_path):
    mapping, X, system = _cg(tiny_ala2, tiny_cg)
    with pytest.raises(ValueError, match="interval"):
        CGFlowMoves(tiny_cg, 0)
    with pytest.raises(TypeError, match="sample"):
        CGFlowMoves(object(), 10)
    with pytest.raises(ValueError):  # a backmapper file is not a CG potential
        CGFlowMoves(tiny_ala2["model"], 10)
    # a System with more particles than the flow's beads and no atomSubset
    bigger = openmm.System()
    for m in [*mapping.masses(), 1.0]:
        bigger.addParticle(m)
    top = app.Topology()
    chain = top.addChain()
    for _ in range(7):
        top.addAtom("B", app.element.carbon, top.addResidue("BEA", chain))
    sim = _simulation(bigger, top, np.concatenate([X[0], [[3.0, 3.0, 3.0]]]))
    sim.reporters.append(CGFlowMoves(tiny_cg, 1))
    with pytest.raises(ValueError, match="7 particles per copy but the CG flow has 6 beads; pass atomSubset"):
        sim.step(3)
    # an integrator without a temperature, and none given
    sim = _simulation(system, mapping.cg_topology.to_openmm(), X[0], dynamics=False)
    sim.reporters.append(CGFlowMoves(tiny_cg, 1))
    with pytest.raises(ValueError, match="CustomIntegrator has no temperature; pass temperature="):
        sim.step(3)
    # a constrained bead pair
    constrained = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    constrained.addConstraint(0, 1, 0.15)
    sim = _simulation(constrained, mapping.cg_topology.to_openmm(), X[0])
    sim.reporters.append(CGFlowMoves(tiny_cg, 1))
    with pytest.raises(ValueError, match="constraint 0 holds particles 0 and 1"):
        sim.step(3)
