"""PDB text of topologies, as model files and checkpoints carry them (one writer, one reader)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np


def topology_to_pdb(topology, xyz: np.ndarray | None = None) -> str:
    """PDB text of an mdtraj topology (with coordinates ``xyz`` (n, 3) nm, or zeros)."""
    import mdtraj as md

    if xyz is None:
        xyz = np.zeros((topology.n_atoms, 3))
    traj = md.Trajectory(np.asarray(xyz, dtype=np.float32).reshape(1, -1, 3), topology)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "top.pdb"
        traj.save_pdb(str(path))
        return path.read_text()


def topology_from_pdb(text: str):
    """mdtraj topology from PDB text."""
    import mdtraj as md

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "top.pdb"
        path.write_text(text)
        return md.load_pdb(str(path)).topology
