"""BackmapReporter cost: its fixed cost per report, CG steps/s with and without it, reporter frames/s,
batched AA energies.

    python benchmarks/bench_reporter.py --model demo/models/backmapper.pt --cg-model demo/models/cg.pt \
        --mapping demo/mapping.json --topology demo/reference/ala2.pdb [--steps 20000]

Without ``--cg-model`` the CG System is harmonic bonds between the beads (at their lengths in the
topology's first frame), a stand-in for a cheap classical CG force field; ``--fixed-only`` runs
section 0 alone.

0. Fixed cost per report: a reporter every step drawing 1 sample with its energy file, timed over
   many steps minus the same steps without it (process CPU time and wall clock, median of repeats),
   with the backmapper's ``sample`` call replayed (a precomputed sample), so what is left is the
   reporter's own work: reading the state, checks, the AA energy, writing the frame and the row.
   The flow's own ``sample`` call is timed alone on the same frame.
1. CG steps/s of the CG System (the CG potential as a force) without a reporter and with a
   BackmapReporter every 1000 steps drawing 1 sample (with its energy file), and the overhead.
2. Reporter frames/s alone (report() called directly on one CG state) at 1, 16 and 256 samples per
   frame, energy file on: sampling, AA energies, writing.
3. AA energies of reconstructions: the batched torch energy against a loop over one OpenMM Context.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import mdtraj as md
import numpy as np
import openmm
import torch
from openmm import app, unit

from openmm_backmap.io.backmap_model import load_model
from openmm_backmap.mapping import CGMapping
from openmm_backmap.openmm.energies import OpenMMBridgeEnergy, aa_energy
from openmm_backmap.openmm.forces import create_cg_system
from openmm_backmap.openmm.reporter import BackmapReporter


def _harmonic_cg_system(mapping, x0):
    """Harmonic bonds between bonded beads at their lengths in x0: a cheap classical CG System."""
    X = mapping.project(x0)
    system = openmm.System()
    for m in mapping.masses():
        system.addParticle(float(m))
    bonds = openmm.HarmonicBondForce()
    for i, j in mapping.cg_bonds():
        bonds.addBond(i, j, float(np.linalg.norm(X[i] - X[j])), 5.0e4)
    system.addForce(bonds)
    return system


def _simulation(args, mapping, x0):
    if args.cg_model:
        system = create_cg_system(mapping.masses(), args.cg_model)
    else:
        system = _harmonic_cg_system(mapping, x0)
    integ = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, 2 * unit.femtoseconds)
    integ.setRandomNumberSeed(1)
    sim = app.Simulation(mapping.cg_topology.to_openmm(), system, integ, openmm.Platform.getPlatformByName("Reference"))
    sim.context.setPositions(mapping.project(x0))
    sim.context.setVelocitiesToTemperature(300 * unit.kelvin, 1)
    return sim


def _steps_per_second(sim, steps: int) -> float:
    sim.step(50)
    start = time.process_time()
    sim.step(steps)
    return steps / (time.process_time() - start)


class _Replay(torch.nn.Module):
    """Stands in for a backmapper module: ``sample`` returns one precomputed sample at no cost, so the
    time left in a report is the reporter's own."""

    def __init__(self, sample: tuple[torch.Tensor, torch.Tensor]) -> None:
        super().__init__()
        self.out = sample

    def sample(self, cg: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.out


def fixed_cost(args, mapping, x0, tmp: Path, steps: int = 500, repeats: int = 7) -> None:
    """Section 0: the reporter's fixed cost per report at one sample (energy file on), with the
    flow's sample call replayed, and the flow's sample call timed alone."""
    model = load_model(args.model, device="cpu")
    X = torch.as_tensor(mapping.project(x0), dtype=torch.float32)[None]
    with torch.no_grad():
        for _ in range(10):
            model.module.sample(X, 1)
        flow = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(50):
                model.module.sample(X, 1)
            flow.append((time.perf_counter() - start) / 50)
        model.module = _Replay(model.module.sample(X, 1))
    sim = _simulation(args, mapping, x0)
    sim.step(10)
    bare = [_per_step(sim, steps) for _ in range(repeats)]
    reporter = BackmapReporter(tmp / "fixed.dcd", 1, model=model, samplesPerFrame=1, energyFile=tmp / "fixed.csv")
    sim.reporters.append(reporter)
    sim.step(10)
    with_reporter = [_per_step(sim, steps) for _ in range(repeats)]
    reporter.close()
    wall = np.array([w for w, _ in with_reporter]) - min(w for w, _ in bare)
    cpu = np.array([c for _, c in with_reporter]) - min(c for _, c in bare)
    print(
        f"fixed cost per report (1 sample, energy file on; the flow's sample call replayed), median of {repeats} x "
        f"{steps} reports: CPU time {1e3 * np.median(cpu):.3f} ms (best {1e3 * cpu.min():.3f}), wall clock "
        f"{1e3 * np.median(wall):.3f} ms (best {1e3 * wall.min():.3f}); the flow's own sample call "
        f"{1e3 * np.median(flow):.3f} ms wall"
    )


def _per_step(sim, steps: int) -> tuple[float, float]:
    """(wall, process CPU) seconds per step over ``steps`` steps."""
    wall, cpu = time.perf_counter(), time.process_time()
    sim.step(steps)
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--cg-model", help="CG potential model file (default: harmonic bonds between the beads)")
    parser.add_argument("--mapping", help="mapping (default: the model's own)")
    parser.add_argument("--topology", required=True)
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--fixed-only", action="store_true", help="only the fixed cost per report (section 0)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    aa = md.load(args.topology)
    if args.mapping:
        mapping = CGMapping.from_spec(args.mapping, aa.topology)
    else:
        mapping = CGMapping.from_dict(load_model(args.model, device="cpu").mapping.to_dict(), aa.topology)
    x0 = aa.xyz[0].astype(np.float64)
    tmp = Path(tempfile.mkdtemp())
    print(f"# {platform.machine()} {platform.processor()}, torch threads 1, CPU time (process) per figure")
    fixed_cost(args, mapping, x0, tmp)
    if args.fixed_only:
        return

    plain = _steps_per_second(_simulation(args, mapping, x0), args.steps)
    sim = _simulation(args, mapping, x0)
    reporter = BackmapReporter(tmp / "aa.dcd", 1000, model=args.model, samplesPerFrame=1, energyFile=tmp / "w.csv")
    sim.reporters.append(reporter)
    with_reporter = _steps_per_second(sim, args.steps)
    reporter.close()
    print(
        f"CG steps/s without reporter {plain:.1f}, with reporter (every 1000 steps, 1 sample) {with_reporter:.1f}, "
        f"overhead {100 * (plain / with_reporter - 1):.2f} %"
    )

    state = sim.context.getState(getPositions=True, getEnergy=True)
    for n in (1, 16, 256):
        rep = BackmapReporter(
            tmp / f"aa{n}.dcd", 1000, model=args.model, samplesPerFrame=n, energyFile=tmp / f"w{n}.csv"
        )
        rep.report(sim, state)  # opens the files
        reps = max(3, 256 // n)
        start = time.process_time()
        for _ in range(reps):
            rep.report(sim, state)
        dt = (time.process_time() - start) / reps
        rep.close()
        print(f"reporter alone, {n:4d} samples/frame: {1 / dt:8.1f} frames/s ({n / dt:9.1f} AA samples/s)")

    model = load_model(args.model, device="cpu")
    X = mapping.project(x0)[None].astype(np.float32)
    samples, _ = model.sample(X, 1024)
    samples = samples.astype(np.float64)
    energy = aa_energy(model.system_xml)
    bridge = OpenMMBridgeEnergy(model.system_xml)
    start = time.process_time()
    bridge.evaluate(samples)
    loop = len(samples) / (time.process_time() - start)
    for dtype in (torch.float64, torch.float32):
        xt = torch.as_tensor(samples, dtype=dtype)
        with torch.no_grad():
            energy(xt)
            start = time.process_time()
            for _ in range(5):
                energy(xt)
            batched = 5 * len(samples) / (time.process_time() - start)
        print(
            f"AA energies of 1024 reconstructions: batched torch ({str(dtype)[6:]}) {batched:.0f} samples/s, "
            f"OpenMM Context loop {loop:.0f} samples/s, speed-up {batched / loop:.1f}x"
        )


if __name__ == "__main__":
    main()
