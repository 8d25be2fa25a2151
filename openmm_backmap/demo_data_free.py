"""``openmm-backmap demo --data-free``: the demo with no MD and no training data.

``demo --data-free`` (:func:`run_data_free_demo`) runs no MD and trains nothing on data: stages 1, 3
and 4 become one ``train-joint`` (:func:`~openmm_backmap.training.joint.train_joint_from_files`), the
CG flow and the backmapper learned together from the AA energy alone; export, CG run and report
follow as in :mod:`openmm_backmap.demo`. Figures that compare with MD frames are measured against
what the data-free path has instead (the project's reference basin populations, the model's own CG
samples, the minimised structure), and the report says which; the two that need MD frames (energy
W1, mapping entropy) are printed as not available, with the reason.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from openmm_backmap.demo import _Stages, basin_lines, compile_cg_force, run_cg_simulation
from openmm_backmap.sampling.annealing import AnnealSettings
from openmm_backmap.systems.builtin import ALA2_REFERENCE_POPULATIONS
from openmm_backmap.training.joint import JointTraining


@dataclass(frozen=True)
class DataFreeSettings:
    """Sizes of ``demo --data-free`` (``full`` and ``quick``).

    ``joint`` is the ``train-joint`` run: ``full`` uses the settings of the best ALA2 run in
    benchmarks/RESULTS.md (six-bead mapping, 600 K -> 300 K, short final stage) with the ordinary
    demo's CG flow size (4 coupling layers of 32 hidden units: the CG run evaluates it every step),
    and cycles on annealed pairs (20 levels), which keep the flow's own alpha_L population where
    plain cycles shrink it.
    The report draws ``model_samples`` joint samples for the sample ESS/N and basin populations,
    and measures the conditional ESS with ``conditional_samples`` reconstructions at each of
    ``eval_frames`` of the model's own CG samples (the data-free path has no MD frames). Then
    ``annealed_samples`` more joint samples are annealed to exp(-U_AA / kT) (``anneal_levels``
    levels, ``anneal_leapfrog`` HMC steps each; :func:`~openmm_backmap.training.joint.annealed_draws`)
    for the same figures with AIS weights (0: not run). The CG run adds a flow move
    (:class:`~openmm_backmap.openmm.flow_moves.CGFlowMoves`, an independent draw of the exported CG
    flow, Metropolis-tested) every ``flow_move_interval`` steps (0: plain Langevin dynamics), so that
    it visits alpha_L, which its dynamics do not reach from C7eq in a few nanoseconds.
    """

    joint: JointTraining
    cg_steps: int  # with the compiled CG force
    cg_steps_torchscript: int
    compile_cg: bool
    report_interval: int
    samples_per_frame: int
    model_samples: int
    eval_frames: int
    conditional_samples: int
    annealed_samples: int = 0
    anneal_levels: int = 20
    anneal_leapfrog: int = 5
    flow_move_interval: int = 0

    @classmethod
    def full(cls) -> DataFreeSettings:
        return cls(
            joint=JointTraining(
                t_start=600.0,
                patience=3,
                check_every=20,
                steps=1500,
                final_steps=400,
                batch_size=128,
                eval_batch=256,
                layers=4,
                hidden=64,
                cg_layers=4,
                cg_hidden=32,
                lr=1e-3,
                n_final=4096,
                time_limit=1500.0,
                refine_steps=8000,
                cycles=8,
                cycle_samples=5000,
                cycle_per_frame=1,
                cycle_anneal_levels=20,
            ),
            cg_steps=500_000,
            cg_steps_torchscript=40_000,
            compile_cg=True,
            report_interval=100,
            samples_per_frame=4,
            model_samples=20_000,
            eval_frames=200,
            conditional_samples=64,
            annealed_samples=8_000,
            anneal_levels=120,
            anneal_leapfrog=5,
            flow_move_interval=100,
        )

    @classmethod
    def quick(cls) -> DataFreeSettings:
        return cls(
            joint=JointTraining(
                t_start=450.0,
                patience=2,
                check_every=10,
                steps=120,
                final_steps=20,
                batch_size=64,
                eval_batch=128,
                layers=2,
                hidden=32,
                cg_layers=2,
                cg_hidden=16,
                lr=1e-3,
                n_final=512,
                time_limit=120.0,
                refine_steps=10,
                refine_frames=64,
                cycles=1,
                cycle_samples=100,
                cycle_per_frame=2,
            ),
            cg_steps=2_000,
            cg_steps_torchscript=2_000,
            compile_cg=False,
            report_interval=100,
            samples_per_frame=4,
            model_samples=2_000,
            eval_frames=20,
            conditional_samples=16,
            annealed_samples=500,
            anneal_levels=4,
            anneal_leapfrog=3,
            flow_move_interval=100,
        )


# ----------------------------------------------------------------------------- demo --data-free
def _population_row(ind: np.ndarray, weights: np.ndarray, reference: float, boot: np.ndarray) -> dict:
    """Raw and reweighted population of one basin among samples with self-normalised ``weights``,
    a bootstrap error (``boot``: resampled index rows) and dF = -ln(p / p_ref) in kT."""
    p = float(weights[ind].sum())
    pb = [weights[b][ind[b]].sum() / weights[b].sum() for b in boot]
    return {
        "reference": reference,
        "raw": float(ind.mean()),
        "reweighted": p,
        "reweighted_error": float(np.std(pb)),
        "delta_f_kT": float(-np.log(p / reference)) if p > 0 else float("nan"),
    }


def joint_model_figures(
    checkpoint: str | Path,
    backmapper: str | Path,
    x_min: np.ndarray,
    n_samples: int,
    eval_frames: int,
    conditional_samples: int,
    seed: int,
    annealed_samples: int = 0,
    anneal: Any = None,
) -> dict:
    """The data-free report's figures of a joint model, from its own samples (no MD frames).

    Parameters
    ----------
    checkpoint
        The ``train-joint`` checkpoint (the joint model q(X) q(x | X) and its AA System).
    backmapper
        Its exported backmapper model file (the conditional ESS is measured on it).
    x_min
        The minimised AA structure (n_aa, 3) nm: the bond lengths the bond score compares with.
    n_samples
        Joint samples for the sample ESS/N (Kish, of log w = -U_AA / kT - log q(X) - log q(x | X))
        and the basin populations, raw and reweighted with 200 bootstrap resamples, against
        :data:`ALA2_REFERENCE_POPULATIONS`.
    eval_frames, conditional_samples
        The conditional ESS: ``conditional_samples`` reconstructions by the model file at each of the
        first ``eval_frames`` CG samples X ~ q(X), weighted by exp(-U_AA / kT - log q(x | X)).
    annealed_samples, anneal
        Joint samples annealed to exp(-U_AA / kT) with the
        :class:`~openmm_backmap.sampling.annealing.AnnealSettings` ``anneal``: their ESS/N and
        AIS-reweighted basin populations under ``annealed`` (0 samples: none).
    """
    import mdtraj as md
    import torch

    from openmm_backmap.analysis.basins import backbone_dihedrals, basin_indicators
    from openmm_backmap.analysis.metrics import bond_score, clash_score
    from openmm_backmap.analysis.reweighting import conditional_ess, kish_ess, normalized_weights
    from openmm_backmap.io.backmap_model import load_model
    from openmm_backmap.io.checkpoints import load_joint_checkpoint
    from openmm_backmap.openmm.energies import aa_energy
    from openmm_backmap.training.joint import annealed_draws, draw
    from openmm_backmap.units import kT

    start = time.perf_counter()
    model, ckpt = load_joint_checkpoint(checkpoint)
    temperature = float(ckpt["spec"]["temperature"])
    energy = aa_energy(ckpt["spec"]["backmapper"]["system_xml"])
    torch.manual_seed(seed)
    s = draw(model, energy, n_samples)
    lw = -s["u"] / kT(temperature) - s["log_qX"] - s["log_qx"]
    lw = np.where(np.isfinite(lw), lw, -np.inf)
    weights = normalized_weights(lw)
    bm = load_model(backmapper, device="cpu")
    top = bm.topology
    phi, psi = backbone_dihedrals(md.Trajectory(s["x"].astype(np.float32), top))
    basins = basin_indicators(phi[:, 0], psi[:, 0])
    boot = np.random.default_rng(seed).integers(0, n_samples, size=(200, n_samples))
    pops = {k: _population_row(v, weights, ALA2_REFERENCE_POPULATIONS[k], boot) for k, v in basins.items()}
    annealed = None
    if annealed_samples:
        t0 = time.perf_counter()
        a = annealed_draws(model, energy, int(annealed_samples), temperature, anneal, seed)
        w_a = normalized_weights(a["log_w"])
        phi_a, psi_a = backbone_dihedrals(md.Trajectory(a["x"].astype(np.float32), top))
        boot_a = np.random.default_rng(seed).integers(0, len(w_a), size=(200, len(w_a)))
        annealed = {
            "samples": int(annealed_samples),
            "levels": anneal.levels,
            "leapfrog": anneal.leapfrog,
            "acceptance": a["stats"]["acceptance"],
            "ess_fraction": float(kish_ess(a["log_w"]) / len(w_a)),
            "plain_ess_fraction": float(kish_ess(a["plain_log_w"]) / len(w_a)),
            "basins": {
                k: _population_row(v, w_a, ALA2_REFERENCE_POPULATIONS[k], boot_a)
                for k, v in basin_indicators(phi_a[:, 0], psi_a[:, 0]).items()
            },
            "seconds": time.perf_counter() - t0,
        }
    frames = min(int(eval_frames), n_samples)
    aa, log_q = bm.sample(s["X"][:frames].astype(np.float32), int(conditional_samples), seed=seed)
    with torch.no_grad():
        u_aa = energy(torch.as_tensor(aa, dtype=torch.float64)).double().numpy()
    u_aa = np.where(np.isfinite(u_aa), u_aa, np.inf).reshape(frames, -1)
    training = ckpt["spec"]["training"].get("reverse_kl", {})
    return {
        "samples": int(n_samples),
        "ess_fraction": float(kish_ess(lw) / n_samples),
        "finite_weight_fraction": float(np.isfinite(lw).mean()),
        "basins": pops,
        "bond_score": bond_score(s["x"], top, reference=np.asarray(x_min, dtype=np.float64)[None]),
        "clash_score_percent": clash_score(s["x"], top),
        "conditional_ess": conditional_ess(u_aa, log_q.astype(np.float64).reshape(frames, -1), temperature),
        "conditional_frames": frames,
        "conditional_samples": int(conditional_samples),
        "annealed": annealed,
        "training": {
            k: training.get(k)
            for k in ("final_T", "reached_target", "steps", "wall_seconds", "cpu_seconds", "final_ess_per_n")
        },
        "seconds": time.perf_counter() - start,
    }


def _check_joint_checkpoint(path: str | Path, topology) -> None:
    """Refuse a joint checkpoint that is not ``train-joint``'s, or not of alanine dipeptide's atoms."""
    from openmm_backmap.io.checkpoints import read_checkpoint
    from openmm_backmap.io.pdb import topology_from_pdb
    from openmm_backmap.mapping import as_mdtraj_topology

    spec = read_checkpoint(path)["spec"]
    if spec.get("kind") != "joint":
        raise ValueError(f"--joint-checkpoint {path} is not a joint checkpoint (openmm-backmap train-joint)")
    theirs = [a.element.symbol for a in as_mdtraj_topology(topology_from_pdb(spec["backmapper"]["topology_pdb"])).atoms]
    ours = [a.element.symbol for a in as_mdtraj_topology(topology).atoms]
    if theirs != ours:
        raise ValueError(
            f"--joint-checkpoint {path} is a model of another molecule ({len(theirs)} atoms); the demo's "
            f"system is alanine dipeptide ({len(ours)} atoms)"
        )


def run_data_free_demo(
    out: Path,
    quick: bool = False,
    seed: int = 1,
    joint_checkpoint: str | Path | None = None,
    settings: DataFreeSettings | None = None,
) -> int:
    """``demo --data-free``: the demo without MD data; returns the process exit code.

    1. the AA system of alanine dipeptide (openmmtools' vacuum System) and its minimised structure;
    2. the six-bead mapping (or the mapping of ``joint_checkpoint``);
    3. ``train-joint``: the CG flow and the backmapper trained together by reverse KL against
       exp(-U_AA / kT) with adaptive tempering (skipped with ``joint_checkpoint``, which is checked
       and copied);
    4. export (``backmapper.pt`` and ``cg.pt``) and compile the CG force, as the ordinary demo;
    5. the CG run with the BackmapReporter, as the ordinary demo;
    6. the report: :func:`joint_model_figures` on the joint model's own samples, and the CG run
       reweighted; basin populations against :data:`ALA2_REFERENCE_POPULATIONS`.
    """
    import shutil

    import mdtraj as md
    import openmm
    from openmm import app, unit

    from openmm_backmap.analysis.evaluate import evaluate_run
    from openmm_backmap.io.checkpoints import export_checkpoint, read_checkpoint
    from openmm_backmap.mapping import CGMapping
    from openmm_backmap.systems.builtin import ala2_six_bead_mapping, builtin_system
    from openmm_backmap.training.joint import minimise, train_joint_from_files

    if settings is not None and not isinstance(settings, DataFreeSettings):
        raise ValueError("the data-free demo takes DataFreeSettings")
    if settings is None:
        settings = DataFreeSettings.quick() if quick else DataFreeSettings.full()
    topology, system, positions = builtin_system("ala2")
    if joint_checkpoint is not None:
        _check_joint_checkpoint(joint_checkpoint, topology)  # before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    models = out / "models"
    models.mkdir(exist_ok=True)
    report = out / "report"
    report.mkdir(exist_ok=True)
    stages = _Stages()
    system_dir = out / "system"

    def system_stage():
        x0 = np.asarray(positions.value_in_unit(unit.nanometer), dtype=np.float64)
        x_min, u_min = minimise(system, x0)
        system_dir.mkdir(exist_ok=True)
        with open(system_dir / "ala2.pdb", "w") as fh:
            app.PDBFile.writeFile(topology, x_min * unit.nanometer, fh, keepIds=True)
        (system_dir / "ala2_system.xml").write_text(openmm.XmlSerializer.serialize(system))
        return x_min, (
            f"alanine dipeptide in vacuum, {system.getNumParticles()} atoms, minimised U = {u_min:.1f} kJ/mol "
            f"-> {system_dir / 'ala2.pdb'}, {system_dir / 'ala2_system.xml'}; no MD"
        )

    x_min = stages.run("1. the all-atom system (no reference MD)", system_stage)
    top = md.load(str(system_dir / "ala2.pdb")).topology

    def mapping_stage():
        if joint_checkpoint is None:
            mapping = ala2_six_bead_mapping(top)
        else:
            mapping = CGMapping.from_dict(read_checkpoint(joint_checkpoint)["spec"]["backmapper"]["mapping"], top)
        mapping.to_json(out / "mapping.json")
        return mapping, f"{mapping.n_cg} beads ({', '.join(mapping.names)}) -> {out / 'mapping.json'}"

    mapping = stages.run("2. CG mapping", mapping_stage)

    def train_joint():
        ckpt = models / "joint.ckpt"
        if joint_checkpoint is not None:
            shutil.copyfile(joint_checkpoint, ckpt)
            return None, f"given checkpoint {joint_checkpoint} -> {ckpt} (not trained here)"
        summary = train_joint_from_files(
            system_dir / "ala2.pdb",
            system_dir / "ala2_system.xml",
            str(out / "mapping.json"),
            ckpt,
            replace(settings.joint, seed=seed),
        )
        reached = "reached" if summary["reached_target"] else "did NOT reach"
        j = settings.joint
        stages_at_target = (
            f"; then {j.refine_steps} backmapper steps and {j.cycles} cycles at the target" if j.cycles else ""
        )
        return None, (
            f"{reached} {settings.joint.temperature:g} K in {summary['steps']} steps{stages_at_target}; "
            f"ESS/N {summary['final']['ess_per_n']:.3f} of {settings.joint.n_final} samples; checkpoint {ckpt}"
        )

    stages.run("3. train-joint: CG potential and backmapper from the AA energy alone", train_joint)

    def export():
        export_checkpoint(models / "joint.ckpt", models / "backmapper.pt", models / "cg.pt")
        return compile_cg_force(models, mapping.n_cg, settings.compile_cg)

    cg_force = stages.run("4. export the model files, compile the CG force", export)

    def simulate():
        steps = settings.cg_steps if cg_force.suffix == ".pt2" else settings.cg_steps_torchscript
        run = run_cg_simulation(
            cg_force,
            models / "backmapper.pt",
            mapping,
            mapping.project(x_min),
            out / "cg_run",
            steps,
            settings.report_interval,
            settings.samples_per_frame,
            seed,
            flow_moves=(models / "cg.pt", settings.flow_move_interval) if settings.flow_move_interval else None,
        )
        return run, run.describe(steps, cg_force.name)

    cg_run = stages.run("5. CG simulation with the BackmapReporter", simulate)

    def evaluate():
        model = joint_model_figures(
            models / "joint.ckpt",
            models / "backmapper.pt",
            x_min,
            settings.model_samples,
            settings.eval_frames,
            settings.conditional_samples,
            seed,
            settings.annealed_samples,
            AnnealSettings(levels=settings.anneal_levels, leapfrog=settings.anneal_leapfrog),
        )
        # evaluate_run compares with a reference trajectory's basins; there is none here, so the
        # run's own frames stand in for it and the project's reference populations replace that column
        aa_dcd = out / "cg_run" / "aa.dcd"
        run = evaluate_run(aa_dcd, out / "cg_run" / "weights.csv", top, md.load(str(aa_dcd), top=top))
        for name, b in run["basins"].items():
            ref = ALA2_REFERENCE_POPULATIONS[name]
            p = b["reweighted"]
            b.update(reference=ref, delta_f_kT=float(-np.log(p / ref)) if p > 0 else float("nan"))
        summary = {
            "data_free": True,
            "reference_populations": dict(ALA2_REFERENCE_POPULATIONS),
            "joint_model": model,
            "reweighting": run,
            "cg_run": {
                "flow_move_interval": settings.flow_move_interval or None,
                "flow_moves": cg_run.flow_moves,
                "flow_acceptance": cg_run.flow_acceptance,
            },
            "energy_w1_kjmol": None,
            "mapping_entropy": None,
            "not_available": dict(NOT_AVAILABLE),
        }
        (report / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        (report / "reweighting.json").write_text(json.dumps(run, indent=1) + "\n")
        pops = "; ".join(
            f"{k} {v['reference']:.3f}/{v['raw']:.3f}/{v['reweighted']:.3f}" for k, v in run["basins"].items()
        )
        note = (
            f"bond score {model['bond_score']:.4f}, W1 n/a, conditional ESS {model['conditional_ess']:.2f}; "
            f"sample ESS/N {model['ess_fraction']:.3f}; run ESS/N {run['ess_fraction']:.2f}; "
            f"basins reference/raw/reweighted: {pops}"
        )
        return summary, note

    summary = stages.run("6. report", evaluate)
    text = "\n".join([stages.table(), "", *data_free_report_lines(summary, mapping.n_cg)])
    (out / "summary.txt").write_text(text + "\n")
    print("\n" + text)
    print(f"\noutputs in {out.resolve()} (report in {report.resolve()})")
    return 0


# what the data-free report cannot measure, and why
NOT_AVAILABLE = {
    "energy_w1": "compares the energies of backmapped frames with those of reference MD frames; the data-free "
    "demo runs no MD",
    "mapping_entropy": "its estimators need unbiased AA frames (MD) to average over; the data-free demo has none",
}


def data_free_report_lines(summary: dict, n_cg: int) -> list[str]:
    """The closing lines of the data-free demo: what each figure is measured on and compared with."""
    model, run = summary["joint_model"], summary["reweighting"]
    tr = model["training"]
    lines = []
    if tr.get("steps") is not None:
        lines.append(
            f"train-joint: {'reached' if tr['reached_target'] else 'did NOT reach'} the target (final T "
            f"{tr['final_T']:.1f} K) in {tr['steps']} steps, {tr['wall_seconds']:.0f} s wall"
        )
    lines += [
        f"joint model, {model['samples']} samples x ~ q(X) q(x | X): sample ESS/N {model['ess_fraction']:.3f}; "
        f"bond score {model['bond_score']:.4f} (bond lengths within 10 % of the minimised structure's), clash score "
        f"{model['clash_score_percent']:.2f} %; conditional ESS {model['conditional_ess']:.2f} ("
        f"{model['conditional_samples']} reconstructions at each of {model['conditional_frames']} CG samples of the "
        "model, not of MD)",
        "basin populations of the joint model's samples (reference | raw | reweighted +- bootstrap error | dF in kT)",
    ]
    lines += basin_lines(model["basins"])
    a = model.get("annealed")
    if a:
        lines.append(
            f"the same with {a['samples']} samples annealed to exp(-U_AA / kT) ({a['levels']} levels x {a['leapfrog']} "
            f"HMC steps, acceptance {np.mean(a['acceptance']):.2f}): ESS/N {a['ess_fraction']:.3f} (their plain "
            f"importance weights: {a['plain_ess_fraction']:.3f}); basin populations (reference | annealed, "
            "unweighted | AIS-reweighted +- bootstrap error | dF in kT)"
        )
        lines += basin_lines(a["basins"])
    moves = summary.get("cg_run", {})
    how = (
        f"Langevin dynamics with a flow move every {moves['flow_move_interval']} steps ({moves['flow_moves']} moves, "
        f"{100 * moves['flow_acceptance']:.0f} % accepted), "
        if moves.get("flow_moves")
        else "Langevin dynamics, "
    )
    lines.append(
        f"basin populations of the CG run ({how}{run['n_samples']} AA frames), run ESS/N {run['ess_fraction']:.2f} "
        "(reference | raw reconstructions | reweighted +- block error | dF in kT)"
    )
    lines += basin_lines(run["basins"])
    lines += [
        "reference populations: C7eq, C5, alpha_R from 240 ns of MD, alpha_L from umbrella sampling "
        "(benchmarks/RESULTS.md); no MD runs in this demo",
        f"energy W1: not available ({NOT_AVAILABLE['energy_w1']})",
        f"mapping entropy of the {n_cg}-bead mapping: not available ({NOT_AVAILABLE['mapping_entropy']})",
    ]
    return lines
