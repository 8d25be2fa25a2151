"""Alanine dipeptide through the transferable protein models, beside per-molecule six-bead models.

Each row is :func:`openmm_backmap.analysis.evaluate.evaluate_model` on evenly spaced frames of a
reference trajectory: one model, K samples per frame (64 for the conditional ESS). Reported: energy
W1 (kJ/mol, Wasserstein-1 between U_AA of one reconstruction per frame and U_AA of the reference
frames; "all" uses every sample), conditional ESS (mean over frames of Kish ESS / K of exp(-beta
U_AA - log q)), bond score (fraction of bonds, hydrogens included, within 10% of the reference's mean
length), clash score, NLL per atom of the reference frames, and the wall time. Definitions:
:mod:`openmm_backmap.analysis.metrics`, :mod:`openmm_backmap.analysis.reweighting`.

A row is ``label=model@reference_dir``; ``reference_dir`` holds ``topology.pdb``, ``traj.dcd`` and
``system.xml`` (the held-out corpus layout) or ``ala2.pdb``, ``ala2.dcd``, ``ala2_system.xml`` (the
reference command's layout). The model is a model file or a protein model's name (bound to the
reference's chain); U_AA is the reference directory's System, so every row on one directory is
scored with one energy function.

Usage::

    python benchmarks/bench_ala2_protein.py \\
        protein-ca=protein-ca@/work/data/peptides/heldout/ala2-gbn2 \\
        protein-backbone=protein-backbone@/work/data/peptides/heldout/ala2-gbn2 \\
        six-bead-gbn2=six_bead_gbn2.pt@/work/data/peptides/heldout/ala2-gbn2 \\
        six-bead-vacuum=/work/data/entropy/models/six_bead.pt@/work/data/entropy/seed2 \\
        [--frames 200] [--samples 64] [--seed 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import mdtraj as md
import torch

from openmm_backmap.analysis.evaluate import evaluate_model

LAYOUTS = (("topology.pdb", "traj.dcd", "system.xml"), ("ala2.pdb", "ala2.dcd", "ala2_system.xml"))


def reference_files(folder: str | Path) -> tuple[Path, Path, Path]:
    """(topology, trajectory, System XML) of a reference directory in either layout."""
    folder = Path(folder)
    for names in LAYOUTS:
        paths = tuple(folder / n for n in names)
        if all(p.is_file() for p in paths):
            return paths
    raise FileNotFoundError(f"{folder} holds neither {' '.join(LAYOUTS[0])} nor {' '.join(LAYOUTS[1])}")


def run_row(model: str, reference_dir: str, frames: int, samples: int, seed: int) -> dict:
    """The metrics of one model on one reference directory (energies from that directory's System)."""
    top, dcd, system = reference_files(reference_dir)
    traj = md.load(str(dcd), top=str(top))
    metrics = evaluate_model(model, traj, None, n_frames=frames, samples=samples, aa_system=str(system), seed=seed)
    metrics.update(model=model, reference=str(reference_dir), reference_frames=int(traj.n_frames))
    return metrics


def table(rows: dict[str, dict]) -> str:
    """A Markdown table of the rows."""
    cols = ("row", "reference", "frames x K", "energy W1", "W1 (all)", "cond. ESS", "bond", "clash %", "NLL/atom", "s")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for label, m in rows.items():
        lines.append(
            f"| {label} | {Path(m['reference']).name} | {m['n_frames']} x {m['samples_per_frame']} | "
            f"{m['energy_w1_kjmol']:.3g} | {m['energy_w1_all_samples_kjmol']:.3g} | {m['conditional_ess']:.4f} | "
            f"{m['bond_score']:.4f} | {m['clash_score_percent']:.2f} | {m['nll_per_atom']:.3f} | {m['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="+", help="label=model@reference_dir")
    parser.add_argument("--frames", type=int, default=200, help="reference frames (evenly spaced; default 200)")
    parser.add_argument("--samples", type=int, default=64, help="samples per frame (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write every row's metrics here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = {}
    for spec in args.rows:
        label, _, rest = spec.partition("=")
        model, _, ref = rest.rpartition("@")
        if not (label and model and ref):
            raise SystemExit(f"row {spec!r} is not label=model@reference_dir")
        rows[label] = run_row(model, ref, args.frames, args.samples, args.seed)
        print(f"{label}: {json.dumps(rows[label])}", flush=True)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads {args.threads}\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
