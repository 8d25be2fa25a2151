"""BackmapReporter: protocol, files, the reweighting energies recomputed independently, restarts."""

import csv

import mdtraj as md
import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit

from openmm_backmap.analysis.reweighting import reweight
from openmm_backmap.io.backmap_model import load_model
from openmm_backmap.io.energy_file import read_energy_file
from openmm_backmap.openmm.energies import load_system
from openmm_backmap.openmm.reporter import BackmapReporter, make_whole
from openmm_backmap.units import kT

T = 300.0
INTERVAL = 50


def _simulation(setup, seed=1):
    integ = openmm.LangevinMiddleIntegrator(T * unit.kelvin, 5.0 / unit.picosecond, 0.001 * unit.picoseconds)
    integ.setRandomNumberSeed(seed)
    sim = app.Simulation(
        setup["cg_top"].to_openmm(), setup["cg_system"], integ, openmm.Platform.getPlatformByName("Reference")
    )
    sim.context.setPositions(setup["X0"])
    sim.context.setVelocitiesToTemperature(T * unit.kelvin, seed)
    return sim


def test_describe_next_report_follows_openmm_protocol(setup):
    reporter = BackmapReporter(setup["dir"] / "p.dcd", 100, model=setup["model"])
    sim = _simulation(setup)
    assert reporter.describeNextReport(sim) == {"steps": 100, "periodic": False, "include": ["positions", "energy"]}
    sim.step(30)
    assert reporter.describeNextReport(sim)["steps"] == 70
    reporter.close()


def test_energy_rows_recomputed_independently(setup, tmp_path):
    """Every row's U_AA, U_CG, log q and log w agree with OpenMM and the model evaluated anew."""
    sim = _simulation(setup)
    n = 3
    with BackmapReporter(
        tmp_path / "aa.dcd", INTERVAL, model=setup["model"], samplesPerFrame=n, energyFile=tmp_path / "w.csv", seed=5
    ) as reporter:
        sim.reporters.append(reporter)
        sim.reporters.append(app.DCDReporter(str(tmp_path / "cg.dcd"), INTERVAL))
        sim.step(6 * INTERVAL)
    aa = md.load(str(tmp_path / "aa.dcd"), top=load_model(setup["model"]).topology)
    cg = md.load(str(tmp_path / "cg.dcd"), top=setup["cg_top"])
    cols = read_energy_file(tmp_path / "w.csv")
    assert aa.n_frames == 6 * n == len(cols["step"])
    np.testing.assert_array_equal(cols["step"], np.repeat(np.arange(1, 7) * INTERVAL, n))
    np.testing.assert_array_equal(cols["sample"], np.tile(np.arange(n), 6))
    np.testing.assert_allclose(cols["time_ps"], cols["step"] * 0.001, atol=1e-9)
    # every sample maps onto its CG frame exactly (slice mapping): M x = X
    X = setup["mapping"].project(aa.xyz.astype(np.float64))
    np.testing.assert_allclose(X, np.repeat(cg.xyz, n, axis=0), atol=2e-6)
    # U_AA from an OpenMM Context on the frames read back
    ctx = openmm.Context(
        load_system(setup["aa_system"]), openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference")
    )
    u_aa = []
    for xyz in aa.xyz:
        ctx.setPositions(xyz.astype(np.float64))
        u_aa.append(ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
    finite = np.isfinite(cols["u_aa_kjmol"])
    np.testing.assert_allclose(cols["u_aa_kjmol"][finite], np.array(u_aa)[finite], rtol=1e-4, atol=0.05)
    # U_CG from a CG Context on the CG frames
    cctx = openmm.Context(
        setup["cg_system"], openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference")
    )
    u_cg = []
    for xyz in cg.xyz:
        cctx.setPositions(xyz.astype(np.float64))
        u_cg.append(cctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
    np.testing.assert_allclose(cols["u_cg_kjmol"], np.repeat(u_cg, n), rtol=1e-4, atol=1e-2)
    # log q from the model on the written frames and their CG frames
    log_q = load_model(setup["model"]).log_prob(aa.xyz, np.repeat(cg.xyz, n, axis=0))
    np.testing.assert_allclose(cols["log_q"], log_q, atol=5e-3 * np.abs(log_q).max())
    beta = 1.0 / kT(T)
    expected = -beta * cols["u_aa_kjmol"] + beta * cols["u_cg_kjmol"] - cols["log_q"]
    np.testing.assert_allclose(cols["log_w"][finite], expected[finite], rtol=1e-9, atol=1e-6)
    assert 0 < reweight(tmp_path / "w.csv").ess <= aa.n_frames


@pytest.mark.parametrize("suffix", [".h5", ".nc"])
def test_other_formats(setup, tmp_path, suffix):
    sim = _simulation(setup)
    reporter = BackmapReporter(tmp_path / f"aa{suffix}", INTERVAL, model=setup["model"], samplesPerFrame=2)
    sim.reporters.append(reporter)
    sim.step(3 * INTERVAL)
    reporter.close()
    traj = md.load(str(tmp_path / f"aa{suffix}"), top=load_model(setup["model"]).topology)
    assert traj.n_frames == 6
    assert np.all(np.isfinite(traj.xyz))


def test_xtc_refused_with_reason(setup, tmp_path):
    with pytest.raises(ValueError, match="XTC is refused for weighted output.*kT"):
        BackmapReporter(tmp_path / "aa.xtc", 10, model=setup["model"])


def test_append_after_checkpoint_loses_and_duplicates_nothing(setup, tmp_path):
    n = 2
    sim = _simulation(setup)
    reporter = BackmapReporter(
        tmp_path / "aa.dcd", INTERVAL, model=setup["model"], samplesPerFrame=n, energyFile=tmp_path / "w.csv"
    )
    sim.reporters.append(reporter)
    sim.step(4 * INTERVAL)
    sim.saveCheckpoint(str(tmp_path / "state.chk"))
    sim.step(3 * INTERVAL)  # frames 5-7 are written, then the run "crashes"
    reporter.close()
    assert read_energy_file(tmp_path / "w.csv")["step"].size == 7 * n

    sim2 = _simulation(setup, seed=2)
    sim2.loadCheckpoint(str(tmp_path / "state.chk"))
    assert sim2.currentStep == 4 * INTERVAL
    reporter2 = BackmapReporter(
        tmp_path / "aa.dcd",
        INTERVAL,
        model=setup["model"],
        samplesPerFrame=n,
        energyFile=tmp_path / "w.csv",
        append=True,
    )
    sim2.reporters.append(reporter2)
    sim2.step(6 * INTERVAL)
    reporter2.close()
    cols = read_energy_file(tmp_path / "w.csv")
    np.testing.assert_array_equal(cols["step"], np.repeat(np.arange(1, 11) * INTERVAL, n))
    traj = md.load(str(tmp_path / "aa.dcd"), top=load_model(setup["model"]).topology)
    assert traj.n_frames == 10 * n
    # the first four frames survived the restart unchanged
    with open(tmp_path / "w.csv") as fh:
        assert next(csv.reader(fh)) == ["step", "time_ps", "sample", "u_cg_kjmol", "u_aa_kjmol", "log_q", "log_w"]


def test_nan_positions_raise_with_step(setup, tmp_path):
    sim = _simulation(setup)
    reporter = BackmapReporter(tmp_path / "aa.dcd", INTERVAL, model=setup["model"])
    sim.step(10)
    x = np.array(setup["X0"])
    x[2, 1] = np.nan
    sim.context.setPositions(x)
    state = sim.context.getState(getPositions=True, getEnergy=False)
    with pytest.raises(ValueError, match="CG positions at step 10 contain NaN"):
        reporter.report(sim, state)
    reporter.close()


def test_nonfinite_aa_energy_is_written_and_flagged(setup, tmp_path):
    system = load_system(setup["aa_system"])
    blowup = openmm.CustomExternalForce("1/(x-x)")  # infinite for every sample
    blowup.addParticle(0, [])
    system.addForce(blowup)
    sim = _simulation(setup)
    reporter = BackmapReporter(
        tmp_path / "aa.dcd",
        INTERVAL,
        model=setup["model"],
        samplesPerFrame=2,
        energyFile=tmp_path / "w.csv",
        aaSystem=system,
    )
    sim.reporters.append(reporter)
    sim.step(2 * INTERVAL)
    reporter.close()
    cols = read_energy_file(tmp_path / "w.csv")
    assert cols["step"].size == 4  # nothing dropped
    assert np.all(np.isinf(cols["u_aa_kjmol"])) and np.all(cols["log_w"] == -np.inf)
    assert md.load(str(tmp_path / "aa.dcd"), top=load_model(setup["model"]).topology).n_frames == 4


def test_model_for_another_system_is_refused(setup, tmp_path):
    sim = _simulation(setup)
    other = openmm.System()
    for _ in range(5):
        other.addParticle(12.0)
    with pytest.raises(ValueError, match="AA System has 5 particles but the model reconstructs 22 atoms"):
        BackmapReporter(tmp_path / "aa.dcd", 10, model=setup["model"], energyFile=tmp_path / "w.csv", aaSystem=other)
    # a CG simulation with the wrong bead count
    small = openmm.System()
    for _ in range(4):
        small.addParticle(12.0)
    sim = app.Simulation(
        setup["cg_top"].subset(range(4)).to_openmm(),
        small,
        openmm.VerletIntegrator(0.001),
        openmm.Platform.getPlatformByName("Reference"),
    )
    sim.context.setPositions(setup["X0"][:4])
    reporter = BackmapReporter(tmp_path / "aa2.dcd", 1, model=setup["model"])
    with pytest.raises(ValueError, match="simulation has 4 particles but the model expects 6 CG beads"):
        reporter.report(sim, sim.context.getState(getPositions=True, getEnergy=True))
    reporter.close()


def test_make_whole_restores_bonds_across_the_box():
    box = np.diag([2.0, 2.0, 2.0])
    X = np.array([[0.1, 1.0, 1.0], [1.95, 1.0, 1.0], [1.8, 1.9, 0.05]])  # 0-1 and 1-2 wrapped apart
    whole = make_whole(X, [(0, 1), (1, 2)], box)
    assert np.linalg.norm(whole[0] - whole[1]) == pytest.approx(0.15)
    assert np.linalg.norm(whole[1] - whole[2]) == pytest.approx(np.linalg.norm([0.15, 0.9, 0.95]))
    np.testing.assert_allclose((whole - X) / 2.0, np.round((whole - X) / 2.0), atol=1e-12)  # moved by box vectors


def test_temporal_reporter_conditions_on_previous_reconstruction(tiny_ala2, setup, tmp_path):
    """temporal=True: each frame's log q is that of the temporal model given the previous frame,
    across a restart too (the previous frame then comes from the file)."""
    from openmm_backmap.io.checkpoints import make_spec
    from openmm_backmap.io.model_files import export_model
    from openmm_backmap.models.backmapper import Backmapper

    traj, mapping = tiny_ala2["traj"], tiny_ala2["mapping"]
    torch.manual_seed(1)
    model = Backmapper.from_data(mapping, traj.xyz.astype(np.float64), temporal=True, n_layers=2, hidden=16, n_hidden=1)
    path = export_model(
        model,
        make_spec(model, T, reference_xyz=traj.xyz[0], system_xml=tiny_ala2["system_xml"]),
        tmp_path / "temporal.pt",
    )
    with pytest.raises(ValueError, match="temporal=True needs a model trained with --temporal"):
        BackmapReporter(tmp_path / "x.dcd", INTERVAL, model=setup["model"], temporal=True)
    sim = _simulation(setup)
    n = 2
    with BackmapReporter(
        tmp_path / "aa.dcd",
        INTERVAL,
        model=path,
        samplesPerFrame=n,
        energyFile=tmp_path / "w.csv",
        temporal=True,
        seed=2,
    ) as reporter:
        sim.reporters.append(reporter)
        sim.reporters.append(app.DCDReporter(str(tmp_path / "cg.dcd"), INTERVAL))
        sim.step(4 * INTERVAL)
    # a restart picks up the last reconstruction from the file
    sim.saveCheckpoint(str(tmp_path / "state.chk"))
    sim = _simulation(setup, seed=3)
    sim.loadCheckpoint(str(tmp_path / "state.chk"))
    with BackmapReporter(
        tmp_path / "aa.dcd",
        INTERVAL,
        model=path,
        samplesPerFrame=n,
        energyFile=tmp_path / "w.csv",
        temporal=True,
        seed=3,
        append=True,
    ) as reporter:
        sim.reporters.append(reporter)
        sim.reporters.append(app.DCDReporter(str(tmp_path / "cg.dcd"), INTERVAL, append=True))
        sim.step(2 * INTERVAL)
    loaded = load_model(path, device="cpu")
    aa = md.load(str(tmp_path / "aa.dcd"), top=loaded.topology).xyz
    cg = md.load(str(tmp_path / "cg.dcd"), top=setup["cg_top"]).xyz
    cols = read_energy_file(tmp_path / "w.csv")
    assert aa.shape[0] == 6 * n
    # frames after the first: chain s of frame t is conditioned on chain s of frame t - 1
    cur = torch.as_tensor(aa[n:])
    prev = torch.as_tensor(aa[:-n])
    X = torch.as_tensor(np.repeat(cg[1:], n, axis=0))
    with torch.no_grad():
        expected = loaded.module.log_prob_next(cur, X, prev).numpy()
    np.testing.assert_allclose(cols["log_q"][n:], expected, rtol=1e-4, atol=1e-3)
