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
import struct
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mdtraj as md
import numpy as np
import torch

from openmm_backmap.geometry import check_box_fits
from openmm_backmap.io.backmap_model import load_model
from openmm_backmap.io.energy_file import ENERGY_COLUMNS, EnergyRows, format_energy_rows, scan_energy_file
from openmm_backmap.openmm.energies import aa_energy
from openmm_backmap.units import kT

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the in-process registry still applies
    fcntl = None

# float32-or-better formats only: XTC's fixed-point rounding moves ALA2 energies by ~0.7 kT and
# chignolin's by ~2 kT, enough to break importance weights.
_FORMATS = {".dcd": "dcd", ".h5": "hdf5", ".hdf5": "hdf5", ".nc": "netcdf", ".ncdf": "netcdf"}
_NEEDS = {"hdf5": ("tables", "PyTables"), "netcdf": ("netCDF4", "netCDF4")}
_GRID_KEY = "openmm_backmap"


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
    kind = _FORMATS[suffix]
    if kind in _NEEDS:
        module, package = _NEEDS[kind]
        try:
            __import__(module)
        except ImportError:
            raise ImportError(f"{path}: writing {kind.upper()} needs {package} (pip install {package})") from None
    return kind


@dataclass(frozen=True)
class _Grid:
    """The steps of a file's reports: report k is at ``first_step + k * interval``."""

    first_step: int
    interval: int
    samples: int

    def step(self, report: int) -> int:
        return self.first_step + report * self.interval

    def text(self) -> str:
        return f"first_step={self.first_step} interval={self.interval} samples={self.samples}"

    @classmethod
    def parse(cls, text: str) -> _Grid | None:
        fields = dict(item.split("=", 1) for item in str(text).split() if "=" in item)
        try:
            return cls(int(fields["first_step"]), int(fields["interval"]), int(fields["samples"]))
        except (KeyError, ValueError):
            return None


# ---------------------------------------------------------------------------- ownership of paths
_LIVE: dict[str, bool] = {}  # resolved paths written by live reporters of this process
_LIVE_LOCK = threading.Lock()


def _claim(paths: list[Path]) -> list[str]:
    keys = [str(p.resolve()) for p in paths]
    with _LIVE_LOCK:
        for key in keys:
            if key in _LIVE:
                raise RuntimeError(
                    f"{key} is already written by another BackmapReporter in this process; close() that "
                    "reporter first (two reporters on one file would interleave their reports)"
                )
        _LIVE.update(dict.fromkeys(keys, True))
    return keys


def _release(keys: list[str]) -> None:
    with _LIVE_LOCK:
        for key in keys:
            _LIVE.pop(key, None)


def _open_locked(path: Path, hold: bool = True):
    """Open ``path`` read-write without truncating it (created if absent) under an exclusive
    advisory lock; returns (file, created). With ``hold=False`` the lock is only probed (for HDF5,
    whose library takes its own lock) and the file is closed again (None is returned)."""
    created = not path.exists()
    fh = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o666), "r+b", buffering=0)
    if fcntl is not None:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            fh.close()
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise RuntimeError(
                f"{path} is being written by another process (it holds a lock on the file); "
                "refusing to write it from a second reporter"
            ) from None
    if not hold:
        fh.close()
        return None, created
    return fh, created


def _write_all(fh, data: bytes, offset: int) -> None:
    """Write ``data`` at ``offset`` (a short write is continued; an OS error propagates)."""
    view = memoryview(data)
    fh.seek(offset)
    while view:
        view = view[fh.write(view) :]


class _LockedFile:
    """An output held open, unbuffered, under an exclusive advisory lock while the reporter writes it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fh = None
        self.created = False

    def lock(self) -> None:
        self.fh, self.created = _open_locked(self.path)

    def sync(self, fsync: bool) -> None:
        if fsync:
            os.fsync(self.fh.fileno())

    def close(self) -> None:
        if self.fh is not None:
            fh, self.fh = self.fh, None  # closed once, even when closing fails
            fh.close()


# ---------------------------------------------------------------------------- trajectory files
class _DCD(_LockedFile):
    """A DCD written by this reporter: float32 frames without unit cell, the step grid in the
    second title line. Each report's frames are written in one call before the header's frame
    count, so the frame count read back is the file size's (a crash leaves at most a cut frame)."""

    header_bytes = 276

    def __init__(self, path: Path, n_atoms: int) -> None:
        super().__init__(path)
        self.n_atoms = n_atoms
        self.frame_bytes = 3 * (8 + 4 * n_atoms)
        self.frames = 0
        self.dt_ps = 0.0

    def inspect(self) -> tuple[_Grid | None, int]:
        size = os.fstat(self.fh.fileno()).st_size
        if size < self.header_bytes:  # empty, or cut while its header was written: no frames
            return None, 0
        self.fh.seek(0)
        head = self.fh.read(self.header_bytes)
        if head[:8] != struct.pack("<i4s", 84, b"CORD"):
            raise ValueError(f"cannot append to {self.path}: it is not a DCD file (no CORD header)")
        title = head[100:260].decode("ascii", "replace")
        grid = _Grid.parse(title[80:]) if title.startswith("Created by openmm-backmap") else None
        if grid is None:
            raise _not_ours(self.path, "its header has no step grid")
        n_atoms = struct.unpack_from("<i", head, 268)[0]
        if n_atoms != self.n_atoms:
            raise ValueError(f"cannot append to {self.path}: it holds {n_atoms} atoms, not the model's {self.n_atoms}")
        frames = (size - self.header_bytes) // self.frame_bytes
        if frames:
            marks = np.memmap(self.path, "<i4", "r", self.header_bytes, (frames, 3, n_atoms + 2))[:, :, [0, -1]]
            bad = np.flatnonzero((marks != 4 * n_atoms).any((1, 2)))
            del marks
            if bad.size:
                raise ValueError(f"{self.path}: frame {bad[0]} is damaged (wrong record markers); cannot continue it")
        return grid, int(frames)

    def begin(self, frames: int, grid: _Grid | None) -> None:
        """Cut the file to its first ``frames`` frames (to nothing when 0) and continue it."""
        os.ftruncate(self.fh.fileno(), self.header_bytes + frames * self.frame_bytes if frames else 0)
        self.frames = frames
        if frames:
            self._update_header(grid)

    def read(self, start: int, stop: int) -> np.ndarray:
        self.fh.seek(self.header_bytes + start * self.frame_bytes)
        rec = np.frombuffer(self.fh.read((stop - start) * self.frame_bytes), dtype="<f4")
        return rec.reshape(stop - start, 3, self.n_atoms + 2)[:, :, 1:-1].transpose(0, 2, 1).astype(np.float64) / 10.0

    def write(self, xyz_nm: np.ndarray, time_ps: float, grid: _Grid) -> None:
        if self.frames == 0:
            _write_all(self.fh, self._header(grid, 0), 0)
        rec = np.empty((len(xyz_nm), 3, self.n_atoms + 2), dtype="<i4")
        rec[:, :, 0] = rec[:, :, -1] = 4 * self.n_atoms
        rec[:, :, 1:-1] = (np.asarray(xyz_nm, dtype=np.float64) * 10.0).astype("<f4").transpose(0, 2, 1).view("<i4")
        _write_all(self.fh, rec.tobytes(), self.header_bytes + self.frames * self.frame_bytes)
        self.frames += len(xyz_nm)
        self._update_header(grid)

    def _update_header(self, grid: _Grid) -> None:
        last = grid.step((self.frames - 1) // grid.samples)
        _write_all(self.fh, struct.pack("<i", self.frames), 8)
        _write_all(self.fh, struct.pack("<i", _int32(last)), 20)

    def _header(self, grid: _Grid, frames: int) -> bytes:
        head = struct.pack(
            "<i4s9if",
            84,
            b"CORD",
            frames,
            _int32(grid.first_step),
            _int32(grid.interval),
            _int32(grid.first_step),
            0,
            0,
            0,
            0,
            0,
            self.dt_ps / 0.04888821,
        )
        head += struct.pack("<13i", 0, 0, 0, 0, 0, 0, 0, 0, 0, 24, 84, 164, 2)
        head += b"Created by openmm-backmap BackmapReporter".ljust(80) + grid.text().encode("ascii").ljust(80)
        return head + struct.pack("<4i", 164, 4, self.n_atoms, 4)


def _int32(value: int) -> int:
    return max(min(int(value), 2**31 - 1), -(2**31))


def _not_ours(path: Path, why: str) -> ValueError:
    return ValueError(
        f"cannot append to {path}: it was not written by BackmapReporter ({why}), so the steps of "
        "its frames are unknown; write a new file or pass append=False"
    )


def _written(time_ps: float, xyz: np.ndarray) -> bool:
    """False for a NetCDF record holding fill values (9.97e36) rather than written data."""
    return bool(np.abs(time_ps) < 1e30 and not (np.abs(xyz) > 1e30).any())


class _NetCDF(_LockedFile):
    """An AMBER-convention NetCDF trajectory (Angstrom, times in ps) with the step grid in the
    global attribute ``openmm_backmap``, written through netCDF4 (mdtraj's writer cannot append).
    Cutting it rewrites the kept frames, times included, into a new file that replaces it."""

    def __init__(self, path: Path, n_atoms: int) -> None:
        super().__init__(path)  # the locked file; netCDF-C opens its own descriptor
        self.n_atoms = n_atoms
        self.ds = None
        self.frames = self.stored = 0

    def inspect(self) -> tuple[_Grid | None, int]:
        if os.fstat(self.fh.fileno()).st_size == 0:
            return None, 0
        with self._dataset(self.path, "r") as ds:
            grid = _Grid.parse(getattr(ds, _GRID_KEY, ""))
            if grid is None:
                raise _not_ours(self.path, f"no {_GRID_KEY} attribute with its step grid")
            if "atom" not in ds.dimensions or len(ds.dimensions["atom"]) != self.n_atoms:
                raise ValueError(f"cannot append to {self.path}: it does not hold {self.n_atoms} atoms")
            frames = self.stored = len(ds.dimensions["frame"])
            ds.set_auto_mask(False)
            # a record the header counts but whose data never reached the file reads as fill values
            while frames and not _written(ds["time"][frames - 1], ds["coordinates"][frames - 1]):
                frames -= 1
        return grid, frames

    def begin(self, frames: int, grid: _Grid | None) -> None:
        if frames == 0:
            os.ftruncate(self.fh.fileno(), 0)
        elif frames < self.stored:
            tmp = self.path.with_name(f".{self.path.name}.cut")
            with self._dataset(self.path, "r") as old, self._create(tmp, grid) as new:
                for start in range(0, frames, 1000):
                    stop = min(start + 1000, frames)
                    new["coordinates"][start:stop] = old["coordinates"][start:stop]
                    new["time"][start:stop] = old["time"][start:stop]
            fh, _ = _open_locked(tmp)
            os.replace(tmp, self.path)
            self.fh.close()
            self.fh = fh
        self.frames = frames
        if frames:
            self.ds = self._dataset(self.path, "a")

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.ds["coordinates"][start:stop], dtype=np.float64) / 10.0

    def write(self, xyz_nm: np.ndarray, time_ps: float, grid: _Grid) -> None:
        if self.ds is None:
            self.ds = self._create(self.path, grid)
            if os.fstat(self.fh.fileno()).st_ino != os.stat(self.path).st_ino:  # netCDF-C made a new file
                self.fh.close()
                self.fh, _ = _open_locked(self.path)
        k, m = self.frames, len(xyz_nm)
        self.ds["coordinates"][k : k + m] = np.asarray(xyz_nm, dtype=np.float32) * 10.0
        self.ds["time"][k : k + m] = np.full(m, time_ps, dtype=np.float32)
        self.frames += m

    def _dataset(self, path: Path, mode: str):
        import netCDF4

        try:
            return netCDF4.Dataset(str(path), mode)
        except OSError as exc:
            raise ValueError(f"cannot append to {path}: it cannot be read as NetCDF ({exc})") from exc

    def _create(self, path: Path, grid: _Grid):
        import mdtraj
        import netCDF4

        ds = netCDF4.Dataset(str(path), "w", format="NETCDF3_64BIT_OFFSET")
        ds.Conventions, ds.ConventionVersion = "AMBER", "1.0"
        ds.program, ds.programVersion, ds.application = "openmm-backmap", mdtraj.__version__, "BackmapReporter"
        setattr(ds, _GRID_KEY, grid.text())
        ds.createDimension("frame", 0)
        ds.createDimension("spatial", 3)
        ds.createDimension("atom", self.n_atoms)
        ds.createVariable("spatial", "c", ("spatial",))[:] = np.array(list("xyz"), dtype="S1")
        ds.createVariable("time", "f", ("frame",)).units = "picosecond"
        ds.createVariable("coordinates", "f", ("frame", "atom", "spatial")).units = "angstrom"
        return ds

    def sync(self, fsync: bool) -> None:
        self.ds.sync()
        super().sync(fsync)

    def close(self) -> None:
        try:
            if self.ds is not None:
                ds, self.ds = self.ds, None  # netCDF-C flushes on close, which can fail (a full disk)
                ds.close()
        finally:
            super().close()


class _HDF5(_LockedFile):
    """An mdtraj HDF5 trajectory (nm, times in ps) with the step grid in the root attribute
    ``openmm_backmap``. The HDF5 library locks the file while it is open; cutting it truncates
    the per-frame arrays in place.

    HDF5 does not survive a write that fails part-way: each flush rewrites the last chunk (frames
    of earlier reports included) and the metadata in place, and the library does not report a short
    write (a full disk, a file-size limit) but leaves a file it cannot open again. So the arrays are
    stored uncompressed (a chunk cut by a kill then holds the earlier frames' bytes unchanged, where
    a cut compressed chunk fails to decompress and takes them with it), and a report is written
    only when the file system and the process's file-size limit leave room for it, a whole chunk
    and :attr:`ROOM` bytes more; a short write that happens anyway is caught after the flush (the
    library's file size beyond the size on disk) and reported.
    """

    ROOM = 1 << 20  # bytes kept free beyond a report and a chunk (metadata, B-tree nodes)

    def __init__(self, path: Path, n_atoms: int, topology: md.Topology) -> None:
        super().__init__(path)  # fh: the mdtraj file, once open
        self.n_atoms, self.topology = n_atoms, topology
        self.frames = 0

    def lock(self) -> None:
        _, self.created = _open_locked(self.path, hold=False)

    def _tables(self, mode: str):
        import tables

        try:
            return tables.open_file(str(self.path), mode)
        except Exception as exc:  # HDF5ExtError, or another process's lock
            raise ValueError(
                f"cannot append to {self.path}: it cannot be opened as HDF5 ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''})"
            ) from exc

    def inspect(self) -> tuple[_Grid | None, int]:
        if self.path.stat().st_size == 0:
            return None, 0
        with self._tables("r") as f:
            grid = _Grid.parse(getattr(f.root._v_attrs, _GRID_KEY, ""))
            frames = 0
            if "coordinates" in f.root:
                if f.root.coordinates.shape[1] != self.n_atoms:
                    raise ValueError(
                        f"cannot append to {self.path}: it holds {f.root.coordinates.shape[1]} atoms, "
                        f"not the model's {self.n_atoms}"
                    )
                # mdtraj appends the coordinates, then the times: a crash can leave one longer
                frames = int(min(len(f.root.coordinates), len(f.root.time) if "time" in f.root else 0))
        if grid is None and frames:
            raise _not_ours(self.path, f"no {_GRID_KEY} attribute with its step grid")
        return grid, frames

    def begin(self, frames: int, grid: _Grid | None) -> None:
        """Cut the file to its first ``frames`` frames (a new file when 0) and hold it open, locked."""
        if frames == 0:
            with md.formats.HDF5TrajectoryFile(str(self.path), "w", compression=None) as f:
                f.topology = self.topology
        else:
            with self._tables("a") as f:
                for node in ("coordinates", "time"):
                    getattr(f.root, node).truncate(frames)
        self.fh = md.formats.HDF5TrajectoryFile(str(self.path), "a", compression=None)
        self.frames = frames

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.fh.root.coordinates[start:stop], dtype=np.float64)

    def write(self, xyz_nm: np.ndarray, time_ps: float, grid: _Grid) -> None:
        xyz = np.asarray(xyz_nm, dtype=np.float32)
        self._check_room(xyz.nbytes)
        if self.frames == 0:
            setattr(self.fh.root._v_attrs, _GRID_KEY, grid.text())
        self.fh.write(xyz, time=np.full(len(xyz), time_ps, dtype=np.float32))
        self.frames += len(xyz)

    def sync(self, fsync: bool) -> None:
        self.fh.flush()
        expected, on_disk = int(self.fh._handle.get_filesize()), os.stat(self.path).st_size
        if on_disk < expected:
            raise OSError(
                errno.ENOSPC,
                f"the HDF5 library wrote {on_disk} of {expected} bytes (a full disk or a file-size limit); "
                "HDF5 cannot be continued after a short write and the file is likely damaged",
            )
        if fsync:
            with open(self.path, "rb") as fh:
                os.fsync(fh.fileno())

    def _check_room(self, report_bytes: int) -> None:
        """OSError (ENOSPC or EFBIG) before writing when the report might not fit."""
        chunk = 4 * int(np.prod(self.fh.root.coordinates.chunkshape)) if "coordinates" in self.fh.root else 0
        need = report_bytes + chunk + self.ROOM
        free = os.statvfs(self.path.parent).f_bavail * os.statvfs(self.path.parent).f_frsize
        if free < need:
            raise OSError(errno.ENOSPC, f"{free} bytes free on the file system, {need} needed to write a report safely")
        try:
            import resource

            limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        except (ImportError, OSError):  # not POSIX
            return
        size = max(os.stat(self.path).st_size, int(self.fh._handle.get_filesize()))
        if limit != resource.RLIM_INFINITY and limit - size < need:
            raise OSError(
                errno.EFBIG,
                f"the process's file-size limit of {limit} bytes leaves {limit - size}, {need} needed to write a "
                "report safely",
            )


class _EnergyFile(_LockedFile):
    """The CSV energy file: a header line, then one row per sample, each report's rows written in
    one call after its frames."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.end = 0

    def inspect(self) -> EnergyRows | None:
        """The complete rows, or None for a file with no complete header line."""
        rows = scan_energy_file(self.path)
        if not rows.header:
            return None
        if tuple(rows.header) != ENERGY_COLUMNS:
            raise ValueError(
                f"cannot append to {self.path}: its columns are {rows.header}, not the reporter's "
                f"{list(ENERGY_COLUMNS)}"
            )
        return rows

    def begin(self, offset: int) -> None:
        """Cut the file at ``offset`` (past a row or the header; 0 rewrites the header) and continue it."""
        os.ftruncate(self.fh.fileno(), offset)
        if offset == 0:
            header = (",".join(ENERGY_COLUMNS) + "\n").encode()
            _write_all(self.fh, header, 0)
            offset = len(header)
        self.end = offset

    def write(self, text: str) -> None:
        data = text.encode()
        _write_all(self.fh, data, self.end)
        self.end += len(data)


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
        :func:`openmm_backmap.io.backmap_model.load_model`.
    samplesPerFrame
        AA samples drawn per CG frame (written as consecutive frames).
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
        kind = _trajectory_format(self._path)  # refuse XTC and unknown formats before the run starts
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
        n_aa = self.model.n_aa
        self._traj = {
            "dcd": lambda: _DCD(self._path, n_aa),
            "netcdf": lambda: _NetCDF(self._path, n_aa),
            "hdf5": lambda: _HDF5(self._path, n_aa, self.model.topology),
        }[kind]()
        self._csv = None if self._energy_path is None else _EnergyFile(self._energy_path)
        self._open = False
        self._failed: str | None = None
        self._grid: _Grid | None = None  # the files' step grid, known from the first report or the files
        self._reports = 0  # complete reports in the files
        self._fill_step: int | None = None
        self._previous: torch.Tensor | None = None
        self._device: torch.device | None = None
        self._beta: float | None = None
        self._groups: int | None = None
        self.frames_written = 0
        self.resumed: str | None = None  # what append kept and cut, for logs
        keys = _claim([self._path] + ([self._energy_path] if self._energy_path is not None else []))
        self._release = weakref.finalize(self, _release, keys)

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
        from openmm import unit

        if not self._open:
            self._open_files(simulation)
        step = int(simulation.currentStep)
        X = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        X = np.asarray(X, dtype=np.float64)
        if X.shape != (self.model.n_cg, 3):
            raise ValueError(
                f"the simulation has {X.shape[0]} particles but the model expects {self.model.n_cg} CG beads"
            )
        if not np.all(np.isfinite(X)):
            raise ValueError(f"CG positions at step {step} contain NaN or infinite values")
        grid = self._grid or _Grid(step, self._interval, self._n)
        if step != grid.step(self._reports):
            raise ValueError(
                f"report at step {step}, but the next report of {self._path} is due at step "
                f"{grid.step(self._reports)} (every {grid.interval} steps from step {grid.first_step})"
            )
        box = None
        if simulation.system.usesPeriodicBoundaryConditions():
            box = np.asarray(state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer))
            bond_range = self.model.metadata.get("cg_bond_range_nm")
            if bond_range:
                check_box_fits(box, float(bond_range[1]), f"the periodic box at step {step}")
        X = make_whole(X, self._cg_bonds, box)
        if self._groups is None:
            u_cg = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        else:
            u_cg = simulation.context.getState(getEnergy=True, groups=self._groups).getPotentialEnergy()
            u_cg = u_cg.value_in_unit(unit.kilojoule_per_mole)
        aa, log_q, previous = self._sample(X)
        time_ps = state.getTime().value_in_unit(unit.picosecond)
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
        previous = aa if self._temporal else None
        return aa.double().cpu().numpy(), torch.cat(logs).double().cpu().numpy(), previous

    def _aa_energies(self, aa: np.ndarray) -> np.ndarray:
        # float32: 4x faster than float64 for the batched torch energy, and within 2e-3 kJ/mol
        # (1e-3 kT) of it for alanine dipeptide (tests/test_energies.py), far below what moves a weight
        with torch.no_grad():
            u = self._energy(torch.as_tensor(aa, dtype=torch.float32)).double().numpy()
        return np.where(np.isfinite(u), u, np.inf)

    def _write(self, step: int, grid: _Grid, aa: np.ndarray, time_ps: float, rows: str | None) -> None:
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
        if isinstance(self._traj, _DCD) and hasattr(integrator, "getStepSize"):
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
        self, step: int, grid: _Grid | None, frames: int, rows: EnergyRows | None
    ) -> tuple[int, _Grid | None, int | None]:
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
