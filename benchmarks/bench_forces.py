"""Time CG MD steps with a neural CG potential bound by each force backend.

For each system (a 6-bead alanine-dipeptide-like CG model and a 10-bead CG chain), platform and
backend, it runs Langevin steps and reports us/step and ns/day, next to the same System without the
neural force (harmonic bonds only).  The neural potential is a stand-in MLP on all pair distances
(a few thousand parameters) unless ``--model`` gives a TorchScript file, so the benchmark can be
rerun on a real CG potential::

    python benchmarks/bench_forces.py                         # stand-in MLPs, all backends
    python benchmarks/bench_forces.py --model cg.pt --systems ala2
    python benchmarks/bench_forces.py --torch-threads 1 --steps 5000
    python benchmarks/bench_forces.py --model cg.pt --systems ala2 --compile   # also the .pt2 package

``--compile`` adds rows for the model compiled with :func:`openmm_backmap.openmm.compiled.compile_model`
(energy and forces fused by AOTInductor), run by the native and python backends.  ``--start aa.pdb
--mapping mapping.json`` runs a trained CG model as it is simulated: the beads' masses and the
projected start structure, and no harmonic bonds (the "bonds only" row is then the bare integrator)::

    python benchmarks/bench_forces.py --model demo/models/cg.pt --systems ala2 --compile \
        --start demo/reference/ala2.pdb --mapping demo/mapping.json
"""

from __future__ import annotations

import argparse
import io
import os
import platform as host
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import openmm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from openmm_backmap.io.model_files import load_model_bytes  # noqa: E402
from openmm_backmap.openmm import forces  # noqa: E402
from openmm_backmap.openmm.compiled import compile_model  # noqa: E402
from openmm_backmap.openmm.plugin import native_plugin_status  # noqa: E402

# Masses (Da) and bond lengths (nm) of the two CG systems.  ala2: CH3-C(O)-N(H)-CA-C(O)-N(H)CH3
# lumped into 6 beads along the backbone; chain10: 10 identical beads.
SYSTEMS = {
    "ala2": (np.array([15.0, 28.0, 15.0, 27.0, 28.0, 30.0]), 0.25),
    "chain10": (np.full(10, 50.0), 0.38),
}
TIMESTEP_PS = 0.002


class PairMLP(torch.nn.Module):
    """Stand-in CG potential: an MLP on all pair distances (nm) -> energy (kJ/mol)."""

    def __init__(self, n: int, hidden: int = 48, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        pairs = torch.triu_indices(n, n, 1)
        self.register_buffer("i", pairs[0])
        self.register_buffer("j", pairs[1])
        self.net = torch.nn.Sequential(
            torch.nn.Linear(pairs.shape[1], hidden),
            torch.nn.SiLU(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.SiLU(),
            torch.nn.Linear(hidden, 1),
        )

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        delta = positions[self.i] - positions[self.j]
        d = torch.sqrt(torch.sum(delta * delta, dim=-1))
        return torch.sum(self.net(d))


def stand_in_model(n: int, dtype: torch.dtype) -> tuple[bytes, int]:
    module = PairMLP(n).to(dtype)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue(), sum(p.numel() for p in module.parameters())


def build_system(masses: np.ndarray, bond: float | None, force: openmm.Force | None) -> openmm.System:
    system = openmm.System()
    for mass in masses:
        system.addParticle(float(mass))
    bonds = openmm.HarmonicBondForce()
    if bond is not None:
        for i in range(len(masses) - 1):
            bonds.addBond(i, i + 1, bond, 5000.0)
    system.addForce(bonds)
    if force is not None:
        system.addForce(force)
    return system


def time_steps(
    system: openmm.System,
    platform: str,
    positions: np.ndarray,
    steps: int,
    repeats: int,
    timestep_ps: float = TIMESTEP_PS,
    friction: float = 1.0,
) -> tuple[float, float]:
    """Best (least disturbed) of ``repeats`` timings: wall and process-CPU microseconds per step.

    CPU time counts every thread of this process (OpenMM's and torch's), so it is less sensitive
    than wall time to other jobs on a shared machine, but includes threads that spin while waiting.
    """
    integrator = openmm.LangevinMiddleIntegrator(300.0, friction, timestep_ps)
    integrator.setRandomNumberSeed(1)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName(platform))
    context.setPositions(positions)
    context.setVelocitiesToTemperature(300.0, 1)
    integrator.step(max(100, steps // 20))
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        integrator.step(steps)
        best = min(best, (time.perf_counter() - start) / steps * 1e6)
        best_cpu = min(best_cpu, (time.process_time() - start_cpu) / steps * 1e6)
    energy = context.getState(getEnergy=True).getPotentialEnergy()._value
    if not np.isfinite(energy):
        raise RuntimeError(f"non-finite energy on {platform}")
    return best, best_cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="TorchScript CG potential (.pt); default: stand-in MLP per system")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    parser.add_argument("--platforms", nargs="+", default=["Reference", "CPU"])
    parser.add_argument("--backends", nargs="+", default=None, help="default: every available backend")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="stand-in model dtype")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time the model compiled into a .pt2 force package (native and python backends)",
    )
    parser.add_argument("--timestep-fs", type=float, default=TIMESTEP_PS * 1000, help="default 2")
    parser.add_argument("--friction", type=float, default=1.0, help="Langevin friction, 1/ps (default 1)")
    parser.add_argument(
        "--torchscript-steps",
        type=int,
        default=None,
        help="steps for the rows of the TorchScript model (default --steps)",
    )
    parser.add_argument("--start", help="all-atom PDB whose CG projection starts the runs (needs --mapping)")
    parser.add_argument("--mapping", help="groups JSON of the CG model (with --start)")
    args = parser.parse_args(argv)
    if bool(args.start) != bool(args.mapping) or (args.start and (len(args.systems) != 1 or not args.model)):
        parser.error("--start and --mapping go together, with --model and one system")

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    backends = args.backends or forces.available_backends()
    dtype = getattr(torch, args.dtype)
    print(
        f"# host: {host.processor() or host.machine()}, {os.cpu_count()} cores; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), OpenMM {openmm.__version__}; native plugin: "
        f"{native_plugin_status()[1]}"
    )
    timestep = args.timestep_fs / 1000.0
    print(
        f"# {args.steps} LangevinMiddle steps of {args.timestep_fs:g} fs, friction {args.friction:g}/ps, "
        f"best of {args.repeats}"
    )
    print("| system | model | platform | backend | us/step (wall) | CPU us/step | ns/day | force overhead us/step |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for name in args.systems:
        masses, bond = SYSTEMS[name]
        n = len(masses)
        if args.model:
            data, label = load_model_bytes(args.model), Path(args.model).name
        else:
            data, count = stand_in_model(n, dtype)
            label = f"MLP {count} params {args.dtype}"
        positions = np.stack([np.arange(n) * bond, 0.05 * np.sin(np.arange(n)), np.zeros(n)], axis=1)
        if args.start:
            import mdtraj as md

            from openmm_backmap.mapping import CGMapping

            aa = md.load(args.start)
            mapping = CGMapping.from_json(args.mapping, aa.topology)
            masses, bond, n = mapping.masses(), None, mapping.n_cg
            positions = mapping.project(aa.xyz[0].astype(np.float64))
            name = f"{name} as mapped"
        models = [(data, label, backends)]
        if args.compile:
            path = Path(tempfile.mkdtemp(prefix="bench-forces-")) / f"{name}.pt2"
            meta = compile_model(data, n, path, positions=positions)
            print(
                f"# {name}: compiled in {meta['compile_seconds']:.0f} s, max relative deviation from the "
                f"TorchScript model {meta['max_deviation']:.1e}"
            )
            models.append((path.read_bytes(), f"{label} compiled", [b for b in backends if b != "openmm-torch"]))
        for platform in args.platforms:
            base, base_cpu = time_steps(
                build_system(masses, bond, None), platform, positions, args.steps, args.repeats, timestep, args.friction
            )
            print(
                f"| {name} ({n} beads) | bonds only | {platform} | - | {base:.1f} | {base_cpu:.1f} | "
                f"{86400 / (base * 1e-6) * timestep / 1000:.0f} | - |"
            )
            for model_data, model_label, model_backends in models:
                for backend in model_backends:
                    force = forces.create_force(model_data, backend=backend, numParticles=n)
                    steps = args.steps
                    if args.torchscript_steps and model_data is data:
                        steps = args.torchscript_steps
                    steps = steps if backend != "python" else max(200, steps // 4)
                    us, cpu = time_steps(
                        build_system(masses, bond, force),
                        platform,
                        positions,
                        steps,
                        args.repeats,
                        timestep,
                        args.friction,
                    )
                    print(
                        f"| {name} ({n} beads) | {model_label} | {platform} | {backend} | {us:.1f} | {cpu:.1f} | "
                        f"{86400 / (us * 1e-6) * timestep / 1000:.0f} | {us - base:.1f} |",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
