"""Backbone dihedrals and the (phi, psi) basins of peptides, with block-averaged populations."""

from __future__ import annotations

from typing import Any

import mdtraj as md
import numpy as np

from openmm_backmap.mapping import as_mdtraj_topology

# (phi, psi) basins of alanine-like residues, with boundaries on the density minima of alanine
# dipeptide in vacuum at 300 K: at phi < 0 the psi histogram is empty between about -110 and 0
# (alpha_R is rare in vacuum), and the two gas-phase minima C7eq (-83, 74) and C5 (-155, 165) meet
# at a shallow saddle near phi = -115. Angles in degrees.
BASINS = ("C7eq", "C5", "alpha_R", "alpha_L")


def backbone_torsions(topology: Any) -> list[list[int]]:
    """Atom indices of the (phi, psi) pair of every residue that has both, as
    ``[phi_0, psi_0, phi_1, psi_1, ...]`` (4 atoms each)."""
    top = as_mdtraj_topology(topology)
    probe = md.Trajectory(np.zeros((1, top.n_atoms, 3), dtype=np.float32), top)
    phi_idx, psi_idx = md.compute_phi(probe)[0], md.compute_psi(probe)[0]
    psi_by_ca = {int(q[1]): q for q in psi_idx}
    out = []
    for q in phi_idx:
        if int(q[2]) in psi_by_ca:
            out += [[int(a) for a in q], [int(a) for a in psi_by_ca[int(q[2])]]]
    if not out:
        raise ValueError("the topology has no residue with both a phi and a psi dihedral")
    return out


# ---------------------------------------------------------------------------- analysis helpers
def backbone_dihedrals(traj: md.Trajectory) -> tuple[np.ndarray, np.ndarray]:
    """(phi, psi) in degrees, shape (n_frames, n_residues_with_both), for any peptide trajectory."""
    phi_idx, phi = md.compute_phi(traj)
    psi_idx, psi = md.compute_psi(traj)
    # pair phi and psi of the same residue: phi's CA is atom 2, psi's CA is atom 1
    psi_by_ca = {int(q[1]): k for k, q in enumerate(psi_idx)}
    pairs = [(k, psi_by_ca[int(q[2])]) for k, q in enumerate(phi_idx) if int(q[2]) in psi_by_ca]
    if not pairs:
        raise ValueError("the topology has no residue with both a phi and a psi dihedral")
    a, b = zip(*pairs)
    return np.degrees(phi[:, list(a)]), np.degrees(psi[:, list(b)])


#: phi (degrees) above which a configuration belongs to the extended region across phi = 180
PHI_WRAP = 130.0


def basin_indicators(phi: np.ndarray, psi: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean indicators of the :data:`BASINS` for (phi, psi) arrays in degrees; they partition
    the plane. phi >= :data:`PHI_WRAP` is first wrapped to phi - 360: the extended (C5) region
    continues across phi = 180, and vacuum MD at 300 K visits phi = 165..180 often while it
    practically never crosses phi = 0 into C7ax.

    * alpha_L: 0 <= phi < 130 (alpha_L and C7ax);
    * alpha_R: phi < 0 and -120 <= psi < 0;
    * C5: phi < 0 and psi < -120, or phi < -115 and psi >= 100 (the extended region);
    * C7eq: the rest of phi < 0 (psi >= 0).
    """
    phi = np.asarray(phi)
    psi = np.asarray(psi)
    phi = np.where(phi >= PHI_WRAP, phi - 360.0, phi)
    left = phi < 0.0
    c5 = left & ((psi < -120.0) | ((phi < -115.0) & (psi >= 100.0)))
    alpha_r = left & (psi >= -120.0) & (psi < 0.0)
    return {"C7eq": left & ~c5 & ~alpha_r, "C5": c5, "alpha_R": alpha_r, "alpha_L": ~left}


# ---------------------------------------------------------------------------- a whole run
def block_average(values: np.ndarray, n_blocks: int = 10) -> tuple[float, float]:
    """Mean of a time series and its standard error from ``n_blocks`` contiguous block means."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values) // n_blocks * n_blocks
    if n < n_blocks:
        return float(values.mean()) if len(values) else float("nan"), float("nan")
    blocks = values[:n].reshape(n_blocks, -1).mean(1)
    return float(values.mean()), float(blocks.std(ddof=1) / np.sqrt(n_blocks))


def basin_populations(traj, n_blocks: int = 10) -> dict[str, dict[str, float]]:
    """Basin populations (:data:`BASINS`) of a peptide trajectory with
    block-averaged standard errors, pooled over the residues that have both phi and psi."""
    phi, psi = backbone_dihedrals(traj)
    out = {}
    for name, ind in basin_indicators(phi, psi).items():
        mean, err = block_average(ind.mean(1), n_blocks)
        out[name] = {"population": mean, "error": err}
    return out
