"""Hybrid CG-to-AA sampling against plain AA Langevin MD: effective samples per CPU second.

    python benchmarks/bench_hybrid.py --model demo/models/backmapper.pt --cg-model demo/models/cg.pt \
        --start demo/reference/ala2.pdb [--seconds 120]

Both chains sample alanine dipeptide in vacuum at 300 K for about the same CPU time. For each,
the statistical inefficiency g of the C7eq basin indicator and of cos(phi), cos(psi) is estimated
from the chain (pymbar's timeseries), and the effective samples per CPU second, N / g / CPU time,
are compared. Plain MD: LangevinMiddle, 2 fs, 1/ps, Reference platform, one sample per 0.1 ps.
Hybrid: per iteration ``--langevin-steps`` AA steps, then one resolution move (independent CG
flow draw + backmapping + Metropolis-Hastings). Batched hybrid: ``--chains`` chains advanced
together (``BatchedHybridSampler``, ``--batched-langevin-steps`` AA steps per chain and iteration);
g is estimated jointly over the chains (pymbar's statistical_inefficiency_multiple) after dropping
the first 10% of iterations, whose CPU time still counts.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

import mdtraj as md
import numpy as np
import openmm
import torch
from openmm import app, unit

from openmm_backmap.analysis.basins import backbone_dihedrals, backbone_torsions, basin_indicators
from openmm_backmap.io.backmap_model import load_model
from openmm_backmap.io.model_files import load_cg_potential
from openmm_backmap.openmm.energies import aa_energy, load_system
from openmm_backmap.sampling.hybrid import BatchedHybridSampler, HybridRun, run_hybrid


def inefficiency(series: np.ndarray) -> float:
    with contextlib.redirect_stdout(io.StringIO()):
        from pymbar import timeseries

    series = np.asarray(series, dtype=float)
    if np.std(series) == 0:
        return float("nan")
    return float(timeseries.statistical_inefficiency(series))


def observables(traj: md.Trajectory) -> dict[str, np.ndarray]:
    phi, psi = backbone_dihedrals(traj)
    return {
        "C7eq": basin_indicators(phi[:, 0], psi[:, 0])["C7eq"].astype(float),
        "cos_phi": np.cos(np.radians(phi[:, 0])),
        "cos_psi": np.cos(np.radians(psi[:, 0])),
    }


def plain_md(system, pdb, seconds: float, out: Path) -> tuple[md.Trajectory, float]:
    integ = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, 2 * unit.femtoseconds)
    integ.setRandomNumberSeed(1)
    sim = app.Simulation(pdb.topology, system, integ, openmm.Platform.getPlatformByName("Reference"))
    sim.context.setPositions(pdb.positions)
    sim.context.setVelocitiesToTemperature(300 * unit.kelvin, 1)
    sim.reporters.append(app.DCDReporter(str(out / "md.dcd"), 50))
    start = time.process_time()
    while time.process_time() - start < seconds:
        sim.step(5000)
    cpu = time.process_time() - start
    del sim
    return md.load(str(out / "md.dcd"), top=md.Topology.from_openmm(pdb.topology)), cpu


def batched_hybrid(model, cg_model: str, system, pdb, chains: int, langevin_steps: int, seconds: float) -> dict:
    cg_module, _ = load_cg_potential(cg_model)
    x0 = np.asarray(pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    top = md.Topology.from_openmm(pdb.topology)
    torsions = np.asarray(backbone_torsions(pdb.topology))[:2]
    start = time.process_time()
    sampler = BatchedHybridSampler(
        model,
        cg_module,
        model.mapping,
        aa_energy(system),
        x0,
        chains,
        300.0,
        langevin_steps=langevin_steps,
        system=system,
        seed=4,
    )
    angles = []
    while time.process_time() - start < seconds:
        sampler.step()
        angles.append(md.compute_dihedrals(md.Trajectory(sampler.x.astype(np.float32), top), torsions))
    cpu = time.process_time() - start
    ang = np.degrees(np.stack(angles, 1))  # (chains, iterations, 2)
    ang = ang[:, len(angles) // 10 :]
    phi, psi = ang[..., 0], ang[..., 1]
    obs = {
        "C7eq": basin_indicators(phi, psi)["C7eq"].astype(float),
        "cos_phi": np.cos(np.radians(phi)),
        "cos_psi": np.cos(np.radians(psi)),
    }
    with contextlib.redirect_stdout(io.StringIO()):
        from pymbar import timeseries
    row = {"samples": int(phi.size), "cpu_s": cpu, "iterations": len(angles), "acceptance": sampler.acceptance_rate}
    for key, series in obs.items():
        g = float(timeseries.statistical_inefficiency_multiple(list(series)))
        row[key] = {"mean": float(series.mean()), "g": g, "eff_per_cpu_s": phi.size / g / cpu}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--cg-model", required=True)
    parser.add_argument("--start", required=True)
    parser.add_argument("--seconds", type=float, default=120.0, help="CPU seconds per chain")
    parser.add_argument("--langevin-steps", type=int, default=50)
    parser.add_argument("--chains", type=int, default=256, help="chains of the batched hybrid sampler")
    parser.add_argument("--batched-langevin-steps", type=int, default=0, help="AA steps per chain and iteration")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(tempfile.mkdtemp())
    model = load_model(args.model, device="cpu")
    system = load_system(model.system_xml)
    pdb = app.PDBFile(args.start)

    md_traj, md_cpu = plain_md(system, pdb, args.seconds, out)
    # calibrate the hybrid's iterations to the same CPU budget with a short run
    start = time.process_time()
    run_hybrid(
        model,
        args.cg_model,
        args.start,
        out / "probe",
        HybridRun(20, langevin_steps=args.langevin_steps, seed=2, progress=False),
    )
    per_iter = (time.process_time() - start) / 20
    n_iter = max(100, int(args.seconds / per_iter))
    start = time.process_time()
    summary = run_hybrid(
        model,
        args.cg_model,
        args.start,
        out / "hybrid",
        HybridRun(n_iter, langevin_steps=args.langevin_steps, seed=3, progress=False),
    )
    hy_cpu = time.process_time() - start
    hy_traj = md.load(str(out / "hybrid" / "trajectory.dcd"), top=md.Topology.from_openmm(pdb.topology))

    rows = {}
    for name, (traj, cpu) in {"plain AA MD": (md_traj, md_cpu), "hybrid": (hy_traj, hy_cpu)}.items():
        obs = observables(traj)
        rows[name] = {"samples": traj.n_frames, "cpu_s": cpu}
        for key, series in obs.items():
            g = inefficiency(series)
            rows[name][key] = {"mean": float(series.mean()), "g": g, "eff_per_cpu_s": traj.n_frames / g / cpu}
    batched = f"hybrid x{args.chains}"
    rows[batched] = batched_hybrid(
        model, args.cg_model, system, pdb, args.chains, args.batched_langevin_steps, args.seconds
    )
    print(
        f"# hybrid: {n_iter} iterations of {args.langevin_steps} AA steps + 1 resolution move, "
        f"acceptance {summary['acceptance_rate']:.3f}"
    )
    print(
        f"# {batched}: {rows[batched]['iterations']} iterations of {args.batched_langevin_steps} AA steps + 1 "
        f"resolution move per chain, acceptance {rows[batched]['acceptance']:.3f}"
    )
    print(f"{'chain':<14} {'obs':<8} {'mean':>8} {'g':>9} {'eff/CPU s':>10}")
    for name, row in rows.items():
        for key in ("C7eq", "cos_phi", "cos_psi"):
            r = row[key]
            print(f"{name:<14} {key:<8} {r['mean']:8.3f} {r['g']:9.1f} {r['eff_per_cpu_s']:10.2f}")
    for name in ("hybrid", batched):
        for key in ("C7eq", "cos_phi", "cos_psi"):
            ratio = rows[name][key]["eff_per_cpu_s"] / rows["plain AA MD"][key]["eff_per_cpu_s"]
            print(f"{name}: speed-up in effective samples per CPU second, {key}: {ratio:.1f}x")
    print(json.dumps({"acceptance": summary["acceptance_rate"], "rows": rows}, default=float))


if __name__ == "__main__":
    main()
