"""The ``openmm-backmap`` command line.

Each subcommand is one function ``_cmd_<name>(args)`` registered by ``_add_<name>(subparsers)``;
heavy imports happen inside the command so ``openmm-backmap --help`` stays fast.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

from openmm_backmap.io.trajectories import TRAJECTORY_SUFFIXES
from openmm_backmap.training.config import BackmapperTraining, CGPotentialTraining, ProteinFinetuning

# Trajectory formats the backmap command writes (mdtraj's savers by suffix).


# ---------------------------------------------------------------------------- argument checks
def _count(text: str) -> int:
    """An argparse type: an integer >= 1 (epochs, batch sizes, strides, frames, samples, ...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _count0(text: str) -> int:
    """An argparse type: an integer >= 0 (MD steps, steps or cycles of an optional stage; 0 means none)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _check_outputs(
    outputs: dict[str, str | None],
    inputs: dict[str, object],
    overwrite: bool,
    suffixes: dict[str, tuple[str, ...]] | None = None,
) -> None:
    """Refuse, before any computation, an output file that is one of the command's inputs, that
    exists (unless ``overwrite``), whose folder does not exist, or whose suffix is not one of
    ``suffixes[option]``; ValueError naming the option and the path.

    ``outputs`` and ``inputs`` map option names (``--out``) to paths (inputs may be lists).
    """
    given = {}
    for option, value in inputs.items():
        for item in value if isinstance(value, list | tuple) else [value]:
            if item:
                given[Path(item).resolve()] = option
    for option, value in outputs.items():
        if not value:
            continue
        path = Path(value)
        if path.resolve() in given:
            raise ValueError(
                f"{option} {path} is also the command's {given[path.resolve()]}: writing it would "
                f"destroy the input; choose another path"
            )
        allowed = (suffixes or {}).get(option)
        if allowed and not any(str(path).lower().endswith(sfx) for sfx in allowed):
            raise ValueError(
                f"{option} {path}: unsupported format {path.suffix or '(no suffix)'}; use one of {', '.join(allowed)}"
            )
        if path.is_dir():
            raise ValueError(f"{option} {path} is a directory; give a file path")
        if not path.parent.is_dir():
            raise ValueError(f"{option} {path}: the folder {path.parent} does not exist")
        if path.exists() and not overwrite:
            raise ValueError(f"{option} {path} exists; pass --overwrite to replace it")


def _check_out_dir(
    option: str,
    value: str | Path,
    inputs: dict[str, object],
    overwrite: bool,
    writes: list[str] | None = None,
) -> Path:
    """Refuse, before any computation, an output directory that is one of the command's inputs or
    holds one, that is a file, that already has content (unless ``overwrite``), or that cannot be
    created or written; then create it. ValueError naming the option and the path.

    ``inputs`` maps option names to paths (or lists of paths). ``writes`` names the files the
    command writes into the directory when the directory may hold other things (``reference``
    writes ``NAME.*`` into a shared data folder); without it any content counts.
    """
    path = Path(value)
    target = path.resolve()
    for name, item in inputs.items():
        for given in item if isinstance(item, list | tuple) else [item]:
            if not given:
                continue
            source = Path(given).resolve()
            if source == target:
                raise ValueError(f"{option} {path} is also the command's {name}; choose another directory")
            if target in source.parents:
                raise ValueError(
                    f"{option} {path} contains the command's {name} {given}: the outputs could replace "
                    f"or mix with the input; choose a directory that holds no input"
                )
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is a file; give a directory")
    if path.is_dir() and not overwrite:
        present = [n for n in writes if (path / n).exists()] if writes is not None else sorted(os.listdir(path))
        if present:
            shown = ", ".join(present[:4]) + (f" and {len(present) - 4} more" if len(present) > 4 else "")
            raise ValueError(
                f"{option} {path} already holds {shown}; pass --overwrite to write over it, or choose an empty "
                "directory"
            )
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ValueError(f"{option} {path} cannot be created or written: {err.strerror or err}") from None
    return path


def _add_overwrite(p) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace output files that exist")


# ---------------------------------------------------------------------------- reference
def _add_reference(sub) -> None:
    p = sub.add_parser(
        "reference",
        help="generate all-atom reference MD for a built-in system (DCD + PDB + System XML)",
        description="Langevin MD of a built-in system on OpenMM's Reference platform; writes "
        "NAME.pdb, NAME.dcd, NAME_system.xml and NAME.json (run metadata and constraints).",
    )
    p.add_argument("system", choices=["ala2", "chignolin"], help="built-in system")
    p.add_argument("--ns", type=float, default=20.0, help="production length in ns (default 20)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--out", default="data", help="output directory (default data/)")
    p.add_argument("--temperature", type=float, default=300.0, help="kelvin (default 300)")
    p.add_argument("--save-every-ps", type=float, default=1.0, help="frame interval in ps")
    p.add_argument("--platform", default="Reference", help="OpenMM platform (default Reference)")
    p.add_argument(
        "--restrain",
        choices=["C7eq", "C5", "alpha_R", "alpha_L"],
        help="hold (phi, psi) in this basin (backmapper training data for a rare basin; not a reference ensemble)",
    )
    _add_overwrite(p)
    p.set_defaults(func=_cmd_reference)


def _cmd_reference(args) -> int:
    from openmm_backmap.systems.reference import generate_reference

    name = args.system
    _check_out_dir(
        "--out", args.out, {}, args.overwrite, [f"{name}{s}" for s in (".pdb", ".dcd", "_system.xml", ".json")]
    )
    paths = generate_reference(
        args.system,
        args.ns,
        args.out,
        seed=args.seed,
        temperature=args.temperature,
        save_every_ps=args.save_every_ps,
        platform=args.platform,
        restrain=args.restrain,
    )
    for key, path in paths.items():
        print(f"{key:>7}: {path}")
    return 0


# ---------------------------------------------------------------------------- demo
def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job: reference MD, training, export, CG run with the reporter, report",
    )
    p.add_argument("--out", default="demo", help="output directory (default demo/)")
    p.add_argument("--quick", action="store_true", help="a smoke run of a few minutes")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--data-free",
        action="store_true",
        help="no MD data: train-joint (CG potential and backmapper from the AA energy alone) replaces the "
        "reference MD and both trainings; the report compares with the project's reference populations",
    )
    p.add_argument(
        "--joint-checkpoint",
        help="with --data-free: a trained train-joint checkpoint of alanine dipeptide, used instead of training",
    )
    _add_overwrite(p)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from openmm_backmap.demo import run_demo

    if args.joint_checkpoint is not None and not args.data_free:
        raise ValueError(
            "--joint-checkpoint is for --data-free: the ordinary demo trains its backmapper and CG potential "
            "on reference MD, not a joint model"
        )
    if args.joint_checkpoint is not None and not Path(args.joint_checkpoint).is_file():
        raise ValueError(f"--joint-checkpoint {args.joint_checkpoint} does not exist")
    _check_out_dir("--out", args.out, {"--joint-checkpoint": args.joint_checkpoint}, args.overwrite)
    if args.data_free:
        from openmm_backmap.demo_data_free import run_data_free_demo

        return run_data_free_demo(Path(args.out), args.quick, args.seed, args.joint_checkpoint)
    return run_demo(Path(args.out), quick=args.quick, seed=args.seed)


# ---------------------------------------------------------------------------- train-cg
def _add_train_cg(sub) -> None:
    d = CGPotentialTraining
    p = sub.add_parser(
        "train-cg",
        help="train a CG potential U_CG(X) = -kT log q(X) (a flow over CG coordinates) on AA data",
        description="Maximum likelihood of a normalizing flow over the internal coordinates of the CG "
        "projection of an all-atom trajectory (train/validation/test blocks), with prior walls on "
        "bonds, angles and non-bonded bead pairs; writes a checkpoint that `openmm-backmap export` "
        "turns into a TorchScript force model.",
    )
    p.add_argument("--topology", required=True, help="all-atom topology (PDB)")
    p.add_argument("--trajectory", required=True, nargs="+", help="all-atom trajectories (DCD, XTC, HDF5, ...)")
    p.add_argument(
        "--allow-restrained",
        action="store_true",
        help="accept runs from `reference --restrain`: the potential then samples a broadened X "
        "distribution, a proposal for reweighting and hybrid sampling rather than the PMF",
    )
    p.add_argument(
        "--mapping", required=True, help="ca | backbone | heavy-backbone | residue-com, or a groups JSON file"
    )
    p.add_argument("--out", required=True, help="checkpoint to write (e.g. cg.ckpt)")
    p.add_argument("--epochs", type=_count, default=d.epochs, help=f"training epochs (default {d.epochs})")
    p.add_argument("--temperature", type=float, default=d.temperature, help=f"kelvin (default {d.temperature:g})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default {d.seed})")
    p.add_argument("--stride", type=_count, default=d.stride, help="use every STRIDE-th frame")
    p.add_argument("--batch-size", type=_count, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help=f"learning rate (default {d.lr:g})")
    p.add_argument("--layers", type=_count, default=d.layers, help=f"coupling layers (default {d.layers})")
    p.add_argument("--hidden", type=_count, default=d.hidden, help=f"hidden units per layer (default {d.hidden})")
    p.add_argument("--bins", type=_count, default=d.bins, help=f"spline bins (default {d.bins})")
    p.add_argument("--time-limit", type=float, help="stop training after this many seconds")
    p.add_argument(
        "--circular-rotors",
        action="store_true",
        help="model every dihedral that spreads more than 0.25 rad on the data (a rotor: phi and psi) as a "
        "circular variable, so that `cycle` can grow torsion basins the data never reached",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_overwrite(p)
    p.set_defaults(func=_cmd_train_cg)


def _cmd_train_cg(args) -> int:
    from openmm_backmap.training.cycle import ROTATABLE_SPREAD
    from openmm_backmap.training.pipeline import train_cg_from_files

    _check_outputs(
        {"--out": args.out},
        {"--topology": args.topology, "--trajectory": args.trajectory, "--mapping": args.mapping},
        args.overwrite,
    )
    settings = CGPotentialTraining(
        stride=args.stride,
        temperature=args.temperature,
        seed=args.seed,
        hidden=args.hidden,
        layers=args.layers,
        bins=args.bins,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        time_limit=args.time_limit,
        allow_restrained=args.allow_restrained,
        circular_spread=ROTATABLE_SPREAD if args.circular_rotors else None,
    )
    train_cg_from_files(args.topology, args.trajectory, args.mapping, args.out, settings, progress=not args.no_progress)
    return 0


# ---------------------------------------------------------------------------- export
def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a trained checkpoint as one TorchScript model file with its metadata",
    )
    p.add_argument("checkpoint", help="checkpoint written by train-cg, train or train-joint")
    p.add_argument("-o", "--output", required=True, help="model file to write (e.g. model.pt)")
    p.add_argument("--cg-output", help="train-joint checkpoints: the CG potential's file (default <output stem>_cg.pt)")
    _add_overwrite(p)
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    from openmm_backmap.io.checkpoints import JOINT_KIND, export_checkpoint, joint_cg_path, read_checkpoint

    outputs = {"--output": args.output}
    # the output checked against the checkpoint before the checkpoint is read (and its kind known)
    _check_outputs(outputs, {"checkpoint": args.checkpoint}, args.overwrite)
    joint = read_checkpoint(args.checkpoint)["spec"].get("kind") == JOINT_KIND
    if joint:
        outputs["--cg-output"] = args.cg_output or str(joint_cg_path(args.output))
    elif args.cg_output:
        raise ValueError("--cg-output is for train-joint checkpoints; this one holds one model")
    _check_outputs(outputs, {"checkpoint": args.checkpoint}, args.overwrite)
    kind = export_checkpoint(args.checkpoint, args.output, outputs.get("--cg-output"))
    if joint:
        print(f"backmapper model: {args.output}\ncg-potential model: {outputs['--cg-output']}")
    else:
        print(f"{kind} model: {args.output}")
    return 0


# ---------------------------------------------------------------------------- train (backmapper)
def _add_compile(sub) -> None:
    p = sub.add_parser(
        "compile",
        help="compile a TorchScript CG potential into a .pt2 force package (energy and forces fused, "
        "many times faster per MD step; Reference/CPU platforms)",
    )
    p.add_argument("model", help="TorchScript model file (.pt), e.g. from `export` of a train-cg checkpoint")
    p.add_argument("-o", "--output", required=True, help="package to write (e.g. cg.pt2)")
    p.add_argument(
        "--particles", type=_count, default=None, help="number of particles (default: the CG model's n_beads)"
    )
    p.add_argument("--periodic", action="store_true", help="the model takes box vectors after the positions")
    p.add_argument(
        "--global-parameter",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a global parameter passed after the positions (repeat, in forward()'s order)",
    )
    _add_overwrite(p)
    p.set_defaults(func=_cmd_compile)


def _cmd_compile(args) -> int:
    from openmm_backmap.io.model_files import load_model_bytes, torchscript_metadata
    from openmm_backmap.openmm.compiled import compile_model

    _check_outputs({"--output": args.output}, {"model": args.model}, args.overwrite, {"--output": (".pt2",)})
    data = load_model_bytes(args.model)
    n = args.particles
    if n is None:
        n = torchscript_metadata(data).get("n_beads")
        if n is None:
            raise SystemExit(f"error: {args.model} does not say how many particles it takes: give --particles")
    parameters = {}
    for item in args.global_parameter:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"error: --global-parameter takes NAME=VALUE, got {item!r}")
        parameters[name] = float(value)
    meta = compile_model(
        data, int(n), args.output, usesPeriodicBoundaryConditions=args.periodic, globalParameters=parameters
    )
    print(
        f"compiled force ({meta['num_particles']} particles) in {meta['compile_seconds']:.0f} s, "
        f"largest relative deviation from the model {meta['max_deviation']:.1e}: {args.output}"
    )
    return 0


def _add_train(sub) -> None:
    d = BackmapperTraining
    p = sub.add_parser(
        "train",
        help="train a backmapper q(x | X) on an all-atom trajectory (ML, then energy refinement)",
        description="Maximum likelihood of a conditional flow of AA coordinates given CG beads on the "
        "frames of an AA trajectory (contiguous validation blocks, model selection on validation NLL), "
        "then, with --aa-system, reverse-KL refinement on the AA energy with tempering. Writes a "
        "checkpoint after every epoch (--resume continues from it); `openmm-backmap export` turns it "
        "into a TorchScript model file.",
    )
    p.add_argument("--topology", required=True, help="all-atom topology (PDB)")
    p.add_argument(
        "--trajectory",
        required=True,
        nargs="+",
        help="all-atom trajectories (DCD, HDF5, ...) of the topology; restrained runs from "
        "`reference --restrain` only when the restrained atoms are beads",
    )
    p.add_argument(
        "--mapping", required=True, help="ca | backbone | heavy-backbone | residue-com, or a groups JSON file"
    )
    p.add_argument("--out", required=True, help="checkpoint to write (e.g. model.ckpt)")
    p.add_argument("--epochs", type=_count, default=d.epochs, help=f"ML epochs (default {d.epochs})")
    p.add_argument("--aa-system", help="AA OpenMM System XML: constraints, energy refinement, embedded")
    p.add_argument("--temporal", action="store_true", help="also condition on the previous AA frame")
    p.add_argument(
        "--energy-steps",
        type=_count0,
        default=d.energy_steps,
        help=f"energy-refinement steps with --aa-system (default {d.energy_steps}; 0 = ML only)",
    )
    p.add_argument("--temperature", type=float, default=d.temperature, help=f"kelvin (default {d.temperature:g})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default {d.seed})")
    p.add_argument("--stride", type=_count, default=d.stride, help="use every STRIDE-th frame")
    p.add_argument("--batch-size", type=_count, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help=f"ML learning rate (default {d.lr:g})")
    p.add_argument(
        "--energy-lr", type=float, default=d.energy_lr, help=f"refinement learning rate (default {d.energy_lr:g})"
    )
    p.add_argument(
        "--ml-weight",
        type=float,
        default=d.ml_weight,
        help=f"weight of the data NLL kept during energy refinement (default {d.ml_weight:g})",
    )
    p.add_argument("--layers", type=_count, default=d.layers, help=f"coupling layers (default {d.layers})")
    p.add_argument("--hidden", type=_count, default=d.hidden, help=f"hidden units per layer (default {d.hidden})")
    p.add_argument("--bins", type=_count, default=d.bins, help=f"spline bins (default {d.bins})")
    p.add_argument(
        "--val-fraction", type=float, default=d.val_fraction, help=f"validation fraction (default {d.val_fraction:g})"
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--resume", action="store_true", help="continue the ML stage from --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_overwrite(p)
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    import torch

    from openmm_backmap.training.pipeline import train_from_files

    # --resume continues from --out, so an existing --out is expected there
    _check_outputs(
        {"--out": args.out},
        {
            "--topology": args.topology,
            "--trajectory": args.trajectory,
            "--mapping": args.mapping,
            "--aa-system": args.aa_system,
        },
        args.overwrite or args.resume,
    )
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    settings = BackmapperTraining(
        stride=args.stride,
        val_fraction=args.val_fraction,
        temperature=args.temperature,
        seed=args.seed,
        temporal=args.temporal,
        hidden=args.hidden,
        layers=args.layers,
        bins=args.bins,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        energy_steps=args.energy_steps,
        energy_lr=args.energy_lr,
        ml_weight=args.ml_weight,
    )
    train_from_files(
        args.topology,
        args.trajectory,
        args.mapping,
        args.out,
        settings,
        aa_system=args.aa_system,
        resume=args.resume,
        progress=not args.no_progress,
    )
    return 0


# ---------------------------------------------------------------------------- train-joint (data-free)
def _add_train_joint(sub) -> None:
    from openmm_backmap.training.joint import JointTraining as d

    p = sub.add_parser(
        "train-joint",
        help="train a CG potential and its backmapper together from the AA energy alone (reverse KL, tempering)",
        description="A joint model q(X) q(x | X) (CG flow and conditional backmapper) trained by reverse KL "
        "against exp(-U_AA / kT) with adaptive tempering: it starts at --t-start and cools when the ESS/N "
        "of the current tempered target reaches --ess-threshold (or after --patience failed checks), down to "
        "--temperature. No trajectory is needed (--trajectory warm-starts by maximum likelihood). "
        "`openmm-backmap export` writes the backmapper and the CG potential model files.",
    )
    p.add_argument("--topology", required=True, help="all-atom topology with one structure (PDB)")
    p.add_argument("--aa-system", required=True, help="AA OpenMM System XML (the energy trained against)")
    p.add_argument(
        "--mapping", required=True, help="ca | backbone | heavy-backbone | residue-com, or a groups JSON file"
    )
    p.add_argument("--out", required=True, help="joint checkpoint to write (e.g. joint.ckpt)")
    p.add_argument(
        "--trajectory", nargs="+", help="optional AA trajectories: statistics and a maximum-likelihood warm start"
    )
    p.add_argument(
        "--temperature", type=float, default=d.temperature, help=f"target kelvin (default {d.temperature:g})"
    )
    p.add_argument("--t-start", type=float, default=d.t_start, help=f"starting kelvin (default {d.t_start:g})")
    p.add_argument(
        "--ess-threshold",
        type=float,
        default=d.ess_threshold,
        help=f"ESS/N that allows cooling (default {d.ess_threshold:g})",
    )
    p.add_argument(
        "--max-cooling",
        type=float,
        default=d.max_cooling,
        help=f"largest cooling factor per stage (default {d.max_cooling:g})",
    )
    p.add_argument(
        "--patience",
        type=_count,
        default=d.patience,
        help=f"failed checks before a forced stage (default {d.patience})",
    )
    p.add_argument("--steps", type=_count, default=d.steps, help=f"most gradient steps (default {d.steps})")
    p.add_argument(
        "--final-steps", type=_count, default=d.final_steps, help=f"steps at the target (default {d.final_steps})"
    )
    p.add_argument(
        "--check-every", type=_count, default=d.check_every, help=f"steps between checks (default {d.check_every})"
    )
    p.add_argument("--batch-size", type=_count, default=d.batch_size)
    p.add_argument(
        "--eval-batch", type=_count, default=d.eval_batch, help=f"samples per check (default {d.eval_batch})"
    )
    p.add_argument("--lr", type=float, default=d.lr, help=f"learning rate (default {d.lr:g})")
    p.add_argument(
        "--energy-cap",
        type=float,
        default=d.energy_cap_kT,
        help=f"kT above the minimum where energies turn logarithmic (default {d.energy_cap_kT:g})",
    )
    p.add_argument("--layers", type=_count, default=d.layers, help=f"backmapper coupling layers (default {d.layers})")
    p.add_argument("--hidden", type=_count, default=d.hidden, help=f"backmapper hidden units (default {d.hidden})")
    p.add_argument(
        "--cg-layers", type=_count, default=d.cg_layers, help=f"CG flow coupling layers (default {d.cg_layers})"
    )
    p.add_argument(
        "--cg-hidden", type=_count, default=d.cg_hidden, help=f"CG flow hidden units (default {d.cg_hidden})"
    )
    p.add_argument(
        "--ml-epochs",
        type=_count,
        default=d.ml_epochs,
        help=f"warm-start epochs with --trajectory (default {d.ml_epochs})",
    )
    p.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default {d.seed})")
    p.add_argument(
        "--select-batch",
        type=int,
        default=d.select_batch,
        help="keep the state at the target with the highest ESS/N of this many fresh samples per check "
        "(default 0: the lowest reverse-KL estimate)",
    )
    p.add_argument(
        "--refine-steps",
        type=_count0,
        default=d.refine_steps,
        help="after the tempered training: reverse-KL steps of the backmapper alone at the target, on fixed "
        f"draws of the CG flow (default {d.refine_steps}: none)",
    )
    p.add_argument(
        "--refine-frames",
        type=_count,
        default=d.refine_frames,
        help=f"CG draws the refinement conditions on (default {d.refine_frames})",
    )
    p.add_argument(
        "--refine-tau",
        type=float,
        default=d.refine_tau,
        help="draw the refinement's CG frames from the flow with its bond-angle latents and those of its narrow "
        f"(not circular) dihedrals widened by this factor, as the cycle's widened copy (>= 1; default "
        f"{d.refine_tau:g}: the flow itself)",
    )
    p.add_argument(
        "--cycles",
        type=_count0,
        default=d.cycles,
        help="then cycles of importance-weighted maximum likelihood of the CG flow at the target (the `cycle` "
        f"command's loop; default {d.cycles}: none)",
    )
    p.add_argument(
        "--cycle-samples", type=_count, default=d.cycle_samples, help=f"CG draws per cycle (default {d.cycle_samples})"
    )
    p.add_argument(
        "--cycle-per-frame",
        type=_count,
        default=d.cycle_per_frame,
        help=f"reconstructions per CG draw in a cycle (default {d.cycle_per_frame})",
    )
    p.add_argument(
        "--cycle-refine-steps",
        type=_count0,
        default=d.cycle_refine_steps,
        help="backmapper refinement steps in each cycle: reverse KL plus the NLL of the pairs resampled by "
        f"weight (default {d.cycle_refine_steps}: none)",
    )
    p.add_argument(
        "--cycle-anneal-levels",
        type=_count0,
        default=d.cycle_anneal_levels,
        help="anneal each cycle's pairs to exp(-U_AA / kT) with this many AIS levels before the refit "
        f"(default {d.cycle_anneal_levels}: plain importance weights)",
    )
    p.add_argument("--time-limit", type=float, help="stop training after this many seconds")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    _add_overwrite(p)
    p.set_defaults(func=_cmd_train_joint)


def _cmd_train_joint(args) -> int:
    import torch

    from openmm_backmap.training.joint import JointTraining, train_joint_from_files

    _check_outputs(
        {"--out": args.out},
        {
            "--topology": args.topology,
            "--aa-system": args.aa_system,
            "--mapping": args.mapping,
            "--trajectory": args.trajectory,
        },
        args.overwrite,
    )
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    settings = JointTraining(
        temperature=args.temperature,
        t_start=args.t_start,
        ess_threshold=args.ess_threshold,
        max_cooling=args.max_cooling,
        patience=args.patience,
        steps=args.steps,
        final_steps=args.final_steps,
        check_every=args.check_every,
        batch_size=args.batch_size,
        eval_batch=args.eval_batch,
        lr=args.lr,
        energy_cap_kT=args.energy_cap,
        layers=args.layers,
        hidden=args.hidden,
        cg_layers=args.cg_layers,
        cg_hidden=args.cg_hidden,
        ml_epochs=args.ml_epochs,
        seed=args.seed,
        time_limit=args.time_limit,
        select_batch=args.select_batch,
        refine_steps=args.refine_steps,
        refine_frames=args.refine_frames,
        refine_tau=args.refine_tau,
        cycles=args.cycles,
        cycle_samples=args.cycle_samples,
        cycle_per_frame=args.cycle_per_frame,
        cycle_refine_steps=args.cycle_refine_steps,
        cycle_anneal_levels=args.cycle_anneal_levels,
    )
    train_joint_from_files(args.topology, args.aa_system, args.mapping, args.out, settings, trajectory=args.trajectory)
    return 0


# ---------------------------------------------------------------------------- info
def _add_info(sub) -> None:
    p = sub.add_parser("info", help="print the metadata of an exported model file")
    p.add_argument("model", help="model file (.pt), compiled force package (.pt2) or a protein model's name")
    p.add_argument("--json", action="store_true", help="print metadata.json as it is")
    p.set_defaults(func=_cmd_info)


def _cmd_info(args) -> int:
    import json
    from pathlib import Path

    from openmm_backmap.io.backmap_model import load_model
    from openmm_backmap.io.model_files import is_compiled_package, read_compiled_metadata, read_model_file
    from openmm_backmap.io.protein_models import protein_model_path

    if protein_model_path(args.model) is not None:
        model = load_model(args.model)
        print(json.dumps(model.describe(), indent=1, default=str) if args.json else model.summary())
        return 0
    if Path(args.model).is_file() and is_compiled_package(Path(args.model).read_bytes()):
        meta = read_compiled_metadata(args.model)
        if args.json:
            print(json.dumps(meta, indent=1))
            return 0
        for key, value in meta.items():
            if key != "model_metadata":
                print(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
        for key, value in meta["model_metadata"].items():
            print(f"model.{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
        return 0
    _, meta, _ = read_model_file(args.model)
    if args.json:
        print(json.dumps(meta, indent=1))
    elif meta.get("kind") == "backmapper":
        print(load_model(args.model, device="cpu").summary())
    else:
        for key, value in meta.items():
            print(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return 0


# ---------------------------------------------------------------------------- backmap
def _add_backmap(sub) -> None:
    p = sub.add_parser(
        "backmap",
        help="reconstruct all-atom frames of a CG trajectory with a backmapper model file or a protein model",
    )
    p.add_argument(
        "--model",
        required=True,
        help="backmapper model file (.pt), or a pretrained protein model's name (protein-ca: one CA bead per "
        "residue; protein-backbone: N, CA, C), bound to the chain of --cg-topology",
    )
    p.add_argument("--cg", required=True, help="CG trajectory (any format mdtraj reads), positions in nm")
    p.add_argument(
        "--cg-topology",
        required=True,
        help="CG topology (PDB) of the beads; for protein models one or more chains, three-letter residue names "
        "(HIS = HIE; HID, HIP; ACE/NME caps, else charged termini), beads named as their atoms",
    )
    p.add_argument(
        "--out", required=True, help="AA trajectory to write (DCD, HDF5, NetCDF, PDB); its topology goes beside it"
    )
    p.add_argument("--samples", type=_count, default=1, help="reconstructions per CG frame (default 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--energies", help="CSV of frame, sample, log_q (and U_AA when the model has a System)")
    p.add_argument("--batch-size", type=_count, default=1024, help="samples per batch (default 1024)")
    p.add_argument("--device", help="torch device (default cuda when available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the model for the batch size first (a minute or two; then faster on CPU)",
    )
    _add_overwrite(p)
    p.set_defaults(func=_cmd_backmap)


def _cmd_backmap(args) -> int:
    from openmm_backmap.backmap import backmap_trajectory, topology_path

    _check_outputs(
        {"--out": args.out, "--energies": args.energies, "--out's topology": topology_path(args.out)},
        {"--model": args.model, "--cg": args.cg, "--cg-topology": args.cg_topology},
        args.overwrite,
        {"--out": TRAJECTORY_SUFFIXES, "--energies": (".csv",)},
    )
    if args.energies and Path(args.energies).resolve() == Path(args.out).resolve():
        raise ValueError(f"--energies and --out are the same file {args.out}")
    res = backmap_trajectory(
        args.model,
        args.cg,
        args.cg_topology,
        args.out,
        samples=args.samples,
        seed=args.seed,
        energies=args.energies,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.no_progress,
        compile=args.compile,
    )
    print(
        f"{res['n_frames']} CG frames -> {res['n_samples']} AA frames: {res['out']}"
        + (f" (topology {res['topology']})" if res["topology"] else "")
    )
    return 0


# ---------------------------------------------------------------------------- evaluate
def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score a backmapper on reference AA frames: metrics JSON and PNG plots",
        description="Backmaps the CG projections of reference frames and writes metrics.json (bond score, "
        "clash score, chirality errors, energy W1, Ramachandran JS, RMSD, diversity, NLL per atom, "
        "conditional ESS) and plots (ramachandran.png, energies.png, geometry.png) to --out.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="backmapper model file (.pt), or a protein model (protein-ca, protein-backbone, or its file), "
        "bound to the reference's chain or chains",
    )
    p.add_argument("--reference", required=True, help="AA reference trajectory (independent of training)")
    p.add_argument("--topology", required=True, help="AA topology (PDB) of the reference")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--frames", type=_count, default=200, help="reference frames backmapped (default 200)")
    p.add_argument("--samples", type=_count, default=64, help="samples per frame (default 64)")
    p.add_argument(
        "--aa-system",
        help="AA System XML for energies, atoms in the reference's order (default: the one in the model file; "
        "amber14 + GBn2 for protein models)",
    )
    p.add_argument(
        "--cg-topology", help="protein models: CG topology (PDB) to bind the model to (default: the reference's beads)"
    )
    p.add_argument("--seed", type=int, default=0)
    _add_overwrite(p)
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args) -> int:
    import json

    from openmm_backmap.analysis.evaluate import evaluate_model
    from openmm_backmap.io.trajectories import load_trajectory, require_unrestrained

    inputs = {"--model": args.model, "--reference": args.reference, "--topology": args.topology}
    inputs.update({"--aa-system": args.aa_system, "--cg-topology": args.cg_topology})
    _check_out_dir("--out", args.out, inputs, args.overwrite)
    require_unrestrained(args.reference, "as a reference ensemble")
    reference = load_trajectory(args.reference, args.topology)
    metrics = evaluate_model(
        args.model,
        reference,
        args.out,
        n_frames=args.frames,
        samples=args.samples,
        aa_system=args.aa_system,
        seed=args.seed,
        cg_topology=args.cg_topology,
    )
    print(json.dumps(metrics, indent=1))
    print(f"report written to {args.out}")
    return 0


# ---------------------------------------------------------------------------- hybrid
def _add_hybrid(sub) -> None:
    p = sub.add_parser(
        "hybrid",
        help="hybrid CG-to-AA sampling: exact AA Boltzmann samples from CG moves and flow reconstructions",
        description="A Markov chain on AA coordinates alternating AA Langevin dynamics with resolution moves "
        "(down to CG, a CG move, back up through the backmapper, Metropolis-Hastings). Writes "
        "trajectory.dcd, acceptance.csv and summary.json (basin populations with block-averaged errors).",
    )
    p.add_argument(
        "--model",
        required=True,
        help="backmapper model file (.pt), or a protein model (protein-ca, protein-backbone, or its file), "
        "bound to the chain or chains of --start",
    )
    p.add_argument("--cg-model", required=True, help="CG potential model file (.pt)")
    p.add_argument(
        "--aa-system",
        help="AA System XML (default: the one embedded in the model file; amber14 + GBn2 for protein models)",
    )
    p.add_argument(
        "--cg-topology", help="protein models: CG topology (PDB) to bind the model to (default: the beads of --start)"
    )
    p.add_argument("--start", required=True, help="PDB with the starting AA structure")
    p.add_argument("--iterations", type=_count, required=True, help="chain iterations")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--kernel",
        choices=["flow", "hmc"],
        default="flow",
        help="CG move: independent draws from the CG flow, or HMC on the CG System (default flow)",
    )
    p.add_argument("--langevin-steps", type=_count0, default=250, help="AA Langevin steps per iteration (default 250)")
    p.add_argument("--attempts", type=_count, default=1, help="resolution moves per iteration (default 1)")
    p.add_argument("--temperature", type=float, help="kelvin (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--platform", default="Reference", help="OpenMM platform (default Reference)")
    p.add_argument(
        "--chains",
        type=_count,
        default=1,
        help="independent chains advanced together with batched model and energy calls (flow kernel; default 1)",
    )
    p.add_argument("--save-every", type=_count, default=1, help="write frames every N iterations (default 1)")
    p.add_argument(
        "--burn-in",
        type=float,
        default=0.1,
        help="fraction of iterations left out of the summary with --chains > 1 (default 0.1)",
    )
    _add_overwrite(p)
    p.set_defaults(func=_cmd_hybrid)


def _cmd_hybrid(args) -> int:
    import json

    from openmm_backmap.sampling.hybrid import HybridRun, run_hybrid

    inputs = {"--model": args.model, "--cg-model": args.cg_model, "--aa-system": args.aa_system, "--start": args.start}
    inputs["--cg-topology"] = args.cg_topology
    _check_out_dir("--out", args.out, inputs, args.overwrite)
    settings = HybridRun(
        iterations=args.iterations,
        kernel=args.kernel,
        langevin_steps=args.langevin_steps,
        attempts=args.attempts,
        temperature=args.temperature,
        seed=args.seed,
        platform=args.platform,
        chains=args.chains,
        save_every=args.save_every,
        burn_in=args.burn_in,
    )
    summary = run_hybrid(
        args.model,
        args.cg_model,
        args.start,
        args.out,
        settings,
        aa_system=args.aa_system,
        cg_topology=args.cg_topology,
    )
    print(json.dumps(summary, indent=1))
    return 0


# ---------------------------------------------------------------------------- main
def _add_peptides(sub) -> None:
    from openmm_backmap.systems.peptides import add_arguments

    p = sub.add_parser(
        "peptides",
        help="build peptides from sequences and run amber14 + GBn2 MD: the protein training corpus",
        description="Build capped or charged-terminus peptides from sequences (pdbfixer side chains and "
        "hydrogens on a placed trans, L backbone), run amber14 + GBn2 implicit-solvent MD and write one "
        "directory per peptide (topology.pdb, traj.dcd, system.xml, meta.json); resumable.",
    )
    add_arguments(p)
    p.set_defaults(func=_cmd_peptides)


def _cmd_peptides(args) -> int:
    from openmm_backmap.systems.peptides import run

    if args.n_peptides is not None and args.n_peptides < 1:
        raise ValueError(f"--n-peptides must be >= 1, got {args.n_peptides}")
    for option, n in (("--n-long", args.n_long), ("--n-helical", args.n_helical)):
        if n < 0:
            raise ValueError(f"{option} must be >= 0, got {n}")
    if args.long_ps <= 0:
        raise ValueError(f"--long-ps must be > 0, got {args.long_ps}")
    _check_out_dir("--out", args.out, {}, overwrite=True)  # resumable: what is there is continued
    run(args)
    return 0


def _add_entropy(sub) -> None:
    from openmm_backmap.analysis.entropy import add_arguments

    p = sub.add_parser(
        "entropy",
        help="mapping entropy: H(x | X) bracketed by cross-entropy and the energy route, S_map, per model",
        description="Conditional entropy H(x | X) of each backmapper's mapping on reference frames (cross-entropy "
        "upper bound, energy-route lower bound from K samples) and the mapping entropy S_map; several models "
        "give a table and a bar chart (docs/mapping_entropy.md).",
    )
    add_arguments(p)
    _add_overwrite(p)
    p.set_defaults(func=_cmd_entropy)


def _cmd_entropy(args) -> int:
    from openmm_backmap.analysis.entropy import run

    for option in ("frames", "blocks"):
        if getattr(args, option) < 1:
            raise ValueError(f"--{option} must be >= 1, got {getattr(args, option)}")
    out = Path(args.out)
    _check_outputs(
        {
            "--out": args.out,
            "--out (table)": str(out.with_suffix(".md")),
            "--out (chart)": str(out.with_suffix(".png")),
        },
        {
            "--model": args.model,
            "--reference": args.reference,
            "--topology": args.topology,
            "--aa-system": args.aa_system,
        },
        args.overwrite,
        {"--out": (".json",)},
    )
    return int(run(args) or 0)


def _add_cycle(sub) -> None:
    from openmm_backmap.training.cycle_files import add_arguments

    p = sub.add_parser(
        "cycle",
        help="cycle coarse graining: refit the CG flow potential to its own backmapped, reweighted samples",
        description="Each cycle draws independent samples of the CG flow (a defensive mixture with a widened "
        "copy), backmaps them, weights them by exp(-beta U_AA) / (q(X) q(x | X)) and refits the flow by weighted "
        "maximum likelihood toward the exact CG marginal; writes cycle.json, cycle.png and the last cycle's "
        "cg.pt. With --from-run, refits once to a reporter run (energy CSV + AA trajectory).",
    )
    add_arguments(p)
    p.set_defaults(func=_cmd_cycle)


def _cmd_cycle(args) -> int:
    from openmm_backmap.training.cycle_files import run

    return int(run(args) or 0)


# ---------------------------------------------------------------------------- finetune
def _add_finetune(sub) -> None:
    from openmm_backmap.training.config import ProteinFinetuning as d

    p = sub.add_parser(
        "finetune",
        help="refine a protein model for one protein from its CG frames alone (reverse KL on amber14 + GBn2)",
        description="Fine-tunes protein-ca, protein-backbone (or a protein model file) for the chain of "
        "--cg-topology by reverse KL against amber14 + GBn2 at --temperature, tempered from --t-start, "
        "conditioned on the frames of --cg (for example a CG run of the protein): no all-atom data. The last "
        "--val-fraction of the frames is held out to select the best state. Writes a protein model file "
        "that loads by path wherever a model is accepted.",
    )
    p.add_argument("--model", required=True, help="protein-ca, protein-backbone, or a protein model file")
    p.add_argument("--cg", required=True, help="CG trajectory of the protein (any format mdtraj reads), nm")
    p.add_argument(
        "--cg-topology", required=True, help="CG topology (PDB): one or more chains, beads of the model's mapping"
    )
    p.add_argument("--out", required=True, help="the fine-tuned protein model file to write (.pt)")
    p.add_argument("--steps", type=_count, default=d.steps, help=f"optimiser steps (default {d.steps})")
    p.add_argument(
        "--batch", type=_count, default=d.batch_frames, help=f"CG frames per step (default {d.batch_frames})"
    )
    p.add_argument("--lr", type=float, default=d.lr, help=f"learning rate (default {d.lr})")
    p.add_argument("--temperature", type=float, default=d.temperature, help=f"target K (default {d.temperature})")
    p.add_argument("--t-start", type=float, default=d.t_start, help=f"tempering start K (default {d.t_start})")
    p.add_argument(
        "--val-fraction", type=float, default=d.val_fraction, help=f"frames held out (default {d.val_fraction})"
    )
    p.add_argument(
        "--eval-every", type=_count, default=d.eval_every, help=f"steps between evaluations ({d.eval_every})"
    )
    p.add_argument(
        "--pair-core-kt",
        type=float,
        default=d.pair_core_kt,
        help="if > 0, non-bonded pairs above this many kT get a linear core in the loss, so clashing "
        f"atoms keep a gradient apart (default {d.pair_core_kt}: the exact energy)",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=_count, default=d.threads, help=f"torch CPU threads (default {d.threads})")
    p.add_argument("--time-limit", type=float, default=None, help="stop after this many seconds")
    _add_overwrite(p)
    p.set_defaults(func=_cmd_finetune)


def _cmd_finetune(args) -> int:
    from openmm_backmap.training.finetune import finetune_files

    _check_outputs(
        {"--out": args.out},
        {"--model": args.model, "--cg": args.cg, "--cg-topology": args.cg_topology},
        args.overwrite,
        {"--out": (".pt",)},
    )
    config = ProteinFinetuning(
        steps=args.steps,
        batch_frames=args.batch,
        lr=args.lr,
        temperature=args.temperature,
        t_start=args.t_start,
        val_fraction=args.val_fraction,
        eval_every=args.eval_every,
        pair_core_kt=args.pair_core_kt,
        seed=args.seed,
        threads=args.threads,
        time_limit=math.inf if args.time_limit is None else args.time_limit,
    )
    config.check()
    finetune_files(args.model, args.cg, args.cg_topology, args.out, config)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from openmm_backmap import __version__

    parser = argparse.ArgumentParser(
        prog="openmm-backmap",
        description="Atoms back from coarse-grained OpenMM simulations with conditional flows.",
    )
    parser.add_argument("--version", action="version", version=f"openmm-backmap {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


_COMMANDS = [
    _add_reference,
    _add_demo,
    _add_train_cg,
    _add_export,
    _add_compile,
    _add_train,
    _add_train_joint,
    _add_info,
    _add_backmap,
    _add_finetune,
    _add_evaluate,
    _add_hybrid,
    _add_peptides,
    _add_entropy,
    _add_cycle,
]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as err:
        print(f"openmm-backmap {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
