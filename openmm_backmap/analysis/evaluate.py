"""Evaluation reports: a backmapper against reference AA frames, and a reporter's run reweighted.

:func:`evaluate_model`: for ``n_frames`` reference frames spread over the trajectory, the CG
projection is backmapped with K samples each; the metrics (bond and clash scores, chirality errors,
RMSD and diversity, NLL, energy W1, Ramachandran JS, conditional ESS: definitions in
:mod:`openmm_backmap.analysis.metrics` and :mod:`openmm_backmap.analysis.reweighting`) are computed
from those samples and written to ``metrics.json``, with the plots of :mod:`openmm_backmap.analysis.plots`.
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
from openmm_backmap.io.backmap_model import load_model
from openmm_backmap.io.energy_file import read_energy_file
from openmm_backmap.openmm.energies import aa_energy, check_system_matches, load_system


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
) -> dict:
    """Score a backmapper on reference frames; returns the metrics dict (and writes the report).

    Parameters
    ----------
    model
        A model file path or a loaded :class:`~openmm_backmap.io.model_files.BackmapModel`.
    reference
        AA reference trajectory of the model's molecule (independent of the training data).
    n_frames, samples
        Frames backmapped (evenly spaced) and samples per frame (K, 64 for the conditional ESS).
    aa_system
        AA System for energies; by default the one embedded in the model file.
    """
    start = time.perf_counter()
    if not hasattr(model, "sample"):
        model = load_model(model, device="cpu")
    model.check_topology(reference.topology)
    top = model.topology
    idx = np.unique(np.linspace(0, reference.n_frames - 1, min(n_frames, reference.n_frames)).round().astype(int))
    ref = reference.xyz[idx].astype(np.float64)
    X = model.mapping.project(ref)
    torch.manual_seed(seed)
    aa, log_q = model.sample(X.astype(np.float32), samples)
    aa = aa.astype(np.float64).reshape(len(idx), samples, model.n_aa, 3)
    log_q = log_q.astype(np.float64).reshape(len(idx), samples)
    flat = aa.reshape(-1, model.n_aa, 3)

    metrics: dict[str, Any] = {"n_frames": int(len(idx)), "samples_per_frame": int(samples)}
    metrics["bond_score"] = bond_score(flat, top, reference=reference.xyz.astype(np.float64))
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
    system = aa_system if aa_system is not None else model.system_xml
    u_aa = u_ref = None
    if system is not None:
        loaded = load_system(system)
        check_system_matches(loaded, model.metadata["elements"], "the AA System", f"the model {model.path}")
        energy = aa_energy(loaded)
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
