"""Crash-and-restart driver for the BackmapReporter kill test (tests/test_reporter_faults.py).

    python _reporter_worker.py DIR KILLS DISK_FULLS SEED [SUFFIX]

DIR holds ``model.pt`` (a backmapper), ``cg.xml`` (a CG openmm.System) and ``start.npz``
(``positions``, ``velocities`` in nm and nm/ps). The driver imports everything once, then forks one
CG run after another (Verlet, Reference platform, so a run continued from a checkpoint retraces the
uninterrupted one exactly). Each run loads ``state.chk`` if there is one (and then appends) and
steps with two reporters: an atomic checkpoint every CHECKPOINT steps, placed before a
BackmapReporter writing ``aa.dcd`` (or ``aa`` + SUFFIX: ``.nc``, ``.h5``) and ``w.csv`` every
INTERVAL steps, so a kill can fall between a checkpoint and the report of the same step. The driver
kills KILLS runs with SIGKILL after a random delay; DISK_FULLS further runs get a file-size limit a
few frames past the trajectory's size, so a write fails part-way like on a full disk. The last run
ends at a step a little past the last checkpoint.
Prints one JSON line: kills, disk-full errors, the reporter's resume notes, and the end step.
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import sys
import time
from pathlib import Path

import numpy as np
import openmm
import torch
from openmm import app, unit

from openmm_backmap.io.backmap_model import load_model
from openmm_backmap.openmm.reporter import BackmapReporter

INTERVAL = 10  # steps between reports
SAMPLES = 2  # AA samples per report
CHECKPOINT = 40  # steps between checkpoints
MAX_DELAY = 0.6  # s: kills fall uniformly in [0, MAX_DELAY] after a run starts
NEVER = 10**7  # a step the killed runs do not reach


class AtomicCheckpoint:
    """Saves a checkpoint every ``interval`` steps into a new file that then replaces the old one
    (a kill while saving leaves the previous checkpoint)."""

    def __init__(self, path: Path, interval: int) -> None:
        self.path, self.interval = path, interval

    def describeNextReport(self, simulation) -> dict:
        # asks for positions (unwrapped) so OpenMM calls it in list order, before the BackmapReporter
        return {
            "steps": self.interval - simulation.currentStep % self.interval,
            "periodic": False,
            "include": ["positions"],
        }

    def report(self, simulation, state) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_bytes(simulation.context.createCheckpoint())
        os.replace(tmp, self.path)


def log(out: Path, record: dict) -> None:
    """One JSON line per event, appended in one write (so a kill cannot cut it)."""
    fd = os.open(out / "events.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, (json.dumps(record) + "\n").encode())
    os.close(fd)


def run(out: Path, model, system: openmm.System, start, end: int, file_limit: int | None, suffix: str) -> None:
    top = app.Topology()
    residue = top.addResidue("CG", top.addChain())
    for k in range(system.getNumParticles()):
        top.addAtom(f"B{k}", None, residue)
    sim = app.Simulation(
        top, system, openmm.VerletIntegrator(0.001 * unit.picoseconds), openmm.Platform.getPlatformByName("Reference")
    )
    checkpoint = out / "state.chk"
    append = checkpoint.exists()
    if append:
        sim.loadCheckpoint(str(checkpoint))
    else:
        sim.context.setPositions(start["positions"])
        sim.context.setVelocities(start["velocities"])
    if file_limit is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))
    reporter = BackmapReporter(
        out / f"aa{suffix}", INTERVAL, model=model, samplesPerFrame=SAMPLES, energyFile=out / "w.csv", append=append
    )
    sim.reporters.extend([AtomicCheckpoint(checkpoint, CHECKPOINT), reporter])
    first = sim.currentStep
    reporter.describeNextReport(sim)  # opens and reconciles the files now, to log what it did
    log(out, {"event": "start", "step": first, "resumed": reporter.resumed})
    sim.step(end - sim.currentStep)
    reporter.close()


def main(out: Path, kills: int, disk_fulls: int, seed: int, suffix: str = ".dcd") -> dict:
    torch.set_num_threads(1)  # before any fork: a child must not inherit a thread pool
    rng = random.Random(seed)
    model = load_model(out / "model.pt")
    system = openmm.XmlSerializer.deserialize((out / "cg.xml").read_text())
    start = dict(np.load(out / "start.npz"))
    for _ in range(2):  # TorchScript optimises a model on its first calls: once here, not in every run
        model.sample(start["positions"], SAMPLES)
    # the format's library is imported once here too, or the runs would spend their time importing it
    if suffix in (".nc", ".h5"):
        __import__({".nc": "netCDF4", ".h5": "tables"}[suffix])
    full_at = set(rng.sample(range(1, kills + disk_fulls), disk_fulls))
    killed, full_errors, attempt, end = 0, [], 0, NEVER
    frame_bytes = 3 * (8 + 4 * model.n_aa) if suffix == ".dcd" else 4 + 12 * model.n_aa
    traj = out / f"aa{suffix}"
    while True:
        limit = None
        if attempt in full_at and traj.exists():
            limit = traj.stat().st_size + int(rng.uniform(1.0, 12.0) * frame_bytes)
        elif attempt in full_at:  # nothing written yet to fill up after: the next run then
            full_at.add(attempt + 1)
        if killed == kills and limit is None:  # the last run: a few reports past the last checkpoint
            end = (checkpoint_step(out) // CHECKPOINT + 2) * CHECKPOINT + INTERVAL
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                run(out, model, system, start, end, limit, suffix)
            except OSError as exc:
                log(out, {"event": "oserror", "message": str(exc)})
                code = 3
            except BaseException as exc:  # noqa: BLE001 - reported to the parent, then exit
                log(out, {"event": "error", "message": f"{type(exc).__name__}: {exc}"})
                code = 4
            os._exit(code)
        if limit is None and end == NEVER:
            time.sleep(rng.uniform(0.0, MAX_DELAY))
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        attempt += 1
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            killed += 1
            continue
        code = os.WEXITSTATUS(status)
        # a full disk is an OSError from the DCD and CSV writers, a library error (RuntimeError) from
        # netCDF-C or HDF5; either names the file and the step
        if code in (3, 4) and limit is not None:
            full_errors.append(read_events(out)[-1]["message"])
            continue
        if code == 0 and end != NEVER:
            break
        raise RuntimeError(f"run {attempt} ended with status {status}: {read_events(out)[-1:]}")
    events = read_events(out)
    return {
        "kills": killed,
        "disk_full_errors": full_errors,
        "end": end,
        "runs": attempt,
        "resumed": [e["resumed"] for e in events if e["event"] == "start"],
    }


def checkpoint_step(out: Path) -> int:
    """The step of the last checkpoint (0 without one)."""
    if not (out / "state.chk").exists():
        return 0
    system = openmm.XmlSerializer.deserialize((out / "cg.xml").read_text())
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.loadCheckpoint((out / "state.chk").read_bytes())
    return int(context.getStepCount())


def read_events(out: Path) -> list[dict]:
    path = out / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


if __name__ == "__main__":
    directory, n_kills, n_full, rng_seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    print(json.dumps(main(directory, n_kills, n_full, rng_seed, *sys.argv[5:6])))
