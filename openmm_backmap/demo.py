"""The main job, ``openmm-backmap demo``: from nothing to a report, in one output directory.

1. all-atom reference MD of alanine dipeptide in vacuum (300 K);
2. the six-bead CG mapping C(ACE), N, CA, CB, C, N(NME), written as a groups JSON;
3. the backmapper trained (maximum likelihood, then energy-based refinement);
4. the CG potential U_CG = -kT log q(X) trained;
5. both exported as TorchScript model files, and the CG potential compiled into a force package
   (the TorchScript file is used if compilation is not possible here);
6. a CG OpenMM simulation with the CG potential as a force and a BackmapReporter attached;
7. the report: backmapper metrics on the reference, and the reporter's run reweighted to the AA
   ensemble (basin populations against the reference, ESS, Ramachandran surfaces).

Each stage prints its wall time; a summary table closes the run. The stages call the library
functions the command line runs (``openmm-backmap train`` is
:func:`~openmm_backmap.training.pipeline.train_from_files`, and so on), with the settings below.

``demo --data-free`` runs no MD: :mod:`openmm_backmap.demo_data_free`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from openmm_backmap.training.config import BackmapperTraining, CGPotentialTraining


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo's stages (``full``, and ``quick`` for a smoke run; their times on 2 CPU
    cores are in benchmarks/RESULTS.md).

    The CG potential is a small flow (4 coupling layers of 32 hidden units) because every CG step
    evaluates it and its gradient once: its cost per step, not the reporter, sets the CG run's speed.
    ``full`` compiles it, which makes a step many times cheaper and pays for a longer CG run;
    ``quick`` runs the TorchScript file.
    ``rare_basin_ns`` of MD restrained to alpha_R and to alpha_L join the training data of both
    models: unbiased vacuum MD visits those basins a few times in 10,000. The backmapper's p(x | X) is
    unbiased by them (the restrained atoms are beads). The CG potential becomes a broadened proposal
    that visits the rare basins: the reweighting is exact for any CG potential, and its estimate of
    a basin's population is only as good as the CG run's visits there.
    """

    reference_ns: float
    rare_basin_ns: float
    backmapper: BackmapperTraining
    cg: CGPotentialTraining
    cg_steps: int  # with the compiled CG force
    cg_steps_torchscript: int  # when the CG force could not be compiled (much slower per step)
    compile_cg: bool
    report_interval: int
    samples_per_frame: int
    eval_frames: int
    entropy_samples: int  # K, samples of q per validation frame for the mapping entropy

    @classmethod
    def full(cls) -> DemoSettings:
        return cls(
            reference_ns=5.0,
            rare_basin_ns=0.5,
            backmapper=BackmapperTraining(epochs=8, energy_steps=500, layers=6, hidden=128),
            cg=CGPotentialTraining(epochs=60, time_limit=90.0, layers=4, hidden=32, allow_restrained=True),
            cg_steps=500_000,
            cg_steps_torchscript=40_000,
            compile_cg=True,
            report_interval=500,
            samples_per_frame=4,
            eval_frames=200,
            entropy_samples=64,
        )

    @classmethod
    def quick(cls) -> DemoSettings:
        return cls(
            reference_ns=1.0,
            rare_basin_ns=0.05,
            backmapper=BackmapperTraining(epochs=2, energy_steps=60, layers=4, hidden=64),
            cg=CGPotentialTraining(epochs=10, time_limit=20.0, layers=4, hidden=32, allow_restrained=True),
            cg_steps=2_000,
            cg_steps_torchscript=2_000,
            compile_cg=False,
            report_interval=100,
            samples_per_frame=4,
            eval_frames=40,
            entropy_samples=16,
        )


class _Stages:
    """Runs named stages, timing each, and collects a summary table."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, str]] = []

    def run(self, name: str, fn):
        print(f"\n== {name}", flush=True)
        start = time.perf_counter()
        result, note = fn()
        self.rows.append((name, time.perf_counter() - start, note))
        print(f"   {note} ({self.rows[-1][1]:.0f} s)", flush=True)
        return result

    def table(self) -> str:
        width = max(len(r[0]) for r in self.rows)
        lines = [f"{'stage':<{width}}  {'seconds':>8}  result", "-" * (width + 50)]
        lines += [f"{n:<{width}}  {s:8.1f}  {note}" for n, s, note in self.rows]
        lines.append(f"{'total':<{width}}  {sum(r[1] for r in self.rows):8.1f}")
        return "\n".join(lines)


@dataclass(frozen=True)
class CGRun:
    """What :func:`run_cg_simulation` did: wall time (s), AA frames written, flow moves made and the
    fraction accepted (None without flow moves)."""

    wall: float
    frames: int
    flow_moves: int | None = None
    flow_acceptance: float | None = None

    def describe(self, steps: int, force: str) -> str:
        us = 1e6 * self.wall / steps
        text = f"{steps} CG steps with {force} ({us:.0f} us/step with the reporter), {self.frames} AA frames"
        if self.flow_moves is not None:
            text += f", {self.flow_moves} flow moves ({100 * self.flow_acceptance:.0f}% accepted)"
        return text


def run_cg_simulation(
    cg_model: Path,
    model: Path,
    mapping,
    start_xyz,
    out: Path,
    steps: int,
    interval: int,
    samples: int,
    seed: int,
    temperature: float = 300.0,
    timestep_fs: float = 1.0,
    friction_per_ps: float = 10.0,
    flow_moves: tuple[Path, int] | None = None,
) -> CGRun:
    """An OpenMM CG simulation with the CG potential as a force and a BackmapReporter.

    1 fs steps and a 10/ps friction: the learned CG bonds are as stiff as the covalent bonds they
    stand for, and the learned surface stiffens further off the data; at 2 fs and 1/ps Langevin
    dynamics slowly heats it until the molecule comes apart (benchmarks/RESULTS.md). The friction
    changes the dynamics, not the sampled ensemble exp(-U_CG/kT).

    ``flow_moves=(cg.pt, interval)`` adds :class:`~openmm_backmap.openmm.flow_moves.CGFlowMoves`:
    every ``interval`` steps an independent draw of the CG flow in ``cg.pt`` is proposed (Metropolis,
    exact for the force the run integrates), so the run crosses the barriers that Langevin dynamics
    does not cross in its length.
    """
    import openmm
    import torch
    from openmm import app, unit
    from tqdm.auto import tqdm

    from openmm_backmap.openmm.forces import create_cg_system
    from openmm_backmap.openmm.reporter import BackmapReporter

    out.mkdir(parents=True, exist_ok=True)
    # a CG force evaluates a small model on a few beads per step: one torch thread is fastest, and
    # a second thread only spins (measured: 2 threads on 2 busy cores made steps several times slower)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    system = create_cg_system(mapping.masses(), str(cg_model))
    integrator = openmm.LangevinMiddleIntegrator(
        temperature * unit.kelvin, friction_per_ps / unit.picosecond, timestep_fs * unit.femtoseconds
    )
    integrator.setRandomNumberSeed(seed)
    simulation = app.Simulation(
        mapping.cg_topology.to_openmm(), system, integrator, openmm.Platform.getPlatformByName("Reference")
    )
    simulation.context.setPositions(start_xyz)
    simulation.context.setVelocitiesToTemperature(temperature * unit.kelvin, seed)
    simulation.reporters.append(app.DCDReporter(str(out / "cg.dcd"), interval))
    simulation.reporters.append(
        app.StateDataReporter(
            str(out / "cg_log.csv"), interval, step=True, potentialEnergy=True, temperature=True, speed=True
        )
    )
    reporter = BackmapReporter(
        out / "aa.dcd", interval, model=str(model), samplesPerFrame=samples, energyFile=out / "weights.csv", seed=seed
    )
    simulation.reporters.append(reporter)
    moves = None
    if flow_moves is not None:
        from openmm_backmap.openmm.flow_moves import CGFlowMoves

        moves = CGFlowMoves(str(flow_moves[0]), int(flow_moves[1]), seed=seed + 1)
        simulation.reporters.append(moves)
    chunk = max(interval, steps // 100)
    start = time.perf_counter()
    with reporter, tqdm(total=steps, desc="CG simulation", unit="step", unit_scale=True) as bar:
        done = 0
        while done < steps:
            n = min(chunk, steps - done)
            simulation.step(n)
            done += n
            bar.update(n)
    torch.set_num_threads(threads)
    return CGRun(
        time.perf_counter() - start,
        reporter.frames_written,
        None if moves is None else moves.nProposed,
        None if moves is None else moves.acceptanceRate,
    )


def compile_cg_force(models: Path, n_cg: int, compile_cg: bool) -> tuple[Path, str]:
    """The CG force file the CG run uses: ``models/cg.pt`` compiled to ``models/cg.pt2`` when
    ``compile_cg`` (the TorchScript file when compilation fails here); returns (path, stage note)."""
    from openmm_backmap.openmm.compiled import compile_model

    files = f"{models / 'backmapper.pt'}, {models / 'cg.pt'}"
    if not compile_cg:
        return models / "cg.pt", files
    try:
        meta = compile_model(models / "cg.pt", n_cg, models / "cg.pt2")
    except Exception as error:  # noqa: BLE001 - any failure: the TorchScript file still runs
        print(f"   could not compile the CG force ({error}); the CG run uses the TorchScript file", flush=True)
        return models / "cg.pt", f"{files} (not compiled)"
    print(
        f"   compiled the CG force in {meta['compile_seconds']:.0f} s, largest relative deviation from the "
        f"model {meta['max_deviation']:.1e}",
        flush=True,
    )
    return models / "cg.pt2", f"{files}, compiled {models / 'cg.pt2'}"


def validation_frames(n_frames: int, val_fraction: float, seed: int):
    """Frame indices of one trajectory that the backmapper's training held out for validation
    (the same contiguous blocks :func:`~openmm_backmap.training.pipeline.split_frames` draws)."""
    from openmm_backmap.training.pipeline import split_frames

    return split_frames([n_frames], val_fraction, seed)[1]


def _entropy_figures(result: dict) -> dict:
    """The mapping-entropy figures the demo's summary keeps (the full result is in entropy.json)."""
    return {
        "n_frames": result["n_frames"],
        "samples": result["samples_per_frame"],
        "cross_entropy": result["cross_entropy"]["value"],
        "cross_entropy_error": result["cross_entropy"]["error"],
        "energy_route": result["energy_route"]["value"],
        "energy_route_error": result["energy_route"]["error"],
        "s_map": result["energy_fluctuation"]["value"],
        "s_map_error": result["energy_fluctuation"]["error"],
        "conditional_ess": result["conditional_ess"]["value"],
    }


def run_demo(out: Path, quick: bool = False, seed: int = 1, settings: DemoSettings | None = None) -> int:
    """Run every stage of the demo into ``out``; returns the process exit code. ``settings``
    replaces the ``full``/``quick`` sizes. The data-free demo is
    :func:`~openmm_backmap.demo_data_free.run_data_free_demo`.

    Raises
    ------
    ValueError
        For settings of the data-free demo.
    """
    if settings is not None and not isinstance(settings, DemoSettings):
        raise ValueError("the ordinary demo takes DemoSettings")

    from openmm_backmap.analysis.entropy import report_mapping_entropy
    from openmm_backmap.analysis.evaluate import evaluate_model, evaluate_run
    from openmm_backmap.io.checkpoints import export_checkpoint
    from openmm_backmap.io.trajectories import load_trajectory
    from openmm_backmap.systems.builtin import ala2_six_bead_mapping
    from openmm_backmap.systems.reference import generate_reference
    from openmm_backmap.training.pipeline import train_cg_from_files, train_from_files

    if settings is None:
        settings = DemoSettings.quick() if quick else DemoSettings.full()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    models = out / "models"
    models.mkdir(exist_ok=True)
    report = out / "report"
    stages = _Stages()

    def reference():
        p = generate_reference("ala2", settings.reference_ns, out / "reference", seed=seed)
        rare = [
            generate_reference(
                "ala2",
                settings.rare_basin_ns,
                out / f"reference_{basin}",
                seed=seed,
                restrain=basin,
                equilibrate_ps=5.0,
            )["dcd"]
            for basin in ("alpha_R", "alpha_L")
        ]
        return (p, rare), (
            f"{settings.reference_ns:g} ns of alanine dipeptide at 300 K -> {p['dcd']}; "
            f"{settings.rare_basin_ns:g} ns restrained to each of alpha_R, alpha_L"
        )

    paths, rare_dcds = stages.run("1. all-atom reference MD", reference)
    traj = load_trajectory(paths["dcd"], paths["pdb"])

    def mapping_stage():
        mapping = ala2_six_bead_mapping(traj.topology)
        mapping.to_json(out / "mapping.json")
        return mapping, f"{mapping.n_cg} beads ({', '.join(mapping.names)}) -> {out / 'mapping.json'}"

    mapping = stages.run("2. CG mapping", mapping_stage)
    topology, mapping_file = str(paths["pdb"]), str(out / "mapping.json")
    # the unrestrained run first, then the restrained ones
    trajectories = [str(paths["dcd"]), *map(str, rare_dcds)]

    def train_backmapper():
        train_from_files(
            topology,
            trajectories,
            mapping_file,
            models / "backmapper.ckpt",
            replace(settings.backmapper, seed=seed),
            aa_system=str(paths["system"]),
        )
        return None, f"checkpoint {models / 'backmapper.ckpt'}"

    stages.run("3. train the backmapper (ML + energy refinement)", train_backmapper)

    def train_cg():
        train_cg_from_files(topology, trajectories, mapping_file, models / "cg.ckpt", replace(settings.cg, seed=seed))
        return None, f"checkpoint {models / 'cg.ckpt'}"

    stages.run("4. train the CG potential", train_cg)

    def export():
        export_checkpoint(models / "backmapper.ckpt", models / "backmapper.pt")
        export_checkpoint(models / "cg.ckpt", models / "cg.pt")
        return compile_cg_force(models, mapping.n_cg, settings.compile_cg)

    cg_force = stages.run("5. export the model files, compile the CG force", export)

    def simulate():
        start_xyz = mapping.project(traj.xyz[0].astype(np.float64))
        steps = settings.cg_steps if cg_force.suffix == ".pt2" else settings.cg_steps_torchscript
        run = run_cg_simulation(
            cg_force,
            models / "backmapper.pt",
            mapping,
            start_xyz,
            out / "cg_run",
            steps,
            settings.report_interval,
            settings.samples_per_frame,
            seed,
        )
        return None, run.describe(steps, cg_force.name)

    stages.run("6. CG simulation with the BackmapReporter", simulate)

    def evaluate():
        metrics = evaluate_model(models / "backmapper.pt", traj, report / "backmapper", n_frames=settings.eval_frames)
        run = evaluate_run(out / "cg_run" / "aa.dcd", out / "cg_run" / "weights.csv", traj.topology, traj, report)
        # the mapping entropy on the unrestrained run's validation blocks (frames the fit never saw)
        val = validation_frames(traj.n_frames, settings.backmapper.val_fraction, seed)
        entropy, entropy_line = report_mapping_entropy(
            models / "backmapper.pt", traj[val], report / "entropy", samples=settings.entropy_samples, seed=seed
        )
        print(f"   mapping entropy: {entropy_line}", flush=True)
        summary = {"backmapper": metrics, "reweighting": run, "mapping_entropy": _entropy_figures(entropy)}
        (report / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        pops = "; ".join(
            f"{k} {v['reference']:.3f}/{v['raw']:.3f}/{v['reweighted']:.3f}" for k, v in run["basins"].items()
        )
        w1 = metrics.get("energy_w1_kjmol", float("nan"))
        ess = metrics.get("conditional_ess", float("nan"))
        note = (
            f"bond score {metrics['bond_score']:.4f}, W1 {w1:.2f} kJ/mol, conditional ESS {ess:.2f}; "
            f"run ESS/N {run['ess_fraction']:.2f}; basins reference/raw/reweighted: {pops}"
        )
        return summary, note

    summary = stages.run("7. report", evaluate)
    table = stages.table()
    lines = [table, "", "basin populations (AA reference | raw reconstructions | reweighted +- error | dF in kT)"]
    lines += basin_lines(summary["reweighting"]["basins"])
    h = summary["mapping_entropy"]
    lines.append(
        f"mapping entropy of the {mapping.n_cg}-bead mapping ({h['n_frames']} validation frames, K = {h['samples']}): "
        f"H(x|X) in [{h['energy_route']:.2f} +- {h['energy_route_error']:.2f}, "
        f"{h['cross_entropy']:.2f} +- {h['cross_entropy_error']:.2f}] nats per molecule, "
        f"S_map^(2) {h['s_map']:.2f} +- {h['s_map_error']:.2f} k_B, conditional ESS {h['conditional_ess']:.2f}"
    )
    text = "\n".join(lines)
    (out / "summary.txt").write_text(text + "\n")
    print("\n" + text)
    print(f"\noutputs in {out.resolve()} (report in {report.resolve()})")
    return 0


def basin_lines(basins: dict) -> list[str]:
    """The report's line per basin (reference | raw | reweighted +- error | dF in kT). dF is said to be
    missing, with the reason, where the reference or the reweighted samples have no weight in the basin,
    and an error that could not be estimated (fewer frames than blocks) is n/a."""

    def delta_f(b: dict) -> str:
        if b["reference"] <= 0:
            return "none: the reference has no frame in this basin"
        if b["reweighted"] <= 0:
            return "none: no sample with weight in this basin"
        return f"{b['delta_f_kT']:+.2f}"

    return [
        f"  {name:<8} {b['reference']:.4f} | {b['raw']:.4f} | {b['reweighted']:.4f} +- "
        + (f"{b['reweighted_error']:.4f}" if np.isfinite(b["reweighted_error"]) else "n/a")
        + f" | {delta_f(b)}"
        for name, b in basins.items()
    ]
