"""The files a :class:`~openmm_backmap.openmm.reporter.BackmapReporter` writes, and their locks.

Trajectory outputs (:class:`DCDOutput`, :class:`NetCDFOutput`, :class:`HDF5Output`) and the energy
CSV (:class:`EnergyOutput`) share one protocol: ``lock()`` opens the file under an exclusive advisory
lock (created if absent), ``inspect()`` reads what an earlier run left (its :class:`StepGrid` and
complete frames, or the complete rows), ``begin(...)`` cuts the file to what is kept and continues
it, ``write(...)`` appends one report, ``sync(fsync)`` flushes, ``close()`` releases. Every report
lies on a grid of steps, ``first_step + k * interval``, recorded in the trajectory (the DCD's second
title line, a NetCDF global attribute, an HDF5 root attribute ``openmm_backmap``). Paths written by
live reporters of this process are registered (:func:`claim_paths`, :func:`release_paths`), so two
reporters never interleave their reports in one file. No OpenMM here.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import mdtraj as md
import numpy as np

from openmm_backmap.io.energy_file import ENERGY_COLUMNS, EnergyRows, scan_energy_file

__all__ = [
    "DCDOutput",
    "EnergyOutput",
    "HDF5Output",
    "LockedOutput",
    "NetCDFOutput",
    "StepGrid",
    "claim_paths",
    "release_paths",
    "trajectory_format",
]

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the in-process registry still applies
    fcntl = None

# float32-or-better formats only: XTC's fixed-point rounding moves ALA2 energies by ~0.7 kT and
# chignolin's by ~2 kT, enough to break importance weights.
_FORMATS = {".dcd": "dcd", ".h5": "hdf5", ".hdf5": "hdf5", ".nc": "netcdf", ".ncdf": "netcdf"}
_NEEDS = {"hdf5": ("tables", "PyTables"), "netcdf": ("netCDF4", "netCDF4")}
_GRID_KEY = "openmm_backmap"


def trajectory_format(path: Path) -> str:
    """The kind of trajectory ``path`` names (``dcd``, ``hdf5``, ``netcdf``); ValueError for XTC and
    unknown suffixes, ImportError when the writer's library is missing."""
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
class StepGrid:
    """The steps of a file's reports: report k is at ``first_step + k * interval``."""

    first_step: int
    interval: int
    samples: int

    def step(self, report: int) -> int:
        return self.first_step + report * self.interval

    def text(self) -> str:
        return f"first_step={self.first_step} interval={self.interval} samples={self.samples}"

    @classmethod
    def parse(cls, text: str) -> StepGrid | None:
        fields = dict(item.split("=", 1) for item in str(text).split() if "=" in item)
        try:
            return cls(int(fields["first_step"]), int(fields["interval"]), int(fields["samples"]))
        except (KeyError, ValueError):
            return None


# ---------------------------------------------------------------------------- ownership of paths
_LIVE: dict[str, bool] = {}  # resolved paths written by live reporters of this process
_LIVE_LOCK = threading.Lock()


def claim_paths(paths: list[Path]) -> list[str]:
    """Register ``paths`` as written by a live reporter of this process (RuntimeError when one
    already is); returns the keys for :func:`release_paths`."""
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


def release_paths(keys: list[str]) -> None:
    """Free paths registered by :func:`claim_paths`."""
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
    """Write ``data`` at ``offset`` (``pwrite``: no seek; a short write is continued; an OS error
    propagates)."""
    view = memoryview(data).cast("B")  # flat bytes: a short write continues at the right byte
    fd = fh.fileno()
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


class LockedOutput:
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
class DCDOutput(LockedOutput):
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
        self._buffer: np.ndarray | None = None

    def inspect(self) -> tuple[StepGrid | None, int]:
        size = os.fstat(self.fh.fileno()).st_size
        if size < self.header_bytes:  # empty, or cut while its header was written: no frames
            return None, 0
        self.fh.seek(0)
        head = self.fh.read(self.header_bytes)
        if head[:8] != struct.pack("<i4s", 84, b"CORD"):
            raise ValueError(f"cannot append to {self.path}: it is not a DCD file (no CORD header)")
        title = head[100:260].decode("ascii", "replace")
        grid = StepGrid.parse(title[80:]) if title.startswith("Created by openmm-backmap") else None
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

    def begin(self, frames: int, grid: StepGrid | None) -> None:
        """Cut the file to its first ``frames`` frames (to nothing when 0) and continue it."""
        os.ftruncate(self.fh.fileno(), self.header_bytes + frames * self.frame_bytes if frames else 0)
        self.frames = frames
        if frames:
            self._update_header(grid)

    def read(self, start: int, stop: int) -> np.ndarray:
        self.fh.seek(self.header_bytes + start * self.frame_bytes)
        rec = np.frombuffer(self.fh.read((stop - start) * self.frame_bytes), dtype="<f4")
        return rec.reshape(stop - start, 3, self.n_atoms + 2)[:, :, 1:-1].transpose(0, 2, 1).astype(np.float64) / 10.0

    def write(self, xyz_nm: np.ndarray, time_ps: float, grid: StepGrid) -> None:
        if self.frames == 0:
            _write_all(self.fh, self._header(grid, 0), 0)
        rec = self._records(len(xyz_nm))
        np.multiply(np.asarray(xyz_nm).transpose(0, 2, 1), 10.0, out=rec[:, :, 1:-1], casting="same_kind")
        _write_all(self.fh, rec.view("<i4").data, self.header_bytes + self.frames * self.frame_bytes)
        self.frames += len(xyz_nm)
        self._update_header(grid)

    def _records(self, frames: int) -> np.ndarray:
        """A reused (frames, 3, n_atoms + 2) float32 buffer of DCD records, the record markers set."""
        if self._buffer is None or len(self._buffer) != frames:
            self._buffer = np.empty((frames, 3, self.n_atoms + 2), dtype="<f4")
            self._buffer.view("<i4")[:, :, [0, -1]] = 4 * self.n_atoms
        return self._buffer

    def _update_header(self, grid: StepGrid) -> None:
        """The frame count and last step (header bytes 8-24: frames, first step, interval, last step)."""
        last = grid.step((self.frames - 1) // grid.samples)
        fields = (self.frames, _int32(grid.first_step), _int32(grid.interval), _int32(last))
        _write_all(self.fh, struct.pack("<4i", *fields), 8)

    def _header(self, grid: StepGrid, frames: int) -> bytes:
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


class NetCDFOutput(LockedOutput):
    """An AMBER-convention NetCDF trajectory (Angstrom, times in ps) with the step grid in the
    global attribute ``openmm_backmap``, written through netCDF4 (mdtraj's writer cannot append).
    Cutting it rewrites the kept frames, times included, into a new file that replaces it."""

    def __init__(self, path: Path, n_atoms: int) -> None:
        super().__init__(path)  # the locked file; netCDF-C opens its own descriptor
        self.n_atoms = n_atoms
        self.ds = None
        self.frames = self.stored = 0

    def inspect(self) -> tuple[StepGrid | None, int]:
        if os.fstat(self.fh.fileno()).st_size == 0:
            return None, 0
        with self._dataset(self.path, "r") as ds:
            grid = StepGrid.parse(getattr(ds, _GRID_KEY, ""))
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

    def begin(self, frames: int, grid: StepGrid | None) -> None:
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

    def write(self, xyz_nm: np.ndarray, time_ps: float, grid: StepGrid) -> None:
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

    def _create(self, path: Path, grid: StepGrid):
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


class HDF5Output(LockedOutput):
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

    def inspect(self) -> tuple[StepGrid | None, int]:
        if self.path.stat().st_size == 0:
            return None, 0
        with self._tables("r") as f:
            grid = StepGrid.parse(getattr(f.root._v_attrs, _GRID_KEY, ""))
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

    def begin(self, frames: int, grid: StepGrid | None) -> None:
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

    def write(self, xyz_nm: np.ndarray, time_ps: float, grid: StepGrid) -> None:
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


class EnergyOutput(LockedOutput):
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
