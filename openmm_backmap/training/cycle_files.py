"""Cycle coarse graining on files: what ``openmm-backmap cycle`` runs.

:func:`cycle_from_files` runs :func:`~openmm_backmap.training.cycle.run_cycles` on a backmapper and
a CG potential given as files (model files or training checkpoints) and writes JSON, a PNG and model
files every cycle; :func:`refit_from_run` refits a CG flow to a reporter run (energy CSV + AA
trajectory); :func:`check_models_match` refuses a backmapper and a CG potential of different
mappings, molecules or temperatures.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from openmm_backmap.analysis.reweighting import kish_ess, normalized_weights
from openmm_backmap.models.cg_potential import CGFlowPotential
from openmm_backmap.models.joint import JointCoordinates
from openmm_backmap.training.cycle import (
    CycleSettings,
    TemperedFlow,
    backmapper_refinement,
    ess_tempering,
    evaluate_weights,
    run_cycles,
    weighted_refit,
    widen_priors,
    zero_weight_message,
)

__all__ = [
    "add_arguments",
    "basin_observable",
    "check_models_match",
    "cycle_from_files",
    "plot_cycles",
    "refit_from_run",
    "run",
]


# ---------------------------------------------------------------------------- models from files
def check_models_match(
    bm_meta: dict, cg_spec: dict, bm_origin: str = "the backmapper", cg_origin: str = "the CG potential"
) -> None:
    """ValueError unless a backmapper (model-file metadata) and a CG potential (spec) are for the same
    beads of the same molecule at the same temperature."""
    n_bm, n_cg = int(bm_meta["n_cg"]), int(cg_spec["model"]["n_cg"])
    if n_bm != n_cg:
        raise ValueError(f"{bm_origin} maps onto {n_bm} beads but {cg_origin} has {n_cg}: different mappings")
    m_bm, m_cg = bm_meta.get("mapping"), cg_spec.get("mapping")
    if m_bm and m_cg:
        if int(m_bm.get("n_atoms", -1)) != int(m_cg.get("n_atoms", -1)):
            raise ValueError(
                f"{bm_origin} is for a molecule of {m_bm.get('n_atoms')} atoms, {cg_origin} for one of "
                f"{m_cg.get('n_atoms')}: different topologies"
            )
        for k, (a, b) in enumerate(zip(m_bm["groups"], m_cg["groups"])):
            if list(a["atoms"]) != list(b["atoms"]) or (
                a.get("labels") and b.get("labels") and a["labels"] != b["labels"]
            ):
                raise ValueError(
                    f"bead {k}: {bm_origin} maps atoms {a.get('labels') or a['atoms']} onto it, {cg_origin} "
                    f"{b.get('labels') or b['atoms']}: different mappings or topologies"
                )
    t_bm, t_cg = float(bm_meta["temperature"]), float(cg_spec["temperature"])
    if abs(t_bm - t_cg) > 1e-6:
        raise ValueError(f"{bm_origin} is for {t_bm:g} K but {cg_origin} for {t_cg:g} K")


def basin_observable(topology: Any) -> Callable[[np.ndarray], dict[str, np.ndarray]] | None:
    """(phi, psi) basin indicators (:func:`~openmm_backmap.analysis.basins.basin_indicators`, averaged
    over residues) of AA positions on ``topology``; None when it has no residue with phi and psi."""
    import mdtraj as md

    from openmm_backmap.analysis.basins import backbone_dihedrals, backbone_torsions, basin_indicators
    from openmm_backmap.mapping import as_mdtraj_topology

    top = as_mdtraj_topology(topology)
    try:
        backbone_torsions(top)
    except ValueError:
        return None

    def indicators(x: np.ndarray) -> dict[str, np.ndarray]:
        phi, psi = backbone_dihedrals(md.Trajectory(np.asarray(x, dtype=np.float32), top))
        return {k: v.mean(1) for k, v in basin_indicators(phi, psi).items()}

    return indicators


def _load_cg(path: str | Path) -> tuple[CGFlowPotential, dict]:
    from openmm_backmap.io.checkpoints import cg_potential_from_file

    return cg_potential_from_file(path)


def _export(model: CGFlowPotential, spec: dict, path: Path, info: dict) -> None:
    from openmm_backmap.io.model_files import export_cg

    spec = copy.deepcopy(spec)
    spec["model"] = copy.deepcopy(model.spec)
    spec.setdefault("training", {})
    spec["training"] = dict(spec["training"] or {}, cycle=info)
    export_cg(copy.deepcopy(model).eval(), spec, path)


def cycle_from_files(
    model: str | Path,
    cg_model: str | Path,
    out: str | Path,
    settings: CycleSettings = CycleSettings(),
    aa_system: str | Path | None = None,
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """What ``openmm-backmap cycle`` runs: the cycle on a backmapper (model file, or ``train``
    checkpoint ``.ckpt``: needed for ``settings.refine_steps``) and a CG potential (``.pt`` model file
    or ``train-cg`` checkpoint), with the AA System embedded in the backmapper or given as
    ``aa_system`` (XML).

    Writes to the folder ``out``: ``cycle.json`` (settings and one record per evaluation, rewritten
    every cycle), ``cycle.png``, ``cg_cycle<c>.pt`` after each refit, and at the end ``cg.pt`` (the
    last cycle's CG potential: runs in ``compile``, the reporter and the hybrid sampler) and
    ``backmapper.pt`` (the backmapper of the last cycle: refined, or a copy of the input's model file),
    and for a checkpoint input ``backmapper.ckpt`` (the same, which a later cycle can refine further).
    """
    from openmm_backmap.io.backmap_model import load_model
    from openmm_backmap.io.checkpoints import load_checkpoint, save_checkpoint
    from openmm_backmap.io.model_files import export_model
    from openmm_backmap.io.pdb import topology_from_pdb
    from openmm_backmap.mapping import CGMapping
    from openmm_backmap.openmm.energies import ReducedEnergy, aa_energy, check_system_matches, load_system

    if threads:
        torch.set_num_threads(int(threads))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if Path(model).suffix == ".ckpt":
        net, bm_ckpt = load_checkpoint(model)
        bm_spec = bm_ckpt["spec"]
        net = net.float().eval()
        topology = topology_from_pdb(bm_spec["topology_pdb"])
        mapping = CGMapping.from_dict(bm_spec["mapping"], topology)
        temperature, system_xml = float(bm_spec["temperature"]), bm_spec.get("system_xml")
        meta = {"n_cg": net.n_cg, "mapping": bm_spec["mapping"], "temperature": temperature}
        sampler = net
    else:
        if settings.refine_steps:
            raise ValueError(f"refining the backmapper needs its training checkpoint (.ckpt), not {model}")
        bm = load_model(model, device="cpu")
        net, bm_spec, topology, mapping = None, None, bm.topology, bm.mapping
        temperature, system_xml, meta, sampler = bm.temperature, bm.system_xml, bm.metadata, bm.module
    elements = [a.element.symbol if a.element is not None else "" for a in topology.atoms]
    cg, spec = _load_cg(cg_model)
    check_models_match(meta, spec, str(model), str(cg_model))
    if aa_system is None and system_xml is None:
        raise ValueError(f"{model} embeds no AA System: give --aa-system system.xml")
    system = load_system(Path(aa_system).read_text() if aa_system is not None else system_xml)
    check_system_matches(system, elements, f"the AA System {aa_system or '(embedded)'}", str(model))
    u_aa = aa_energy(system)
    energy = ReducedEnergy(u_aa, temperature)
    dtype = torch.float32

    def backmap(X: Tensor, k: int) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            return sampler.sample(X.to(dtype), int(k))

    refine = None
    if settings.refine_steps and net is not None:
        refine = backmapper_refinement(net, bm_spec, u_aa, mapping.project, temperature, settings, cg)

    check = None
    if settings.check_steps:
        from openmm_backmap.sampling.langevin import dynamics_check

        def check(module: torch.nn.Module, X: np.ndarray) -> dict:
            # the exported force's energy (flow and priors) in double precision, as OpenMM would run it
            model = copy.deepcopy(module).double().eval()
            return dynamics_check(
                model.energy,
                torch.as_tensor(X),
                mapping.masses(),
                temperature,
                settings.check_steps,
                seed=settings.seed,
            )

    def fibre_log_prob(x: Tensor, X: Tensor) -> Tensor:
        return sampler.log_prob(x.to(dtype), X.to(dtype))

    def fibre_sample(X: Tensor) -> tuple[Tensor, Tensor]:
        # differentiable w.r.t. X only: the refit's reverse KL trains the CG flow, not the backmapper
        trained = [p for p in sampler.parameters() if p.requires_grad]
        for p in trained:
            p.requires_grad_(False)
        try:
            return sampler.sample(X.to(dtype), 1)
        finally:
            for p in trained:
                p.requires_grad_(True)

    family = TemperedFlow(cg, settings.widen_lengths)
    header = {
        "backmapper": str(model),
        "cg_model": str(cg_model),
        "aa_system": str(aa_system) if aa_system else "embedded",
        "temperature_K": temperature,
        "settings": asdict(settings),
    }
    history: list[dict] = []

    def on_cycle(c: int, record: dict) -> None:
        history.append(record)
        (out / "cycle.json").write_text(json.dumps({**header, "cycles": history}, indent=1) + "\n")
        plot_cycles(history, out / "cycle.png")
        if c < settings.cycles:
            _export(cg, spec, out / f"cg_cycle{c + 1}.pt", {"cycle": c + 1, "source": str(cg_model)})

    run_cycles(
        family,
        backmap,
        energy,
        mapping.project,
        settings,
        basin_observable(topology),
        on_cycle,
        log,
        refine,
        check,
        fibre_log_prob,
        JointCoordinates(cg, sampler) if settings.anneal_levels else None,
        fibre_sample,
    )
    _export(cg, spec, out / "cg.pt", {"cycles": settings.cycles, "source": str(cg_model), "final": history[-1]})
    if net is not None:
        export_model(net, bm_spec, out / "backmapper.pt")
        # the refined backmapper as a checkpoint too: a later `cycle --model` can go on refining it
        save_checkpoint(out / "backmapper.ckpt", net, bm_spec, stage="cycle")
    else:
        (out / "backmapper.pt").write_bytes(Path(model).read_bytes())
    log(
        f"written: {out / 'cycle.json'}, {out / 'cycle.png'}, {out / 'cg.pt'}, {out / 'backmapper.pt'}"
        + (f", {out / 'backmapper.ckpt'}" if net is not None else "")
    )
    return history


def refit_from_run(
    energy_file: str | Path,
    trajectory: str | Path,
    cg_model: str | Path,
    out: str | Path,
    topology: str | Path | None = None,
    model: str | Path | None = None,
    settings: CycleSettings = CycleSettings(cycles=1),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Refit a CG flow to a reporter run: the energy CSV (one row per AA frame, ``log_w`` the
    importance log-weight) and the AA trajectory it wrote (one frame per row, in order).

    The CG projections M x of the frames, weighted by the run's self-normalised weights, are fitted by
    weighted maximum likelihood (``settings.epochs`` etc.; the run's CG frames came from
    exp(-beta U_CG), so the weights make them samples of the CG marginal). The topology comes from
    ``topology`` or the backmapper ``model``; the mapping from the CG model (or the backmapper).
    Writes ``out/cg.pt`` and ``out/refit.json``; returns the summary.

    Raises
    ------
    ValueError
        The file's rows do not match the trajectory's frames, the models disagree, or every weight
        is zero (the message says which frames, and which basins the run reached).
    """
    import mdtraj as md

    from openmm_backmap.io.energy_file import read_energy_file
    from openmm_backmap.io.trajectories import load_trajectory
    from openmm_backmap.mapping import CGMapping

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cg, spec = _load_cg(cg_model)
    bm_meta = None
    if model is not None:
        from openmm_backmap.io.backmap_model import load_model

        bm = load_model(model, device="cpu")
        check_models_match(bm.metadata, spec, str(model), str(cg_model))
        bm_meta, top = bm.metadata, bm.topology
    if topology is not None:
        top = md.load_topology(str(topology))
    elif model is None:
        if not spec.get("topology_pdb"):
            raise ValueError(f"{cg_model} carries no AA topology: give --topology or --model")
        from openmm_backmap.io.pdb import topology_from_pdb

        top = topology_from_pdb(spec["topology_pdb"])
    rows = read_energy_file(energy_file)
    traj = load_trajectory(str(trajectory), top)
    n_rows, n_frames = len(rows["log_w"]), traj.n_frames
    if n_rows != n_frames:
        raise ValueError(
            f"{energy_file} has {n_rows} rows but {trajectory} has {n_frames} frames: the reporter writes one "
            f"row per AA frame, so these files are not of one run (or one was cut short)"
        )
    mapping_dict = spec.get("mapping") or (bm_meta or {}).get("mapping")
    if not mapping_dict:
        raise ValueError(f"{cg_model} carries no mapping: give --model (the backmapper of the run)")
    cg_map = CGMapping.from_dict(mapping_dict, traj.topology)
    log_w = np.asarray(rows["log_w"], dtype=np.float64)
    obs = basin_observable(traj.topology)
    ind = obs(traj.xyz) if obs is not None else None
    if kish_ess(log_w) == 0.0:
        raise ValueError(zero_weight_message(log_w, str(energy_file), ind))
    stats = evaluate_weights(log_w, ind)
    X = cg_map.project(traj.xyz.astype(np.float64))
    lam = ess_tempering(log_w, settings.ess_target)
    w = normalized_weights(lam * log_w)
    refit = weighted_refit(
        cg, X, w, settings.epochs, settings.batch_size, settings.lr, settings.val_fraction, settings.seed
    )
    heavy = w >= 0.01 * w[w > 0].mean()
    refit["priors_widened"] = widen_priors(cg, X[heavy])
    summary = {
        "energy_file": str(energy_file),
        "trajectory": str(trajectory),
        "cg_model": str(cg_model),
        "run": stats,
        "lambda": lam,
        "refit": {k: v for k, v in refit.items() if k != "history"},
        "settings": asdict(settings),
    }
    _export(cg, spec, out / "cg.pt", {"from_run": str(energy_file), "lambda": lam})
    (out / "refit.json").write_text(json.dumps(summary, indent=1) + "\n")
    log(
        f"run: {n_rows} frames, ESS/N {stats['ess_fraction']:.3f}, lambda {lam:.3f}; held-out weighted NLL "
        f"{refit['val_nll_start']:.3f} -> {refit['val_nll_end']:.3f} +- {refit['val_nll_error']:.3f}"
        f"{' (reverted)' if refit['reverted'] else ''}; written {out / 'cg.pt'}, {out / 'refit.json'}"
    )
    return summary


# ---------------------------------------------------------------------------- figure
def plot_cycles(history: list[dict], path: str | Path) -> None:
    """ESS/N and the KL estimates per cycle, and each basin's population (raw and reweighted, with
    error bars, log scale) per cycle, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = [r["cycle"] for r in history]
    basins = list((history[0].get("basins") or {}).keys())
    fig, axes = plt.subplots(1, 2 if basins else 1, figsize=(11 if basins else 5.5, 4), squeeze=False)
    ax = axes[0, 0]
    ax.plot(c, [r["ess_fraction"] for r in history], "o-", label="ESS/N (cycle's draws)")
    ax.plot(c, [r["flow"]["ess_fraction"] for r in history], "d-", color="C4", label="ESS/N (flow's own draws)")
    if any(r.get("per_frame", 1) > 1 for r in history):
        pairs = [r.get("pair_ess_fraction", np.nan) for r in history]
        ax.plot(c, pairs, "o:", color="C0", alpha=0.6, label="ESS/N (single reconstructions)")
    ax.set_xlabel("cycle")
    ax.set_ylabel("ESS/N")
    ax.set_ylim(0, 1)
    ax2 = ax.twinx()
    ax2.plot(c, [r["flow"]["kl_forward"] for r in history], "s--", color="C3", label="KL(p||q) est., flow")
    ax2.plot(c, [r["flow"]["kl_reverse"] for r in history], "^--", color="C2", label="KL(q||p) est., flow")
    ax2.set_ylabel("KL estimate (nats, joint)")
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="upper right", fontsize=8)
    if basins:
        ax = axes[0, 1]
        for k, name in enumerate(basins):
            raw = np.array([r["basins"][name]["raw"] for r in history])
            rw = np.array([r["basins"][name]["reweighted"] for r in history])
            ax.errorbar(
                c,
                rw,
                yerr=[r["basins"][name]["reweighted_error"] for r in history],
                fmt="o-",
                color=f"C{k}",
                label=f"{name} reweighted",
            )
            ax.plot(c, raw, "x:", color=f"C{k}", label=f"{name} flow (raw)")
        ax.set_yscale("log")
        ax.set_xlabel("cycle")
        ax.set_ylabel("population")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- command line
def add_arguments(p) -> None:
    """The options of ``openmm-backmap cycle``."""
    d = CycleSettings
    p.add_argument(
        "--model", help="backmapper: model file (.pt) or train checkpoint (.ckpt), with its AA System (or --aa-system)"
    )
    p.add_argument("--cg-model", required=True, help="CG potential: model file (.pt) or train-cg checkpoint")
    p.add_argument("--aa-system", help="AA OpenMM System XML (default: the one embedded in --model)")
    p.add_argument(
        "--from-run",
        nargs=2,
        metavar=("ENERGY_CSV", "TRAJECTORY"),
        help="refit once to a reporter run: its energy CSV and the AA trajectory it wrote",
    )
    p.add_argument("--topology", help="AA topology (PDB) of --from-run's trajectory (default: from --model)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--cycles", type=int, default=d.cycles, help=f"refits of the CG flow (default {d.cycles})")
    p.add_argument("--samples", type=int, default=d.samples, help=f"CG draws per cycle (default {d.samples})")
    p.add_argument("--per-frame", type=int, default=d.per_frame, help="reconstructions per CG draw (default 1)")
    p.add_argument(
        "--defensive", type=float, default=d.defensive, help=f"fraction drawn from the widened flow ({d.defensive})"
    )
    p.add_argument("--tau", type=float, default=d.tau, help=f"latent scale of the widened flow (default {d.tau})")
    p.add_argument(
        "--shifted",
        type=float,
        default=d.shifted,
        help="fraction drawn from the flow with its rotatable dihedrals turned by multiples of 360 / "
        "--shift-steps degrees (exact density; reaches torsion basins across barriers the flow has no mass in; "
        f"default {d.shifted:g})",
    )
    p.add_argument(
        "--shift-steps", type=int, default=d.shift_steps, help=f"turns per rotatable dihedral (default {d.shift_steps})"
    )
    p.add_argument(
        "--widen-lengths",
        action="store_true",
        help="widen the bond-length latents of the widened flow too (default: only angles and dihedrals)",
    )
    p.add_argument(
        "--ess-target",
        type=float,
        default=d.ess_target,
        help=f"ESS/N below which weights are tempered ({d.ess_target})",
    )
    p.add_argument("--pool", type=int, default=d.pool, help=f"cycles whose samples each refit uses (default {d.pool})")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"refit epochs per cycle (default {d.epochs})")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help=f"refit learning rate (default {d.lr:g})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--refine-backmapper",
        type=int,
        default=0,
        metavar="STEPS",
        help="also refine the backmapper each cycle (reverse KL + weighted NLL steps); --model must be its .ckpt",
    )
    p.add_argument(
        "--refine-lr", type=float, default=d.refine_lr, help=f"backmapper refinement learning rate ({d.refine_lr:g})"
    )
    p.add_argument(
        "--refine-spread",
        type=float,
        default=d.refine_spread,
        metavar="FRACTION",
        help="fraction of the refinement's CG frames with their rotatable dihedrals redrawn uniformly, so the "
        f"backmapper learns basins the CG flow has not reached yet (default {d.refine_spread})",
    )
    p.add_argument(
        "--check-steps",
        type=int,
        default=d.check_steps,
        metavar="STEPS",
        help="after each refit, run this many 1 fs Langevin steps of the CG potential from weighted frames "
        f"({d.check_replicas} replicas) and undo a refit whose dynamics run away ({d.check_steps}; 0: no check)",
    )
    p.add_argument(
        "--anneal-levels",
        type=int,
        default=d.anneal_levels,
        metavar="T",
        help="anneal every backmapped draw to exp(-U_AA / kT) by annealed importance sampling with T levels before "
        "the weights are used (HMC in the models' internal coordinates; 0: plain importance weights, the default)",
    )
    p.add_argument(
        "--anneal-leapfrog",
        type=int,
        default=d.anneal_leapfrog,
        metavar="L",
        help=f"leapfrog steps of each annealing move (default {d.anneal_leapfrog})",
    )
    p.add_argument(
        "--anneal-step",
        type=float,
        default=d.anneal_step,
        help=f"first leapfrog step, in standard deviations of the internal coordinates (default {d.anneal_step:g})",
    )
    p.add_argument(
        "--reverse-kl",
        type=float,
        default=d.reverse_kl_weight,
        metavar="WEIGHT",
        help="add WEIGHT times the CG flow's reverse KL against the CG marginal of exp(-U_AA / kT) (fresh draws "
        "of the flow, backmapped) to every refit step: pulls back mass the flow smears into the gaps between basins, "
        f"which maximum likelihood barely feels (default {d.reverse_kl_weight:g}: none)",
    )
    p.add_argument(
        "--reverse-kl-batch",
        type=int,
        default=d.reverse_kl_batch,
        help=f"draws per refit step of the reverse-KL term (default {d.reverse_kl_batch})",
    )
    p.add_argument(
        "--reverse-kl-per-frame",
        type=int,
        default=d.reverse_kl_per_frame,
        metavar="K",
        help="reconstructions per draw of the reverse-KL term: with K > 1 the term estimates the CG marginal's "
        "density by importance sampling over K reconstructions, which shrinks its bias toward where the "
        f"backmapper is good (default {d.reverse_kl_per_frame}: the joint reverse KL)",
    )
    p.add_argument(
        "--reverse-kl-excess",
        type=float,
        default=d.reverse_kl_excess,
        metavar="C",
        help="make the --reverse-kl term an excess penalty: only draws where the flow's density exceeds the CG "
        "marginal's by more than C nats count, so that it removes mass from the gaps between basins and none from "
        "where the flow's density is at most e^C times the marginal's (default: the plain reverse KL)",
    )
    p.add_argument(
        "--estimate-samples",
        type=int,
        default=d.estimate_samples,
        metavar="N",
        help="after the last cycle, weigh N fresh draws of the final CG flow (--per-frame reconstructions each, "
        "plain importance weights: cheap for large N) for the final reweighted AA estimate, 'estimate' in "
        f"cycle.json (default {d.estimate_samples}: none)",
    )
    p.add_argument(
        "--estimate-anneal",
        action="store_true",
        help="anneal every draw of --estimate-samples (one reconstruction each) with the cycle's AIS "
        "(--anneal-levels): slower (about 25 ms a draw on alanine dipeptide), and its weights do not inherit "
        "the backmapper's conditional error in the rare basins",
    )
    p.add_argument(
        "--stratify",
        type=float,
        default=d.stratify,
        metavar="F",
        help="stratify the refit by basin: fit the shape of every basin with at least the share F of the gradient "
        "(maximum likelihood gives a basin its population's share) while a population term on fresh draws of the "
        "flow keeps the basins' populations; the same minimiser, the exact marginal "
        f"(default {d.stratify}: plain weighted maximum likelihood)",
    )
    p.add_argument(
        "--stratify-draws",
        type=int,
        default=d.stratify_draws,
        metavar="N",
        help=f"draws of the CG flow per refit step for the population term of --stratify (default {d.stratify_draws})",
    )
    p.add_argument(
        "--resample-moves",
        type=int,
        default=d.resample_moves,
        metavar="M",
        help="with --anneal-levels: resample every basin whose annealed pairs have a Kish ESS below half their "
        "number by weight within the basin (its population kept) and give its pairs M HMC moves at "
        "exp(-U_AA / kT) before the refit, so that a basin whose weight sits on a few pairs hands the refit a spread "
        f"of pairs (default {d.resample_moves}: none)",
    )
    p.add_argument(
        "--resample-in-basin",
        action="store_true",
        help="keep every pair of --resample-moves in its basin (moves out of it are rejected): a shallow basin keeps "
        "its pairs and --stratify weighs its shape up",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")


def run(args) -> int:
    """``openmm-backmap cycle``: :func:`cycle_from_files`, or :func:`refit_from_run` with ``--from-run``."""
    if args.threads:
        torch.set_num_threads(int(args.threads))
    settings = CycleSettings(
        cycles=max(args.cycles, 1) if args.from_run else args.cycles,
        samples=args.samples,
        per_frame=args.per_frame,
        defensive=args.defensive,
        tau=args.tau,
        shifted=args.shifted,
        shift_steps=args.shift_steps,
        widen_lengths=args.widen_lengths,
        ess_target=args.ess_target,
        pool=args.pool,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        refine_steps=args.refine_backmapper,
        refine_lr=args.refine_lr,
        refine_spread=args.refine_spread,
        check_steps=args.check_steps,
        anneal_levels=args.anneal_levels,
        anneal_leapfrog=args.anneal_leapfrog,
        anneal_step=args.anneal_step,
        reverse_kl_weight=args.reverse_kl,
        reverse_kl_batch=args.reverse_kl_batch,
        reverse_kl_per_frame=args.reverse_kl_per_frame,
        reverse_kl_excess=args.reverse_kl_excess,
        estimate_samples=args.estimate_samples,
        stratify=args.stratify,
        stratify_draws=args.stratify_draws,
        resample_moves=args.resample_moves,
        resample_in_basin=args.resample_in_basin,
        estimate_anneal=args.estimate_anneal,
    )
    if args.from_run:
        for flag, value in (
            ("--reverse-kl", args.reverse_kl),
            ("--estimate-samples", args.estimate_samples),
            ("--stratify", args.stratify),
        ):
            if value:
                raise ValueError(f"{flag} draws from the models: it needs the cycle, not --from-run (a refit to a run)")
        energy_csv, trajectory = args.from_run
        for path in (energy_csv, trajectory, args.cg_model):
            if not Path(path).is_file():
                raise FileNotFoundError(f"{path} does not exist")
        if args.model is None and args.topology is None:
            raise ValueError("--from-run needs the AA topology: give --topology aa.pdb or --model backmapper.pt")
        refit_from_run(energy_csv, trajectory, args.cg_model, args.out, args.topology, args.model, settings)
        return 0
    if args.model is None:
        raise ValueError("give --model backmapper.pt (or --from-run ENERGY_CSV TRAJECTORY)")
    cycle_from_files(args.model, args.cg_model, args.out, settings, args.aa_system)
    return 0
