"""Metrics for reconstructions and importance weights; one definition each, used everywhere.

Positions are nm, energies kJ/mol, log densities nats. Every function takes plain numpy arrays (and
an mdtraj Topology where the metric needs chemistry), so the same code scores a model, a reporter's
output, or a hybrid run.
"""

from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import mdtraj as md
import numpy as np
from scipy.special import logsumexp
from scipy.stats import wasserstein_distance

CLASH_DISTANCE = 0.12  # nm: heavy-atom contacts under 1.2 Angstrom are clashes
BOND_TOLERANCE = 0.10  # bonds within +-10% of the reference length count as good

# Side-chain chiral centres of the standard amino acids: (residue, centre, its four neighbours).
_SIDE_CHAIN_CENTRES = {"THR": ("CB", ("CA", "OG1", "CG2", "HB")), "ILE": ("CB", ("CA", "CG1", "CG2", "HB"))}


# ---------------------------------------------------------------------------- weights
def kish_ess(log_w: np.ndarray) -> float:
    """Kish's effective sample size (sum w)^2 / sum w^2 from log-weights; -inf weights count as 0."""
    log_w = np.asarray(log_w, dtype=np.float64).reshape(-1)
    finite = np.isfinite(log_w)
    if not finite.any():
        return 0.0
    lw = log_w[finite]
    return float(np.exp(2 * logsumexp(lw) - logsumexp(2 * lw)))


def normalized_weights(log_w: np.ndarray) -> np.ndarray:
    """Self-normalised importance weights summing to 1 (non-finite log-weights get weight 0)."""
    log_w = np.asarray(log_w, dtype=np.float64)
    out = np.zeros_like(log_w)
    finite = np.isfinite(log_w)
    if finite.any():
        out[finite] = np.exp(log_w[finite] - logsumexp(log_w[finite]))
    return out


def log_weights(u_aa: np.ndarray, u_cg: np.ndarray, log_q: np.ndarray, temperature: float) -> np.ndarray:
    """log w = -beta U_AA + beta U_CG - log q (DESIGN.md), energies in kJ/mol."""
    from openmm_backmap.energies import kT

    beta = 1.0 / kT(temperature)
    lw = -beta * np.asarray(u_aa) + beta * np.asarray(u_cg) - np.asarray(log_q)
    return np.where(np.isfinite(lw), lw, -np.inf)


def conditional_ess(u_aa: np.ndarray, log_q: np.ndarray, temperature: float) -> float:
    """Mean over CG frames of Kish ESS / K of exp(-beta U_AA - log q) among each frame's K samples.

    ``u_aa`` and ``log_q`` have shape (n_frames, K).
    """
    from openmm_backmap.energies import kT

    u_aa, log_q = np.atleast_2d(u_aa), np.atleast_2d(log_q)
    lw = -np.asarray(u_aa) / kT(temperature) - np.asarray(log_q)
    lw = np.where(np.isfinite(lw), lw, -np.inf)
    return float(np.mean([kish_ess(row) / row.size for row in lw]))


# ---------------------------------------------------------------------------- geometry metrics
def heavy_atoms(topology: md.Topology) -> np.ndarray:
    return np.array([a.index for a in topology.atoms if a.element is not None and a.element.symbol != "H"])


def bond_score(x: np.ndarray, topology: md.Topology, reference_lengths: np.ndarray | None = None,
               reference: np.ndarray | None = None) -> float:
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
        pairs = np.array([(i, j) for k, i in enumerate(heavy) for j in heavy[k + 1 :]
                          if (int(i), int(j)) not in bonded])
        if len(pairs) == 0:
            return 0.0
        close = _pair_distances(x, pairs) < CLASH_DISTANCE
        return float(100.0 * close.any(-1).mean())
    if per != "residue":
        raise ValueError(f"per must be 'auto', 'sample' or 'residue', got {per!r}")
    res_of = np.array([a.residue.index for a in topology.atoms])
    bonded_res = {(res_of[i], res_of[j]) for i, j in bonded} | {(res_of[j], res_of[i]) for i, j in bonded}
    pairs = np.array([(i, j) for k, i in enumerate(heavy) for j in heavy[k + 1 :]
                      if res_of[i] != res_of[j] and (res_of[i], res_of[j]) not in bonded_res])
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


def ramachandran_histogram(phi: np.ndarray, psi: np.ndarray, bins: int = 36,
                           weights: np.ndarray | None = None) -> np.ndarray:
    """Normalised (bins x bins) histogram of (phi, psi) in degrees over [-180, 180)^2."""
    h, _, _ = np.histogram2d(np.ravel(phi), np.ravel(psi), bins=bins, range=[[-180, 180], [-180, 180]],
                             weights=None if weights is None else np.ravel(weights))
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


def ramachandran_js(samples_traj: md.Trajectory, reference_traj: md.Trajectory,
                    weights: np.ndarray | None = None) -> float:
    """JS divergence of the (phi, psi) histograms (36 x 36) of two trajectories (all residues)."""
    from openmm_backmap.data import backbone_dihedrals

    phi_s, psi_s = backbone_dihedrals(samples_traj)
    phi_r, psi_r = backbone_dihedrals(reference_traj)
    w = None if weights is None else np.repeat(np.asarray(weights)[:, None], phi_s.shape[1], 1)
    return js_divergence(ramachandran_histogram(phi_s, psi_s, weights=w), ramachandran_histogram(phi_r, psi_r))


# ---------------------------------------------------------------------------- reporter output
ENERGY_COLUMNS = ("step", "time_ps", "sample", "u_cg_kjmol", "u_aa_kjmol", "log_q", "log_w")


@dataclass
class EnergyRows:
    """The complete rows of a reporter energy file and where each one ends in the file.

    Attributes
    ----------
    path
        The file read.
    header
        Column names from the header line (empty when the file has no complete header line).
    data
        ``(n_rows, n_columns)`` values, float64.
    lines
        1-based line number of each row.
    ends
        Byte offset just past each row's newline (where the file would be cut to keep it last).
    header_end
        Byte offset just past the header line (0 without one).
    partial_line
        Line number of an incomplete last row (no newline: the writer was killed or the disk filled
        while writing it), which is left out of ``data``; None when the file ends with a full row.
    """

    path: Path
    header: list[str]
    data: np.ndarray
    lines: np.ndarray
    ends: np.ndarray
    header_end: int
    partial_line: int | None


def scan_energy_file(path: str | Path) -> EnergyRows:
    """Read every complete row of an energy file, tolerating an incomplete last row.

    A row is complete when it ends with a newline: the reporter writes each row whole and ends it
    with the newline, so a last line without one was cut short (and may parse to wrong numbers: a
    cut ``-51.03`` reads as ``-51.0``). Such a last line is left out and reported in
    ``partial_line``. Any other malformed row raises ValueError naming the file and the line.
    Lines starting with ``#`` and blank lines are skipped.
    """
    path = Path(path)
    raw = path.read_bytes()
    header: list[str] = []
    header_end = 0
    values, lines, ends = [], [], []
    partial = None
    offset = 0
    chunks = raw.split(b"\n")
    for number, chunk in enumerate(chunks, start=1):
        last = number == len(chunks)
        start, offset = offset, offset + len(chunk) + (0 if last else 1)
        if last:  # text after the final newline (empty when the file ends with one)
            if chunk.strip():
                partial = number
            break
        try:
            text = chunk.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ValueError(f"{path}, line {number}: not text (bytes {start}-{offset})") from None
        if not text or text.startswith("#"):
            continue
        row = next(csv.reader([text]))
        if not header:
            header, header_end = [h.strip() for h in row], offset
            continue
        if len(row) != len(header):
            raise ValueError(f"{path}, line {number}: {len(row)} values where the header has {len(header)} columns")
        try:
            values.append([float(v) for v in row])
        except ValueError:
            raise ValueError(f"{path}, line {number}: not a number in {text!r}") from None
        lines.append(number)
        ends.append(offset)
    data = np.array(values, dtype=np.float64).reshape(len(values), len(header))
    return EnergyRows(path, header, data, np.array(lines, dtype=np.int64), np.array(ends, dtype=np.int64),
                      header_end, partial)


def read_energy_file(path: str | Path) -> dict[str, np.ndarray]:
    """Read a reporter energy file (CSV with :data:`ENERGY_COLUMNS`) into column arrays.

    An incomplete last row (a run killed, or a disk filled, while writing it) is left out with a
    warning that names the file and the line; see :func:`scan_energy_file`.
    """
    rows = scan_energy_file(path)
    if not rows.header:
        raise ValueError(f"{rows.path} is empty (no header line)")
    missing = [c for c in ENERGY_COLUMNS if c not in rows.header]
    if missing:
        raise ValueError(f"{rows.path} lacks the columns {missing}; is it a BackmapReporter energy file?")
    if rows.partial_line is not None:
        warnings.warn(
            f"{rows.path}: line {rows.partial_line} is an incomplete last row (the run was killed or the disk "
            f"filled while writing it); it is left out and the {len(rows.data)} complete rows are used",
            stacklevel=2,
        )
    return {name: rows.data[:, k] for k, name in enumerate(rows.header)}


class Reweighted:
    """Self-normalised importance weights of a run, with ESS and reweighted statistics."""

    def __init__(self, log_w: np.ndarray) -> None:
        self.log_w = np.asarray(log_w, dtype=np.float64)
        self.weights = normalized_weights(self.log_w)
        self.ess = kish_ess(self.log_w)
        self.n = self.log_w.size

    @property
    def ess_fraction(self) -> float:
        return self.ess / max(self.n, 1)

    def average(self, observable: np.ndarray) -> float:
        """Reweighted average of an observable with one value per sample."""
        obs = np.asarray(observable, dtype=np.float64).reshape(self.n, -1)
        return float((self.weights[:, None] * obs).sum(0).squeeze())

    def histogram(self, observable: np.ndarray, bins=50, range=None) -> tuple[np.ndarray, np.ndarray]:
        """Reweighted, normalised histogram (density) of a per-sample observable."""
        return np.histogram(np.asarray(observable).reshape(-1), bins=bins, range=range,
                            weights=self.weights, density=True)


def reweight(energy_file: str | Path) -> Reweighted:
    """Weights, ESS and reweighted statistics from a BackmapReporter energy file (an incomplete
    last row is left out with a warning, see :func:`read_energy_file`)."""
    return Reweighted(read_energy_file(energy_file)["log_w"])


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


def summarize(values: dict[str, float], keys: Sequence[str] | None = None,
              fmt: Callable[[float], str] = lambda v: f"{v:.4g}") -> str:
    """A two-column text table of metrics."""
    keys = keys or list(values)
    width = max(len(k) for k in keys)
    return "\n".join(f"{k:<{width}}  {fmt(values[k])}" for k in keys)
