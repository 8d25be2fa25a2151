"""Importance weights: from CG samples and their reconstructions to all-atom Boltzmann averages.

A CG frame X from exp(-beta U_CG(X)) and a reconstruction x ~ q(x | X) get the log-weight

    log w = -beta U_AA(x) + beta U_CG(X) - log q(x | X)

(up to a constant); self-normalised weights turn them into AA ensemble averages, and Kish's effective
sample size says how much those are worth.  :func:`reweight` reads a reporter energy file
(:mod:`openmm_backmap.io.energy_file`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.special import logsumexp

from openmm_backmap.io.energy_file import read_energy_file
from openmm_backmap.units import kT


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
    """log w = -beta U_AA + beta U_CG - log q, the importance log-weight of a reconstruction x of a
    CG frame X drawn from exp(-beta U_CG), energies in kJ/mol."""
    beta = 1.0 / kT(temperature)
    lw = -beta * np.asarray(u_aa) + beta * np.asarray(u_cg) - np.asarray(log_q)
    return np.where(np.isfinite(lw), lw, -np.inf)


def conditional_ess(u_aa: np.ndarray, log_q: np.ndarray, temperature: float) -> float:
    """Mean over CG frames of Kish ESS / K of exp(-beta U_AA - log q) among each frame's K samples.

    ``u_aa`` and ``log_q`` have shape (n_frames, K).
    """
    u_aa, log_q = np.atleast_2d(u_aa), np.atleast_2d(log_q)
    lw = -np.asarray(u_aa) / kT(temperature) - np.asarray(log_q)
    lw = np.where(np.isfinite(lw), lw, -np.inf)
    return float(np.mean([kish_ess(row) / row.size for row in lw]))


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
        return np.histogram(
            np.asarray(observable).reshape(-1), bins=bins, range=range, weights=self.weights, density=True
        )


def reweight(energy_file: str | Path) -> Reweighted:
    """Weights, ESS and reweighted statistics from a BackmapReporter energy file."""
    return Reweighted(read_energy_file(energy_file)["log_w"])
