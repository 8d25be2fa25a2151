"""Metrics of reconstructions; one definition each, used everywhere (weights: :mod:`.reweighting`).

Positions are nm, energies kJ/mol, log densities nats. Every function takes plain numpy arrays (and
an mdtraj Topology where the metric needs chemistry), so the same code scores a model, a reporter's
output, or a hybrid run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mdtraj as md
import numpy as np
from scipy.stats import wasserstein_distance

from openmm_backmap.analysis.basins import backbone_dihedrals

CLASH_DISTANCE = 0.12  # nm: heavy-atom contacts under 1.2 Angstrom are clashes
BOND_TOLERANCE = 0.10  # bonds within +-10% of the reference length count as good

# Side-chain chiral centres of the standard amino acids: (residue, centre, its four neighbours).
_SIDE_CHAIN_CENTRES = {"THR": ("CB", ("CA", "OG1", "CG2", "HB")), "ILE": ("CB", ("CA", "CG1", "CG2", "HB"))}


# ---------------------------------------------------------------------------- geometry metrics
def heavy_atoms(topology: md.Topology) -> np.ndarray:
    return np.array([a.index for a in topology.atoms if a.element is not None and a.element.symbol != "H"])


def bond_score(
    x: np.ndarray,
    topology: md.Topology,
    reference_lengths: np.ndarray | None = None,
    reference: np.ndarray | None = None,
) -> float:
    """Fraction of covalent bonds (over all samples) within +-10% of the reference length.

    The reference length of each bond is ``reference_lengths`` (nm, one per topology bond) or the
    mean over ``reference`` frames.
    """
    pairs = np.array([[a.index, b.index] for a, b in topology.bonds])
    lengths = _pair_distances(np.asarray(x), pairs)
    if reference_lengths is None:
        if reference is None:
            raise ValueError("bond_score needs reference_lengths or reference frames")
        reference_lengths = _pair_distances(np.asarray(reference), pairs).mean(0)
    ok = np.abs(lengths - reference_lengths) <= BOND_TOLERANCE * reference_lengths
    return float(ok.mean())


def clash_score(x: np.ndarray, topology: md.Topology, per: str = "auto") -> float:
    """Clash score in percent.

    ``per="sample"`` (small molecules): % of samples with a heavy-atom pair closer than 1.2 A that
    is not 1-2 or 1-3 bonded. ``per="residue"`` (proteins, FlowBack's definition): % of residues with
    a heavy-atom contact under 1.2 A to a residue it is not bonded to, averaged over samples.
    ``auto`` uses ``residue`` for four or more residues.
    """
    x = np.asarray(x)
    if per == "auto":
        per = "residue" if topology.n_residues >= 4 else "sample"
    heavy = heavy_atoms(topology)
    bonded = _bonded_pairs(topology, max_separation=2)
    if per == "sample":
        pairs = np.array(
            [(i, j) for k, i in enumerate(heavy) for j in heavy[k + 1 :] if (int(i), int(j)) not in bonded]
        )
        if len(pairs) == 0:
            return 0.0
        close = _pair_distances(x, pairs) < CLASH_DISTANCE
        return float(100.0 * close.any(-1).mean())
    if per != "residue":
        raise ValueError(f"per must be 'auto', 'sample' or 'residue', got {per!r}")
    res_of = np.array([a.residue.index for a in topology.atoms])
    bonded_res = {(res_of[i], res_of[j]) for i, j in bonded} | {(res_of[j], res_of[i]) for i, j in bonded}
    pairs = np.array(
        [
            (i, j)
            for k, i in enumerate(heavy)
            for j in heavy[k + 1 :]
            if res_of[i] != res_of[j] and (res_of[i], res_of[j]) not in bonded_res
        ]
    )
    if len(pairs) == 0:
        return 0.0
    close = _pair_distances(x, pairs) < CLASH_DISTANCE  # (S, P)
    flagged = np.zeros((x.shape[0], topology.n_residues), dtype=bool)
    for col in (0, 1):
        np.logical_or.at(flagged, (slice(None), res_of[pairs[:, col]]), close)
    return float(100.0 * flagged.mean())


def chiral_centres(topology: md.Topology) -> np.ndarray:
    """(n, 4) atom indices: centre, then three neighbours, of C-alpha (residues with CB) and the
    side-chain centres of Thr and Ile. The sign of the triple product fixes the handedness."""
    rows = []
    for res in topology.residues:
        names = {a.name: a.index for a in res.atoms}
        if {"CA", "N", "C", "CB"} <= names.keys():
            rows.append([names["CA"], names["N"], names["C"], names["CB"]])
        if res.name in _SIDE_CHAIN_CENTRES:
            centre, neigh = _SIDE_CHAIN_CENTRES[res.name]
            if all(n in names for n in (centre,) + neigh[:3]):
                rows.append([names[centre]] + [names[n] for n in neigh[:3]])
    return np.array(rows, dtype=np.int64).reshape(-1, 4)


def chirality_signs(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Sign of (a - c) . ((b - c) x (d - c)) for every centre, shape (S, n_centres)."""
    x = np.asarray(x)
    c = x[:, centres[:, 0]]
    a, b, d = (x[:, centres[:, k]] - c for k in (1, 2, 3))
    return np.sign(np.einsum("sij,sij->si", a, np.cross(b, d)))


def chirality_errors(x: np.ndarray, topology: md.Topology, reference: np.ndarray) -> float:
    """% of chiral centres (over all samples) whose handedness differs from the reference's."""
    centres = chiral_centres(topology)
    if len(centres) == 0:
        return 0.0
    ref_sign = np.sign(chirality_signs(np.asarray(reference), centres).sum(0))
    return float(100.0 * (chirality_signs(x, centres) != ref_sign[None]).mean())


def kabsch_rmsd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """RMSD (nm) between paired frames a[k] and b[k] (S, n, 3) after optimal superposition."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    h = np.einsum("sni,snj->sij", a, b)
    u, s, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(np.einsum("sij,sjk->sik", u, vt)))
    s[:, -1] *= d
    msd = ((a * a).sum((1, 2)) + (b * b).sum((1, 2)) - 2 * s.sum(1)) / a.shape[1]
    return np.sqrt(np.maximum(msd, 0.0))


def rmsd_and_diversity(samples: np.ndarray, reference: np.ndarray, topology: md.Topology) -> tuple[float, float]:
    """Heavy-atom RMSD (nm) of samples to the reference frame they were backmapped from, and
    diversity 1 - mean sample-sample RMSD / mean sample-reference RMSD.

    ``samples`` has shape (n_frames, K, n_aa, 3), ``reference`` (n_frames, n_aa, 3).
    """
    heavy = heavy_atoms(topology)
    s = np.asarray(samples)[..., heavy, :]
    r = np.asarray(reference)[:, heavy, :]
    n_frames, k = s.shape[:2]
    to_ref = kabsch_rmsd(s.reshape(-1, len(heavy), 3), np.repeat(r, k, axis=0)).mean()
    if k < 2:
        return float(to_ref), float("nan")
    shifted = np.roll(s, 1, axis=1)
    between = kabsch_rmsd(s.reshape(-1, len(heavy), 3), shifted.reshape(-1, len(heavy), 3)).mean()
    return float(to_ref), float(1.0 - between / to_ref)


def energy_w1(u_samples: np.ndarray, u_reference: np.ndarray) -> float:
    """Wasserstein-1 distance (kJ/mol) between finite sample and reference energies."""
    u_samples = np.asarray(u_samples).reshape(-1)
    u_reference = np.asarray(u_reference).reshape(-1)
    return float(wasserstein_distance(u_samples[np.isfinite(u_samples)], u_reference[np.isfinite(u_reference)]))


def ramachandran_histogram(
    phi: np.ndarray, psi: np.ndarray, bins: int = 36, weights: np.ndarray | None = None
) -> np.ndarray:
    """Normalised (bins x bins) histogram of (phi, psi) in degrees over [-180, 180)^2."""
    h, _, _ = np.histogram2d(
        np.ravel(phi),
        np.ravel(psi),
        bins=bins,
        range=[[-180, 180], [-180, 180]],
        weights=None if weights is None else np.ravel(weights),
    )
    return h / max(h.sum(), 1e-300)


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (nats, at most ln 2) of two histograms."""
    p = np.asarray(p, dtype=np.float64).ravel()
    q = np.asarray(q, dtype=np.float64).ravel()
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)

    def kl(a):
        nz = a > 0
        return float((a[nz] * np.log(a[nz] / m[nz])).sum())

    return 0.5 * kl(p) + 0.5 * kl(q)


def ramachandran_js(
    samples_traj: md.Trajectory, reference_traj: md.Trajectory, weights: np.ndarray | None = None
) -> float:
    """JS divergence of the (phi, psi) histograms (36 x 36) of two trajectories (all residues)."""
    phi_s, psi_s = backbone_dihedrals(samples_traj)
    phi_r, psi_r = backbone_dihedrals(reference_traj)
    w = None if weights is None else np.repeat(np.asarray(weights)[:, None], phi_s.shape[1], 1)
    return js_divergence(ramachandran_histogram(phi_s, psi_s, weights=w), ramachandran_histogram(phi_r, psi_r))


# ---------------------------------------------------------------------------- helpers
def _pair_distances(x: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    d = x[:, pairs[:, 0]] - x[:, pairs[:, 1]]
    return np.sqrt((d * d).sum(-1))


def _bonded_pairs(topology: md.Topology, max_separation: int) -> set[tuple[int, int]]:
    """Pairs (i < j) separated by at most ``max_separation`` bonds."""
    neigh: list[set[int]] = [set() for _ in range(topology.n_atoms)]
    for a, b in topology.bonds:
        neigh[a.index].add(b.index)
        neigh[b.index].add(a.index)
    out = set()
    for i in range(topology.n_atoms):
        frontier, seen = {i}, {i}
        for _ in range(max_separation):
            frontier = {j for f in frontier for j in neigh[f]} - seen
            seen |= frontier
        out |= {(min(i, j), max(i, j)) for j in seen if j != i}
    return out


def summarize(
    values: dict[str, float], keys: Sequence[str] | None = None, fmt: Callable[[float], str] = lambda v: f"{v:.4g}"
) -> str:
    """A two-column text table of metrics."""
    keys = keys or list(values)
    width = max(len(k) for k in keys)
    return "\n".join(f"{k:<{width}}  {fmt(values[k])}" for k in keys)
