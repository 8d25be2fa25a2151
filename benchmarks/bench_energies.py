"""AA energy evaluation: batched torch energy against a per-sample OpenMM Context loop.

    python benchmarks/bench_energies.py [--system ala2] [--batch 1024] [--repeats 5]

Prints samples/s of energies (and energies + forces) for both, and the speed-up. The frames are
alanine-dipeptide geometries jittered around the built-in structure (the cost does not depend on
which geometries are evaluated).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from openmm_backmap.openmm.energies import OpenMMBridgeEnergy, TorchSystemEnergy
from openmm_backmap.systems.builtin import builtin_system


def _rate(fn, n_samples: int, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n_samples / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", default="ala2", choices=["ala2"])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    _, system, positions = builtin_system(args.system)
    x0 = np.array(positions.value_in_unit(positions.unit))
    x = x0[None] + np.random.default_rng(0).normal(scale=0.005, size=(args.batch,) + x0.shape)
    torch_energy = TorchSystemEnergy(system)
    bridge = OpenMMBridgeEnergy(system, platform="Reference")
    xt32 = torch.tensor(x, dtype=torch.float32)
    xt64 = torch.tensor(x, dtype=torch.float64)

    def torch_forces(xt):
        xt = xt.clone().requires_grad_(True)
        torch.autograd.grad(torch_energy(xt).sum(), xt)

    with torch.no_grad():
        rates = {
            "torch float32, energies": _rate(lambda: torch_energy(xt32), args.batch, args.repeats),
            "torch float64, energies": _rate(lambda: torch_energy(xt64), args.batch, args.repeats),
        }
    rates["torch float32, energies + forces"] = _rate(lambda: torch_forces(xt32), args.batch, args.repeats)
    loop = _rate(lambda: bridge.evaluate(x), args.batch, max(1, args.repeats // 2))
    rates["OpenMM Reference Context loop, energies + forces"] = loop

    cpu = platform.processor() or platform.machine()
    print(f"# {args.system}, batch {args.batch}, torch threads {args.threads}, {cpu}")
    print(f"{'method':<52} {'samples/s':>12} {'vs loop':>8}")
    for name, rate in rates.items():
        print(f"{name:<52} {rate:12.0f} {rate / loop:8.1f}x")


if __name__ == "__main__":
    main()
