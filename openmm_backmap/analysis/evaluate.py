"""Evaluation reports: a backmapper against reference AA frames, and a reporter's run reweighted.

:func:`evaluate_model`: for ``n_frames`` reference frames spread over the trajectory, the CG
projection is backmapped with K samples each; the metrics (bond and clash scores, chirality errors,
RMSD and diversity, NLL, energy W1, Ramachandran JS, conditional ESS: definitions in
:mod:`openmm_backmap.analysis.metrics` and :mod:`openmm_backmap.analysis.reweighting`) are computed
from those samples and written to ``metrics.json``, with the plots of :mod:`openmm_backmap.analysis.plots`.
A protein model (``protein-ca``, ``protein-backbone`` or a protein model file) is bound to the chain or chains
of the reference (or of a CG topology) by :func:`bind_protein_model`, and its energies are amber14 +
GBn2 unless an AA System is given.
:func:`evaluate_run`: the basin populations of a BackmapReporter run, raw and reweighted, against a
reference.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import mdtraj as md
import numpy as np
import torch

from openmm_backmap.analysis.basins import backbone_dihedrals, basin_indicators
from openmm_backmap.analysis.metrics import (
    bond_score,
    chirality_errors,
    clash_score,
    energy_w1,
    ramachandran_js,
    rmsd_and_diversity,
)
from openmm_backmap.analysis.plots import plot_backmapper_report, plot_reweighting_report
from openmm_backmap.analysis.reweighting import Reweighted, conditional_ess, normalized_weights
from openmm_backmap.io.backmap_model import ProteinChainModel, ProteinModel, load_model
from openmm_backmap.io.energy_file import read_energy_file
from openmm_backmap.io.protein_models import load_cg_topology, protein_model_path
from openmm_backmap.mapping import as_mdtraj_topology
from openmm_backmap.models.residues import MAPPINGS, build_chains, canonical_hydrogens, residue_template_name
from openmm_backmap.openmm.energies import aa_energy, check_system_matches, model_system


# ---------------------------------------------------------------------------- protein models
def is_protein_model(model: Any) -> bool:
    """True for a protein model: a shipped model's name, a protein model file, a :class:`ProteinModel`
    or one bound to a chain (:class:`ProteinChainModel`)."""
    if isinstance(model, (ProteinModel, ProteinChainModel)):
        return True
    return not hasattr(model, "sample") and protein_model_path(model) is not None


def bind_protein_model(
    model: Any, aa_topology: Any, cg_topology: Any = None, device: str = "cpu"
) -> tuple[ProteinChainModel, np.ndarray]:
    """Bind a protein model to the chain of an AA topology (a reference or a start structure).

    Parameters
    ----------
    model
        A shipped protein model's name (``protein-ca``, ``protein-backbone``), a protein model file,
        a :class:`~openmm_backmap.io.backmap_model.ProteinModel`, or a model already bound (checked
        against the AA topology's chain).
    aa_topology
        The AA topology (mdtraj or OpenMM, or a file) of the structures to compare with: one chain
        of amber14 residues or several (a complex; histidines named HIS are told apart by their protons).
    cg_topology
        Optional CG topology to bind to instead of the beads of ``aa_topology``; its residues must
        be the AA topology's.

    Returns
    -------
    (model, perm)
        The bound :class:`~openmm_backmap.io.backmap_model.ProteinChainModel`, and ``perm`` with model
        atom ``a`` at AA-topology atom ``perm[a]`` (the model lists atoms in amber14 template order).

    Raises
    ------
    ValueError
        When the AA topology is not a chain the model knows (naming the residue or atom), or the CG
        topology is another chain.
    """
    top = as_mdtraj_topology(aa_topology)
    sequences = [
        [residue_template_name(r.name, [a.name for a in r.atoms], f"the AA topology's residue {r}") for r in c.residues]
        for c in top.chains
        if c.n_residues
    ]
    if isinstance(model, ProteinChainModel):
        if cg_topology is not None:
            model.check_cg_topology(cg_topology)
        bound = model
    else:
        bound = _bind(model, sequences, top, cg_topology, device)
    model_sequences = bound_sequences(bound)
    if model_sequences != sequences:

        def residues(chains: list[list[str]]) -> str:  # chains separated by " / "
            return " / ".join(" ".join(q) for q in chains)

        raise ValueError(
            f"the CG topology's chain {residues(model_sequences)} is not the AA topology's chain {residues(sequences)}"
        )
    if list(build_chains(sequences).atom_names) != bound.metadata["atom_names"]:
        raise ValueError("the bound model's atoms are not its chain template's; the protein model file is damaged")
    return bound, chain_atom_order(bound, top)


def chain_atom_order(model: ProteinChainModel, topology: Any) -> np.ndarray:
    """``perm`` with the bound model's atom ``a`` at atom ``perm[a]`` of an AA topology of its chain
    that may list each residue's atoms in another order (matched by residue and atom name).

    Raises
    ------
    ValueError
        When the topology lacks atoms of the chain (naming them) or has atoms the chain has not.
    """
    top = as_mdtraj_topology(topology)
    where = {(a.residue.index, a.name): a.index for a in top.atoms}
    mine = [(a.residue.index, a.name) for a in as_mdtraj_topology(model.topology).atoms]
    missing = [f"residue {r + 1} {n}" for r, n in mine if (r, n) not in where]
    if missing:
        raise ValueError(
            f"the reference topology lacks atoms of the model's chain ({', '.join(missing[:5])}): "
            "it is another molecule or another protonation state"
        )
    if top.n_atoms != len(mine):
        extra = sorted(set(where) - set(mine))[:5]
        raise ValueError(
            f"the reference topology has {top.n_atoms} atoms, the model's chain {len(mine)} (not in the chain: "
            f"{', '.join(f'residue {r + 1} {n}' for r, n in extra)})"
        )
    return np.array([where[k] for k in mine], dtype=np.int64)


def _bind(model: Any, sequences: list[list[str]], top: md.Topology, cg_topology: Any, device: str) -> ProteinChainModel:
    """``model`` bound to ``cg_topology``, or to the beads of the chains ``sequences`` of ``top``."""
    unbound = model if isinstance(model, ProteinModel) else load_model(model)
    if cg_topology is None:
        cg = md.Topology()
        aa_chains = [c for c in top.chains if c.n_residues]
        for names, aa_chain in zip(sequences, aa_chains):
            chain = cg.add_chain(chain_id=getattr(aa_chain, "chain_id", None))
            for name, res in zip(names, aa_chain.residues):
                residue = cg.add_residue(name, chain, resSeq=res.resSeq)
                for bead in MAPPINGS[unbound.mapping][name]:
                    cg.add_atom(bead, md.element.get_by_symbol(bead[0]), residue)
        cg_topology = cg
    return unbound.bind(load_cg_topology(cg_topology), device=device)


def bound_sequences(model: ProteinChainModel) -> list[list[str]]:
    """The residue names (amber14 templates) of a bound model's chains, chain by chain."""
    return [[r.name for r in c.residues] for c in as_mdtraj_topology(model.topology).chains if c.n_residues]


def chain_frames(model: ProteinChainModel, xyz: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """AA frames (N, n_atoms, 3) in a topology's atom order -> the bound model's order, with
    equivalent hydrogens named as the model was trained (energies unchanged)."""
    return canonical_hydrogens(build_chains(bound_sequences(model)), np.asarray(xyz)[:, perm])


def _in_order(energy, order: np.ndarray):
    """``energy`` of a System whose particle k is model atom ``order[k]``, on model-order frames."""
    if np.array_equal(order, np.arange(len(order))):
        return energy
    index = torch.as_tensor(order)
    return lambda x: energy(x[:, index])


def _energies(energy, xyz: np.ndarray, batch: int = 2048) -> np.ndarray:
    out = []
    with torch.no_grad():
        for k in range(0, len(xyz), batch):
            out.append(energy(torch.as_tensor(xyz[k : k + batch], dtype=torch.float64)).numpy())
    u = np.concatenate(out) if out else np.zeros(0)
    return np.where(np.isfinite(u), u, np.inf)


def evaluate_model(
    model: Any,
    reference: md.Trajectory,
    out_dir: str | Path | None = None,
    n_frames: int = 200,
    samples: int = 64,
    aa_system: Any = None,
    seed: int = 0,
    plots: bool = True,
    cg_topology: Any = None,
) -> dict:
    """Score a backmapper on reference frames; returns the metrics dict (and writes the report).

    Parameters
    ----------
    model
        A model file path, a loaded :class:`~openmm_backmap.io.model_files.BackmapModel`, or a
        protein model (a shipped model's name, a protein model file, a ``ProteinModel``), bound to
        the reference's chain (:func:`bind_protein_model`).
    reference
        AA reference trajectory of the model's molecule (independent of the training data).
    n_frames, samples
        Frames backmapped (evenly spaced) and samples per frame (K, 64 for the conditional ESS).
    aa_system
        AA System for energies, with the reference's atom order; by default the one embedded in the
        model file, or amber14 + GBn2 built on the chain for a protein model.
    cg_topology
        For a protein model: the CG topology to bind it to (default: the reference's beads).
    """
    start = time.perf_counter()
    perm = None  # model atom a is reference atom perm[a] (protein models)
    if is_protein_model(model):
        model, perm = bind_protein_model(model, reference.topology, cg_topology)
    elif not hasattr(model, "sample"):
        model = load_model(model, device="cpu")
    if perm is None:
        model.check_topology(reference.topology)
        ref_all = reference.xyz.astype(np.float64)
    else:
        ref_all = chain_frames(model, reference.xyz.astype(np.float64), perm)
    top = as_mdtraj_topology(model.topology)
    idx = np.unique(np.linspace(0, reference.n_frames - 1, min(n_frames, reference.n_frames)).round().astype(int))
    ref = ref_all[idx]
    X = model.mapping.project(ref)
    torch.manual_seed(seed)
    aa, log_q = model.sample(X.astype(np.float32), samples)
    aa = aa.astype(np.float64).reshape(len(idx), samples, model.n_aa, 3)
    log_q = log_q.astype(np.float64).reshape(len(idx), samples)
    flat = aa.reshape(-1, model.n_aa, 3)

    metrics: dict[str, Any] = {"n_frames": int(len(idx)), "samples_per_frame": int(samples)}
    metrics["bond_score"] = bond_score(flat, top, reference=ref_all)
    metrics["clash_score_percent"] = clash_score(flat, top)
    metrics["chirality_errors_percent"] = chirality_errors(flat, top, reference=ref)
    rmsd, diversity = rmsd_and_diversity(aa, ref, top)
    metrics["rmsd_nm"], metrics["diversity"] = rmsd, diversity
    nll = -model.log_prob(ref.astype(np.float32), X.astype(np.float32)).astype(np.float64)
    metrics["nll_per_atom"] = float(np.mean(nll) / model.n_aa)
    try:
        sample_traj = md.Trajectory(flat.astype(np.float32), top)
        metrics["ramachandran_js"] = ramachandran_js(sample_traj, md.Trajectory(ref.astype(np.float32), top))
    except ValueError:
        sample_traj = None  # no residue with both phi and psi
    system = model_system(model, aa_system)
    u_aa = u_ref = None
    if system is not None:
        order = np.arange(model.n_aa) if perm is None or aa_system is None else np.argsort(perm)
        elements = [model.metadata["elements"][a] for a in order]  # in the System's atom order
        check_system_matches(system, elements, "the AA System", f"the model {model.path}")
        energy = _in_order(aa_energy(system), order)
        u_aa = _energies(energy, flat).reshape(len(idx), samples)
        u_ref = _energies(energy, ref)
        metrics["energy_w1_kjmol"] = energy_w1(u_aa[:, 0], u_ref)
        metrics["energy_w1_all_samples_kjmol"] = energy_w1(u_aa, u_ref)
        metrics["conditional_ess"] = conditional_ess(u_aa, log_q, model.temperature)
        metrics["finite_energy_fraction"] = float(np.isfinite(u_aa).mean())
    metrics["seconds"] = time.perf_counter() - start
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        if plots:
            plot_backmapper_report(out, top, ref, flat, sample_traj, u_aa, u_ref)
    return metrics


# ---------------------------------------------------------------------------- reporter output
def evaluate_run(
    aa_trajectory: str | Path,
    energy_file: str | Path,
    topology: Any,
    reference: md.Trajectory,
    out_dir: str | Path | None = None,
    n_blocks: int = 10,
) -> dict:
    """Reweight a BackmapReporter run to the AA ensemble and compare it with a reference.

    Reads the reporter's AA trajectory and energy file, computes the self-normalised weights, the
    ESS, and the basin populations (:data:`openmm_backmap.systems.builtin.BASINS`) of the reference, of the raw
    reconstructions and reweighted, with their free-energy differences in kT and block-averaged
    standard errors of the reweighted estimate. With ``out_dir``: ``reweighting.json`` and plots of
    the Ramachandran free-energy surfaces (reference, raw, reweighted), the energy histograms and
    the ESS over the run.
    """
    traj = md.load(str(aa_trajectory), top=topology)
    cols = read_energy_file(energy_file)
    if len(cols["log_w"]) != traj.n_frames:
        raise ValueError(f"{energy_file} has {len(cols['log_w'])} rows but {aa_trajectory} has {traj.n_frames} frames")
    rw = Reweighted(cols["log_w"])
    phi, psi = backbone_dihedrals(traj)
    phi_r, psi_r = backbone_dihedrals(reference)
    basins = basin_indicators(phi[:, 0], psi[:, 0])
    ref_basins = basin_indicators(phi_r[:, 0], psi_r[:, 0])
    report: dict[str, Any] = {
        "n_samples": int(traj.n_frames),
        "ess": rw.ess,
        "ess_fraction": rw.ess_fraction,
        "finite_weight_fraction": float(np.isfinite(cols["log_w"]).mean()),
        "basins": {},
    }
    n = traj.n_frames // n_blocks * n_blocks
    for name, ind in basins.items():
        p_ref = float(ref_basins[name].mean())
        p_raw = float(ind.mean())
        p_rw = rw.average(ind.astype(float))
        # block estimates of the reweighted population (self-normalised within each block)
        blocks = []
        for b in np.array_split(np.arange(n), n_blocks) if n >= n_blocks else []:
            w = normalized_weights(cols["log_w"][b])
            blocks.append(float((w * ind[b]).sum()))
        err = float(np.std(blocks, ddof=1) / np.sqrt(len(blocks))) if len(blocks) > 1 else float("nan")
        with np.errstate(divide="ignore"):
            df = float(-np.log(p_rw / p_ref)) if p_ref > 0 and p_rw > 0 else float("nan")
        report["basins"][name] = {
            "reference": p_ref,
            "raw": p_raw,
            "reweighted": p_rw,
            "reweighted_error": err,
            "delta_f_kT": df,
        }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "reweighting.json").write_text(json.dumps(report, indent=1) + "\n")
        plot_reweighting_report(out, phi, psi, phi_r, psi_r, rw, cols)
    return report
