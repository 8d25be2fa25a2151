"""Alanine dipeptide without MD data: evaluate a joint model trained by ``openmm-backmap train-joint``.

Draws samples x ~ q(X) q(x | X) from a joint checkpoint, weights them by
log w = -U_AA(x) / kT - log q(X) - log q(x | X), and reports

* the sample ESS/N (Kish) at the target temperature,
* the basin populations (C7eq, C5, alpha_R, alpha_L as ``analysis.basins.basin_indicators`` defines
  them) of the model's raw samples and reweighted, with bootstrap errors, against the project's
  references (long MD for C7eq and alpha_R, umbrella sampling with MBAR for C5 and alpha_L), as
  |log(p / p_ref)| in kT,
* the training's wall and CPU time and final temperature (from the checkpoint),
* a PNG: the learned CG free energy -kT log q in (phi, psi) of the model's samples, the same
  reweighted to the AA Boltzmann density, and the reference MD histogram.

Usage::

    python benchmarks/bench_datafree.py CHECKPOINT --out DIR [--samples 20000] [--reference-dcd a.dcd ...] \
        [--tail N] [--basin-weights]
    python benchmarks/bench_datafree.py CHECKPOINT --out DIR --cg-md CG.pt[2] BACKMAPPER.pt --steps N \\
        --reference-dcd a.dcd --reference-pdb a.pdb

The second form runs the exported CG potential in OpenMM with a BackmapReporter and reweights the
run (the demo's simulation and report stages).

The reference MD (``--reference-dcd`` with ``--reference-pdb``) is used only for the third panel.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from openmm_backmap.systems.builtin import ALA2_REFERENCE_POPULATIONS

REFERENCE = ALA2_REFERENCE_POPULATIONS  # 240 ns MD for C7eq, C5, alpha_R; umbrella for alpha_L


def weight_tail(model, energy, draws: dict, lw: np.ndarray, phi, psi, T: float, n: int, k: int = 512) -> list[dict]:
    """The n largest joint weights: where they are (phi, psi in degrees, as ``backbone_dihedrals``
    gives them; log q(X) and its quantile
    among the draws) and whether the CG flow or the backmapper makes them. Each such CG frame is
    backmapped k more times: its conditional ESS, and how far the sample's conditional log weight
    -u - log q(x | X) lies above the frame's log mean conditional weight (near 0: the weight comes
    from q(X), the CG flow; large: from the backmapper's tail)."""
    import torch

    from openmm_backmap.analysis.reweighting import kish_ess
    from openmm_backmap.units import kT

    beta = 1.0 / kT(T)
    total = np.logaddexp.reduce(lw[np.isfinite(lw)])
    rows = []
    for i in np.argsort(-lw)[:n]:
        X = torch.as_tensor(draws["X"][i : i + 1]).to(model.dtype)
        with torch.no_grad():
            x, lq = model.bm.sample(X, k)
            u = beta * energy(x.reshape(-1, *x.shape[-2:])).double().numpy()
        cw = -u - lq.reshape(-1).double().numpy()
        cw = np.where(np.isfinite(cw), cw, -np.inf)
        log_mean = np.logaddexp.reduce(cw) - math.log(len(cw))
        rows.append(
            {
                "weight_share": float(np.exp(lw[i] - total)),
                "log_w_above_median": float(lw[i] - np.median(lw[np.isfinite(lw)])),
                "phi_deg": float(phi[i]),
                "psi_deg": float(psi[i]),
                "log_qX": float(draws["log_qX"][i]),
                "log_qX_quantile": float(np.mean(draws["log_qX"] < draws["log_qX"][i])),
                "conditional_ess": float(kish_ess(cw) / len(cw)),
                "above_frame_mean_nats": float(-beta * draws["u"][i] - draws["log_qx"][i] - log_mean),
            }
        )
    return rows


def basin_frame_weights(model, energy, draws: dict, ind: dict, T: float, n: int = 64, k: int = 64) -> dict:
    """Per basin, up to n of the model's own CG frames there, each backmapped k times: the median frame
    log weight log mean_k exp(-u - log q(x | X)) - log q(X) relative to C7eq's, and the median
    conditional ESS/N. A basin whose frames sit many nats below C7eq's carries almost no weight, and
    when its conditional ESS is fair that is the CG frames' geometry (their fibre integrals), not the
    backmapper's tail."""
    import torch

    from openmm_backmap.units import kT

    beta = 1.0 / kT(T)
    out = {}
    for name, mask in ind.items():
        idx = np.flatnonzero(mask)[:n]
        if len(idx) == 0:
            out[name] = {"frames": 0}
            continue
        X = torch.as_tensor(draws["X"][idx]).to(model.dtype)
        with torch.no_grad():
            x, lq = model.bm.sample(X, k)
            u = beta * energy(x.reshape(-1, *x.shape[-2:])).double().numpy().reshape(len(idx), k)
        cw = -u - lq.double().numpy().reshape(len(idx), k)
        cw = np.where(np.isfinite(cw), cw, -np.inf)
        log_sum = np.logaddexp.reduce(cw, axis=1)
        frame = log_sum - math.log(k) - draws["log_qX"][idx]
        ess = np.exp(2.0 * log_sum - np.logaddexp.reduce(2.0 * cw, axis=1)) / k
        out[name] = {"frames": int(len(idx)), "median_frame_log_w": float(np.median(frame))}
        out[name]["median_conditional_ess"] = float(np.median(ess))
    ref = out.get("C7eq", {}).get("median_frame_log_w")
    for v in out.values():
        if ref is not None and "median_frame_log_w" in v:
            v["below_c7eq_nats"] = float(ref - v["median_frame_log_w"])
    return out


def evaluate(
    checkpoint: str,
    out: Path,
    n_samples: int,
    seed: int,
    ref_dcd: list[str],
    ref_pdb: str | None,
    tail: int = 0,
    basin_weights: bool = False,
    anneal: tuple[int, int] | None = None,
) -> dict:
    import mdtraj as md
    import torch

    from openmm_backmap.analysis.basins import backbone_dihedrals, basin_indicators
    from openmm_backmap.analysis.reweighting import kish_ess, normalized_weights
    from openmm_backmap.io.checkpoints import load_joint_checkpoint
    from openmm_backmap.io.pdb import topology_from_pdb
    from openmm_backmap.openmm.energies import aa_energy
    from openmm_backmap.sampling.annealing import AnnealSettings
    from openmm_backmap.training.joint import annealed_draws, draw
    from openmm_backmap.units import kT

    torch.manual_seed(seed)
    model, ckpt = load_joint_checkpoint(checkpoint)
    spec = ckpt["spec"]
    T = float(spec["temperature"])
    energy = aa_energy(spec["backmapper"]["system_xml"])
    s = draw(model, energy, n_samples)
    lw = -s["u"] / kT(T) - s["log_qX"] - s["log_qx"]
    lw = np.where(np.isfinite(lw), lw, -np.inf)
    ess = kish_ess(lw) / len(lw)
    w = normalized_weights(lw)
    top = topology_from_pdb(spec["backmapper"]["topology_pdb"])

    def basins(x: np.ndarray):
        phi, psi = backbone_dihedrals(md.Trajectory(x.astype(np.float32), top))
        return phi[:, 0], psi[:, 0], basin_indicators(phi[:, 0], psi[:, 0])

    def populations(ind: dict, w: np.ndarray) -> dict:
        boot = np.random.default_rng(seed).integers(0, len(w), size=(200, len(w)))
        pops = {}
        for name, mask in ind.items():
            p = float(w[mask].sum())
            pb = np.array([w[b][mask[b]].sum() / w[b].sum() for b in boot])
            ref = REFERENCE[name]
            pops[name] = {
                "raw": float(mask.mean()),
                "reweighted": p,
                "error": float(pb.std()),
                "reference": ref,
                "delta_kT": float(abs(math.log(p / ref))) if p > 0 else math.inf,
            }
        return pops

    phi, psi, ind = basins(s["x"])
    pops = populations(ind, w)
    rkl = spec["training"].get("reverse_kl", {})
    result = {
        "checkpoint": str(checkpoint),
        "mapping_beads": int(model.cg.n_cg),
        "samples": int(n_samples),
        "ess_per_n": float(ess),
        "populations": pops,
        "training": {
            k: rkl.get(k)
            for k in ("final_T", "reached_target", "steps", "wall_seconds", "cpu_seconds", "final_ess_per_n")
        },
    }
    if tail:
        result["tail"] = weight_tail(model, energy, s, lw, phi, psi, T, tail)
    if basin_weights:
        result["basin_frame_weights"] = basin_frame_weights(model, energy, s, ind, T)
    if anneal:
        t0 = time.perf_counter()
        settings = AnnealSettings(levels=anneal[0], leapfrog=anneal[1])
        a = annealed_draws(model, energy, n_samples, T, settings, seed)
        result["annealed"] = {
            "levels": anneal[0],
            "leapfrog": anneal[1],
            "acceptance": a["stats"]["acceptance"],
            "ess_per_n": float(kish_ess(a["log_w"]) / n_samples),
            "plain_ess_per_n": float(kish_ess(a["plain_log_w"]) / n_samples),
            "populations": populations(basins(a["x"])[2], normalized_weights(a["log_w"])),
            "seconds": time.perf_counter() - t0,
        }
    out.mkdir(parents=True, exist_ok=True)
    (out / "datafree_ala2.json").write_text(json.dumps(result, indent=1))
    plot(out / "datafree_ala2_fes.png", phi, psi, w, T, ref_dcd, ref_pdb, result)
    return result


def _fes(phi, psi, weights, T, bins=36):
    from openmm_backmap.units import kT

    h, _, _ = np.histogram2d(phi, psi, bins=bins, range=[[-180, 180], [-180, 180]], weights=weights)
    with np.errstate(divide="ignore"):
        f = -kT(T) * np.log(h / h.sum())
    return (f - np.nanmin(f[np.isfinite(f)])).T


def plot(path: Path, phi, psi, w, T, ref_dcd, ref_pdb, result) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("learned CG free energy -kT log q (model samples)", _fes(phi, psi, None, T)),
        (f"reweighted to U_AA (ESS/N {result['ess_per_n']:.3f})", _fes(phi, psi, w, T)),
    ]
    if ref_dcd and ref_pdb:
        import mdtraj as md

        from openmm_backmap.analysis.basins import backbone_dihedrals

        ref = md.load(ref_dcd, top=ref_pdb)
        rphi, rpsi = backbone_dihedrals(ref)
        panels.append(
            (
                f"reference MD ({ref.n_frames} frames; alpha_L from umbrella: 0.0088)",
                _fes(rphi[:, 0], rpsi[:, 0], None, T),
            )
        )
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), constrained_layout=True)
    for ax, (title, f) in zip(np.atleast_1d(axes), panels):
        im = ax.imshow(np.clip(f, 0, 30), origin="lower", extent=[-180, 180, -180, 180], cmap="viridis", vmax=30)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("phi (deg)")
        ax.set_ylabel("psi (deg)")
    fig.colorbar(im, ax=axes, label="F (kJ/mol)")
    pops = result["populations"]
    fig.suptitle(
        "ALA2 data-free joint model, "
        + ", ".join(f"{k} {v['reweighted']:.4f} (ref {v['reference']:.4f})" for k, v in pops.items()),
        fontsize=9,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cg_md(
    checkpoint: str,
    cg_force: str,
    backmapper: str,
    out: Path,
    steps: int,
    interval: int,
    samples: int,
    seed: int,
    ref_dcd: list[str],
    ref_pdb: str,
    flow_moves: tuple[str, int] | None = None,
) -> dict:
    """An OpenMM CG simulation with the exported CG potential (``.pt`` or compiled ``.pt2``) and a
    BackmapReporter with the exported backmapper, reweighted to the AA ensemble (the demo's stages)."""
    import mdtraj as md
    import torch

    from openmm_backmap.analysis.evaluate import evaluate_run
    from openmm_backmap.demo import run_cg_simulation
    from openmm_backmap.io.checkpoints import load_joint_checkpoint
    from openmm_backmap.io.pdb import topology_from_pdb
    from openmm_backmap.mapping import CGMapping

    model, ckpt = load_joint_checkpoint(checkpoint)
    spec = ckpt["spec"]["backmapper"]
    mapping = CGMapping.from_dict(spec["mapping"], topology_from_pdb(spec["topology_pdb"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        X, _ = model.cg.sample(1)
    cg_run = run_cg_simulation(
        Path(cg_force),
        Path(backmapper),
        mapping,
        X[0].double().numpy(),
        out,
        steps,
        interval,
        samples,
        seed,
        flow_moves=flow_moves,
    )
    reference = md.load(ref_dcd, top=ref_pdb)
    run = evaluate_run(out / "aa.dcd", out / "weights.csv", reference.topology, reference, out)
    for name, b in run["basins"].items():
        b["reference_project"] = REFERENCE[name]
        b["delta_kT_project"] = (
            float(abs(math.log(b["reweighted"] / REFERENCE[name]))) if b["reweighted"] > 0 else math.inf
        )
    result = {
        "cg_force": str(cg_force),
        "steps": steps,
        "wall_seconds": cg_run.wall,
        "frames": cg_run.frames,
        "flow_moves": cg_run.flow_moves,
        "flow_acceptance": cg_run.flow_acceptance,
        "run": run,
    }
    (out / "cg_md.json").write_text(json.dumps(result, indent=1, default=float))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--cg-md", nargs=2, metavar=("CG_FORCE", "BACKMAPPER"), help="run the CG MD stage with these files")
    ap.add_argument("--steps", type=int, default=100000, help="CG MD steps (1 fs)")
    ap.add_argument("--interval", type=int, default=200, help="steps between reports")
    ap.add_argument("--per-frame", type=int, default=4, help="reconstructions per reported frame")
    ap.add_argument(
        "--flow-moves",
        nargs=2,
        metavar=("CG_PT", "INTERVAL"),
        help="CG MD stage: a CGFlowMoves move from the CG flow CG_PT every INTERVAL steps",
    )
    ap.add_argument("--out", required=True)
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reference-dcd", nargs="*", default=[])
    ap.add_argument("--reference-pdb")
    ap.add_argument(
        "--tail", type=int, default=0, help="report the N largest weights: where they are and what makes them"
    )
    ap.add_argument(
        "--basin-weights",
        action="store_true",
        help="per basin, 64 of the model's CG frames backmapped 64 times: frame log weights against C7eq's",
    )
    ap.add_argument(
        "--anneal",
        nargs=2,
        type=int,
        metavar=("LEVELS", "LEAPFROG"),
        help="also anneal --samples fresh joint samples to exp(-U_AA / kT) (AIS, HMC in internal coordinates) "
        "and report their ESS/N and AIS-reweighted populations",
    )
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    if args.cg_md:
        res = cg_md(
            args.checkpoint,
            args.cg_md[0],
            args.cg_md[1],
            Path(args.out),
            args.steps,
            args.interval,
            args.per_frame,
            args.seed,
            args.reference_dcd,
            args.reference_pdb,
            (args.flow_moves[0], int(args.flow_moves[1])) if args.flow_moves else None,
        )
        run = res["run"]
        moves = ""
        if res["flow_moves"] is not None:
            moves = f", {res['flow_moves']} flow moves ({res['flow_acceptance']:.2f} accepted)"
        print(
            f"{res['steps']} CG steps in {res['wall_seconds']:.0f} s, {res['frames']} AA samples{moves}, "
            f"ESS/N {run['ess_fraction']:.3f}"
        )
        for k, b in run["basins"].items():
            print(
                f"| {k} | {b['raw']:.4f} | {b['reweighted']:.4f} +- {b['reweighted_error']:.4f} | "
                f"{b['reference_project']:.5f} | {b['delta_kT_project']:.2f} |"
            )
        return
    result = evaluate(
        args.checkpoint,
        Path(args.out),
        args.samples,
        args.seed,
        args.reference_dcd,
        args.reference_pdb,
        args.tail,
        args.basin_weights,
        tuple(args.anneal) if args.anneal else None,
    )
    print(json.dumps(result, indent=1))
    tables = [("plain importance weights", result)]
    if "annealed" in result:
        tables.append(("annealed (AIS weights; raw = annealed states, unweighted)", result["annealed"]))
    for title, part in tables:
        print(f"{title}: ESS/N {part['ess_per_n']:.3f}")
        print("| basin | raw | reweighted | reference | abs log ratio (kT) |")
        print("|---|---|---|---|---|")
        for k, v in part["populations"].items():
            print(
                f"| {k} | {v['raw']:.4f} | {v['reweighted']:.4f} +- {v['error']:.4f} | {v['reference']:.5f} "
                f"| {v['delta_kT']:.2f} |"
            )


if __name__ == "__main__":
    main()
