"""BackmapReporter cost: CG steps/s with and without it, reporter frames/s, batched AA energies.

    python benchmarks/bench_reporter.py --model demo/models/backmapper.pt --cg-model demo/models/cg.pt \
        --mapping demo/mapping.json --topology demo/reference/ala2.pdb [--steps 20000]

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


def _simulation(args, mapping, x0):
    system = create_cg_system(mapping.masses(), args.cg_model)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--cg-model", required=True)
    parser.add_argument("--mapping", required=True)
    parser.add_argument("--topology", required=True)
    parser.add_argument("--steps", type=int, default=20000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    aa = md.load(args.topology)
    mapping = CGMapping.from_spec(args.mapping, aa.topology)
    x0 = aa.xyz[0].astype(np.float64)
    tmp = Path(tempfile.mkdtemp())
    print(f"# {platform.machine()} {platform.processor()}, torch threads 1, CPU time (process) per figure")

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
