"""The main job, ``openmm-backmap demo``: from nothing to a report, in one output directory.

1. all-atom reference MD of alanine dipeptide in vacuum (300 K);
2. the six-bead CG mapping C(ACE), N, CA, CB, C, N(NME), written as a groups JSON;
3. the backmapper trained with the CLI (maximum likelihood, then energy-based refinement);
4. the CG potential U_CG = -kT log q(X) trained with the CLI;
5. both exported as TorchScript model files, and the CG potential compiled into a force package
   (``openmm-backmap compile``; the TorchScript file is used if compilation is not possible here);
6. a CG OpenMM simulation with the CG potential as a force and a BackmapReporter attached;
7. the report: backmapper metrics on the reference, and the reporter's run reweighted to the AA
   ensemble (basin populations against the reference, ESS, Ramachandran surfaces).

Each stage prints its wall time; a summary table closes the run. The CLI stages run the very
commands a user would type (``openmm-backmap train ...``), through :func:`openmm_backmap.cli.main`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

# The six-bead alanine dipeptide mapping of the quality benchmarks: C(ACE), N, CA, CB, C, N(NME)
# (in residue order, so the CG topology's residues are contiguous).
ALA2_SIX_BEADS = ("ACE1-C", "ALA2-N", "ALA2-CA", "ALA2-CB", "ALA2-C", "NME3-N")
ALA2_SIX_NAMES = ("C1", "N", "CA", "CB", "C", "N2")


def ala2_six_bead_mapping(topology):
    """The six-atom slice mapping of alanine dipeptide used by the demo and the benchmarks."""
    from openmm_backmap.mapping import CGMapping, atom_label

    by_label = {atom_label(a): a.index for a in topology.atoms}
    missing = [lab for lab in ALA2_SIX_BEADS if lab not in by_label]
    if missing:
        raise ValueError(f"the topology lacks the atoms {missing} of the six-bead ALA2 mapping")
    groups = [[by_label[lab]] for lab in ALA2_SIX_BEADS]
    return CGMapping(topology, groups, names=list(ALA2_SIX_NAMES))


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo's stages; ``full`` fits in about 10 minutes on 2 CPU cores, ``quick`` in 3.

    The CG potential is a small flow (4 coupling layers of 32 hidden units) because every CG step
    evaluates it and its gradient once: its cost per step, not the reporter, sets the CG run's speed.
    ``full`` compiles it (about 1.5 minutes), which makes a step ~60x cheaper and pays for a 12x longer
    CG run; ``quick`` runs the TorchScript file.
    ``rare_basin_ns`` of MD restrained to alpha_R and to alpha_L join the training data of both
    models: unbiased vacuum MD visits those basins a few times in 10,000. The backmapper's p(x | X) is
    unbiased by them (the restrained atoms are beads). The CG potential becomes a broadened proposal
    that visits the rare basins: the reweighting is exact for any CG potential, and its estimate of
    a basin's population is only as good as the CG run's visits there.
    """

    reference_ns: float
    rare_basin_ns: float
    epochs: int
    energy_steps: int
    layers: int
    hidden: int
    cg_epochs: int
    cg_time_limit: float
    cg_layers: int
    cg_hidden: int
    cg_steps: int  # with the compiled CG force
    cg_steps_torchscript: int  # when the CG force could not be compiled (~50x slower per step)
    compile_cg: bool
    report_interval: int
    samples_per_frame: int
    eval_frames: int

    @classmethod
    def full(cls) -> "DemoSettings":
        return cls(5.0, 0.5, 8, 500, 6, 128, 60, 90.0, 4, 32, 500_000, 40_000, True, 500, 4, 200)

    @classmethod
    def quick(cls) -> "DemoSettings":
        return cls(1.0, 0.05, 2, 60, 4, 64, 10, 20.0, 4, 32, 2_000, 2_000, False, 100, 4, 40)


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


def _cli(*argv: str) -> None:
    from openmm_backmap.cli import main

    print("   $ openmm-backmap " + " ".join(argv), flush=True)
    code = main(list(argv))
    if code != 0:
        raise RuntimeError(f"`openmm-backmap {argv[0]}` failed with exit code {code}")


def run_cg_simulation(cg_model: Path, model: Path, mapping, start_xyz, out: Path, steps: int, interval: int,
                      samples: int, seed: int, temperature: float = 300.0, timestep_fs: float = 1.0,
                      friction_per_ps: float = 10.0):
    """A plain OpenMM CG simulation with the CG potential as a force and a BackmapReporter.

    1 fs steps and a 10/ps friction: the learned CG bonds are as stiff as the covalent bonds they
    stand for, and the learned surface stiffens further off the data; at 2 fs and 1/ps Langevin
    dynamics slowly heats it until the molecule comes apart (benchmarks/RESULTS.md). The friction
    changes the dynamics, not the sampled ensemble exp(-U_CG/kT).
    """
    import openmm
    from openmm import app, unit
    from tqdm.auto import tqdm

    from openmm_backmap.openmm.forces import create_cg_system
    from openmm_backmap.openmm.reporter import BackmapReporter

    import torch

    out.mkdir(parents=True, exist_ok=True)
    # a CG force evaluates a small model on a few beads per step: one torch thread is fastest, and
    # a second thread only spins (measured: 2 threads on 2 busy cores made steps several times slower)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    system = create_cg_system(mapping.masses(), str(cg_model))
    integrator = openmm.LangevinMiddleIntegrator(temperature * unit.kelvin, friction_per_ps / unit.picosecond,
                                                 timestep_fs * unit.femtoseconds)
    integrator.setRandomNumberSeed(seed)
    simulation = app.Simulation(mapping.cg_topology.to_openmm(), system, integrator,
                                openmm.Platform.getPlatformByName("Reference"))
    simulation.context.setPositions(start_xyz)
    simulation.context.setVelocitiesToTemperature(temperature * unit.kelvin, seed)
    simulation.reporters.append(app.DCDReporter(str(out / "cg.dcd"), interval))
    simulation.reporters.append(app.StateDataReporter(str(out / "cg_log.csv"), interval, step=True,
                                                      potentialEnergy=True, temperature=True, speed=True))
    reporter = BackmapReporter(out / "aa.dcd", interval, model=str(model), samplesPerFrame=samples,
                               energyFile=out / "weights.csv", seed=seed)
    simulation.reporters.append(reporter)
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
    return time.perf_counter() - start, reporter.frames_written


def run_demo(out: Path, quick: bool = False, seed: int = 1) -> int:
    """Run every stage of the demo into ``out``; returns the process exit code."""
    import numpy as np

    from openmm_backmap.systems.builtin import generate_reference, load_trajectory
    from openmm_backmap.analysis.evaluate import evaluate_model, evaluate_run

    settings = DemoSettings.quick() if quick else DemoSettings.full()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    models = out / "models"
    models.mkdir(exist_ok=True)
    report = out / "report"
    stages = _Stages()

    def reference():
        p = generate_reference("ala2", settings.reference_ns, out / "reference", seed=seed)
        rare = [generate_reference("ala2", settings.rare_basin_ns, out / f"reference_{basin}", seed=seed,
                                   restrain=basin, equilibrate_ps=5.0)["dcd"] for basin in ("alpha_R", "alpha_L")]
        return (p, rare), (f"{settings.reference_ns:g} ns of alanine dipeptide at 300 K -> {p['dcd']}; "
                           f"{settings.rare_basin_ns:g} ns restrained to each of alpha_R, alpha_L")

    paths, rare_dcds = stages.run("1. all-atom reference MD", reference)
    traj = load_trajectory(paths["dcd"], paths["pdb"])

    def mapping_stage():
        mapping = ala2_six_bead_mapping(traj.topology)
        mapping.to_json(out / "mapping.json")
        return mapping, f"{mapping.n_cg} beads ({', '.join(mapping.names)}) -> {out / 'mapping.json'}"

    mapping = stages.run("2. CG mapping", mapping_stage)
    # --trajectory last: the backmapper's training adds the restrained runs after it
    common = ["--topology", str(paths["pdb"]), "--mapping", str(out / "mapping.json"),
              "--trajectory", str(paths["dcd"])]

    def train_backmapper():
        _cli("train", *common, *map(str, rare_dcds), "--aa-system", str(paths["system"]),
             "--epochs", str(settings.epochs),
             "--energy-steps", str(settings.energy_steps), "--layers", str(settings.layers),
             "--hidden", str(settings.hidden), "--seed", str(seed), "--out", str(models / "backmapper.ckpt"))
        return None, f"checkpoint {models / 'backmapper.ckpt'}"

    stages.run("3. train the backmapper (ML + energy refinement)", train_backmapper)

    def train_cg():
        _cli("train-cg", *common, *map(str, rare_dcds), "--allow-restrained", "--epochs", str(settings.cg_epochs),
             "--time-limit", str(settings.cg_time_limit),
             "--layers", str(settings.cg_layers), "--hidden", str(settings.cg_hidden), "--seed", str(seed),
             "--out", str(models / "cg.ckpt"))
        return None, f"checkpoint {models / 'cg.ckpt'}"

    stages.run("4. train the CG potential", train_cg)

    def export():
        _cli("export", str(models / "backmapper.ckpt"), "-o", str(models / "backmapper.pt"))
        _cli("export", str(models / "cg.ckpt"), "-o", str(models / "cg.pt"))
        if not settings.compile_cg:
            return models / "cg.pt", f"{models / 'backmapper.pt'}, {models / 'cg.pt'}"
        try:
            _cli("compile", str(models / "cg.pt"), "-o", str(models / "cg.pt2"))
        except Exception as error:  # noqa: BLE001 - any failure: the TorchScript file still runs
            print(f"   could not compile the CG force ({error}); the CG run uses the TorchScript file", flush=True)
            return models / "cg.pt", f"{models / 'backmapper.pt'}, {models / 'cg.pt'} (not compiled)"
        return models / "cg.pt2", f"{models / 'backmapper.pt'}, {models / 'cg.pt'}, compiled {models / 'cg.pt2'}"

    cg_force = stages.run("5. export the model files, compile the CG force", export)

    def simulate():
        start_xyz = mapping.project(traj.xyz[0].astype(np.float64))
        steps = settings.cg_steps if cg_force.suffix == ".pt2" else settings.cg_steps_torchscript
        wall, frames = run_cg_simulation(cg_force, models / "backmapper.pt", mapping, start_xyz,
                                         out / "cg_run", steps, settings.report_interval,
                                         settings.samples_per_frame, seed)
        us = 1e6 * wall / steps
        return None, f"{steps} CG steps with {cg_force.name} ({us:.0f} us/step with the reporter), {frames} AA frames"

    stages.run("6. CG simulation with the BackmapReporter", simulate)

    def evaluate():
        metrics = evaluate_model(models / "backmapper.pt", traj, report / "backmapper", n_frames=settings.eval_frames)
        run = evaluate_run(out / "cg_run" / "aa.dcd", out / "cg_run" / "weights.csv", traj.topology, traj, report)
        summary = {"backmapper": metrics, "reweighting": run}
        (report / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        pops = "; ".join(f"{k} {v['reference']:.3f}/{v['raw']:.3f}/{v['reweighted']:.3f}"
                         for k, v in run["basins"].items())
        w1 = metrics.get("energy_w1_kjmol", float("nan"))
        ess = metrics.get("conditional_ess", float("nan"))
        note = (f"bond score {metrics['bond_score']:.4f}, W1 {w1:.2f} kJ/mol, conditional ESS {ess:.2f}; "
                f"run ESS/N {run['ess_fraction']:.2f}; basins reference/raw/reweighted: {pops}")
        return summary, note

    summary = stages.run("7. report", evaluate)
    table = stages.table()
    lines = [table, "", "basin populations (AA reference | raw reconstructions | reweighted +- error | dF in kT)"]
    for name, b in summary["reweighting"]["basins"].items():
        lines.append(f"  {name:<8} {b['reference']:.4f} | {b['raw']:.4f} | {b['reweighted']:.4f} +- "
                     f"{b['reweighted_error']:.4f} | {b['delta_f_kT']:+.2f}")
    text = "\n".join(lines)
    (out / "summary.txt").write_text(text + "\n")
    print("\n" + text)
    print(f"\noutputs in {out.resolve()} (report in {report.resolve()})")
    return 0
