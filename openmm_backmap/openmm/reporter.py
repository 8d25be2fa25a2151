"""BackmapReporter: all-atom reconstructions and reweighting energies during a CG simulation.

    simulation.reporters.append(BackmapReporter('aa.dcd', 1000, model='model.pt',
                                                samplesPerFrame=4, energyFile='weights.csv'))

Every ``reportInterval`` steps the reporter reads the CG positions, makes the molecule whole across
periodic boundaries, draws ``samplesPerFrame`` AA structures from the backmapper q(x | X) on the
torch device that matches the OpenMM platform, writes them to the trajectory, and writes one row per
sample to the energy file:

    step, time_ps, sample, u_cg_kjmol, u_aa_kjmol, log_q, log_w

with log w = -beta U_AA(x) + beta U_CG(X) - log q(x | X), the importance log-weight that turns the
CG ensemble into AA Boltzmann averages (``openmm_backmap.analysis.reweighting.reweight``).

Faults. The outputs are opened and checked together before the first report (at the first
``describeNextReport``), all or none: their directories must exist, no other reporter in this process
may write them, and no other process may hold them (an advisory ``flock``; HDF5 files carry the HDF5
library's own lock). Each report writes its frames, then its rows, so a crash (kill -9, full disk)
leaves at most one incomplete report at the end. Reports lie on a grid of steps, ``first_step + k *
reportInterval``, that the trajectory records (the DCD's second title line, a NetCDF global attribute,
an HDF5 root attribute ``openmm_backmap``): frame ``f`` belongs to report ``f // samplesPerFrame``.
With ``append=True`` the reporter reads what exists, keeps the complete reports (all frames and, with
an energy file, all rows, the rows matching the frames' steps) up to the simulation's step, cuts the
rest, and resumes; it refuses a simulation whose step is before the data, or past a report the files
lack. A report missing at exactly the simulation's step (a checkpoint saved before the reporter wrote
that step) is written at once from the restored state.
"""

from __future__ import annotations

import errno
import os
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch

from openmm_backmap.geometry import check_box_fits
from openmm_backmap.io.backmap_model import ProteinModel, load_model
from openmm_backmap.io.energy_file import ENERGY_COLUMNS, EnergyRows, format_energy_rows
from openmm_backmap.io.reporter_outputs import (
    DCDOutput,
    EnergyOutput,
    HDF5Output,
    NetCDFOutput,
    StepGrid,
    claim_paths,
    release_paths,
    trajectory_format,
)
from openmm_backmap.openmm.energies import OpenMMBridgeEnergy, aa_energy, model_system
from openmm_backmap.units import kT


def _units():
    from openmm import unit

    return unit.nanometer, unit.kilojoule_per_mole, unit.picosecond


_NM, _KJ, _PS = _units()


def _value(quantity, unit) -> Any:
    """The number of an OpenMM quantity in ``unit``; States hold nm, kJ/mol and ps already, and
    reading the value directly saves the unit conversion (a tenth of a millisecond each)."""
    return quantity._value if quantity.unit is unit else quantity.value_in_unit(unit)


def _copies(subset: Any) -> np.ndarray | None:
    """atomSubset as (copies, beads) particle indices, or None; ValueError for ragged, negative or
    repeated indices."""
    if subset is None:
        return None
    rows = [subset] if np.ndim(subset[0] if len(subset) else 0) == 0 else list(subset)
    lengths = {len(r) for r in rows}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(
            f"atomSubset: every copy of the molecule needs the same number of beads, got copies of "
            f"{sorted(len(r) for r in rows)} particles"
        )
    out = np.asarray(rows, dtype=np.int64)
    if (out < 0).any():
        raise ValueError(f"atomSubset has a negative particle index {int(out.min())}")
    values, counts = np.unique(out, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"atomSubset lists particle {int(values[counts > 1][0])} twice (copies must be disjoint)")
    return out


def _group_mask(groups: Any) -> int | None:
    """cgForceGroups as OpenMM's bit mask of force groups, or None."""
    if groups is None:
        return None
    groups = [groups] if np.ndim(groups) == 0 else list(groups)
    bad = [g for g in groups if not 0 <= int(g) <= 31]
    if bad or not groups:
        raise ValueError(f"cgForceGroups must be force groups 0-31, got {groups}")
    return sum(1 << int(g) for g in set(groups))


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
        A backmapper model file (``openmm-backmap export``), the name of a shipped protein model
        (``protein-ca``, ``protein-backbone``: bound at the first report to the chain that the
        Simulation's topology holds at ``atomSubset``), or a model loaded with
        :func:`openmm_backmap.io.backmap_model.load_model`.
    samplesPerFrame
        AA samples drawn per CG frame (written as consecutive frames).
    atomSubset
        The molecule's particles in the CG System, in the model's bead order (mdtraj's name): a list
        of indices, or for several copies of the molecule a list of such lists, one per copy (the
        same molecule, disjoint). None: every particle is a bead of one molecule. With several
        copies each trajectory frame holds every copy (copy c's atoms after those of copies 0 ..
        c-1), each copy drawn independently; a row's ``log_q`` and ``u_aa_kjmol`` are sums over the
        copies (each copy's own AA energy, no interactions between copies) and ``log_w`` the joint
        importance weight.
    cgForceGroups
        The force groups (integers 0-31) whose energy is U_CG, e.g. the molecule's own CG terms in a
        System that holds other particles too. None: the integrator's integration force groups
        (all forces by default).
    energyFile
        CSV path for one row per sample (step, time_ps, sample, u_cg_kjmol, u_aa_kjmol, log_q,
        log_w); needs an AA System (embedded in the model file or ``aaSystem``).
    aaSystem
        The AA openmm.System (or its XML path) for U_AA, overriding the one in the model file.
    append
        Continue existing files (after ``Simulation.loadCheckpoint``): the complete reports up to
        the simulation's step are kept, anything after them (reports the interrupted run wrote past
        the checkpoint, an incomplete last report) is cut, so no frame is lost or duplicated.
        Refused when the simulation's step is before the files' first report (that would discard
        them all: pass ``append=False`` to start over) or past a report the files lack.
    temporal
        Condition each frame on the previous reconstruction (a model trained with ``--temporal``).
    seed
        Seeds torch's generator on the first report.
    device
        Torch device; by default CUDA when the Simulation runs on the CUDA platform and torch sees a
        GPU, else CPU.
    batchSize
        Most samples drawn in one model call.
    fsync
        Force every report to the disk (``os.fsync``) before the next step; survives a power
        failure as well as a crash, at a cost per report.

    Attributes
    ----------
    frames_written
        Frames this reporter wrote.
    resumed
        With ``append``, what was kept and cut at the first report (None until then), e.g.
        ``"aa.dcd: kept 6 reports (steps 1000-6000), cut 4 frames and 2 rows, at step 6000"``.
    """

    def __init__(
        self,
        file: str | os.PathLike,
        reportInterval: int,
        model: Any,
        samplesPerFrame: int = 1,
        energyFile: str | os.PathLike | None = None,
        aaSystem: Any = None,
        atomSubset: Any = None,
        cgForceGroups: Any = None,
        append: bool = False,
        temporal: bool = False,
        seed: int | None = None,
        device: str | None = None,
        batchSize: int = 1024,
        fsync: bool = False,
    ) -> None:
        if int(reportInterval) < 1:
            raise ValueError(f"reportInterval must be a positive number of steps, got {reportInterval}")
        if int(samplesPerFrame) < 1:
            raise ValueError(f"samplesPerFrame must be at least 1, got {samplesPerFrame}")
        self._path = Path(file)
        kind = trajectory_format(self._path)  # refuse XTC and unknown formats before the run starts
        self._interval = int(reportInterval)
        self._n = int(samplesPerFrame)
        self._energy_path = None if energyFile is None else Path(energyFile)
        if self._energy_path is not None and self._energy_path.resolve() == self._path.resolve():
            raise ValueError(f"energyFile and file are the same path {self._path}")
        self._check_directories()
        self._append = bool(append)
        self._temporal = bool(temporal)
        self._seed = seed
        self._device_name = device
        self._batch = int(batchSize)
        self._fsync = bool(fsync)
        self._kind = kind
        self._aa_system = aaSystem
        self._copies = _copies(atomSubset)
        self._group_mask = _group_mask(cgForceGroups)
        if self._copies is not None and len(self._copies) > 1 and self._temporal:
            raise ValueError("temporal=True works for one molecule; atomSubset holds several copies")
        self.model = load_model(model) if isinstance(model, (str, os.PathLike)) else model
        self._traj = self._csv = self._energy = self._context_energy = None
        if not isinstance(self.model, ProteinModel):  # a protein model is bound at the first report
            self._prepare()
        self._open = False
        self._failed: str | None = None
        self._grid: StepGrid | None = None  # the files' step grid, known from the first report or the files
        self._reports = 0  # complete reports in the files
        self._fill_step: int | None = None
        self._previous: torch.Tensor | None = None
        self._device: torch.device | None = None
        self._beta: float | None = None
        self._groups: int | None = None
        self._periodic = False
        self._use_context: bool | None = None  # AA energies from an OpenMM Context (decided at the first report)
        self.frames_written = 0
        self.resumed: str | None = None  # what append kept and cut, for logs
        keys = claim_paths([self._path] + ([self._energy_path] if self._energy_path is not None else []))
        self._release = weakref.finalize(self, release_paths, keys)

    def _prepare(self) -> None:
        """The AA energy and the output files of the (bound) model."""
        model = self.model
        if self._temporal and not model.temporal:
            raise ValueError("temporal=True needs a model trained with --temporal")
        if self._copies is not None and self._copies.shape[1] != model.n_cg:
            raise ValueError(
                f"atomSubset selects {self._copies.shape[1]} particles per copy but the model has {model.n_cg} "
                f"beads ({', '.join(model.metadata['bead_names'])})"
            )
        wanted = self._energy_path is not None or self._aa_system is not None
        system = model_system(model, self._aa_system) if wanted else None
        if self._energy_path is not None and system is None:
            raise ValueError(
                "energyFile needs AA energies, but the model file embeds no AA System: pass aaSystem= "
                "(an openmm.System or its XML path) or export the model with --aa-system"
            )
        self._energy_system = system
        self._energy = None if system is None or self._energy_path is None else aa_energy(system)
        if system is not None and system.getNumParticles() != model.n_aa:
            raise ValueError(
                f"the AA System has {system.getNumParticles()} particles but the model reconstructs "
                f"{model.n_aa} atoms: the System is for another topology"
            )
        self._cg_bonds = [tuple(b) for b in model.mapping.cg_bonds()]
        copies = 1 if self._copies is None else len(self._copies)
        n_atoms = copies * model.n_aa
        topology = model.topology
        for _ in range(copies - 1):
            topology = topology.join(model.topology)
        self._traj = {
            "dcd": lambda: DCDOutput(self._path, n_atoms),
            "netcdf": lambda: NetCDFOutput(self._path, n_atoms),
            "hdf5": lambda: HDF5Output(self._path, n_atoms, topology),
        }[self._kind]()
        self._csv = None if self._energy_path is None else EnergyOutput(self._energy_path)

    def _bind(self, simulation) -> None:
        """Check atomSubset and cgForceGroups against the Simulation; bind a protein model to the
        chain at atomSubset (every copy must hold the same residues)."""
        import mdtraj as md

        n = simulation.system.getNumParticles()
        if self._copies is not None and self._copies.max() >= n:
            raise ValueError(f"atomSubset has particle {int(self._copies.max())}, but the CG System has {n} particles")
        if self._group_mask is not None:
            used = {f.getForceGroup() for f in simulation.system.getForces()}
            asked = {g for g in range(32) if self._group_mask >> g & 1}
            if asked - used:
                raise ValueError(
                    f"cgForceGroups has group(s) {sorted(asked - used)} that no force of the CG System is in "
                    f"(its forces are in groups {sorted(used)})"
                )
        if not isinstance(self.model, ProteinModel):
            return
        top = md.Topology.from_openmm(simulation.topology)
        copies = [np.arange(n)] if self._copies is None else list(self._copies)
        bound = self.model.bind(top.subset(copies[0]), device="cpu")
        for c, idx in enumerate(copies[1:], start=1):
            try:
                bound.check_cg_topology(top.subset(idx))
            except ValueError as err:
                raise ValueError(f"atomSubset copy {c}: {err} (copy 0 holds the model's chain)") from None
        self.model = bound
        self._prepare()

    # ------------------------------------------------------------------ OpenMM protocol
    def describeNextReport(self, simulation) -> dict:
        step = int(simulation.currentStep)
        if not self._open:
            self._open_files(simulation)
            if self._fill_step == step:  # the checkpoint was saved before this step's report was written
                self._fill_step = None
                self.report(simulation, simulation.context.getState(getPositions=True, getEnergy=True))
        if self._grid is None:
            steps = self._interval - step % self._interval
        else:
            steps = (self._grid.first_step - step) % self._interval or self._interval
        return {"steps": steps, "periodic": False, "include": ["positions", "energy"]}

    def report(self, simulation, state) -> None:
        if not self._open:
            self._open_files(simulation)
        step = int(simulation.currentStep)
        X = np.asarray(_value(state.getPositions(asNumpy=True), _NM), dtype=np.float64)
        if self._copies is not None:
            X = X[self._copies]  # (copies, n_cg, 3)
        elif X.shape != (self.model.n_cg, 3):
            raise ValueError(
                f"the simulation has {X.shape[0]} particles but the model expects {self.model.n_cg} CG beads; "
                "pass atomSubset= (the molecule's particle indices) for a System that holds other particles"
            )
        else:
            X = X[None]
        if not np.isfinite(X).all():
            raise ValueError(f"CG positions at step {step} contain NaN or infinite values")
        grid = self._grid or StepGrid(step, self._interval, self._n)
        if step != grid.step(self._reports):
            raise ValueError(
                f"report at step {step}, but the next report of {self._path} is due at step "
                f"{grid.step(self._reports)} (every {grid.interval} steps from step {grid.first_step})"
            )
        if self._periodic:
            box = np.asarray(_value(state.getPeriodicBoxVectors(asNumpy=True), _NM))
            bond_range = self.model.metadata.get("cg_bond_range_nm")
            if bond_range:
                check_box_fits(box, float(bond_range[1]), f"the periodic box at step {step}")
            X = np.stack([make_whole(x, self._cg_bonds, box) for x in X])
        if self._groups is None:
            u_cg = _value(state.getPotentialEnergy(), _KJ)
        else:
            u_cg = _value(simulation.context.getState(getEnergy=True, groups=self._groups).getPotentialEnergy(), _KJ)
        aa, log_q, previous = self._sample(X)
        time_ps = _value(state.getTime(), _PS)
        rows = None
        if self._csv is not None:
            u_aa = self._aa_energies(aa)
            log_w = -self._beta * u_aa + self._beta * u_cg - log_q
            log_w = np.where(np.isfinite(log_w), log_w, -np.inf)  # flagged, never dropped
            rows = format_energy_rows(step, time_ps, u_cg, u_aa, log_q, log_w)
        self._write(step, grid, aa, time_ps, rows)
        self._grid = grid
        self._reports += 1
        self._previous = previous
        self.frames_written += len(aa)

    # ------------------------------------------------------------------ work
    def _sample(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, torch.Tensor | None]:
        """Samples of CG frames X (copies, n_cg, 3): (aa (n, copies * n_aa, 3), log q (n,) summed over
        the copies, the samples a temporal model continues from). Calls the model file's module
        directly (X is checked here: finite above, bond lengths or chain by the model's check_cg)."""
        self.model.check_cg(X, "CG positions")
        cg = torch.as_tensor(X, dtype=torch.float32).to(self._device)
        module, c = self.model.module, len(X)
        out, logs = [], []
        with torch.no_grad():
            if self._temporal and self._previous is not None:
                aa, lq = module.sample_next(cg.expand(self._n, -1, -1), self._previous)
                out.append(aa)
                logs.append(lq)
            else:
                left = self._n
                while left > 0:
                    k = min(left, max(1, self._batch // c))
                    aa, lq = module.sample(cg, k)  # copy-major: row c * k + s
                    out.append(aa.reshape(c, k, -1, 3).transpose(0, 1) if c > 1 else aa)
                    logs.append(lq.reshape(c, k).sum(0) if c > 1 else lq)
                    left -= k
            aa = out[0] if len(out) == 1 else torch.cat(out)
            lq = logs[0] if len(logs) == 1 else torch.cat(logs)
        previous = aa if self._temporal else None
        aa = aa.cpu().numpy().astype(np.float64)
        if c > 1:  # every copy of a sample in one frame
            aa = aa.reshape(len(aa), -1, 3)
        return aa, lq.cpu().numpy().astype(np.float64), previous

    def _aa_energies(self, aa: np.ndarray) -> np.ndarray:
        """U_AA (n,) kJ/mol of samples aa (n, copies * n_aa, 3), summed over the copies."""
        n_aa = self.model.n_aa
        x = aa.reshape(-1, n_aa, 3)
        if self._use_context is None:
            self._use_context = self._context_is_faster(x)
        if self._use_context:
            u = self._context_energy.energies(x)
        else:
            # float32: 4x faster than float64 for the batched torch energy, and within 2e-3 kJ/mol
            # (1e-3 kT) of it for alanine dipeptide (tests/test_energies.py), far below what moves a weight
            with torch.no_grad():
                u = self._energy(torch.as_tensor(x, dtype=torch.float32)).double().numpy()
        u = np.where(np.isfinite(u), u, np.inf)
        return u.reshape(len(aa), -1).sum(1)  # rows: sample-major, then copy

    def _context_is_faster(self, x: np.ndarray) -> bool:
        """Whether one OpenMM Context, a sample at a time, beats the batched torch energy on these
        samples (a few small molecules: yes, the torch call's fixed cost dominates; proteins with
        generalized Born or many samples: no). Each is timed on its second call."""
        if isinstance(self._energy, OpenMMBridgeEnergy):
            self._context_energy = self._energy
            return True
        self._context_energy = OpenMMBridgeEnergy(self._energy_system, platform="Reference")
        times = []
        for run in (
            lambda: self._context_energy.energies(x[:1]),
            lambda: self._energy(torch.as_tensor(x, dtype=torch.float32)),
        ):
            with torch.no_grad():
                run()
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
        faster = times[0] * len(x) < times[1]
        if not faster:
            self._context_energy = None
        return faster

    def _write(self, step: int, grid: StepGrid, aa: np.ndarray, time_ps: float, rows: str | None) -> None:
        """Frames, then rows; a failure closes the reporter (the files end in at most one incomplete
        report, which a reporter with append=True cuts) and re-raises with the path, step and counts."""
        where = self._path
        try:
            self._traj.write(aa, time_ps, grid)
            self._traj.sync(self._fsync)
            if rows is not None:
                where = self._energy_path
                self._csv.write(rows)
                self._csv.sync(self._fsync)
        except Exception as exc:
            counts = f"{self._reports} complete reports ({self._reports * self._n} frames"
            counts += f", {self._reports * self._n} rows)" if self._csv is not None else ")"
            message = (
                f"{where}: writing the report at step {step} failed after {counts}: "
                f"{exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}; the reporter is "
                "closed, continue from the last checkpoint with append=True"
            )
            self._failed = message
            try:
                self.close()
            except Exception:  # noqa: BLE001 - closing flushes, and can fail the same way: report the first error
                pass
            if isinstance(exc, OSError):
                raise OSError(exc.errno, message) from exc
            raise RuntimeError(message) from exc

    # ------------------------------------------------------------------ files
    def _check_directories(self) -> None:
        for path, argument in ((self._path, "file"), (self._energy_path, "energyFile")):
            if path is not None and not path.absolute().parent.is_dir():
                raise FileNotFoundError(
                    errno.ENOENT, f"the directory of {argument} {path} does not exist", str(path.absolute().parent)
                )

    def _open_files(self, simulation) -> None:
        """Check and open every output, all or none (a failure closes what was opened)."""
        from openmm import unit

        if self._failed is not None:
            raise RuntimeError(self._failed)
        self._check_directories()
        self._bind(simulation)
        self._periodic = simulation.system.usesPeriodicBoundaryConditions()
        platform = simulation.context.getPlatform().getName()
        if self._device_name is not None:
            self._device = torch.device(self._device_name)
        elif platform == "CUDA" and torch.cuda.is_available():
            self._device = torch.device("cuda")
        else:
            self._device = torch.device("cpu")
        self.model = self.model.on_device(self._device)
        if self._seed is not None:
            torch.manual_seed(int(self._seed))
        integrator = simulation.integrator
        temperature = None
        if hasattr(integrator, "getTemperature"):
            temperature = integrator.getTemperature().value_in_unit(unit.kelvin)
        self._beta = 1.0 / kT(temperature if temperature else self.model.temperature)
        groups = integrator.getIntegrationForceGroups() if hasattr(integrator, "getIntegrationForceGroups") else -1
        self._groups = None if (groups & 0xFFFFFFFF) == 0xFFFFFFFF else int(groups)
        if self._group_mask is not None:
            self._groups = self._group_mask
        if isinstance(self._traj, DCDOutput) and hasattr(integrator, "getStepSize"):
            self._traj.dt_ps = integrator.getStepSize().value_in_unit(unit.picosecond)
        outputs = [self._traj] + ([self._csv] if self._csv is not None else [])
        try:
            for output in outputs:
                output.lock()
            self._resume(int(simulation.currentStep))
        except BaseException:
            for output in outputs:
                output.close()
                if output.created and output.path.exists() and output.path.stat().st_size == 0:
                    output.path.unlink()
            raise
        self._open = True

    def _resume(self, step: int) -> None:
        """Read what the files hold (with append), decide what to keep, cut the rest and continue."""
        grid, frames, rows = None, 0, None
        if self._append:
            grid, frames = self._traj.inspect()
            rows = self._csv.inspect() if self._csv is not None else None
        keep, self._grid, self._fill_step = self._reconcile(step, grid, frames, rows)
        self._traj.begin(keep * self._n, self._grid)
        if self._csv is not None:
            self._csv.begin(int(rows.ends[keep * self._n - 1]) if keep else (rows.header_end if rows else 0))
        self._reports = keep
        if self._temporal and keep:
            prev = self._traj.read((keep - 1) * self._n, keep * self._n)
            self._previous = torch.as_tensor(prev, dtype=torch.float32, device=self._device)
        if self._append and (frames or rows is not None):
            note = f"{self._path}: kept {keep} reports"
            note += f" (steps {self._grid.first_step}-{self._grid.step(keep - 1)})" if keep else ""
            note += f", cut {frames - keep * self._n} frames"
            if rows is not None:
                note += f" and {len(rows.data) - keep * self._n} rows"
                note += " plus an incomplete row" if rows.partial_line else ""
            note += f", at step {step}"
            self.resumed = note + (f"; writing the report at step {step} now" if self._fill_step is not None else "")

    def _reconcile(
        self, step: int, grid: StepGrid | None, frames: int, rows: EnergyRows | None
    ) -> tuple[int, StepGrid | None, int | None]:
        """How many reports to keep, the grid to continue, and a report step to write at once.

        A report is complete with all its frames and, with an energy file, all its rows; the rows
        must lie on the frames' grid. The reporter writes frames before rows, so after a crash the
        rows can lag the frames by one report but never lead them.
        """
        n, traj, csv = self._n, self._path, self._energy_path
        n_rows = 0 if rows is None else len(rows.data)
        settings = (self._interval, n)
        if grid is None or (frames < n and (grid.interval, grid.samples) != settings):
            if n_rows:
                raise ValueError(
                    f"cannot append: {csv} has {n_rows} rows but {traj} holds no complete report; "
                    "rows are written after their frames, so these files do not belong together"
                )
            return 0, None, None
        if (grid.interval, grid.samples) != settings:
            raise ValueError(
                f"cannot append to {traj}: it holds reports every {grid.interval} steps with {grid.samples} samples "
                f"per frame, but this reporter has reportInterval={self._interval}, samplesPerFrame={n}"
            )
        complete = frames // n
        if complete and step < grid.first_step:
            raise ValueError(
                f"cannot append to {traj}: the simulation is at step {step}, before the file's first report at step "
                f"{grid.first_step} (its reports run to step {grid.step(complete - 1)}); appending would discard them "
                "all: load the checkpoint these files were written with, or pass append=False to start over"
            )
        # reports after the simulation's step are cut whatever else holds (a restart cut short by an
        # error may have cut one file and not the other)
        upto = (step - grid.first_step) // grid.interval + 1 if step >= grid.first_step else 0
        keep = min(complete, upto)
        if csv is not None:
            if complete and self._csv.created:
                raise ValueError(
                    f"cannot append: {traj} holds {complete} reports but the energy file {csv} does not "
                    "exist; pass the energy file written with them, or energyFile=None"
                )
            k = np.arange(n_rows)
            want = np.stack([grid.first_step + (k // n) * grid.interval, k % n], 1)
            have = rows.data[:, [ENERGY_COLUMNS.index("step"), ENERGY_COLUMNS.index("sample")]] if n_rows else want
            bad = np.flatnonzero((have != want).any(1))
            if bad.size:
                b = bad[0]
                raise ValueError(
                    f"cannot append: {csv}, line {rows.lines[b]}, is for step {have[b, 0]:.0f} sample "
                    f"{have[b, 1]:.0f}, but {traj} has step {want[b, 0]} sample {want[b, 1]} there: the files do "
                    "not belong together"
                )
            in_rows = min(n_rows // n, upto)
            if in_rows > keep:
                raise ValueError(
                    f"cannot append: {csv} has rows for {in_rows} reports but {traj} holds only {keep} "
                    f"(to step {step}); rows are written after their frames: the files do not belong "
                    "together"
                )
            if keep > in_rows + 1:
                raise ValueError(
                    f"cannot append: {traj} holds {keep} reports but {csv} has rows for only {in_rows} "
                    f"(to step {step}); a crash leaves the rows at most one report behind"
                )
            keep = min(keep, in_rows)
        due = grid.step(keep)
        if keep == 0 and step != due:
            return 0, None, None
        if step > due:
            raise ValueError(
                f"cannot append to {traj}: its complete reports end at step {grid.step(keep - 1)} but the simulation "
                f"is at step {step}, so the report at step {due} is missing; continue from a checkpoint at or before "
                f"step {due}"
            )
        return keep, grid, (step if step == due else None)

    def close(self) -> None:
        """Flush and close the files and free their paths for another reporter (safe to call twice;
        a closed reporter does not report again)."""
        self._failed = self._failed or f"{self._path}: the reporter is closed"
        try:
            if self._traj is not None:
                self._traj.close()
        finally:  # the energy file and the claimed paths are freed even when the trajectory fails to close
            try:
                if self._csv is not None:
                    self._csv.close()
            finally:
                self._open = False
                self._release()

    def __enter__(self) -> BackmapReporter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
