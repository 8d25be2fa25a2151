"""The energy files: the CSV schema the reporter writes and the analysis reads, in one place.

A reporter energy file (:class:`~openmm_backmap.openmm.reporter.BackmapReporter`) has one row per
AA sample, columns :data:`ENERGY_COLUMNS`:

    step, time_ps, sample, u_cg_kjmol, u_aa_kjmol, log_q, log_w

energies in kJ/mol, log q(x | X) in nats, log w = -beta U_AA + beta U_CG - log q the importance
log-weight (-inf for an impossible sample, flagged, never dropped).  ``openmm-backmap backmap
--energies`` writes the columns :data:`BACKMAP_COLUMNS` (no CG energy: the CG trajectory has none).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import IO

import numpy as np

ENERGY_COLUMNS = ("step", "time_ps", "sample", "u_cg_kjmol", "u_aa_kjmol", "log_q", "log_w")
BACKMAP_COLUMNS = ("frame", "sample", "log_q", "u_aa_kjmol")


def energy_rows(step: int, time_ps: float, u_cg: float, u_aa: np.ndarray, log_q: np.ndarray,
                log_w: np.ndarray) -> list[list]:
    """The rows of one reported CG frame (one per sample), formatted as written."""
    return [[step, f"{time_ps:.6f}", s, f"{u_cg:.10g}", f"{u_aa[s]:.10g}", f"{log_q[s]:.10g}", f"{log_w[s]:.10g}"]
            for s in range(len(log_q))]


def open_energy_file(path: str | Path, append: bool) -> tuple[IO[str], csv.writer]:
    """(file, csv writer) for a reporter energy file: appended to when ``append`` and it has rows
    already, else created with the header."""
    path = Path(path)
    exists = append and path.exists() and path.stat().st_size > 0
    fh = open(path, "a" if exists else "w", newline="")
    writer = csv.writer(fh)
    if not exists:
        writer.writerow(ENERGY_COLUMNS)
        fh.flush()
    return fh, writer


def truncate_energy_file(path: str | Path, keep: int) -> None:
    """Keep the header and the first ``keep`` rows of an energy file (replaced atomically)."""
    path = Path(path)
    with open(path) as fh:
        lines = fh.readlines()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(lines[: keep + 1]))
    tmp.replace(path)


def read_energy_file(path: str | Path) -> dict[str, np.ndarray]:
    """Read a reporter energy file (CSV with :data:`ENERGY_COLUMNS`) into column arrays."""
    path = Path(path)
    with open(path, newline="") as fh:
        rows = list(csv.reader(line for line in fh if not line.startswith("#")))
    if not rows:
        raise ValueError(f"{path} is empty")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in ENERGY_COLUMNS if c not in header]
    if missing:
        raise ValueError(f"{path} lacks the columns {missing}; is it a BackmapReporter energy file?")
    data = np.array([[float(v) for v in row] for row in rows[1:] if row], dtype=np.float64).reshape(-1, len(header))
    return {name: data[:, k] for k, name in enumerate(header)}


def write_backmap_energies(path: str | Path, log_q: np.ndarray, u_aa: np.ndarray | None, samples: int) -> None:
    """The ``backmap --energies`` CSV: one row per AA frame, frame-major (row k = CG frame k // samples,
    sample k % samples), with ``u_aa_kjmol`` only when AA energies are given."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(BACKMAP_COLUMNS if u_aa is not None else BACKMAP_COLUMNS[:3])
        for k in range(len(log_q)):
            row = [k // samples, k % samples, f"{log_q[k]:.6f}"]
            if u_aa is not None:
                row.append(f"{u_aa[k]:.6f}")
            w.writerow(row)
