"""Quality of exported backmapper model files on an independent AA trajectory.

For each model: backmap the CG projections of evaluation frames (one sample each) and report bond
score, clash score, chirality errors, energy W1 (kJ/mol, against the reference frames' energies),
Ramachandran JS (when the molecule has phi/psi), held-out NLL, and the conditional ESS (K samples
per CG frame, Kish ESS of exp(-beta U_AA - log q) / K, averaged over frames). Metric definitions
are those of ``openmm_backmap.analysis.metrics``.

Usage::

    python benchmarks/bench_quality.py --topology ref2/ala2.pdb --trajectory ref2/ala2.dcd \
        --system ref2/ala2_system.xml model.pt [model.ml.pt ...] [--frames 2000] [--ess-frames 200]
"""

from __future__ import annotations

import argparse
import json
import time

import mdtraj as md
import numpy as np
import torch

from openmm_backmap.analysis.metrics import bond_score, chirality_errors, clash_score, energy_w1, ramachandran_js
from openmm_backmap.analysis.reweighting import conditional_ess
from openmm_backmap.io.backmap_model import load_model
from openmm_backmap.openmm.energies import aa_energy


def evaluate(model_path, traj, energy, n_frames=2000, ess_frames=200, k=64, seed=0) -> dict:
    model = load_model(model_path, device="cpu", topology=traj.topology)
    stride = max(1, traj.n_frames // n_frames)
    ref = traj[::stride][:n_frames]
    x_ref = ref.xyz.astype(np.float64)
    X = model.mapping.project(x_ref)
    torch.manual_seed(seed)
    t0 = time.time()
    aa, lq = model.sample(X.astype(np.float32), 1, seed=seed)
    t_sample = time.time() - t0
    with torch.no_grad():
        u_ref = np.concatenate(
            [energy(torch.as_tensor(x_ref[s : s + 1024])).numpy() for s in range(0, len(x_ref), 1024)]
        )
        u_s = np.concatenate(
            [energy(torch.as_tensor(aa[s : s + 1024], dtype=torch.float64)).numpy() for s in range(0, len(aa), 1024)]
        )
    top = traj.topology
    out = {
        "model": str(model_path),
        "frames": int(len(ref)),
        "bond_score": bond_score(aa, top, reference=x_ref),
        "clash_score_pct": clash_score(aa, top),
        "chirality_errors_pct": chirality_errors(aa, top, x_ref),
        "energy_w1_kjmol": energy_w1(u_s, u_ref),
        "mean_U_samples": float(np.mean(u_s)),
        "mean_U_reference": float(np.mean(u_ref)),
        "nll_per_frame": float(-np.mean(model.log_prob(x_ref.astype(np.float32), X.astype(np.float32)))),
        "sample_seconds": t_sample,
    }
    try:
        out["rama_js"] = ramachandran_js(md.Trajectory(aa, top), ref)
    except Exception as err:  # noqa: BLE001 - molecules without phi/psi
        out["rama_js"] = f"n/a ({type(err).__name__})"
    # conditional ESS: K samples for each of ess_frames CG frames
    sel = np.linspace(0, len(X) - 1, ess_frames).astype(int)
    aa_k, lq_k = model.sample(X[sel].astype(np.float32), k, seed=seed + 1)
    with torch.no_grad():
        u_k = np.concatenate(
            [
                energy(torch.as_tensor(aa_k[s : s + 2048], dtype=torch.float64)).numpy()
                for s in range(0, len(aa_k), 2048)
            ]
        )
    out["conditional_ess"] = conditional_ess(
        u_k.reshape(len(sel), k), lq_k.reshape(len(sel), k).astype(np.float64), model.temperature
    )
    out["conditional_ess_K"] = k
    return out


def evaluate_temporal(model_path, traj, n_frames=1000, seed=0) -> dict:
    """Frame-to-frame displacements of a backmapped trajectory against the reference.

    A contiguous reference segment is projected to CG and backmapped as one chain with
    ``sample_next`` (started from the reference's first frame), and also with independent
    ``sample`` draws; the RMS displacement per frame step of the non-bead atoms is compared.
    """
    model = load_model(model_path, device="cpu")
    seg = traj[:n_frames].xyz.astype(np.float64)
    X = model.mapping.project(seg).astype(np.float32)
    torch.manual_seed(seed)
    chain = [seg[0].astype(np.float32)]
    for t in range(1, len(seg)):
        aa, _ = model.sample_next(X[t : t + 1], chain[-1][None])
        chain.append(aa[0])
    chain = np.array(chain)
    indep, _ = model.sample(X, 1, seed=seed)
    beads = set(int(g["atoms"][0]) for g in model.metadata["mapping"]["groups"] if len(g["atoms"]) == 1)
    free = np.array([i for i in range(model.n_aa) if i not in beads])

    bead_idx = np.array(sorted(beads))

    def rms_step(x):
        # displacements after superposing each frame's beads on the previous frame's: the rigid
        # motion of the molecule (given by the beads) is removed, the atoms' own motion remains
        steps = []
        for t in range(1, len(x)):
            a, b = x[t, bead_idx], x[t - 1, bead_idx]
            ca, cb = a.mean(0), b.mean(0)
            u, _, vt = np.linalg.svd((a - ca).T @ (b - cb))
            s = np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))])
            rot = u @ s @ vt
            moved = (x[t, free] - ca) @ rot + cb
            steps.append(np.linalg.norm(moved - x[t - 1, free], axis=-1))
        d = np.array(steps)
        return float(np.sqrt((d**2).mean())), d.mean(0)

    ref, ref_atoms = rms_step(seg)
    tem, tem_atoms = rms_step(chain)
    ind, ind_atoms = rms_step(indep)
    return {
        "model": str(model_path),
        "frames": int(len(seg)),
        "rms_step_reference_nm": ref,
        "rms_step_temporal_nm": tem,
        "rms_step_independent_nm": ind,
        "per_atom_mean_step_abs_error_temporal_nm": float(np.abs(tem_atoms - ref_atoms).mean()),
        "per_atom_mean_step_abs_error_independent_nm": float(np.abs(ind_atoms - ref_atoms).mean()),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="exported model files")
    p.add_argument("--topology", required=True)
    p.add_argument("--trajectory", required=True, help="independent AA trajectory (not trained on)")
    p.add_argument("--system", required=True, help="AA System XML for U_AA")
    p.add_argument("--frames", type=int, default=2000)
    p.add_argument("--ess-frames", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    traj = md.load(args.trajectory, top=args.topology)
    energy = aa_energy(args.system)
    results = []
    for m in args.models:
        results.append(evaluate(m, traj, energy, args.frames, args.ess_frames))
        if load_model(m, device="cpu").temporal:
            results.append(evaluate_temporal(m, traj))
    for r in results:
        print(json.dumps(r, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
