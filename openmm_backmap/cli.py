"""The ``openmm-backmap`` command line.

Each subcommand is one function ``_cmd_<name>(args)`` registered by ``_add_<name>(subparsers)``;
heavy imports happen inside the command so ``openmm-backmap --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


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
    p.set_defaults(func=_cmd_reference)


def _cmd_reference(args) -> int:
    from openmm_backmap.data import generate_reference

    paths = generate_reference(
        args.system,
        args.ns,
        args.out,
        seed=args.seed,
        temperature=args.temperature,
        save_every_ps=args.save_every_ps,
        platform=args.platform,
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
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from openmm_backmap.demo import run_demo

    return run_demo(Path(args.out), quick=args.quick, seed=args.seed)


# ---------------------------------------------------------------------------- main
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


_COMMANDS = [_add_reference, _add_demo]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"openmm-backmap {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
