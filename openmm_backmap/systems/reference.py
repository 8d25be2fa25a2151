"""Reference all-atom MD of the built-in systems, and the restraint record of restrained runs.

:func:`generate_reference` writes ``<name>.pdb``, ``<name>.dcd``, ``<name>_system.xml`` and
``<name>.json`` (run metadata: seed, platform, constraints and the restraint, if any).  A run
restrained to a basin (:func:`~openmm_backmap.systems.builtin.basin_restraint`) biases p(X): it is
valid backmapper training data only when the restrained atoms are CG beads by themselves
(:func:`~openmm_backmap.io.trajectories.check_restraint_for_mapping`) and never a reference ensemble
(:func:`~openmm_backmap.io.trajectories.require_unrestrained`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from openmm_backmap.openmm.energies import constraints_from_system
from openmm_backmap.systems.builtin import basin_restraint, builtin_system


def langevin_context(
    system, positions, temperature: float, friction_per_ps: float, timestep_fs: float, seed: int, platform: str
):
    """(Context, LangevinMiddleIntegrator) seeded with ``seed``, energy-minimised from ``positions``,
    with Maxwell-Boltzmann velocities at ``temperature``."""
    import openmm
    from openmm import unit

    integrator = openmm.LangevinMiddleIntegrator(
        temperature * unit.kelvin, friction_per_ps / unit.picosecond, timestep_fs * unit.femtoseconds
    )
    integrator.setRandomNumberSeed(int(seed))
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName(platform))
    context.setPositions(positions)
    openmm.LocalEnergyMinimizer.minimize(context)
    context.setVelocitiesToTemperature(temperature * unit.kelvin, int(seed))
    return context, integrator


def generate_reference(
    name: str,
    ns: float,
    out_dir: str | Path,
    seed: int = 1,
    temperature: float = 300.0,
    timestep_fs: float = 2.0,
    friction_per_ps: float = 1.0,
    save_every_ps: float = 1.0,
    equilibrate_ps: float = 20.0,
    platform: str = "Reference",
    progress: bool = True,
    restrain: str | None = None,
) -> dict[str, Path]:
    """Run Langevin MD of a built-in system and write ``<name>.pdb``, ``<name>.dcd``,
    ``<name>_system.xml`` (the AA System) and ``<name>.json`` (run metadata, constraints).

    Parameters
    ----------
    ns
        Production length in nanoseconds (after ``equilibrate_ps`` of equilibration).
    seed
        Seeds the initial velocities and the Langevin integrator, so a run is reproducible on the
        same platform.
    save_every_ps
        Frame interval in ps.
    restrain
        A basin name of :data:`BASIN_WINDOWS`: hold every residue's (phi, psi) in that basin with
        :func:`basin_restraint` (backmapper training data for rare basins). The written System XML
        is the unrestrained one; the JSON records the restraint.

    Returns
    -------
    dict
        Paths of the written files under the keys ``pdb``, ``dcd``, ``system``, ``json``.
    """
    import openmm
    from openmm import app, unit
    from tqdm.auto import tqdm

    if ns <= 0:
        raise ValueError(f"--ns must be positive, got {ns}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    topology, system, positions = builtin_system(name)
    system_xml = openmm.XmlSerializer.serialize(system)  # the unrestrained System is the one written
    restraint = None
    if restrain is not None:
        force, restraint = basin_restraint(topology, restrain)
        force.setForceGroup(31)  # left out of the recorded potential energies
        system.addForce(force)
    energy_groups = set(range(31)) if restrain is not None else -1
    dt = timestep_fs * unit.femtoseconds
    context, integrator = langevin_context(system, positions, temperature, friction_per_ps, timestep_fs, seed, platform)
    steps_per_frame = max(1, int(round(save_every_ps * 1000.0 / timestep_fs)))
    n_frames = max(1, int(round(ns * 1000.0 / save_every_ps)))
    integrator.step(int(round(equilibrate_ps * 1000.0 / timestep_fs)))

    paths = {
        "pdb": out / f"{name}.pdb",
        "dcd": out / f"{name}.dcd",
        "system": out / f"{name}_system.xml",
        "json": out / f"{name}.json",
    }
    state = context.getState(getPositions=True)
    with open(paths["pdb"], "w") as fh:
        app.PDBFile.writeFile(topology, state.getPositions(), fh, keepIds=True)
    paths["system"].write_text(system_xml)
    energies = np.empty(n_frames)
    start = time.perf_counter()
    with open(paths["dcd"], "wb") as fh:
        dcd = app.DCDFile(fh, topology, dt, firstStep=0, interval=steps_per_frame)
        bar = tqdm(range(n_frames), desc=f"reference {name}", unit="ps", disable=not progress)
        for k in bar:
            integrator.step(steps_per_frame)
            state = context.getState(getPositions=True, getEnergy=True, groups=energy_groups)
            energies[k] = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
            if not np.isfinite(energies[k]):
                raise RuntimeError(f"reference MD of {name} blew up at frame {k} (energy {energies[k]})")
            dcd.writeModel(state.getPositions())
    wall = time.perf_counter() - start
    meta = {
        "system": name,
        "ns": ns,
        "seed": seed,
        "temperature_K": temperature,
        "timestep_fs": timestep_fs,
        "friction_per_ps": friction_per_ps,
        "save_every_ps": save_every_ps,
        "equilibrate_ps": equilibrate_ps,
        "platform": platform,
        "n_frames": n_frames,
        "n_atoms": topology.getNumAtoms(),
        "mean_potential_kjmol": float(energies.mean()),
        "wall_seconds": wall,
        "openmm_version": openmm.__version__,
        "constraints": [list(c) for c in constraints_from_system(system)],
        "restraint": restraint,
    }
    paths["json"].write_text(json.dumps(meta, indent=1) + "\n")
    return paths
