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
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ENERGY_COLUMNS = ("step", "time_ps", "sample", "u_cg_kjmol", "u_aa_kjmol", "log_q", "log_w")
BACKMAP_COLUMNS = ("frame", "sample", "log_q", "u_aa_kjmol")


def format_energy_rows(
    step: int, time_ps: float, u_cg: float, u_aa: np.ndarray, log_q: np.ndarray, log_w: np.ndarray
) -> str:
    """The rows of one reported CG frame (one per sample) as the text written, each ending in a newline."""
    return "".join(
        f"{step},{time_ps:.6f},{s},{u_cg:.10g},{u_aa[s]:.10g},{log_q[s]:.10g},{log_w[s]:.10g}\n"
        for s in range(len(log_q))
    )


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
    return EnergyRows(
        path, header, data, np.array(lines, dtype=np.int64), np.array(ends, dtype=np.int64), header_end, partial
    )


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
