"""From files to trained models: what ``openmm-backmap train`` and ``train-cg`` run, in stages.

:func:`train_from_files` (a backmapper): load the AA trajectories and the mapping
(:func:`load_frames`), take the constraints from the AA System or the data
(:func:`aa_constraints`), split each file into contiguous training and validation blocks
(:func:`split_frames`), fit the model's statistics, train by maximum likelihood, refine on the AA
energy when a System is given, and write the checkpoint.  :func:`train_cg_from_files` does the same
for a CG flow potential.  Settings are the dataclasses of :mod:`openmm_backmap.training.config`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mdtraj as md
import numpy as np
import torch

from openmm_backmap.geometry import COVALENT_BOND_RANGE_NM, bond_length_range, check_length_scale
from openmm_backmap.io.checkpoints import make_cg_spec, make_spec, save_checkpoint
from openmm_backmap.io.trajectories import (
    check_restraint_for_mapping,
    load_trajectory,
    reference_restraint,
    require_unrestrained,
)
from openmm_backmap.mapping import CGMapping
from openmm_backmap.models.backmapper import Backmapper
from openmm_backmap.models.cg_potential import CGFlowPotential
from openmm_backmap.openmm.energies import aa_energy, check_system_matches, constraints_from_system, load_system
from openmm_backmap.training import backmapper as bm_training
from openmm_backmap.training import cg_potential as cg_training
from openmm_backmap.training.config import BackmapperTraining, CGPotentialTraining
from openmm_backmap.training.data import block_split, make_pairs

__all__ = [
    "TrainingFrames",
    "aa_constraints",
    "detect_constraints",
    "load_frames",
    "split_frames",
    "train_cg_from_files",
    "train_from_files",
]


# ---------------------------------------------------------------------------- stages
@dataclass
class TrainingFrames:
    """AA frames of one or more files of one topology, and the CG mapping.

    ``traj`` holds the files one after the other; ``first`` marks the first frame of each file and
    ``part_frames`` counts each file's frames.
    """

    files: list[str]
    traj: md.Trajectory
    mapping: CGMapping
    first: np.ndarray
    part_frames: list[int]


def load_frames(topology: str, trajectory: str | Sequence[str], mapping: str, stride: int = 1) -> TrainingFrames:
    """Load the trajectories and the mapping (a preset or a groups JSON); a restrained run is refused
    unless every restrained atom is a bead by itself (then p(x | X) is unbiased)."""
    files = [trajectory] if isinstance(trajectory, (str, Path)) else list(trajectory)
    if not files:
        raise ValueError("no trajectory given")
    parts = [load_trajectory(f, topology, stride=stride) for f in files]
    cg_map = CGMapping.from_spec(mapping, parts[0].topology)
    for f in files:
        check_restraint_for_mapping(f, cg_map)
    traj = parts[0].join(parts[1:], check_topology=True) if len(parts) > 1 else parts[0]
    first = np.zeros(traj.n_frames, dtype=bool)
    first[np.cumsum([0] + [p.n_frames for p in parts[:-1]])] = True
    return TrainingFrames([str(f) for f in files], traj, cg_map, first, [p.n_frames for p in parts])


def aa_constraints(traj: md.Trajectory, aa_system: str | None) -> tuple[Any, str | None, list]:
    """(AA System or None, its XML or None, constraints (i, j, nm)): from the System's constraints
    when its XML path is given, else the bonds whose length does not vary in the data."""
    if aa_system is None:
        return None, None, detect_constraints(traj)
    system = load_system(aa_system)
    check_system_matches(
        system,
        [a.element.symbol if a.element is not None else "" for a in traj.topology.atoms],
        f"the AA System {aa_system}",
        "the topology",
    )
    return system, Path(aa_system).read_text(), constraints_from_system(system)


def split_frames(part_frames: Sequence[int], val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) frame indices: contiguous time blocks of each file
    (:func:`~openmm_backmap.training.data.block_split`), in the joined trajectory's numbering."""
    split: dict[str, list] = {"train": [], "val": []}
    offset = 0
    for n in part_frames:
        one = block_split(n, (1.0 - val_fraction, val_fraction, 0.0), n_blocks=10, seed=seed)
        for key in split:
            split[key].append(one[key] + offset)
        offset += n
    return np.concatenate(split["train"]), np.concatenate(split["val"])


def detect_constraints(traj, tol: float = 1e-4) -> list[tuple[int, int, float]]:
    """Bonds whose length varies by less than ``tol`` nm (std) over a trajectory: constrained."""
    pairs = np.array([(a.index, b.index) for a, b in traj.topology.bonds], dtype=np.int64).reshape(-1, 2)
    if pairs.size == 0:
        return []
    d = np.linalg.norm(traj.xyz[:, pairs[:, 0]] - traj.xyz[:, pairs[:, 1]], axis=-1).astype(np.float64)
    std, mean = d.std(0), d.mean(0)
    return [(int(i), int(j), float(m)) for (i, j), s, m in zip(pairs, std, mean) if s < tol]


def _previous_index(frames: np.ndarray, first: np.ndarray | None = None) -> np.ndarray:
    """Position in ``frames`` of each frame's predecessor (-1 when it is not in ``frames``, or when
    ``first[f]`` marks frame f as the first of its trajectory)."""
    pos = {int(f): i for i, f in enumerate(frames)}
    return np.array(
        [-1 if first is not None and first[int(f)] else pos.get(int(f) - 1, -1) for f in frames], dtype=np.int64
    )


# ---------------------------------------------------------------------------- backmapper
def train_from_files(
    topology: str,
    trajectory: str | Sequence[str],
    mapping: str,
    out: str | Path,
    settings: BackmapperTraining = BackmapperTraining(),
    aa_system: str | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """What ``openmm-backmap train`` does: load, split, fit, ML-train, energy-refine, checkpoint.

    ``trajectory`` may be several files of the same topology (e.g. an unrestrained run plus runs
    restrained to rare basins by ``openmm-backmap reference --restrain``); a restrained run is
    accepted only when every restrained atom is a CG bead by itself, so that p(x | X) is unbiased.
    Energy refinement runs when ``aa_system`` (a System XML path) is given and
    ``settings.energy_steps > 0``; the maximum-likelihood model is then kept beside ``out`` as
    ``<out>.ml.ckpt``.  ``resume`` continues the maximum-likelihood stage from ``out``.

    Returns
    -------
    dict
        ``ml`` (and ``energy``) training summaries and ``final_val_nll`` (nats per frame).
    """
    s = settings
    torch.manual_seed(s.seed)
    np.random.seed(s.seed)
    frames = load_frames(topology, trajectory, mapping, s.stride)
    traj, cg_map = frames.traj, frames.mapping
    system, system_xml, constraints = aa_constraints(traj, aa_system)
    tr, va = split_frames(frames.part_frames, s.val_fraction, s.seed)
    x = traj.xyz.astype(np.float64)
    X = cg_map.project(x)
    log(
        f"{traj.n_frames} frames ({len(tr)} train, {len(va)} validation), {cg_map.n_aa} atoms -> "
        f"{cg_map.n_cg} beads, {len(constraints)} constraints"
    )
    model = Backmapper.from_data(
        cg_map,
        x[tr],
        constraints=constraints,
        temporal=s.temporal,
        hidden=s.hidden,
        n_layers=s.layers,
        n_bins=s.bins,
        seed=s.seed,
    )
    spec = make_spec(model, s.temperature, x[0], system_xml, cg_xyz=X[tr])
    log(f"model: {model.dim} internal DOF, {sum(p.numel() for p in model.parameters())} parameters")
    previous = (lambda idx: (_previous_index(idx, frames.first),)) if s.temporal else (lambda idx: ())
    ml = bm_training.train_ml(
        model,
        spec,
        (x[tr], X[tr], *previous(tr)),
        (x[va], X[va], *previous(va)),
        epochs=s.epochs,
        batch_size=s.batch_size,
        lr=s.lr,
        seed=s.seed,
        checkpoint=out,
        resume=resume,
        progress=progress,
    )
    log(f"ML: best validation NLL {ml['best_val_nll']:.3f} nats/frame at epoch {ml['best_epoch']}")
    summary = {"ml": {k: v for k, v in ml.items() if k != "history"}}
    if system is not None and s.energy_steps > 0:
        # keep the maximum-likelihood model beside the refined one, for comparison
        ml_path = Path(out).with_suffix(".ml" + (Path(out).suffix or ".ckpt"))
        save_checkpoint(ml_path, model, copy.deepcopy(spec), stage="ml-done")
        log(f"maximum-likelihood model written to {ml_path}")
        en = bm_training.refine_energy(
            model,
            spec,
            aa_energy(system),
            X[tr],
            s.temperature,
            steps=s.energy_steps,
            ml_data=(x[tr], X[tr]),
            ml_weight=s.ml_weight,
            lr=s.energy_lr,
            seed=s.seed,
            val_frames=X[va][:: max(1, len(va) // 100)],
            progress=progress,
        )
        log(f"energy refinement: {en['steps']} steps, best validation reverse KL {en['best_val_kl']:.3f}")
        summary["energy"] = {k: v for k, v in en.items() if k != "history"}
    spec["training"]["data"] = {
        "trajectory": frames.files[0] if len(frames.files) == 1 else frames.files,
        "n_frames": int(traj.n_frames),
        "stride": int(s.stride),
        "n_train": int(len(tr)),
        "n_val": int(len(va)),
        "seed": int(s.seed),
    }
    dtype = model.M.dtype
    val_nll = bm_training.mean_nll(model, torch.as_tensor(x[va], dtype=dtype), torch.as_tensor(X[va], dtype=dtype))
    spec["training"]["final_val_nll"] = val_nll
    save_checkpoint(out, model, spec, stage="done")
    log(f"final validation NLL {val_nll:.3f} nats/frame; checkpoint written to {out}")
    summary["final_val_nll"] = val_nll
    return summary


# ---------------------------------------------------------------------------- CG potential
def train_cg_from_files(
    topology: str,
    trajectory: str | Sequence[str],
    mapping: str,
    out: str | Path,
    settings: CGPotentialTraining = CGPotentialTraining(),
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """What ``openmm-backmap train-cg`` does: project the AA frames onto the beads, split every file
    into train / validation / test blocks, fit the flow's statistics and priors, train, checkpoint.

    Returns
    -------
    dict
        The training summary of :func:`~openmm_backmap.training.cg_potential.train_cg` and ``test_nll``.
    """
    s = settings
    files = [trajectory] if isinstance(trajectory, (str, Path)) else list(trajectory)
    if not s.allow_restrained:
        for path in files:
            require_unrestrained(
                path,
                "as training data for a CG potential of mean force, which learns p(X) "
                "(--allow-restrained trains a broadened proposal instead)",
            )
    # s.seed fixes the blocks and the coupling masks; the networks' initial weights come from torch's
    # global generator as it stands (the CLI has always left it unseeded here)
    parts = [load_trajectory(path, topology, stride=s.stride) for path in files]
    cg_map = CGMapping.from_spec(mapping, parts[0].topology)
    cg_map.check_disjoint("a CG potential (an atom in two beads ties their positions and makes the forces NaN)")
    bonds = [(a.index, b.index) for a, b in parts[0].topology.bonds]
    for path, part in zip(files, parts, strict=True):  # the AA bonds tell nm from Angstrom, as `train` checks
        if bonds:
            found = bond_length_range(part.xyz[:: max(1, part.n_frames // 100)], bonds)
            check_length_scale(found, COVALENT_BOND_RANGE_NM, f"the training coordinates of {path}")
    # train / validation / test blocks of each file, pooled
    split = [make_pairs(part, cg_map, seed=s.seed) for part in parts]
    pairs = {name: np.concatenate([p[name].X for p in split]) for name in ("train", "val", "test")}
    model = CGFlowPotential.from_data(
        pairs["train"],
        cg_map.cg_bonds(),
        circular_spread=s.circular_spread,
        temperature=s.temperature,
        n_layers=s.layers,
        hidden=s.hidden,
        n_bins=s.bins,
        seed=s.seed,
    )
    spec = make_cg_spec(model, cg_map, parts[0].xyz[0])
    spec["cg_bond_range_nm"] = list(bond_length_range(pairs["train"], cg_map.cg_bonds()))
    restrained = [r["basin"] for r in map(reference_restraint, files) if r is not None]
    spec["data"] = {
        "trajectories": [str(p) for p in files],
        "restrained_basins": restrained,
        "potential_of_mean_force": not restrained,
    }
    summary = cg_training.train_cg(
        model,
        spec,
        pairs["train"],
        pairs["val"],
        epochs=s.epochs,
        batch_size=s.batch_size,
        lr=s.lr,
        seed=s.seed,
        checkpoint=out,
        progress=progress,
        time_limit=s.time_limit,
    )
    summary["test_nll"] = cg_training.mean_nll(model, torch.as_tensor(pairs["test"], dtype=torch.float32))
    log(
        f"{cg_map.n_cg} beads, {model.dim} internal coordinates; best validation NLL "
        f"{summary['best_val_nll']:.3f} nats (epoch {summary['best_epoch']}), test NLL {summary['test_nll']:.3f}"
    )
    log(f"checkpoint: {out}")
    return summary
