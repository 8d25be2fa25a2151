"""Speed of backmappers: samples per second of ``sample`` and ``log_prob``.

ALA2 (six-atom mapping C(ACE), N, CA, CB, C, N(NME)) and the 10-residue peptide chignolin (``ca``
mapping), batch 1 and 1024, eager and TorchScript, float32, no gradients. Speed does not depend on
the trained weights, so the models are built (default architecture: 6 coupling layers, 128 hidden
units, 8 bins) with statistics from jittered copies of the built-in structures.

Usage::

    python benchmarks/bench_backmapper.py [--threads 1] [--hidden 128] [--layers 6] [--seconds 3] [--compiled]

``--compiled`` adds a row at batch 1024 for the exported module compiled by inductor
(:class:`openmm_backmap.io.model_files.CompiledBackmapper`, what ``BackmapModel.compile`` and
``openmm-backmap backmap --compile`` use); compiling takes a minute or two per system.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import mdtraj as md
import numpy as np
import torch

from openmm_backmap.io.backmap_model import CompiledBackmapper
from openmm_backmap.mapping import CGMapping
from openmm_backmap.models.backmapper import Backmapper
from openmm_backmap.openmm.energies import constraints_from_system
from openmm_backmap.systems.builtin import ala2_six_bead_mapping, builtin_system


def build(name: str, hidden: int, layers: int) -> tuple[Backmapper, torch.Tensor]:
    top, system, positions = builtin_system(name)
    mtop = md.Topology.from_openmm(top)
    from openmm import unit

    x0 = np.asarray(positions.value_in_unit(unit.nanometer), dtype=np.float64)
    rng = np.random.default_rng(0)
    x = x0[None] + 0.005 * rng.normal(size=(256,) + x0.shape)
    mapping = ala2_six_bead_mapping(mtop) if name == "ala2" else CGMapping.from_preset(mtop, "ca")
    torch.manual_seed(0)
    model = Backmapper.from_data(
        mapping, x, constraints=constraints_from_system(system), hidden=hidden, n_layers=layers
    ).eval()
    return model, torch.as_tensor(x, dtype=torch.float32)


def rate(fn, n_items: int, seconds: float) -> tuple[float, float]:
    """(items per wall-clock second, items per CPU second of this process).

    On a shared machine the CPU-time rate is the one to compare: it does not count the time the
    process waited for a core (with one torch thread it is the rate of an idle core).
    """
    fn()  # warm-up (TorchScript profiles the first calls)
    fn()
    count, t0, c0 = 0, time.perf_counter(), time.process_time()
    while True:
        fn()
        count += 1
        dt = time.perf_counter() - t0
        if dt > seconds and count >= 3:
            return count * n_items / dt, count * n_items / (time.process_time() - c0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--seconds", type=float, default=3.0, help="timing window per measurement")
    p.add_argument("--systems", default="ala2,chignolin")
    p.add_argument("--compiled", action="store_true", help="also time the inductor-compiled module at batch 1024")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.1f}"
    )
    print(
        "| system | atoms | beads | DOF | params | batch | mode | sample/s wall | sample/s CPU "
        "| log_prob/s wall | log_prob/s CPU |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.systems.split(","):
        model, x = build(name, args.hidden, args.layers)
        scripted = torch.jit.script(model)
        n_params = sum(q.numel() for q in model.parameters())
        for batch in (1, 1024):
            xb = x[torch.arange(batch) % x.shape[0]]
            X = model.project(xb)
            modes = [("eager", model), ("TorchScript", scripted)]
            if args.compiled and batch == 1024:
                modes.append(("compiled", CompiledBackmapper(scripted, batch, model.n_cg, model.n_aa)))
            for mode, m in modes:
                with torch.no_grad():
                    s = rate(lambda: m.sample(X, 1), batch, args.seconds)
                    lp = rate(lambda: m.log_prob(xb, X), batch, args.seconds)
                print(
                    f"| {name} | {model.n_aa} | {model.n_cg} | {model.dim} | {n_params} | {batch} | {mode} "
                    f"| {s[0]:,.0f} | {s[1]:,.0f} | {lp[0]:,.0f} | {lp[1]:,.0f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
