"""AA energy evaluation: batched torch energy against a per-sample OpenMM Context loop.

    python benchmarks/bench_energies.py [--system ala2 chignolin peptide20] [--batch 64 256]
                                        [--repeats 3] [--threads 1] [--clock wall|cpu]

Prints samples/s and residues/s of energies (and energies + forces) for the torch energy in
float32 and float64 and for OpenMM Context loops (Reference and CPU platforms) over the same
frames, and the speed-up over the Reference loop. Systems: ``ala2`` (alanine dipeptide in vacuum,
22 atoms), ``chignolin`` (10 residues, 138 atoms, amber14 + GBn2 implicit solvent) and
``peptide20`` (chignolin extended by ten residues with PDBFixer, 306 atoms, amber14 + GBn2). The
frames are the built structure jittered by 0.005 nm (the cost does not depend on the geometry).
``--clock cpu`` times with the process CPU clock, which is steadier than the wall clock on a
machine shared with other jobs.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from openmm_backmap.openmm.energies import OpenMMBridgeEnergy, TorchSystemEnergy
from openmm_backmap.systems.builtin import DATA_DIR, builtin_system

# the ten residues appended to chignolin for ``peptide20``
EXTENSION = ["ALA", "LYS", "GLU", "LEU", "SER", "ARG", "VAL", "ASN", "PHE", "GLN"]


def peptide20():
    """(topology, System, positions) of chignolin extended by :data:`EXTENSION`, amber14 + GBn2."""
    from openmm import app
    from pdbfixer import PDBFixer

    fixer = PDBFixer(filename=str(DATA_DIR / "chignolin.pdb"))
    fixer.missingResidues = {(0, 10): list(EXTENSION)}  # built by PDBFixer after residue 10
    fixer.findMissingAtoms()
    fixer.addMissingAtoms()
    fixer.addMissingHydrogens(7.0)
    ff = app.ForceField("amber14-all.xml", "implicit/gbn2.xml")
    system = ff.createSystem(fixer.topology, nonbondedMethod=app.NoCutoff, constraints=app.HBonds)
    return fixer.topology, system, fixer.positions


def load(name: str):
    return peptide20() if name == "peptide20" else builtin_system(name)


def _rate(fn, n_samples: int, repeats: int, clock) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return n_samples / best


def bench(name: str, batch: int, repeats: int, clock) -> tuple[int, int, dict[str, float]]:
    """(atoms, residues, {method: samples/s}) for one system and batch size."""
    topology, system, positions = load(name)
    x0 = np.array(positions.value_in_unit(positions.unit))
    x = x0[None] + np.random.default_rng(0).normal(scale=0.005, size=(batch,) + x0.shape)
    torch_energy = TorchSystemEnergy(system)

    def torch_forces(xt):
        xt = xt.clone().requires_grad_(True)
        torch.autograd.grad(torch_energy(xt).sum(), xt)

    rates = {}
    for dtype, label in ((torch.float32, "float32"), (torch.float64, "float64")):
        xt = torch.tensor(x, dtype=dtype)
        with torch.no_grad():
            rates[f"torch {label}, energies"] = _rate(lambda: torch_energy(xt), batch, repeats, clock)
        rates[f"torch {label}, energies + forces"] = _rate(lambda: torch_forces(xt), batch, repeats, clock)
    for platform_name in ("Reference", "CPU"):
        loop = OpenMMBridgeEnergy(system, platform=platform_name)
        rates[f"OpenMM {platform_name} Context loop, energies + forces"] = _rate(
            lambda: loop.evaluate(x), batch, max(1, repeats // 2), clock
        )
    return topology.getNumAtoms(), topology.getNumResidues(), rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", nargs="+", default=["ala2"], choices=["ala2", "chignolin", "peptide20"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OPENMM_CPU_THREADS"] = str(args.threads)  # read by OpenMM's CPU platform
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    cpu = platform.processor() or platform.machine()
    print(f"# torch threads {args.threads}, OpenMM CPU threads {args.threads}, {args.clock} clock, {cpu}")
    for name in args.system:
        for batch in args.batch:
            atoms, residues, rates = bench(name, batch, args.repeats, clock)
            loop = rates["OpenMM Reference Context loop, energies + forces"]
            print(f"\n## {name}: {atoms} atoms, {residues} residues, batch {batch}")
            print(f"{'method':<52} {'samples/s':>10} {'residues/s':>11} {'vs Reference loop':>18}")
            for method, rate in rates.items():
                print(f"{method:<52} {rate:10.1f} {rate * residues:11.0f} {rate / loop:17.1f}x", flush=True)


if __name__ == "__main__":
    main()
