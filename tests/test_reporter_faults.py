"""BackmapReporter under faults: restarts, crashes, full disks, shared paths, bad files.

The CG runs here use a Verlet integrator on the Reference platform, so a run continued from a
checkpoint retraces the uninterrupted one exactly: every written frame is checked against the CG
positions of an uninterrupted run at its step (the six-bead mapping selects atoms, so M x = X),
every row's U_CG against that run's energy and its U_AA against the frame it sits next to.
"""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import mdtraj as md
import numpy as np
import openmm
import pytest
import torch
from _reporter_worker import AtomicCheckpoint
from openmm import app, unit

import openmm_backmap.io.reporter_outputs as outputs_module
from openmm_backmap.analysis.reweighting import reweight
from openmm_backmap.io.backmap_model import load_model
from openmm_backmap.io.energy_file import read_energy_file
from openmm_backmap.openmm.energies import aa_energy
from openmm_backmap.openmm.reporter import BackmapReporter

INTERVAL = 10  # steps between reports
N = 2  # samples per report
T = 300.0
FORMATS = [".dcd", ".nc", ".h5"]
ROOT = Path(__file__).resolve().parents[1]
posix = pytest.mark.skipif(sys.platform == "win32", reason="flock, fork and file-size limits are POSIX")


def _simulation(setup, start, checkpoint=None):
    sim = app.Simulation(
        setup["cg_top"].to_openmm(),
        setup["cg_system"],
        openmm.VerletIntegrator(0.001),
        openmm.Platform.getPlatformByName("Reference"),
    )
    if checkpoint is None:
        sim.context.setPositions(setup["X0"])
        sim.context.setVelocities(start["velocities"])
    else:
        sim.loadCheckpoint(str(checkpoint))
    return sim


def _reference(setup, start, end):
    """CG positions (nm) and energies (kJ/mol) of an uninterrupted run at every report step to ``end``."""
    sim = _simulation(setup, start)
    X, U = {}, {}
    for step in range(INTERVAL, end + 1, INTERVAL):
        sim.step(INTERVAL)
        state = sim.context.getState(getPositions=True, getEnergy=True)
        X[step] = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        U[step] = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    return X, U


@pytest.fixture(scope="module")
def start(setup):
    sim = app.Simulation(
        setup["cg_top"].to_openmm(),
        setup["cg_system"],
        openmm.VerletIntegrator(0.001),
        openmm.Platform.getPlatformByName("Reference"),
    )
    sim.context.setPositions(setup["X0"])
    sim.context.setVelocitiesToTemperature(T * unit.kelvin, 3)
    v = sim.context.getState(getVelocities=True).getVelocities(asNumpy=True)
    v = v.value_in_unit(unit.nanometer / unit.picosecond)
    model = load_model(setup["model"])  # one model for all reporters: TorchScript's first calls are slow
    for _ in range(2):
        model.sample(setup["X0"], N)
    out = {"velocities": np.asarray(v), "model": model, "top": model.topology, "energy": aa_energy(setup["aa_system"])}
    out["X"], out["U"] = _reference(setup, out, 200)
    return out


def _reporter(start, tmp, suffix=".dcd", energy=True, **kwargs):
    return BackmapReporter(
        tmp / f"aa{suffix}",
        kwargs.pop("interval", INTERVAL),
        model=start["model"],
        samplesPerFrame=kwargs.pop("samples", N),
        energyFile=(tmp / "w.csv") if energy else None,
        **kwargs,
    )


def _assert_reports(setup, start, tmp, suffix, last, energy=True, X=None, U=None):
    """The files hold the reports at steps INTERVAL..last, each once, frames and rows aligned."""
    X, U = X or start["X"], U or start["U"]
    steps = np.arange(INTERVAL, last + 1, INTERVAL)
    traj = md.load(str(tmp / f"aa{suffix}"), top=start["top"])
    assert traj.n_frames == N * len(steps)
    np.testing.assert_allclose(
        setup["mapping"].project(traj.xyz.astype(np.float64)), np.repeat([X[s] for s in steps], N, axis=0), atol=2e-5
    )
    if suffix != ".dcd":  # the stored times are the reports' own
        np.testing.assert_allclose(traj.time, np.repeat(steps * 0.001, N), atol=1e-5)
    if not energy:
        return
    cols = read_energy_file(tmp / "w.csv")
    np.testing.assert_array_equal(cols["step"], np.repeat(steps, N))
    np.testing.assert_array_equal(cols["sample"], np.tile(np.arange(N), len(steps)))
    np.testing.assert_allclose(cols["u_cg_kjmol"], np.repeat([U[s] for s in steps], N), rtol=1e-6, atol=1e-4)
    xyz = torch.as_tensor(traj.xyz.astype(np.float64)).requires_grad_(True)
    u = start["energy"](xyz)
    (grad,) = torch.autograd.grad(u.sum(), xyz)
    u_aa = u.detach().double().numpy()
    # the reporter's energies are of the positions before the file rounded them (float32 Angstrom in
    # the DCD, then float32 nm in mdtraj): up to about one float32 spacing per coordinate, which at a
    # clash (U ~ 1e7 kJ/mol, forces ~ 1e9 kJ/mol/nm) moves U by more than 1e-4 of itself
    rounding = np.spacing(np.abs(traj.xyz * 10.0).astype(np.float32)).astype(np.float64) / 10.0
    tolerance = 0.05 + 1e-4 * np.abs(u_aa) + (np.abs(grad.numpy()) * rounding).sum((1, 2))
    finite = np.isfinite(cols["u_aa_kjmol"])
    assert finite.sum() > len(steps)  # enough rows to tell a shifted frame from its own
    deviation = np.abs(cols["u_aa_kjmol"][finite] - u_aa[finite])
    assert np.all(deviation <= tolerance[finite]), np.flatnonzero(deviation > tolerance[finite])


@pytest.fixture
def full_disk(monkeypatch):
    """``full_disk(path, fraction)``: the next write to ``path`` stores ``fraction`` of its bytes and
    then fails with ENOSPC, like a disk that fills up in the middle of it."""
    write_all = outputs_module._write_all

    def arm(path, fraction):
        target = os.stat(path).st_ino if path.exists() else None

        def failing(fh, data, offset):
            if os.fstat(fh.fileno()).st_ino == (target or os.stat(path).st_ino):
                monkeypatch.setattr(outputs_module, "_write_all", write_all)
                write_all(fh, bytes(data)[: int(fraction * len(data))], offset)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            write_all(fh, data, offset)

        monkeypatch.setattr(outputs_module, "_write_all", failing)

    return arm


# ---------------------------------------------------------------------------- restarts
@pytest.mark.parametrize("suffix", FORMATS)
def test_restart_without_energy_file_keeps_each_report_once(setup, start, tmp_path, suffix):
    """The trajectory's own step record decides where to resume (no energy file to ask)."""
    sim = _simulation(setup, start)
    reporter = _reporter(start, tmp_path, suffix, energy=False)
    sim.reporters.append(reporter)
    sim.step(60)
    sim.saveCheckpoint(str(tmp_path / "c.chk"))
    sim.step(40)  # reports at 70-100 written, then the run "crashes"
    reporter.close()
    sim = _simulation(setup, start, tmp_path / "c.chk")
    reporter = _reporter(start, tmp_path, suffix, energy=False, append=True)
    sim.reporters.append(reporter)
    sim.step(50)
    reporter.close()
    assert "kept 6 reports (steps 10-60), cut 8 frames, at step 60" in reporter.resumed
    _assert_reports(setup, start, tmp_path, suffix, 110, energy=False)


@pytest.mark.parametrize("suffix", FORMATS)
def test_append_before_the_data_is_refused_and_changes_nothing(setup, start, tmp_path, suffix):
    sim = _simulation(setup, start)
    with _reporter(start, tmp_path, suffix) as reporter:
        sim.reporters.append(reporter)
        sim.step(50)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    fresh = _simulation(setup, start)
    reporter = _reporter(start, tmp_path, suffix, append=True)
    fresh.reporters.append(reporter)
    with pytest.raises(
        ValueError,
        match=rf"aa{suffix}: the simulation is at step 0, before the file's first report "
        r"at step 10 \(its reports run to step 50\)",
    ):
        fresh.step(10)
    reporter.close()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_missing_directory_is_refused_before_anything_is_written(setup, start, tmp_path):
    with pytest.raises(FileNotFoundError, match="the directory of energyFile .*no/w.csv does not exist"):
        BackmapReporter(tmp_path / "aa.dcd", INTERVAL, model=start["model"], energyFile=tmp_path / "no" / "w.csv")
    assert not (tmp_path / "aa.dcd").exists()
    # a directory that disappears after the reporter was made: nothing is written, and once it is
    # back the run continues with both files, not with frames alone
    out = tmp_path / "out"
    out.mkdir()
    reporter = BackmapReporter(
        tmp_path / "aa.dcd", INTERVAL, model=start["model"], samplesPerFrame=N, energyFile=out / "w.csv"
    )
    out.rmdir()
    sim = _simulation(setup, start)
    sim.reporters.append(reporter)
    with pytest.raises(FileNotFoundError, match="out/w.csv"):
        sim.step(30)
    assert not (tmp_path / "aa.dcd").exists() and sim.currentStep == 0
    out.mkdir()
    sim.step(30)
    reporter.close()
    (out / "w.csv").rename(tmp_path / "w.csv")
    _assert_reports(setup, start, tmp_path, ".dcd", 30)


@posix
@pytest.mark.parametrize("suffix", FORMATS)
def test_a_path_is_written_by_one_reporter_only(setup, start, tmp_path, suffix):
    first = _reporter(start, tmp_path, suffix)
    with pytest.raises(RuntimeError, match=f"aa{suffix} is already written by another BackmapReporter"):
        _reporter(start, tmp_path, suffix, energy=False)
    with pytest.raises(RuntimeError, match="w.csv is already written by another BackmapReporter"):
        BackmapReporter(tmp_path / "other.dcd", INTERVAL, model=start["model"], energyFile=tmp_path / "w.csv")
    with pytest.raises(ValueError, match="energyFile and file are the same path"):
        BackmapReporter(tmp_path / "x.dcd", INTERVAL, model=start["model"], energyFile=tmp_path / "x.dcd")
    sim = _simulation(setup, start)
    sim.reporters.append(first)
    sim.step(20)
    # a reporter in another process does not see this process's registry; it meets the file lock
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(outputs_module, "_LIVE", {})
        second = _reporter(start, tmp_path, suffix, append=True)
        with pytest.raises(RuntimeError, match=f"aa{suffix} is being written by another process"):
            second.describeNextReport(_simulation(setup, start))
        second.close()
    sim.step(20)
    first.close()
    _assert_reports(setup, start, tmp_path, suffix, 40)
    _reporter(start, tmp_path, suffix, append=True).close()  # free again once closed


@posix
def test_lock_held_by_another_process_is_refused(setup, start, tmp_path):
    (tmp_path / "aa.dcd").touch()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys; f = open(sys.argv[1], 'ab'); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('locked', flush=True); sys.stdin.read()",
            str(tmp_path / "aa.dcd"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        reporter = _reporter(start, tmp_path)
        with pytest.raises(RuntimeError, match="aa.dcd is being written by another process"):
            reporter.describeNextReport(_simulation(setup, start))
        reporter.close()
        assert not (tmp_path / "w.csv").exists()  # all outputs or none
    finally:
        holder.communicate("")


# ---------------------------------------------------------------------------- crashes
CRASHES = [
    (".dcd", "aa.dcd", 0.0),
    (".dcd", "aa.dcd", 0.4),
    (".dcd", "w.csv", 0.0),
    (".dcd", "w.csv", 0.3),
    (".nc", "w.csv", 0.0),
    (".nc", "w.csv", 0.3),
    (".h5", "w.csv", 0.0),
    (".h5", "w.csv", 0.3),
]


@pytest.mark.parametrize("suffix,victim,fraction", CRASHES)
def test_full_disk_mid_report_then_restart(setup, start, tmp_path, full_disk, suffix, victim, fraction):
    """The disk fills while the report at step 80 is written (its frames, or its rows after the
    frames); the error names the file, the step and the counts; a restart from the checkpoint at
    step 60 cuts the incomplete report and continues with every report once."""
    sim = _simulation(setup, start)
    reporter = _reporter(start, tmp_path, suffix)
    sim.reporters.append(reporter)
    sim.step(60)
    sim.saveCheckpoint(str(tmp_path / "c.chk"))
    sim.step(10)
    full_disk(tmp_path / victim, fraction)
    with pytest.raises(
        OSError,
        match=rf"{victim}: writing the report at step 80 failed after 7 complete reports "
        r"\(14 frames, 14 rows\): No space left on device",
    ) as err:
        sim.step(10)
    assert err.value.errno == errno.ENOSPC
    with pytest.raises(RuntimeError, match="the reporter is closed, continue from the last checkpoint"):
        sim.step(10)
    if victim == "w.csv" and fraction:
        with pytest.warns(UserWarning, match=r"w.csv: line 16 is an incomplete last row"):
            assert reweight(tmp_path / "w.csv").n == 14
    sim = _simulation(setup, start, tmp_path / "c.chk")
    reporter = _reporter(start, tmp_path, suffix, append=True)
    sim.reporters.append(reporter)
    sim.step(60)
    reporter.close()
    cut_rows = "2 rows plus an incomplete row" if victim == "w.csv" and fraction else "2 rows"
    cut_frames = 4 if victim == "w.csv" else 2  # the frames of the report at step 80 were complete, or not
    assert f"kept 6 reports (steps 10-60), cut {cut_frames} frames and {cut_rows}" in reporter.resumed
    _assert_reports(setup, start, tmp_path, suffix, 120)


@pytest.mark.parametrize("suffix", FORMATS)
def test_report_missing_at_the_checkpoint_is_written_on_restart(setup, start, tmp_path, full_disk, monkeypatch, suffix):
    """A checkpoint saved before the reporter's turn at the same step, then a crash: the restart
    writes that step's report from the restored state before stepping on (with fsync=True: every
    report forced to the disk, counted here rather than waited for)."""
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.fstat(fd).st_ino))
    sim = _simulation(setup, start)
    reporter = _reporter(start, tmp_path, suffix)
    sim.reporters.extend([AtomicCheckpoint(tmp_path / "c.chk", 30), reporter])
    sim.step(50)
    full_disk(tmp_path / "w.csv", 0.0)
    with pytest.raises(OSError, match="step 60"):
        sim.step(10)
    sim = _simulation(setup, start, tmp_path / "c.chk")
    assert sim.currentStep == 60
    reporter = _reporter(start, tmp_path, suffix, append=True, fsync=True)
    sim.reporters.append(reporter)
    sim.step(40)
    reporter.close()
    assert reporter.resumed.endswith("at step 60; writing the report at step 60 now")
    inodes = {os.stat(tmp_path / name).st_ino for name in (f"aa{suffix}", "w.csv")}
    assert len(synced) == 2 * 5 and set(synced) == inodes  # reports 60-100, trajectory and rows
    _assert_reports(setup, start, tmp_path, suffix, 100)


@pytest.mark.parametrize("cut", ["aa.dcd", "w.csv"])
def test_restart_interrupted_between_its_two_cuts_resumes(setup, start, tmp_path, cut):
    """A restart that cut one file back to the checkpoint and died before cutting the other: the
    next restart cuts the other one too (reports after the simulation's step never count)."""
    sim = _simulation(setup, start)
    with _reporter(start, tmp_path) as reporter:
        sim.reporters.append(reporter)
        sim.step(60)
        sim.saveCheckpoint(str(tmp_path / "c.chk"))
        sim.step(40)
    if cut == "aa.dcd":
        with open(tmp_path / cut, "r+b") as fh:
            fh.truncate(276 + 12 * 3 * (8 + 4 * 22))
    else:
        lines = (tmp_path / cut).read_text().splitlines(keepends=True)
        (tmp_path / cut).write_text("".join(lines[:13]))
    sim = _simulation(setup, start, tmp_path / "c.chk")
    with _reporter(start, tmp_path, append=True) as reporter:
        sim.reporters.append(reporter)
        sim.step(20)
    _assert_reports(setup, start, tmp_path, ".dcd", 80)


@pytest.mark.parametrize("suffix,writer", [(".nc", "NetCDFOutput"), (".h5", "HDF5Output")])
def test_library_errors_name_the_file_step_and_counts(setup, start, tmp_path, monkeypatch, suffix, writer):
    """An error inside netCDF4 or PyTables while writing is re-raised with the path, the step and
    what the files hold; the next reporter continues after the last complete report."""
    sim = _simulation(setup, start)
    reporter = _reporter(start, tmp_path, suffix)
    sim.reporters.append(reporter)
    sim.step(30)
    sim.saveCheckpoint(str(tmp_path / "c.chk"))

    def broken(self, xyz_nm, time_ps, grid):
        raise RuntimeError("NetCDF: HDF error" if suffix == ".nc" else "HDF5ExtError: can't write data")

    monkeypatch.setattr(getattr(outputs_module, writer), "write", broken)
    with pytest.raises(
        RuntimeError,
        match=rf"aa{suffix}: writing the report at step 40 failed after 3 complete "
        r"reports \(6 frames, 6 rows\): .*(HDF error|can't write data)",
    ):
        sim.step(10)
    monkeypatch.undo()
    sim = _simulation(setup, start, tmp_path / "c.chk")
    with _reporter(start, tmp_path, suffix, append=True) as reporter:
        sim.reporters.append(reporter)
        sim.step(20)
    _assert_reports(setup, start, tmp_path, suffix, 50)


@pytest.mark.parametrize("suffix", [".nc", ".h5"])
def test_partial_records_of_netcdf_and_hdf5_are_cut(setup, start, tmp_path, suffix):
    """A NetCDF record the header counts but whose time never arrived, an HDF5 coordinate array
    one frame longer than its times: both are incomplete frames, cut on restart."""
    sim = _simulation(setup, start)
    with _reporter(start, tmp_path, suffix) as reporter:
        sim.reporters.append(reporter)
        sim.step(30)
    sim.saveCheckpoint(str(tmp_path / "c.chk"))
    if suffix == ".nc":
        import netCDF4

        with netCDF4.Dataset(str(tmp_path / "aa.nc"), "a") as ds:
            ds["coordinates"][6] = ds["coordinates"][5]
    else:
        import tables

        with tables.open_file(str(tmp_path / "aa.h5"), "a") as f:
            f.root.coordinates.append(f.root.coordinates[5:6])
    sim = _simulation(setup, start, tmp_path / "c.chk")
    reporter = _reporter(start, tmp_path, suffix, append=True)
    sim.reporters.append(reporter)
    sim.step(30)
    reporter.close()
    assert "kept 3 reports (steps 10-30), cut 0 frames and 0 rows" in reporter.resumed
    _assert_reports(setup, start, tmp_path, suffix, 60)


# ---------------------------------------------------------------------------- refusals
def test_restart_past_a_missing_report_is_refused(setup, start, tmp_path):
    sim = _simulation(setup, start)
    with _reporter(start, tmp_path) as reporter:
        sim.reporters.append(reporter)
        sim.step(30)
    sim.reporters.clear()
    sim.step(20)
    sim.saveCheckpoint(str(tmp_path / "c.chk"))
    sim = _simulation(setup, start, tmp_path / "c.chk")
    reporter = _reporter(start, tmp_path, append=True)
    sim.reporters.append(reporter)
    with pytest.raises(
        ValueError,
        match=r"aa.dcd: its complete reports end at step 30 but the simulation is at "
        r"step 50, so the report at step 40 is missing",
    ):
        sim.step(10)
    reporter.close()


@pytest.fixture
def written(setup, start, tmp_path):
    """Three reports (steps 10-30) in aa.dcd and w.csv, and a simulation at step 30."""
    sim = _simulation(setup, start)
    with _reporter(start, tmp_path) as reporter:
        sim.reporters.append(reporter)
        sim.step(30)
    return sim


def _refused(start, sim, tmp_path, match, **kwargs):
    reporter = _reporter(start, tmp_path, append=True, **kwargs)
    with pytest.raises(ValueError, match=match):
        reporter.describeNextReport(sim)
    reporter.close()


def test_other_settings_are_refused(start, written, tmp_path):
    _refused(
        start,
        written,
        tmp_path,
        "aa.dcd: it holds reports every 10 steps with 2 samples per frame, but this "
        "reporter has reportInterval=20, samplesPerFrame=2",
        interval=20,
    )
    _refused(start, written, tmp_path, "reportInterval=10, samplesPerFrame=3", samples=3)


def test_files_that_do_not_belong_together_are_refused(start, written, tmp_path):
    dcd, csv = tmp_path / "aa.dcd", tmp_path / "w.csv"
    text = csv.read_text()
    csv.write_text(text.replace("\n20,", "\n25,", 1))
    _refused(start, written, tmp_path, r"w.csv, line 4, is for step 25 sample 0, but .*aa.dcd has step 20 sample 0")
    csv.write_text(text)
    frame = 3 * (8 + 4 * 22)
    with open(dcd, "r+b") as fh:
        fh.truncate(276 + 2 * frame)
    _refused(start, written, tmp_path, r"w.csv has rows for 3 reports but .*aa.dcd holds only 1")
    csv.unlink()
    _refused(start, written, tmp_path, r"aa.dcd holds 1 reports but the energy file .*w.csv does not exist")


def test_damaged_and_foreign_trajectories_are_refused(setup, start, written, tmp_path):
    dcd = tmp_path / "aa.dcd"
    with open(dcd, "r+b") as fh:  # frame 1's y record marker
        fh.seek(276 + 3 * (8 + 4 * 22) + (8 + 4 * 22))
        fh.write(b"\0\0\0\0")
    _refused(start, written, tmp_path, r"aa.dcd: frame 1 is damaged \(wrong record markers\); cannot continue it")
    dcd.unlink()
    sim = _simulation(setup, start)
    sim.reporters.append(app.DCDReporter(str(tmp_path / "openmm.dcd"), INTERVAL))
    sim.step(20)
    del sim.reporters[0]
    (tmp_path / "openmm.dcd").rename(dcd)
    (tmp_path / "w.csv").unlink()
    with pytest.raises(ValueError, match="aa.dcd: it was not written by BackmapReporter"):
        _reporter(start, tmp_path, energy=False, append=True).describeNextReport(sim)


def test_energy_file_with_a_partial_last_row_is_read_and_says_so(tmp_path):
    path = tmp_path / "e.csv"
    rows = (
        "step,time_ps,sample,u_cg_kjmol,u_aa_kjmol,log_q,log_w\n"
        "10,0.01,0,1.0,-50.0,10.0,3.0\n10,0.01,1,1.0,-51.0,11.0,3.0\n"
    )
    path.write_text(rows + "20,0.02,0,2.0,-49.0,9.0,1.2")  # cut mid-row: no newline
    with pytest.warns(UserWarning, match=r"e.csv: line 4 is an incomplete last row .* the 2 complete rows are used"):
        result = reweight(path)
    np.testing.assert_allclose(result.weights, [0.5, 0.5])
    path.write_text(rows + "20,0.02,0\n20,0.02,1,2.0,-49.0,9.0,1.2\n")
    with pytest.raises(ValueError, match=r"e.csv, line 4: 3 values where the header has 7 columns"):
        reweight(path)
    path.write_text(rows.replace("-51.0", "-5x.0"))
    with pytest.raises(ValueError, match=r"e.csv, line 3: not a number"):
        reweight(path)


def test_hdf5_report_is_not_started_without_room(setup, start, tmp_path, monkeypatch):
    """HDF5 cannot be continued after a short write, so a report that might not fit is refused
    before anything is written: the error names the file, the step and the counts, the file still
    reads, and a restart from the checkpoint continues it."""
    sim = _simulation(setup, start)
    reporter = _reporter(start, tmp_path, ".h5")
    sim.reporters.append(reporter)
    sim.step(30)
    sim.saveCheckpoint(str(tmp_path / "c.chk"))
    monkeypatch.setattr(outputs_module.HDF5Output, "ROOM", 1 << 62)  # more than any disk has free
    with pytest.raises(OSError) as err:
        sim.step(10)
    message = str(err.value)
    assert "aa.h5: writing the report at step 40 failed after 3 complete reports (6 frames, 6 rows)" in message
    assert "bytes free on the file system" in message and "needed to write a report safely" in message
    monkeypatch.undo()
    assert md.load(str(tmp_path / "aa.h5")).n_frames == 6
    sim = _simulation(setup, start, tmp_path / "c.chk")
    reporter = _reporter(start, tmp_path, ".h5", append=True)
    sim.reporters.append(reporter)
    sim.step(30)
    reporter.close()
    _assert_reports(setup, start, tmp_path, ".h5", 60)


@posix
def test_hdf5_short_write_is_reported_not_ignored(setup, start, tmp_path):
    """Should a write fall short anyway (the disk filled between the check and the write), the HDF5
    library says nothing; the reporter sees it after the flush and stops with the path and step
    instead of running on into a file it cannot reopen. Run in a child process with a file-size
    limit and the room check switched off."""
    import resource
    import signal

    sim = _simulation(setup, start)
    reporter = _reporter(start, tmp_path, ".h5", energy=False)
    sim.reporters.append(reporter)
    sim.step(30)
    limit = (tmp_path / "aa.h5").stat().st_size + 600
    pid = os.fork()
    if pid == 0:  # the child: stop at the first error, and say what it was
        code = 1
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
            outputs_module.HDF5Output._check_room = lambda self, report_bytes: None
            sim.step(3000)  # past the first chunk of frames (allocated whole): the file must grow
        except OSError as exc:
            (tmp_path / "message").write_text(str(exc))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    reporter.close()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, "the child ran on without an error"
    message = (tmp_path / "message").read_text()
    assert "aa.h5: writing the report at step" in message and "the HDF5 library wrote" in message


# ---------------------------------------------------------------------------- the kill test
def _kill_and_restart(setup, start, tmp_path, suffix: str, kills: int, disk_fulls: int, seed: int) -> None:
    """``kills`` runs killed with SIGKILL at random times and ``disk_fulls`` that hit a full disk (a
    file-size limit), each continued from the last checkpoint with append=True: in the end every
    report from the first to the last step is in the files exactly once, its frames and rows aligned."""
    os.symlink(setup["model"], tmp_path / "model.pt")
    (tmp_path / "cg.xml").write_text(openmm.XmlSerializer.serialize(setup["cg_system"]))
    np.savez(tmp_path / "start.npz", positions=setup["X0"], velocities=start["velocities"])
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1"
    )
    worker = [sys.executable, str(ROOT / "tests" / "_reporter_worker.py"), str(tmp_path)]
    done = subprocess.run(
        [*worker, str(kills), str(disk_fulls), str(seed), suffix],
        capture_output=True,
        text=True,
        env=env,
        timeout=60 + 15 * (kills + disk_fulls),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(summary, indent=1))
    assert summary["kills"] == kills
    assert len(summary["disk_full_errors"]) == disk_fulls
    for message in summary["disk_full_errors"]:
        assert f"aa{suffix}: writing the report at step" in message
        if suffix == ".dcd":
            assert "File too large" in message
    X, U = _reference(setup, start, summary["end"])
    _assert_reports(setup, start, tmp_path, suffix, summary["end"], X=X, U=U)


@posix
def test_sigkill_at_random_times_then_restart_keeps_every_report_once(setup, start, tmp_path):
    """The DCD: 20 kills and 2 full disks."""
    _kill_and_restart(setup, start, tmp_path, ".dcd", 20, 2, 11)


@posix
@pytest.mark.parametrize("suffix", [".nc", ".h5"])
def test_sigkill_then_restart_netcdf_and_hdf5(setup, start, tmp_path, suffix):
    """NetCDF and HDF5 under the same faults, 5 kills and 1 full disk each (20 and 2 with -m slow)."""
    _kill_and_restart(setup, start, tmp_path, suffix, 5, 1, 12)


@posix
@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".nc", ".h5"])
def test_sigkill_20_times_then_restart_netcdf_and_hdf5(setup, start, tmp_path, suffix):
    _kill_and_restart(setup, start, tmp_path, suffix, 20, 2, 13)
