"""Mapping entropy of a CG mapping, estimated with an exact-density backmapper q(x | X).

A CG mapping X = M x forgets the position of the molecule on the fibre {x : M x = X}. Three
quantities measure what it forgets (definitions, measure conventions and units in README):

* the conditional entropy H(x | X) = -E_p[log p(x | X)] (the split-flows mapping entropy, averaged
  over X), bracketed from both sides:

  - cross-entropy ``CE = E_p[-log q(x | X)]`` over reference frames x ~ p: an upper bound, equal to
    H when q is exact (CE - H = E_X KL(p(.|X) || q(.|X)));
  - energy route ``H_IS(K) = E_p[beta U(x)] + E_p[log Z_K(X)]`` with
    ``log Z_K(X) = logsumexp_k(-beta U(x_k) - log q(x_k | X)) - log K`` over K samples x_k ~ q(. | X):
    a lower bound in expectation at every K (Jensen), rising to H as K grows;

* the mapping entropy of Giulini et al. (JCTC 2020), S_map = D_KL(p(x) || p(X) / Omega(X)) =
  E_X[log Omega(X)] - H(x | X), with Omega(X) the volume of the fibre; it needs a finite box, so it is
  reported for a stated volume per free atom;
* its energy-fluctuation form S_map^(2) = (beta^2 / 2) E_X[Var(U | X)] (the second cumulant of
  log <exp(beta (U - <U>_X))>_X), estimated on each reference frame's own fibre with self-normalised
  importance weights of the K samples, and from the reference frames alone by clustering them in CG
  space (the macrostates of Giulini et al.).

Entropies are in nats (k_B) per molecule, w.r.t. the backmapper's measure on the fibre: Cartesian nm
for every atom the model places (all atoms but one pivot per bead), the surface of the sphere for a
bond held at its constraint length. Energies are kJ/mol; beta = 1 / kT. Errors are block standard
errors over the reference frames (contiguous blocks, so time correlation is accounted for).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import logsumexp

DEFAULT_BLOCKS = 20
DEFAULT_VOLUME_NM3 = 1.0  # box volume per free atom for the Giulini S_map (nm^3)


# ---------------------------------------------------------------------------- statistics
def block_error(values: np.ndarray, n_blocks: int = DEFAULT_BLOCKS) -> float:
    """Standard error of the mean of a time series from ``n_blocks`` contiguous block means."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    nb = min(int(n_blocks), v.size)
    if nb < 2:
        return float("nan")
    means = np.array([b.mean() for b in np.array_split(v, nb)])
    return float(means.std(ddof=1) / math.sqrt(nb))


def _figure(per_frame: np.ndarray, n_blocks: int) -> dict:
    """Mean and block error of per-frame terms; None where the mean is not finite."""
    per_frame = np.asarray(per_frame, dtype=np.float64)
    if not np.all(np.isfinite(per_frame)):
        return {"value": None, "error": None, "non_finite_frames": int((~np.isfinite(per_frame)).sum())}
    return {"value": float(per_frame.mean()), "error": block_error(per_frame, n_blocks)}


def log_weights(u_samples: np.ndarray, log_q_samples: np.ndarray) -> np.ndarray:
    """log w = -beta U - log q for reduced energies ``u_samples`` (beta U); non-finite -> -inf."""
    lw = -np.asarray(u_samples, dtype=np.float64) - np.asarray(log_q_samples, dtype=np.float64)
    return np.where(np.isfinite(lw), lw, -np.inf)


def log_partition(u_samples: np.ndarray, log_q_samples: np.ndarray) -> np.ndarray:
    """Per-frame importance estimate log Z_K(X) (nats) from samples of shape (..., K) (last axis: K).

    log Z(X) = log of the integral of exp(-beta U) over the fibre, in the measure of log q.
    """
    lw = log_weights(u_samples, log_q_samples)
    with np.errstate(divide="ignore"):
        return logsumexp(lw, axis=-1) - math.log(lw.shape[-1])


def fibre_energy_variance(u_samples: np.ndarray, log_q_samples: np.ndarray) -> np.ndarray:
    """Per-frame Var(beta U | X) (dimensionless) from self-normalised importance weights.

    Uses the reliability-weight correction 1 / (1 - sum w^2), unbiased for equal weights (exact q).
    """
    lw = log_weights(u_samples, log_q_samples)
    u = np.where(np.isfinite(u_samples), u_samples, 0.0)
    ok = np.isfinite(lw).any(axis=1)
    top = np.where(ok, lw.max(axis=1, initial=-np.inf), 0.0)
    w = np.exp(lw - top[:, None])
    w = w / np.where(ok, w.sum(axis=1), 1.0)[:, None]
    mean = (w * u).sum(axis=1, keepdims=True)
    denom = 1.0 - (w * w).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        var = (w * (u - mean) ** 2).sum(axis=1) / denom
    return np.where(ok & (denom > 1e-12), var, np.nan)


def cluster_energy_fluctuation(
    u_ref: np.ndarray, features: np.ndarray, n_clusters: int, seed: int = 0, n_blocks: int = DEFAULT_BLOCKS
) -> dict:
    """(1/2) mean within-cluster Var(beta U) of reference frames clustered by CG features (k-means).

    Giulini et al.'s estimator of S_map^(2) from data alone: the clusters stand in for the fibres, so
    it overestimates the fibre variance by the spread of <U>_X within a cluster, less with more
    clusters. ``u_ref`` are reduced energies in time order, ``features`` (n_frames, F)
    rotation-invariant CG features. Returns ``{"value", "error"}``; the error is the block error of
    the per-frame terms (beta U_i - mean of its cluster)^2 n_c / (2 (n_c - 1)), whose mean is the value.
    """
    from scipy.cluster.vq import kmeans2

    u_ref = np.asarray(u_ref, dtype=np.float64)
    f = np.asarray(features, dtype=np.float64)
    f = (f - f.mean(0)) / np.maximum(f.std(0), 1e-12)
    _, labels = kmeans2(f, int(n_clusters), minit="++", seed=seed)
    terms = np.full(u_ref.size, np.nan)
    for c in np.unique(labels):
        members = labels == c
        size = int(members.sum())
        if size > 1:
            terms[members] = 0.5 * (u_ref[members] - u_ref[members].mean()) ** 2 * size / (size - 1)
    return _figure(terms[np.isfinite(terms)], n_blocks)


def cg_distance_features(X: np.ndarray) -> np.ndarray:
    """All bead-pair distances (nm) of CG frames (n_frames, n_cg, 3): rotation-invariant features."""
    i, j = np.triu_indices(X.shape[1], k=1)
    return np.linalg.norm(X[:, i] - X[:, j], axis=-1)


# ---------------------------------------------------------------------------- estimators
def entropy_from_terms(
    log_q_ref: np.ndarray,
    u_ref: np.ndarray,
    u_samples: np.ndarray,
    log_q_samples: np.ndarray,
    n_blocks: int = DEFAULT_BLOCKS,
) -> dict:
    """The estimators of the module docstring from per-frame terms (all in nats, per molecule).

    Parameters
    ----------
    log_q_ref
        log q(x_i | X_i) of the reference frames, shape (n_frames,).
    u_ref
        Reduced energies beta U(x_i) of the reference frames, shape (n_frames,).
    u_samples, log_q_samples
        beta U and log q of K samples x_ik ~ q(. | X_i), shape (n_frames, K), K >= 2.

    Returns
    -------
    dict
        ``cross_entropy`` (upper bound), ``energy_route`` (lower bound at K), ``gap`` (their per-frame
        difference, whose error is much smaller than either's), ``energy_route_by_k`` (the bias trend:
        the energy route with the K samples split into disjoint subsets of k = 1, 2, 4, ..., K),
        ``energy_route_extrapolated`` (2 H_IS(K) - H_IS(K/2), first order in 1/K: an estimate, not a
        bound), ``energy_fluctuation`` (S_map^(2) on the fibres) and ``conditional_ess`` (mean Kish
        ESS / K). Each figure is ``{"value", "error"}``.
    """
    log_q_ref = np.asarray(log_q_ref, dtype=np.float64).reshape(-1)
    u_ref = np.asarray(u_ref, dtype=np.float64).reshape(-1)
    u_samples = np.asarray(u_samples, dtype=np.float64)
    log_q_samples = np.asarray(log_q_samples, dtype=np.float64)
    from openmm_backmap.analysis.reweighting import kish_ess

    n, k = u_samples.shape
    if k < 2:
        raise ValueError(
            f"the energy route needs K >= 2 samples per frame (got {k}): its bias trend and the "
            "fibre variance need at least two"
        )
    if log_q_ref.size != n or u_ref.size != n or log_q_samples.shape != (n, k):
        raise ValueError(
            "per-frame arrays disagree in shape: log_q_ref and u_ref (n_frames,), "
            "u_samples and log_q_samples (n_frames, K)"
        )
    if not np.all(np.isfinite(u_ref)):
        raise ValueError(f"{int((~np.isfinite(u_ref)).sum())} reference frame(s) have a non-finite energy")
    ce = -log_q_ref
    h_is = u_ref + log_partition(u_samples, log_q_samples)
    lw = log_weights(u_samples, log_q_samples)
    ess = np.array([kish_ess(row) / k for row in lw])  # per frame: the conditional ESS of analysis
    by_k = {}
    sizes = [2**p for p in range(int(math.log2(k)) + 1)]
    if sizes[-1] != k:
        sizes.append(k)
    per_k = {}
    for size in sizes:
        m = k // size
        sub_u = u_samples[:, : m * size].reshape(n, m, size)
        sub_q = log_q_samples[:, : m * size].reshape(n, m, size)
        lz = log_partition(sub_u, sub_q).mean(axis=1)
        per_k[size] = u_ref + lz
        by_k[str(size)] = _figure(per_k[size], n_blocks)
    half = k // 2
    out = {
        "n_frames": int(n),
        "samples_per_frame": int(k),
        "cross_entropy": _figure(ce, n_blocks),
        "energy_route": _figure(h_is, n_blocks),
        "gap": _figure(ce - h_is, n_blocks),
        "energy_route_by_k": by_k,
        "energy_route_extrapolated": _figure(2 * per_k[k] - per_k[half], n_blocks) if half in per_k else None,
        "energy_fluctuation": _figure(0.5 * fibre_energy_variance(u_samples, log_q_samples), n_blocks),
        "conditional_ess": _figure(ess, n_blocks),
        "finite_sample_fraction": float(np.isfinite(lw).mean()),
        "per_frame": {"cross_entropy": ce, "energy_route": h_is},
    }
    return out


def paired_differences(results: Sequence[dict], n_blocks: int = DEFAULT_BLOCKS) -> list[dict]:
    """H(x | X) of each result minus the first's, frame by frame on the same reference frames.

    Every mapping's estimate carries the spread of the reference frames (~0.1 nat for alanine
    dipeptide); on shared frames most of it cancels, so the differences that order the mappings have
    much smaller errors than the figures themselves. Results must come from the same reference
    frames (same trajectory, ``frames``) and keep their ``per_frame`` terms.
    """
    base = results[0]["per_frame"]
    out = []
    for r in results[1:]:
        terms = r["per_frame"]
        if terms["cross_entropy"].shape != base["cross_entropy"].shape:
            raise ValueError("paired differences need the same reference frames for every model")
        out.append(
            {
                "model": r.get("model"),
                "minus": results[0].get("model"),
                "cross_entropy": _figure(terms["cross_entropy"] - base["cross_entropy"], n_blocks),
                "energy_route": _figure(terms["energy_route"] - base["energy_route"], n_blocks),
            }
        )
    return out


def _json_ready(result: dict) -> dict:
    """A result without its per-frame arrays."""
    return {k: v for k, v in result.items() if k != "per_frame"}


def _scaled(fig: dict | None, factor: float, offset: float = 0.0) -> dict | None:
    """A figure a * value + b with error |a| * error (offsets carry no error)."""
    if fig is None or fig.get("value") is None:
        return None
    return {"value": offset + factor * fig["value"], "error": abs(factor) * fig["error"]}


# ---------------------------------------------------------------------------- measure on the fibre
def fibre_log_volume(model: Any, volume_nm3: float = DEFAULT_VOLUME_NM3) -> dict:
    """log Omega of the fibre in a box of ``volume_nm3`` per free atom, in the model's measure.

    Every atom the model places freely ranges over the box (log V each); an atom held at a
    constraint length from its parent ranges over that sphere (log 4 pi d^2 each). Returns the
    value and its ingredients; ``value`` is None when the constraints the model leaves out of its
    degrees of freedom cannot be matched to the metadata.
    """
    from openmm_backmap.models.backmapper import choose_pivots

    n_removed = int(model.n_aa) - int(model.n_cg)
    n_dof = int(model.metadata["n_free_dof"])
    n_fixed = 3 * n_removed - n_dof
    pivots = {int(p) for p in choose_pivots(model.mapping)}
    spheres = [
        float(d) for i, j, d in model.metadata.get("constraints", []) if int(i) not in pivots or int(j) not in pivots
    ]
    out = {
        "volume_nm3_per_free_atom": float(volume_nm3),
        "free_atoms": n_removed,
        "free_dof": n_dof,
        "constrained_free_atoms": n_fixed,
        "value": None,
    }
    if len(spheres) != n_fixed:
        out["note"] = (
            f"the model fixes {n_fixed} bond lengths but {len(spheres)} constraints involve a placed "
            "atom; the fibre volume is not defined here"
        )
        return out
    out["value"] = (n_removed - n_fixed) * math.log(volume_nm3) + sum(math.log(4 * math.pi * d * d) for d in spheres)
    return out


# ---------------------------------------------------------------------------- models
def sample_terms(
    model: Any,
    x_ref: np.ndarray,
    energy: Callable[[np.ndarray], np.ndarray],
    samples: int,
    seed: int = 0,
    batch: int = 4096,
) -> dict[str, np.ndarray]:
    """Per-frame terms of :func:`entropy_from_terms` for reference frames ``x_ref`` (n, n_aa, 3) nm.

    ``model`` has ``sample(cg, n, seed=)``, ``log_prob(aa, cg)``, ``mapping.project`` and
    ``temperature`` (a :class:`~openmm_backmap.io.backmap_model.BackmapModel`, or a toy with the same
    methods); ``energy`` maps positions (B, n_aa, 3) nm to U in kJ/mol (B,). Also returns the CG
    frames ``X``.
    """
    from openmm_backmap.units import kT

    if int(samples) < 2:
        raise ValueError(f"the energy route needs K >= 2 samples per frame, got {samples}")
    beta = 1.0 / kT(model.temperature)
    x_ref = np.asarray(x_ref, dtype=np.float64)
    X = np.asarray(model.mapping.project(x_ref), dtype=np.float64)
    log_q_ref = np.concatenate(
        [
            np.asarray(model.log_prob(x_ref[s : s + batch], X[s : s + batch]), dtype=np.float64)
            for s in range(0, len(x_ref), batch)
        ]
    )
    u_ref = beta * _energies(energy, x_ref, batch)
    per = max(1, int(batch) // int(samples))
    u_s, lq_s = [], []
    for s in range(0, len(X), per):
        aa, lq = model.sample(X[s : s + per], int(samples), seed=seed if s == 0 else None)
        u_s.append(beta * _energies(energy, np.asarray(aa, dtype=np.float64), batch))
        lq_s.append(np.asarray(lq, dtype=np.float64))
    k = int(samples)
    return {
        "X": X,
        "log_q_ref": log_q_ref,
        "u_ref": u_ref,
        "u_samples": np.concatenate(u_s).reshape(-1, k),
        "log_q_samples": np.concatenate(lq_s).reshape(-1, k),
    }


def _energies(energy: Callable, xyz: np.ndarray, batch: int) -> np.ndarray:
    out = [np.asarray(energy(xyz[s : s + batch]), dtype=np.float64).reshape(-1) for s in range(0, len(xyz), batch)]
    u = np.concatenate(out)
    return np.where(np.isfinite(u), u, np.inf)


def torch_energy(system: Any) -> Callable[[np.ndarray], np.ndarray]:
    """U(x) in kJ/mol of an OpenMM System (object, XML path or text) as a numpy function (batched torch)."""
    import torch

    from openmm_backmap.openmm.energies import aa_energy

    module = aa_energy(system)

    def energy(xyz: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.as_tensor(xyz, dtype=torch.float64)).numpy()

    return energy


def check_system(system: Any, model: Any, order: np.ndarray | None = None) -> None:
    """Raise ValueError unless an AA System fits the model: atom count, bonds and constraints.

    The constraints fix the measure of log q (a constrained bond is a sphere, not a volume), so
    the System's and the model's must be the same pairs at the same lengths. ``order`` (model atom
    ``m`` is System particle ``order[m]``, see :func:`reference_atom_order`) when the System lists
    the atoms in another order than the model.
    """
    from openmm_backmap.openmm.energies import constraints_from_system, load_system

    system = load_system(system)
    n = system.getNumParticles()
    if n != model.n_aa:
        raise ValueError(
            f"the AA System has {n} particles but the model's molecule has {model.n_aa} atoms: "
            "the System belongs to another molecule"
        )
    to_model = np.arange(n) if order is None else np.argsort(order)
    sys_cons = {
        (min(to_model[i], to_model[j]), max(to_model[i], to_model[j])): d for i, j, d in constraints_from_system(system)
    }
    mod_cons = {
        (min(int(i), int(j)), max(int(i), int(j))): float(d) for i, j, d in model.metadata.get("constraints", [])
    }
    if sys_cons.keys() != mod_cons.keys():
        extra = sorted(set(sys_cons) - set(mod_cons))[:5]
        missing = sorted(set(mod_cons) - set(sys_cons))[:5]
        raise ValueError(
            f"the AA System's constraints differ from the model's ({len(sys_cons)} vs {len(mod_cons)}; "
            f"only in the System: {extra}, only in the model: {missing}): log q and U would live on "
            "different spaces"
        )
    bad = [p for p in sys_cons if abs(sys_cons[p] - mod_cons[p]) > 1e-4]
    if bad:
        p = bad[0]
        raise ValueError(
            f"constraint {p} is {sys_cons[p]:.5f} nm in the AA System but {mod_cons[p]:.5f} nm in the model"
        )
    top_bonds = {(min(a.index, b.index), max(a.index, b.index)) for a, b in model.topology.bonds}
    sys_bonds = set(sys_cons)
    for force in system.getForces():
        if type(force).__name__ == "HarmonicBondForce":
            for b in range(force.getNumBonds()):
                i, j = (int(to_model[k]) for k in force.getBondParameters(b)[:2])
                sys_bonds.add((min(i, j), max(i, j)))
    if top_bonds and sys_bonds and sys_bonds != top_bonds:
        diff = sorted(sys_bonds ^ top_bonds)[:5]
        raise ValueError(
            f"the AA System's bonds differ from the model topology's (first differences {diff}): "
            "the System belongs to another molecule"
        )


def reference_atom_order(model: Any, topology: Any) -> np.ndarray | None:
    """Where the model's atoms are in a reference topology that lists them in another order.

    A protein model builds its chain's atoms in template order (:mod:`openmm_backmap.models.residues`),
    while a reference written by another program may list a residue's atoms differently. Returns
    ``order`` with model atom ``m`` at reference atom ``order[m]`` (matched by residue and atom
    name), or None when the orders already agree or the model is not a protein model (whose
    topology must then match exactly: :meth:`BackmapModel.check_topology`).
    """
    from openmm_backmap.analysis.evaluate import chain_atom_order
    from openmm_backmap.io.backmap_model import ProteinChainModel
    from openmm_backmap.mapping import as_mdtraj_topology

    top = as_mdtraj_topology(topology)
    try:
        model.check_topology(top)
        return None
    except ValueError:
        if not isinstance(model, ProteinChainModel) or top.n_atoms != model.n_aa:
            raise
    return chain_atom_order(model, top)


def _cg_topology_for(model_name: Any, topology: Any):
    """A protein model bound to the chain of an AA reference topology (every residue's beads, the
    caps' included: :func:`~openmm_backmap.analysis.evaluate.bind_protein_model`)."""
    from openmm_backmap.analysis.evaluate import bind_protein_model

    return bind_protein_model(model_name, topology)[0]


def _load_reference(reference: Any, topology: Any = None):
    """(trajectory, path or None) from a trajectory or a path; restrained runs are refused."""
    import mdtraj as md

    from openmm_backmap.io.trajectories import load_trajectory, require_unrestrained

    if isinstance(reference, md.Trajectory):
        return reference, None
    require_unrestrained(
        reference,
        "as the reference ensemble of a mapping entropy: its p(X) is biased, and "
        "so is its p(x | X) unless every restrained atom is a bead",
    )
    return load_trajectory(reference, topology), Path(reference)


def mapping_entropy(
    model: Any,
    reference: Any,
    topology: Any = None,
    aa_system: Any = None,
    samples: int = 64,
    frames: int = 1000,
    seed: int = 0,
    n_blocks: int = DEFAULT_BLOCKS,
    volume_nm3: float = DEFAULT_VOLUME_NM3,
    clusters: Sequence[int] | None = None,
) -> dict:
    """Every mapping-entropy figure of a backmapper model file on an AA reference ensemble.

    Parameters
    ----------
    model
        A backmapper model file or a loaded :class:`~openmm_backmap.io.backmap_model.BackmapModel`.
    reference
        AA reference trajectory (path with ``topology``, or an mdtraj Trajectory): unbiased MD of the
        model's molecule, independent of its training data.
    aa_system
        AA System (object, XML path or text); default the one embedded in the model file.
    samples
        K, samples of q per reference frame (>= 2).
    frames
        Reference frames used, evenly spaced over the trajectory (time order kept for block errors).
    volume_nm3
        Box volume per free atom for the Giulini S_map (nm^3).
    clusters
        Cluster counts for the data-only S_map^(2) (default: frames / 100, / 20, / 5).

    Returns
    -------
    dict
        JSON-ready: the mapping, counts, H(x | X) bounds per molecule, per removed atom and per
        degree of freedom, the Giulini S_map bounds, S_map^(2) from the fibres and from clusters,
        the bias trend with K and the conditional ESS.
    """
    from openmm_backmap.io.backmap_model import load_model

    if int(samples) < 2:
        raise ValueError(f"--samples must be >= 2 (got {samples}): the energy route and its bias trend need K >= 2")
    if int(frames) < 4:
        raise ValueError(f"--frames must be at least 4 (got {frames})")
    from openmm_backmap.analysis.evaluate import chain_frames
    from openmm_backmap.io.backmap_model import ProteinChainModel
    from openmm_backmap.io.protein_models import protein_model_path

    traj, path = _load_reference(reference, topology)
    if not hasattr(model, "sample"):
        if protein_model_path(model) is not None:  # a transferable model: bound to the reference's chain
            model = _cg_topology_for(model, traj.topology)
        else:
            model = load_model(model, device="cpu")
    order = reference_atom_order(model, traj.topology)
    system = aa_system if aa_system is not None else model.system_xml
    if system is None:
        raise ValueError(f"{model.path} embeds no AA System: give one (--aa-system system.xml) for the energy route")
    check_system(system, model, order)
    idx = np.unique(np.linspace(0, traj.n_frames - 1, min(int(frames), traj.n_frames)).round().astype(int))
    x_ref = traj.xyz[idx].astype(np.float64)
    energy = torch_energy(system)
    if order is not None:  # the model's atom order; the System keeps the reference's
        x_ref = x_ref[:, order]
        back = np.argsort(order)
        model_energy = energy

        def energy(xyz: np.ndarray) -> np.ndarray:
            return model_energy(np.asarray(xyz)[:, back])

    if isinstance(model, ProteinChainModel):  # equivalent hydrogens named as in training (U unchanged)
        x_ref = chain_frames(model, x_ref, np.arange(model.n_aa))
    terms = sample_terms(model, x_ref, energy, int(samples), seed=seed)
    result = entropy_from_terms(
        terms["log_q_ref"], terms["u_ref"], terms["u_samples"], terms["log_q_samples"], n_blocks=n_blocks
    )
    result = _with_units(result, model, volume_nm3)
    n = len(idx)
    counts = clusters if clusters is not None else sorted({max(2, n // 100), max(2, n // 20), max(2, n // 5)})
    feats = cg_distance_features(terms["X"])
    result["energy_fluctuation_clusters"] = {
        str(c): cluster_energy_fluctuation(terms["u_ref"], feats, int(c), seed=seed, n_blocks=n_blocks)
        for c in counts
        if c < n
    }
    result["reference"] = {
        "trajectory": None if path is None else str(path),
        "frames_in_file": int(traj.n_frames),
        "frame_stride": float(np.mean(np.diff(idx))) if n > 1 else 1.0,
    }
    result["model"] = str(model.path)
    result["temperature_K"] = float(model.temperature)
    result["seed"] = int(seed)
    result["blocks"] = int(min(n_blocks, n))
    return result


def _with_units(result: dict, model: Any, volume_nm3: float) -> dict:
    """Add the mapping, the per-atom and per-DOF figures and the Giulini S_map to a result."""
    n_removed = int(model.n_aa) - int(model.n_cg)
    n_dof = int(model.metadata["n_free_dof"])
    result["mapping"] = {
        "beads": int(model.n_cg),
        "atoms": int(model.n_aa),
        "removed_atoms": n_removed,
        "free_dof": n_dof,
        "bead_names": list(model.metadata.get("bead_names", [])),
        "bead_atoms": [[int(a) for a in g] for g in model.mapping.groups],
    }
    ce, h_is = result["cross_entropy"], result["energy_route"]
    result["per_removed_atom"] = {
        "cross_entropy": _scaled(ce, 1.0 / n_removed),
        "energy_route": _scaled(h_is, 1.0 / n_removed),
    }
    result["per_dof"] = {"cross_entropy": _scaled(ce, 1.0 / n_dof), "energy_route": _scaled(h_is, 1.0 / n_dof)}
    vol = fibre_log_volume(model, volume_nm3)
    result["fibre_log_volume"] = vol
    if vol["value"] is not None:
        # S_map = log Omega - H: the upper bound on H gives the lower bound on S_map and vice versa
        result["giulini_smap"] = {"lower": _scaled(ce, -1.0, vol["value"]), "upper": _scaled(h_is, -1.0, vol["value"])}
    else:
        result["giulini_smap"] = None
    return result


# ---------------------------------------------------------------------------- reports
_COLUMNS = ("model", "beads", "removed", "CE", "H_IS", "gap", "CE/atom", "H_IS/atom", "S2 fibres", "S2 clusters", "ESS")


def _pm(fig: dict | None, digits: int = 2) -> str:
    if fig is None or fig.get("value") is None:
        return "n/a"
    return f"{fig['value']:.{digits}f} +- {fig['error']:.{digits}f}"


def _finest_clusters(result: dict) -> dict | None:
    """The data-only S_map^(2) at the largest cluster count of a result, or None."""
    c = result.get("energy_fluctuation_clusters") or {}
    return c[max(c, key=int)] if c else None


def table(results: Sequence[dict]) -> str:
    """A Markdown table of the headline figures of one or more results (nats per molecule / atom)."""
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for r in results:
        row = [
            Path(r["model"]).stem,
            str(r["mapping"]["beads"]),
            str(r["mapping"]["removed_atoms"]),
            _pm(r["cross_entropy"]),
            _pm(r["energy_route"]),
            _pm(r["gap"]),
            _pm(r["per_removed_atom"]["cross_entropy"], 3),
            _pm(r["per_removed_atom"]["energy_route"], 3),
            _pm(r["energy_fluctuation"]),
            _pm(_finest_clusters(r)),
            _pm(r["conditional_ess"]),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def summary_line(result: dict) -> str:
    """One line for a report: the bracket on H(x | X), S_map^(2) and the conditional ESS."""
    return (
        f"H(x|X) in [{_pm(result['energy_route'])}, {_pm(result['cross_entropy'])}] nats per molecule "
        f"(energy route K={result['samples_per_frame']} .. cross-entropy, {result['n_frames']} frames), "
        f"S_map^(2) = {_pm(result['energy_fluctuation'])}, conditional ESS {_pm(result['conditional_ess'])}"
    )


def plot_comparison(results: Sequence[dict], path: str | Path) -> Path:
    """Bar chart with error bars: H(x | X) per molecule and per removed atom (both bounds), and
    S_map^(2) on the fibres and from the finest clustering of the reference frames."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{Path(r['model']).stem}\n({r['mapping']['beads']} beads)" for r in results]
    x = np.arange(len(results))
    fig, axes = plt.subplots(1, 3, figsize=(6 + 2.6 * len(results), 4.6))
    panels = [
        (
            "H(x|X), nats per molecule",
            ("cross-entropy (upper)", "energy route (lower)"),
            lambda r: (r["cross_entropy"], r["energy_route"]),
        ),
        (
            "H(x|X), nats per removed atom",
            ("cross-entropy (upper)", "energy route (lower)"),
            lambda r: (r["per_removed_atom"]["cross_entropy"], r["per_removed_atom"]["energy_route"]),
        ),
        (
            "S_map^(2) = (beta^2/2) E Var(U|X)",
            ("fibres (samples of q)", "clusters of frames (finest)"),
            lambda r: (r["energy_fluctuation"], _finest_clusters(r)),
        ),
    ]
    for ax, (title, labels, get) in zip(axes, panels):
        for off, label, which in ((-0.2, labels[0], 0), (0.2, labels[1], 1)):
            figs = [get(r)[which] for r in results]
            vals = [np.nan if f is None or f["value"] is None else f["value"] for f in figs]
            errs = [0.0 if f is None or f["value"] is None else f["error"] for f in figs]
            ax.bar(x + off, vals, 0.4, yerr=errs, capsize=3, label=label)
        ax.set_xticks(x)
        ax.set_xticklabels(names, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.axhline(0.0, color="k", lw=0.5)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report_mapping_entropy(
    model: Any,
    reference: Any,
    out_dir: str | Path,
    frames: int = 400,
    samples: int = 64,
    seed: int = 0,
    aa_system: Any = None,
) -> tuple[dict, str]:
    """The mapping entropy of one model for a report: writes ``out_dir/entropy.json``, returns
    (result, one summary line). ``reference`` is an mdtraj Trajectory or a path (unbiased MD; frames
    the model was not trained on give an honest cross-entropy). 400 frames x 64 samples take seconds
    for alanine dipeptide."""
    result = mapping_entropy(model, reference, aa_system=aa_system, samples=samples, frames=frames, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "entropy.json").write_text(json.dumps(_json_ready(result), indent=1) + "\n")
    return result, summary_line(result)


# ---------------------------------------------------------------------------- command line
def add_arguments(parser) -> None:
    """Arguments of ``openmm-backmap entropy``."""
    parser.add_argument(
        "--model",
        required=True,
        nargs="+",
        help="backmapper model file(s) of one molecule, one per CG mapping to compare",
    )
    parser.add_argument("--reference", required=True, help="unbiased AA reference trajectory (not training data)")
    parser.add_argument("--topology", required=True, help="AA topology (PDB) of the reference")
    parser.add_argument("--aa-system", help="AA System XML (default: the one embedded in each model file)")
    parser.add_argument("--samples", type=int, default=64, help="K, samples of q per reference frame (default 64)")
    parser.add_argument("--frames", type=int, default=1000, help="reference frames, evenly spaced (default 1000)")
    parser.add_argument(
        "--blocks",
        type=int,
        default=DEFAULT_BLOCKS,
        help=f"blocks of contiguous frames for the standard errors (default {DEFAULT_BLOCKS})",
    )
    parser.add_argument(
        "--volume",
        type=float,
        default=DEFAULT_VOLUME_NM3,
        help="box volume per free atom for the Giulini S_map, nm^3 (default 1)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--out",
        required=True,
        help="JSON to write (entropy.json); a Markdown table and a PNG chart are written beside it",
    )


def run(args) -> int:
    """``openmm-backmap entropy``: every figure to JSON, a table to stdout and Markdown, a bar chart."""
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.samples < 2:
        raise ValueError(f"--samples must be >= 2 (got {args.samples}): the energy route needs K >= 2")
    results = []
    for path in args.model:
        results.append(
            mapping_entropy(
                path,
                args.reference,
                topology=args.topology,
                aa_system=args.aa_system,
                samples=args.samples,
                frames=args.frames,
                seed=args.seed,
                n_blocks=args.blocks,
                volume_nm3=args.volume,
            )
        )
        print(summary_line(results[-1]) + f"  [{path}]")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "units": "nats (k_B) per molecule unless stated; log q w.r.t. Cartesian nm of the placed atoms, "
        "constrained bonds as spheres; energies kJ/mol",
        "results": [_json_ready(r) for r in results],
    }
    if len(results) > 1:
        doc["differences"] = paired_differences(results, args.blocks)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    text = table(results)
    for d in doc.get("differences", []):
        text += (
            f"\n\nH({Path(d['model']).stem}) - H({Path(d['minus']).stem}) on the same frames: "
            f"CE {_pm(d['cross_entropy'])}, energy route {_pm(d['energy_route'])} nats"
        )
    out.with_suffix(".md").write_text(text + "\n")
    plot_comparison(results, out.with_suffix(".png"))
    print(text)
    print(f"written: {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")
    return 0
