"""Backmapping a CG trajectory file: CG frames in, AA frames (and their energies) out.

What ``openmm-backmap backmap`` runs: a model file or a protein model by name
(:func:`~openmm_backmap.io.backmap_model.load_model`, bound to the chain of the CG topology)
samples ``samples`` reconstructions per CG frame, in batches, optionally compiled; AA energies come
from the model's System (:func:`~openmm_backmap.openmm.energies.model_system`: embedded in the model
file, or amber14 + GBn2 for protein models), evaluated in batches in torch
(:func:`~openmm_backmap.openmm.energies.aa_energy`), and go to the CSV of
:func:`~openmm_backmap.io.energy_file.write_backmap_energies`. The AA topology is written beside
the trajectory as a PDB (:func:`topology_path`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from openmm_backmap.io.backmap_model import ProteinChainModel, ProteinModel, load_model
from openmm_backmap.io.energy_file import write_backmap_energies
from openmm_backmap.io.pdb import topology_to_pdb
from openmm_backmap.io.protein_models import CGChain, check_cg_positions, load_cg_topology
from openmm_backmap.io.trajectories import TRAJECTORY_SUFFIXES
from openmm_backmap.openmm.energies import aa_energy, model_system

__all__ = ["backmap_trajectory", "read_cg_frames", "topology_path"]


def topology_path(out: str | Path) -> Path | None:
    """Where the AA topology of a backmapped trajectory ``out`` is written: the same name with
    ``.pdb`` (``aa.dcd`` -> ``aa.pdb``); None when ``out`` is itself a PDB."""
    out = Path(out)
    return None if out.suffix.lower() == ".pdb" else out.with_suffix(".pdb")


def _check_writable(path: Path, what: str) -> None:
    """Refuse, before any sampling, an output path that is a directory or whose folder is missing
    or not writable (probed with a temporary file there); OSError naming the path."""
    if path.is_dir():
        raise OSError(f"the {what} {path} is a directory; give a file path")
    if not path.parent.is_dir():
        raise OSError(f"cannot write the {what} {path}: {path.parent} is not an existing folder")
    try:
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as err:
        raise OSError(f"cannot write the {what} {path}: {err.strerror or err}") from err


def _write_replacing(path: Path, write: Callable[[Path], None]) -> Path:
    """``write`` into a new file beside ``path`` (same suffix, so writers pick the same format) and
    return it; on any failure the partial file is removed and ``path`` is untouched."""
    partial = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    try:
        write(partial)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return partial


def read_cg_frames(
    cg: str | Path, topology, n_beads: int, chain: CGChain | None = None, topology_name: str | Path = "the CG topology"
) -> np.ndarray:
    """The frames (N, n_beads, 3) nm, float32, of a CG trajectory file (any format mdtraj reads):
    the bead count must be ``n_beads``, every coordinate finite, and for a protein ``chain`` the
    chain geometry plausible (:func:`~openmm_backmap.io.protein_models.check_cg_positions`:
    Angstrom, missing residues).

    Raises
    ------
    FileNotFoundError, ValueError
        Naming the file (and the frame or residues at fault).
    """
    import mdtraj as md

    cg_path = Path(cg)
    if not cg_path.is_file():
        raise FileNotFoundError(f"CG trajectory {cg_path} does not exist")
    try:
        traj = md.load(str(cg_path), top=topology)
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - mdtraj raises many kinds for mismatched files
        raise ValueError(f"cannot read {cg_path} with the CG topology {topology_name}: {err}") from err
    if traj.n_atoms != n_beads:
        raise ValueError(f"the CG trajectory {cg_path} has {traj.n_atoms} beads but the model expects {n_beads}")
    X = traj.xyz.astype(np.float32)
    if not np.all(np.isfinite(X)):
        frame = int(np.argwhere(~np.isfinite(X))[0][0])
        raise ValueError(f"the CG trajectory {cg_path} contains NaN or infinite coordinates (first in frame {frame})")
    if chain is not None:
        check_cg_positions(X, chain, f"the CG trajectory {cg_path}")
    return X


def backmap_trajectory(
    model_path: str | Path,
    cg: str | Path,
    cg_topology: str | Path,
    out: str | Path,
    samples: int = 1,
    seed: int = 0,
    energies: str | Path | None = None,
    batch_size: int = 1024,
    device: str | None = None,
    progress: bool = True,
    compile: bool = False,
) -> dict:
    """Backmap a CG trajectory (any format mdtraj reads) with a model file or a protein model's
    name (``protein-ca``, ``protein-backbone``: bound to the chain of ``cg_topology``) and write the
    AA trajectory (``samples`` reconstructions per frame, frame-major), its topology beside it
    (:func:`topology_path`, the first reconstruction's coordinates), and optionally a CSV of
    ``frame, sample, log_q`` (+ ``u_aa_kjmol`` when the model has an AA System: embedded, or
    amber14 + GBn2 for protein models).

    Temporal models run ``samples`` chains, each frame conditioned on the chain's previous frame.
    ``compile`` compiles the full batches first (:meth:`BackmapModel.compile`; not for temporal
    models): worth it for long trajectories, as it costs a minute or two and doubles the speed.
    """
    import mdtraj as md
    from tqdm.auto import tqdm

    if int(samples) < 1 or int(batch_size) < 1:
        raise ValueError(f"samples and batch_size must be >= 1, got samples={samples}, batch_size={batch_size}")
    out = Path(out)
    if not out.name.lower().endswith(TRAJECTORY_SUFFIXES):
        raise ValueError(
            f"cannot write the backmapped trajectory {out}: unsupported format {out.suffix or '(no suffix)'}; "
            f"use one of {', '.join(TRAJECTORY_SUFFIXES)}"
        )
    _check_writable(out, "backmapped trajectory")
    if energies is not None:
        energies = Path(energies)
        if energies.resolve() == out.resolve():
            raise ValueError(f"the energies file and the trajectory are the same file {out}")
        _check_writable(energies, "energies file")
    model = load_model(model_path, device=device)
    cg_path = Path(cg)
    top = load_cg_topology(cg_topology)
    if isinstance(model, ProteinModel):
        model = model.bind(top, device=device)
    else:
        model.check_cg_topology(top)
    chain = model.cg_chain if isinstance(model, ProteinChainModel) else None
    X = read_cg_frames(cg_path, top, model.n_cg, chain, cg_topology)
    system = model_system(model) if energies is not None else None
    energy = aa_energy(system) if system is not None else None
    frames_per_batch = max(1, int(batch_size) // int(samples))
    if compile:
        if model.temporal:
            raise ValueError("compile works for independent sampling, not for temporal models")
        model.compile(min(frames_per_batch, len(X)) * int(samples))
    torch.manual_seed(int(seed))
    aa_all, lq_all, u_all = [], [], []
    bar = tqdm(total=len(X), desc="backmap", unit="frame", disable=not progress, dynamic_ncols=True)
    if model.temporal:
        prev = None
        for f in range(len(X)):
            cg_f = torch.as_tensor(X[f : f + 1]).repeat(int(samples), 1, 1)
            if prev is None:
                aa, lq = model.sample(cg_f[:1], int(samples))
            else:
                aa, lq = model.sample_next(cg_f, prev)
            prev = aa
            aa_all.append(aa.cpu().numpy())
            lq_all.append(lq.cpu().numpy())
            bar.update(1)
    else:
        for s in range(0, len(X), frames_per_batch):
            aa, lq = model.sample(torch.as_tensor(X[s : s + frames_per_batch]), int(samples))
            aa_all.append(aa.cpu().numpy())
            lq_all.append(lq.cpu().numpy())
            bar.update(min(frames_per_batch, len(X) - s))
    bar.close()
    aa = np.concatenate(aa_all).astype(np.float32)
    lq = np.concatenate(lq_all)
    if energy is not None:
        with torch.no_grad():
            for s in range(0, len(aa), 1024):
                u_all.append(energy(torch.as_tensor(aa[s : s + 1024], dtype=torch.float64)).numpy())
    if Path(out).suffix.lower() == ".xtc":
        print(
            "warning: XTC rounds coordinates to 1e-3 nm, enough to shift AA energies by ~1 kT; "
            "prefer DCD, HDF5 or NetCDF for reweighting"
        )
    # Both files are written beside their targets first and replace them only when both are
    # complete: a failed write (full disk, a writer's error) leaves any earlier files as they were.
    counts = f"{len(aa)} frames of {model.n_aa} atoms, from {len(X)} CG frames x {samples} samples"
    n = int(samples)
    written = []
    try:
        try:
            written.append((_write_replacing(out, lambda p: md.Trajectory(aa, model.topology).save(str(p))), out))
        except Exception as err:  # noqa: BLE001 - mdtraj's writers raise many kinds (OSError, HDF5, NetCDF)
            raise OSError(f"cannot write the backmapped trajectory {out} ({counts}): {err}") from err
        if energies is not None:
            # temporal chains are stored frame-major too: row k = frame k // n, chain k % n
            u = np.concatenate(u_all) if u_all else None
            try:
                written.append((_write_replacing(energies, lambda p: write_backmap_energies(p, lq, u, n)), energies))
            except Exception as err:  # noqa: BLE001 - reported with the path and the counts
                raise OSError(f"cannot write the energies file {energies} ({len(lq)} rows, {counts}): {err}") from err
    except BaseException:
        for partial, _ in written:
            partial.unlink(missing_ok=True)
        raise
    for partial, target in written:
        os.replace(partial, target)
    pdb = topology_path(out)
    if pdb is not None:
        pdb.write_text(topology_to_pdb(model.topology, aa[0]))
    if energies is not None and not u_all:
        print("note: the model embeds no AA System, so the energies file has no U_AA column")
    return {
        "n_frames": int(len(X)),
        "n_samples": int(len(aa)),
        "out": str(out),
        "topology": None if pdb is None else str(pdb),
    }
