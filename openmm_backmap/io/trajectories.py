"""Reading AA trajectories: any format mdtraj reads, checked (atom count, frames, finite values)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mdtraj as md
import numpy as np

from openmm_backmap.mapping import CGMapping, as_mdtraj_topology

# what mdtraj writes, by file suffix: the formats a backmapped trajectory may be saved in
TRAJECTORY_SUFFIXES = (".dcd", ".h5", ".nc", ".ncdf", ".netcdf", ".pdb", ".xtc", ".trr", ".xyz")


def load_trajectory(
    trajectory: str | Path | md.Trajectory,
    topology: str | Path | Any | None = None,
    stride: int = 1,
) -> md.Trajectory:
    """Load any trajectory mdtraj reads and check it.

    Raises
    ------
    ValueError
        If the trajectory and topology disagree on the atom count, if it has no frame, or if any
        coordinate is NaN or infinite (naming the first bad frame).
    """
    if isinstance(trajectory, md.Trajectory):
        traj = trajectory[::stride]
    else:
        path = Path(trajectory)
        if not path.exists():
            raise FileNotFoundError(f"trajectory {path} does not exist")
        kwargs = {}
        if topology is not None:
            top = topology if isinstance(topology, (str, Path)) else as_mdtraj_topology(topology)
            if isinstance(top, (str, Path)):
                top = md.load_topology(str(top))
            kwargs["top"] = top
        if path.is_file() and path.stat().st_size == 0:
            raise ValueError(f"the trajectory {path} is empty (0 bytes): it has no frames")
        try:
            traj = md.load(str(path), stride=stride, **kwargs)
        except (ValueError, OSError, IndexError) as err:
            if "Could not open file" in str(err) and path.is_file():
                n_top = f" (topology: {kwargs['top'].n_atoms} atoms)" if "top" in kwargs else ""
                raise ValueError(
                    f"the trajectory {path} ({path.stat().st_size} bytes) exists but cannot be read{n_top}: "
                    f"it has no frames (a header only) or is truncated"
                ) from err
            n_file = _file_atom_count(path)
            if n_file is not None and "top" in kwargs and n_file != kwargs["top"].n_atoms:
                raise ValueError(
                    f"the trajectory {path} has {n_file} atoms but the topology has {kwargs['top'].n_atoms}"
                ) from err
            raise ValueError(f"cannot read {path} with the given topology: {err}") from err
    if topology is not None and not isinstance(topology, (str, Path)):
        n_top = as_mdtraj_topology(topology).n_atoms
        if traj.n_atoms != n_top:
            where = "" if isinstance(trajectory, md.Trajectory) else f" {trajectory}"
            raise ValueError(f"the trajectory{where} has {traj.n_atoms} atoms but the topology has {n_top}")
    if traj.n_frames == 0:
        where = "" if isinstance(trajectory, md.Trajectory) else f" {trajectory}"
        raise ValueError(f"the trajectory{where} has no frames" + (f" at stride {stride}" if stride > 1 else ""))
    bad = ~np.isfinite(traj.xyz).all(axis=(1, 2))
    if bad.any():
        raise ValueError(
            f"the trajectory has NaN or infinite coordinates in {int(bad.sum())} frame(s), "
            f"first in frame {int(np.flatnonzero(bad)[0])}"
        )
    return traj


def _file_atom_count(path: Path) -> int | None:
    """The atom count stored in a trajectory file, or None when the format does not tell."""
    try:
        with md.open(str(path)) as fh:
            return int(np.asarray(fh.read(n_frames=1)[0]).shape[1])
    except Exception:  # noqa: BLE001 - any failure means "unknown", the caller reports the error
        return None


def reference_restraint(trajectory: str | Path) -> dict | None:
    """The restraint a trajectory written by :func:`generate_reference` was run with (from the JSON
    beside it), or None for an unrestrained run or a trajectory without that JSON."""
    meta_path = Path(trajectory).with_suffix(".json")
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return meta.get("restraint") if isinstance(meta, dict) else None


def require_unrestrained(trajectory: str | Path, purpose: str) -> None:
    """Raise when ``trajectory`` comes from a restrained run: its p(X) is biased."""
    restraint = reference_restraint(trajectory)
    if restraint is not None:
        raise ValueError(
            f"{trajectory} was run with a {restraint.get('basin')} restraint on (phi, psi), which biases the "
            f"ensemble; it cannot serve {purpose}. Use an unrestrained run (restrained runs are training data "
            "for backmappers only)"
        )


def check_restraint_for_mapping(trajectory: str | Path, mapping: CGMapping) -> None:
    """Raise unless every atom the trajectory's restraint (if any) acts on is a CG bead by itself,
    the condition under which the restrained run's p(x | X) is unbiased."""
    restraint = reference_restraint(trajectory)
    if restraint is None:
        return
    beads = {int(g[0]) for g in mapping.groups if g.size == 1}
    missing = [a for a in restraint.get("atoms", []) if int(a) not in beads]
    if missing:
        raise ValueError(
            f"{trajectory} was run with a {restraint.get('basin')} restraint on atoms {missing} that are not CG "
            "beads by themselves in this mapping, so its x|X statistics are biased; train this mapping on "
            "unrestrained data only"
        )
