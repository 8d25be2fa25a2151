"""CG alanine dipeptide with a flow potential: train, export, simulate, compare (phi, psi) with the reference.

Trains :class:`openmm_backmap.models.cg_potential.CGFlowPotential` on the six-bead CG projection of an ALA2
reference trajectory (train/val blocks), exports it, runs Langevin dynamics of the CG System
(``create_cg_system``) and reports the Jensen-Shannon divergence of the 36x36 (phi, psi) histograms
of the CG run and of the flow's own samples against the whole projected reference, plus the wall
time per step.

    python benchmarks/bench_cg_potential.py --reference /work/refdata/seed1 --out bench_out/cg
    python benchmarks/bench_cg_potential.py --model bench_out/cg/cg.pt ...   # skip training

The figures are printed as one JSON object (and written to OUT/cg_bench.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# CG phi and psi of the six-bead mapping, by bead name: C1-N-CA-C and N-CA-C-N2
PHI_PSI_NAMES = [["C1", "N", "CA", "C"], ["N", "CA", "C", "N2"]]


def phi_psi_beads() -> list[list[int]]:
    """Bead indices of the CG phi and psi of :func:`openmm_backmap.systems.builtin.ala2_six_bead_mapping`."""
    from openmm_backmap.systems.builtin import ALA2_SIX_NAMES

    return [[ALA2_SIX_NAMES.index(n) for n in quad] for quad in PHI_PSI_NAMES]


def bead_dihedrals_deg(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(phi, psi) in degrees of CG positions (N, 6, 3) of the six-bead mapping."""
    import torch

    from openmm_backmap.geometry import dihedrals

    x = torch.as_tensor(np.asarray(X, dtype=np.float64))
    out = [np.degrees(dihedrals(*(x[:, b] for b in beads)).numpy()) for beads in phi_psi_beads()]
    return out[0], out[1]


def phi_psi_js(X: np.ndarray, X_ref: np.ndarray) -> float:
    from openmm_backmap.analysis.metrics import js_divergence, ramachandran_histogram

    phi, psi = bead_dihedrals_deg(X)
    phi_r, psi_r = bead_dihedrals_deg(X_ref)
    return js_divergence(ramachandran_histogram(phi, psi), ramachandran_histogram(phi_r, psi_r))


def load_reference(directory: Path):
    """(mapping, all projected frames (N, 6, 3), train/val/test pairs) of an ALA2 reference run."""
    from openmm_backmap.io.trajectories import load_trajectory
    from openmm_backmap.systems.builtin import ala2_six_bead_mapping
    from openmm_backmap.training.data import make_pairs

    traj = load_trajectory(directory / "ala2.dcd", directory / "ala2.pdb")
    mapping = ala2_six_bead_mapping(traj.topology)
    X_all = mapping.project(traj.xyz.astype(np.float64))
    return mapping, X_all, make_pairs(traj, mapping), traj.xyz[0]


def train_model(mapping, pairs, reference_xyz, out: Path, epochs: int, seed: int, progress: bool, **arch):
    from openmm_backmap.io.checkpoints import make_cg_spec
    from openmm_backmap.io.model_files import export_cg
    from openmm_backmap.models.cg_potential import CGFlowPotential
    from openmm_backmap.training.cg_potential import train_cg

    model = CGFlowPotential.from_data(pairs["train"].X, mapping.cg_bonds(), seed=seed, **arch)
    spec = make_cg_spec(model, mapping, reference_xyz)
    summary = train_cg(
        model,
        spec,
        pairs["train"].X,
        pairs["val"].X,
        epochs=epochs,
        seed=seed,
        checkpoint=out / "cg.ckpt",
        progress=progress,
    )
    export_cg(model, spec, out / "cg.pt")
    return summary


def simulate(
    model_path: Path,
    masses,
    X0: np.ndarray,
    steps: int,
    timestep_fs: float,
    friction: float,
    temperature: float,
    backend: str,
    platform_name: str,
    every: int,
    seed: int,
    progress: bool = False,
    partial: Path | None = None,
) -> dict:
    """Langevin dynamics of the CG System; positions every ``every`` steps (written to ``partial``
    at every progress line when given)."""
    import openmm
    import openmm.unit as u

    from openmm_backmap.openmm.forces import create_cg_system

    system = create_cg_system(masses, str(model_path), backend=backend)
    integrator = openmm.LangevinMiddleIntegrator(
        temperature * u.kelvin, friction / u.picosecond, timestep_fs * u.femtosecond
    )
    integrator.setRandomNumberSeed(seed)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName(platform_name))
    context.setPositions(X0)
    context.setVelocitiesToTemperature(temperature * u.kelvin, seed)
    frames, energies = [], []
    n_chunks = steps // every
    t0 = time.perf_counter()
    for chunk in range(n_chunks):
        integrator.step(every)
        state = context.getState(getPositions=True, getEnergy=True)
        frames.append(state.getPositions(asNumpy=True).value_in_unit(u.nanometer))
        energies.append(state.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole))
        if progress and (chunk + 1) % max(1, n_chunks // 20) == 0:
            done = (chunk + 1) * every
            rate = (time.perf_counter() - t0) / done * 1e6
            print(
                f"  step {done}/{steps}: {rate:.0f} us/step, U = {energies[-1]:.1f} kJ/mol", file=sys.stderr, flush=True
            )
            if partial is not None:
                np.save(partial, np.asarray(frames, dtype=np.float32))
    wall = time.perf_counter() - t0
    X = np.asarray(frames)
    E = np.asarray(energies)
    return {
        "X": X,
        "energies": E,
        "finite": bool(np.isfinite(X).all() and np.isfinite(E).all()),
        "us_per_step": wall / max(steps, 1) * 1e6,
        "ns_per_day": timestep_fs * 1e-6 * steps / wall * 86400.0,
        "wall_s": wall,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", type=Path, default=Path("/work/refdata/seed1"), help="dir with ala2.pdb/dcd")
    p.add_argument("--out", type=Path, default=ROOT / "bench_out" / "cg")
    p.add_argument("--model", type=Path, help="use this exported .pt instead of training")
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--bins", type=int, default=8)
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--timestep-fs", type=float, default=1.0, help="2 fs heats the learned potential up")
    p.add_argument("--friction", type=float, default=1.0, help="1/ps")
    p.add_argument("--temperature", type=float, default=300.0)
    p.add_argument("--every", type=int, default=10, help="save a frame every this many steps")
    p.add_argument("--backend", default="auto")
    p.add_argument("--platform", default="CPU")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--flow-samples", type=int, default=50_000)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    mapping, X_ref, pairs, xyz0 = load_reference(args.reference)
    result: dict = {"reference": str(args.reference), "n_reference_frames": len(X_ref)}
    model_path = args.model
    if model_path is None:
        summary = train_model(
            mapping,
            pairs,
            xyz0,
            args.out,
            args.epochs,
            args.seed,
            not args.no_progress,
            n_layers=args.layers,
            hidden=args.hidden,
            n_bins=args.bins,
            temperature=args.temperature,
        )
        result["training"] = {k: v for k, v in summary.items() if k != "history"}
        model_path = args.out / "cg.pt"
    from openmm_backmap.io.model_files import load_cg_potential

    module, meta = load_cg_potential(model_path)
    with torch.no_grad():
        test_X = torch.as_tensor(pairs["test"].X, dtype=torch.float32)
        result["test_nll"] = float(-module.log_prob(test_X).mean())
        Xs, _ = module.sample(args.flow_samples)
    result["js_flow_samples"] = phi_psi_js(Xs.double().numpy(), X_ref)
    X0 = pairs["test"].X[0]
    run = simulate(
        model_path,
        meta["masses"],
        X0,
        args.steps,
        args.timestep_fs,
        args.friction,
        args.temperature,
        args.backend,
        args.platform,
        args.every,
        args.seed,
        progress=not args.no_progress,
        partial=args.out / "cg_run_positions_partial.npy",
    )
    X_run = run.pop("X")
    run.pop("energies")
    result.update({f"md_{k}": v for k, v in run.items()})
    result["js_md"] = phi_psi_js(X_run, X_ref) if run["finite"] else float("nan")
    half = len(X_run) // 2
    result["js_md_second_half"] = phi_psi_js(X_run[half:], X_ref) if run["finite"] else float("nan")
    result["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result["machine"] = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s)"
    (args.out / "cg_bench.json").write_text(json.dumps(result, indent=1) + "\n")
    np.save(args.out / "cg_run_positions.npy", X_run.astype(np.float32))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
