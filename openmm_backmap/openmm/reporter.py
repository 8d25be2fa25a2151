"""BackmapReporter: all-atom reconstructions and reweighting energies during a CG simulation.

    simulation.reporters.append(BackmapReporter('aa.dcd', 1000, model='model.pt',
                                                samplesPerFrame=4, energyFile='weights.csv'))

Every ``reportInterval`` steps the reporter reads the CG positions, makes the molecule whole across
periodic boundaries, draws ``samplesPerFrame`` AA structures from the backmapper q(x | X) on the
torch device that matches the OpenMM platform, writes them through mdtraj, and writes one row per
sample to the energy file:

    step, time_ps, sample, u_cg_kjmol, u_aa_kjmol, log_q, log_w

with log w = -beta U_AA(x) + beta U_CG(X) - log q(x | X), the importance log-weight that turns the
CG ensemble into AA Boltzmann averages (``openmm_backmap.analysis.metrics.reweight``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mdtraj as md
import numpy as np
import torch

from openmm_backmap.io.backmap_model import load_model
from openmm_backmap.io.energy_file import energy_rows, open_energy_file, read_energy_file, truncate_energy_file
from openmm_backmap.openmm.energies import aa_energy
from openmm_backmap.units import kT

# float32-or-better formats only: XTC's fixed-point rounding moves ALA2 energies by ~0.7 kT and
# chignolin's by ~2 kT, enough to break importance weights.
_FORMATS = {".dcd": "dcd", ".h5": "hdf5", ".hdf5": "hdf5", ".nc": "netcdf", ".ncdf": "netcdf"}


def _trajectory_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".xtc":
        raise ValueError(
            f"{path}: XTC is refused for weighted output: its fixed-point rounding (0.001 nm) shifts "
            "AA energies by about a kT (0.7 kT for alanine dipeptide), which breaks the importance "
            "weights; use .dcd, .h5 or .nc"
        )
    if suffix not in _FORMATS:
        raise ValueError(f"{path}: unknown trajectory format {suffix!r}; use .dcd, .h5 or .nc")
    return _FORMATS[suffix]


class _AATrajectoryWriter:
    """Appends AA frames (nm) to a DCD, HDF5 or NetCDF file and flushes after every write.

    DCD goes through OpenMM's ``DCDFile`` (float32, continues an existing file in place); HDF5
    and NetCDF through mdtraj's file objects. mdtraj's NetCDF writer cannot append, so continuing a
    NetCDF file rewrites its ``existing`` frames first (once, at the first report).
    """

    def __init__(self, path: Path, topology: md.Topology, existing: np.ndarray | None) -> None:
        self.path = path
        self.kind = _trajectory_format(path)
        self.topology = topology
        continuing = existing is not None and len(existing) > 0
        if self.kind == "dcd":
            from openmm import app, unit

            self.fh = open(path, "r+b" if continuing else "wb")
            self.dcd = app.DCDFile(self.fh, topology.to_openmm(), 0.001 * unit.picoseconds, append=continuing)
            self.unit = unit.nanometer
        elif self.kind == "hdf5":
            self.fh = md.formats.HDF5TrajectoryFile(str(path), "a" if continuing else "w")
            if not continuing:
                self.fh.topology = topology
        else:
            self.fh = md.formats.NetCDFTrajectoryFile(str(path), "w")
            if continuing:
                self.fh.write(np.asarray(existing, dtype=np.float32) * 10.0)

    def write(self, xyz_nm: np.ndarray, time_ps: float) -> None:
        xyz = np.asarray(xyz_nm, dtype=np.float32)
        if self.kind == "dcd":
            for frame in xyz:
                self.dcd.writeModel(frame.astype(np.float64) * self.unit)
        elif self.kind == "hdf5":
            self.fh.write(xyz, time=np.full(len(xyz), time_ps, dtype=np.float32))
        else:
            self.fh.write(xyz * 10.0, time=np.full(len(xyz), time_ps, dtype=np.float32))
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def make_whole(X: np.ndarray, bonds: list[tuple[int, int]], box: np.ndarray | None) -> np.ndarray:
    """Unwrap CG positions so every bond is its minimum image (a breadth-first walk over the CG
    bond graph from bead 0 of each connected piece). ``box`` is OpenMM's reduced-form (3, 3) box."""
    if box is None or not bonds:
        return X
    X = X.copy()
    neigh: list[list[int]] = [[] for _ in range(len(X))]
    for i, j in bonds:
        neigh[i].append(j)
        neigh[j].append(i)
    done = np.zeros(len(X), dtype=bool)
    for start in range(len(X)):
        if done[start]:
            continue
        done[start] = True
        stack = [start]
        while stack:
            i = stack.pop()
            for j in neigh[i]:
                if done[j]:
                    continue
                d = X[j] - X[i]
                for k in (2, 1, 0):  # reduced form: c, then b, then a
                    d -= box[k] * np.round(d[k] / box[k, k])
                X[j] = X[i] + d
                done[j] = True
                stack.append(j)
    return X


class BackmapReporter:
    """An OpenMM reporter that writes AA reconstructions of CG frames and their reweighting energies.

    Parameters
    ----------
    file
        AA trajectory path: ``.dcd``, ``.h5`` or ``.nc`` (XTC is refused for weighted output).
    reportInterval
        Steps between reports.
    model
        A backmapper model file (``openmm-backmap export``) or a model loaded with
        :func:`openmm_backmap.io.model_files.load_model`.
    samplesPerFrame
        AA samples drawn per CG frame (written as consecutive frames).
    energyFile
        CSV path for one row per sample (step, time_ps, sample, u_cg_kjmol, u_aa_kjmol, log_q,
        log_w); needs an AA System (embedded in the model file or ``aaSystem``).
    aaSystem
        The AA openmm.System (or its XML path) for U_AA, overriding the one in the model file.
    append
        Continue existing files (after ``Simulation.loadCheckpoint``): rows and frames written after
        the current step by the interrupted run are dropped first, so no frame is lost or duplicated.
    temporal
        Condition each frame on the previous reconstruction (a model trained with ``--temporal``).
    seed
        Seeds torch's generator on the first report.
    device
        Torch device; by default CUDA when the Simulation runs on the CUDA platform and torch sees a
        GPU, else CPU.
    batchSize
        Most samples drawn in one model call.
    """

    def __init__(
        self,
        file: str | os.PathLike,
        reportInterval: int,
        model: Any,
        samplesPerFrame: int = 1,
        energyFile: str | os.PathLike | None = None,
        aaSystem: Any = None,
        append: bool = False,
        temporal: bool = False,
        seed: int | None = None,
        device: str | None = None,
        batchSize: int = 1024,
    ) -> None:
        if int(reportInterval) < 1:
            raise ValueError(f"reportInterval must be a positive number of steps, got {reportInterval}")
        if int(samplesPerFrame) < 1:
            raise ValueError(f"samplesPerFrame must be at least 1, got {samplesPerFrame}")
        self._path = Path(file)
        _trajectory_format(self._path)  # refuse XTC and unknown formats before the run starts
        self._interval = int(reportInterval)
        self._n = int(samplesPerFrame)
        self._energy_path = None if energyFile is None else Path(energyFile)
        self._append = bool(append)
        self._temporal = bool(temporal)
        self._seed = seed
        self._device_name = device
        self._batch = int(batchSize)
        self.model = load_model(model) if isinstance(model, (str, os.PathLike)) else model
        if self._temporal and not self.model.temporal:
            raise ValueError("temporal=True needs a model trained with --temporal")
        system = aaSystem if aaSystem is not None else self.model.system_xml
        if self._energy_path is not None and system is None:
            raise ValueError(
                "energyFile needs AA energies, but the model file embeds no AA System: pass aaSystem= "
                "(an openmm.System or its XML path) or export the model with --aa-system"
            )
        self._energy = None if system is None else aa_energy(system)
        if self._energy is not None and self._energy.n_atoms != self.model.n_aa:
            raise ValueError(
                f"the AA System has {self._energy.n_atoms} particles but the model reconstructs "
                f"{self.model.n_aa} atoms: the System is for another topology"
            )
        self._cg_bonds = [tuple(b) for b in self.model.mapping.cg_bonds()]
        self._writer: _AATrajectoryWriter | None = None
        self._csv_fh = None
        self._csv = None
        self._previous: torch.Tensor | None = None
        self._device: torch.device | None = None
        self._beta: float | None = None
        self._groups: int | None = None
        self.frames_written = 0

    # ------------------------------------------------------------------ OpenMM protocol
    def describeNextReport(self, simulation) -> dict:
        steps = self._interval - simulation.currentStep % self._interval
        return {"steps": steps, "periodic": False, "include": ["positions", "energy"]}

    def report(self, simulation, state) -> None:
        from openmm import unit

        if self._writer is None:
            self._open(simulation)
        step = int(simulation.currentStep)
        X = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        X = np.asarray(X, dtype=np.float64)
        if X.shape != (self.model.n_cg, 3):
            raise ValueError(
                f"the simulation has {X.shape[0]} particles but the model expects {self.model.n_cg} CG beads"
            )
        if not np.all(np.isfinite(X)):
            raise ValueError(f"CG positions at step {step} contain NaN or infinite values")
        box = None
        if simulation.system.usesPeriodicBoundaryConditions():
            box = np.asarray(state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer))
        X = make_whole(X, self._cg_bonds, box)
        if self._groups is None:
            u_cg = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        else:
            u_cg = simulation.context.getState(getEnergy=True, groups=self._groups).getPotentialEnergy()
            u_cg = u_cg.value_in_unit(unit.kilojoule_per_mole)
        aa, log_q = self._sample(X)
        time_ps = state.getTime().value_in_unit(unit.picosecond)
        self._writer.write(aa, time_ps)
        self.frames_written += len(aa)
        if self._csv is not None:
            u_aa = self._aa_energies(aa)
            log_w = -self._beta * u_aa + self._beta * u_cg - log_q
            log_w = np.where(np.isfinite(log_w), log_w, -np.inf)  # flagged, never dropped
            self._csv.writerows(energy_rows(step, time_ps, u_cg, u_aa, log_q, log_w))
            self._csv_fh.flush()

    # ------------------------------------------------------------------ work
    def _sample(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cg = torch.as_tensor(X, dtype=torch.float32, device=self._device)[None]
        out, logs = [], []
        with torch.no_grad():
            if self._temporal and self._previous is not None:
                aa, lq = self.model.sample_next(cg.expand(self._n, -1, -1), self._previous)
                out.append(aa)
                logs.append(lq)
            else:
                left = self._n
                while left > 0:
                    k = min(left, self._batch)
                    aa, lq = self.model.sample(cg, k)
                    out.append(aa)
                    logs.append(lq)
                    left -= k
        aa = torch.cat(out)
        if self._temporal:
            self._previous = aa
        return aa.double().cpu().numpy(), torch.cat(logs).double().cpu().numpy()

    def _aa_energies(self, aa: np.ndarray) -> np.ndarray:
        # float32: faster than float64 for the batched torch energy (benchmarks/RESULTS.md) and within
        # 2e-3 kJ/mol (1e-3 kT) of it for alanine dipeptide (tests/test_energies.py), far below what
        # moves a weight
        with torch.no_grad():
            u = self._energy(torch.as_tensor(aa, dtype=torch.float32)).double().numpy()
        return np.where(np.isfinite(u), u, np.inf)

    # ------------------------------------------------------------------ files
    def _open(self, simulation) -> None:
        from openmm import unit

        platform = simulation.context.getPlatform().getName()
        if self._device_name is not None:
            self._device = torch.device(self._device_name)
        elif platform == "CUDA" and torch.cuda.is_available():
            self._device = torch.device("cuda")
        else:
            self._device = torch.device("cpu")
        if self.model.device != self._device:
            self.model = load_model(self.model.path, device=self._device)
        if self._seed is not None:
            torch.manual_seed(int(self._seed))
        integrator = simulation.integrator
        temperature = None
        if hasattr(integrator, "getTemperature"):
            temperature = integrator.getTemperature().value_in_unit(unit.kelvin)
        self._beta = 1.0 / kT(temperature if temperature else self.model.temperature)
        groups = integrator.getIntegrationForceGroups() if hasattr(integrator, "getIntegrationForceGroups") else -1
        self._groups = None if (groups & 0xFFFFFFFF) == 0xFFFFFFFF else int(groups)
        existing = self._reconcile(int(simulation.currentStep)) if self._append else None
        self._writer = _AATrajectoryWriter(self._path, self.model.topology, existing)
        if self._energy_path is not None:
            self._csv_fh, self._csv = open_energy_file(self._energy_path, self._append)

    def _reconcile(self, step: int) -> np.ndarray | None:
        """On append (called at the first report, at ``step``), drop the rows and frames the
        interrupted run wrote at ``step`` or later (they are about to be written again), pick up
        the previous reconstruction for temporal models, and return the frames kept (nm)."""
        if not self._path.exists() or self._path.stat().st_size == 0:
            return None
        traj = md.load(str(self._path), top=self.model.topology)
        keep = traj.n_frames
        if self._energy_path is not None and self._energy_path.exists():
            cols = read_energy_file(self._energy_path)
            if len(cols["step"]) != traj.n_frames:
                raise ValueError(
                    f"cannot append: {self._energy_path} has {len(cols['step'])} rows but {self._path} "
                    f"has {traj.n_frames} frames"
                )
            keep = int((cols["step"] < step).sum())
            if keep < len(cols["step"]):
                truncate_energy_file(self._energy_path, keep)
        if keep < traj.n_frames:
            tmp = self._path.with_name(".tmp-" + self._path.name)
            traj[:keep].save(str(tmp))
            tmp.replace(self._path)
        if self._temporal and keep >= self._n:
            prev = traj.xyz[keep - self._n : keep]
            self._previous = torch.as_tensor(prev, dtype=torch.float32, device=self._device)
        return traj.xyz[:keep]

    def close(self) -> None:
        """Flush and close the files (safe to call twice)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._csv_fh is not None:
            self._csv_fh.close()
            self._csv_fh = None
            self._csv = None

    def __enter__(self) -> "BackmapReporter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
