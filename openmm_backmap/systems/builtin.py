"""All-atom data: trajectories to (x, X) pairs, and reference MD for the built-in systems.

Positions are nm throughout. Splits are made of contiguous blocks of frames, because frames close
in time are correlated and a random split would leak the validation set into training.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import mdtraj as md
import numpy as np

from openmm_backmap.mapping import CGMapping, as_mdtraj_topology

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
BUILTIN_SYSTEMS = ("ala2", "chignolin")

# (phi, psi) basins of alanine-like residues, with boundaries on the density minima of alanine
# dipeptide in vacuum at 300 K: at phi < 0 the psi histogram is empty between about -110 and 0
# (alpha_R is rare in vacuum), and the two gas-phase minima C7eq (-83, 74) and C5 (-155, 165) meet
# at a shallow saddle near phi = -115. Angles in degrees.
BASINS = ("C7eq", "C5", "alpha_R", "alpha_L")

# Windows for restrained reference runs, per basin: ((phi centre, half-width), (psi centre,
# half-width)) in degrees. Each sits inside its basin of :func:`basin_indicators`, with margins
# of 10 degrees or more for thermal excursions past the walls; the alpha_L window
# spans psi from -90 to 70, so it holds both alpha_L and C7ax.
BASIN_WINDOWS = {
    "C7eq": ((-80.0, 30.0), (70.0, 40.0)),
    "C5": ((-150.0, 25.0), (165.0, 30.0)),
    "alpha_R": ((-80.0, 40.0), (-50.0, 35.0)),
    "alpha_L": ((65.0, 35.0), (-10.0, 80.0)),
}


# ---------------------------------------------------------------------------- trajectories
def load_trajectory(
    trajectory: str | Path | md.Trajectory,
    topology: str | Path | Any | None = None,
    stride: int = 1,
) -> md.Trajectory:
    """Load any trajectory mdtraj reads and check it.

    Raises
    ------
    ValueError
        If the trajectory and topology disagree on the atom count, if it has no frame, or if any
        coordinate is NaN or infinite (naming the first bad frame).
    """
    if isinstance(trajectory, md.Trajectory):
        traj = trajectory[::stride]
    else:
        path = Path(trajectory)
        if not path.exists():
            raise FileNotFoundError(f"trajectory {path} does not exist")
        kwargs = {}
        if topology is not None:
            top = topology if isinstance(topology, (str, Path)) else as_mdtraj_topology(topology)
            if isinstance(top, (str, Path)):
                top = md.load_topology(str(top))
            kwargs["top"] = top
        try:
            traj = md.load(str(path), stride=stride, **kwargs)
        except (ValueError, OSError, IndexError) as err:
            n_file = _file_atom_count(path)
            if n_file is not None and "top" in kwargs and n_file != kwargs["top"].n_atoms:
                raise ValueError(
                    f"the trajectory {path} has {n_file} atoms but the topology has "
                    f"{kwargs['top'].n_atoms}"
                ) from err
            raise ValueError(f"cannot read {path} with the given topology: {err}") from err
    if topology is not None and not isinstance(topology, (str, Path)):
        n_top = as_mdtraj_topology(topology).n_atoms
        if traj.n_atoms != n_top:
            raise ValueError(f"the trajectory has {traj.n_atoms} atoms but the topology has {n_top}")
    if traj.n_frames == 0:
        raise ValueError("the trajectory has no frames")
    bad = ~np.isfinite(traj.xyz).all(axis=(1, 2))
    if bad.any():
        raise ValueError(
            f"the trajectory has NaN or infinite coordinates in {int(bad.sum())} frame(s), "
            f"first in frame {int(np.flatnonzero(bad)[0])}"
        )
    return traj


def _file_atom_count(path: Path) -> int | None:
    """The atom count stored in a trajectory file, or None when the format does not tell."""
    try:
        with md.open(str(path)) as fh:
            return int(np.asarray(fh.read(n_frames=1)[0]).shape[1])
    except Exception:  # noqa: BLE001 - any failure means "unknown", the caller reports the error
        return None


def block_split(
    n_frames: int,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    n_blocks: int = 10,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Split frame indices into train / validation / test sets made of contiguous time blocks.

    The trajectory is cut into ``n_blocks`` equal contiguous blocks; whole blocks are assigned to
    the splits in the given proportions (at least one block each for a non-zero fraction), in an
    order shuffled by ``seed``. Indices within each split stay in time order.
    """
    if n_frames < 1:
        raise ValueError("no frames to split")
    fractions = np.asarray(fractions, dtype=float)
    if fractions.shape != (3,) or np.any(fractions < 0) or abs(fractions.sum() - 1) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    n_blocks = int(min(n_blocks, n_frames))
    wanted = int((fractions > 0).sum())
    if n_blocks < wanted:
        raise ValueError(f"{n_frames} frames cannot be split into {wanted} non-empty blocks")
    counts = np.floor(fractions * n_blocks).astype(int)
    counts[(fractions > 0) & (counts == 0)] = 1
    while counts.sum() > n_blocks:
        counts[int(np.argmax(counts))] -= 1
    counts[0] += n_blocks - counts.sum()
    edges = np.linspace(0, n_frames, n_blocks + 1).round().astype(int)
    order = np.random.default_rng(seed).permutation(n_blocks)
    out, start = {}, 0
    for name, count in zip(("train", "val", "test"), counts):
        blocks = np.sort(order[start : start + count])
        start += count
        idx = [np.arange(edges[b], edges[b + 1]) for b in blocks]
        out[name] = np.concatenate(idx) if idx else np.zeros(0, dtype=int)
    return out


@dataclass
class PairDataset:
    """(x, X) pairs: AA positions ``x`` (N, n_aa, 3) and their CG projections ``X`` (N, n_cg, 3), nm.

    ``frames`` are the indices of the frames in the source trajectory (time order kept), so that
    temporal models can find each frame's predecessor (``previous`` is -1 where the predecessor is
    not in this set).
    """

    x: np.ndarray
    X: np.ndarray
    frames: np.ndarray

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def previous(self) -> np.ndarray:
        """Index (into this dataset) of each frame's predecessor in time, or -1."""
        pos = {int(f): i for i, f in enumerate(self.frames)}
        return np.array([pos.get(int(f) - 1, -1) for f in self.frames], dtype=np.int64)

    def tensors(self, dtype=None):
        """The pairs as torch tensors (float32 by default)."""
        import torch

        dtype = dtype or torch.float32
        return torch.as_tensor(self.x, dtype=dtype), torch.as_tensor(self.X, dtype=dtype)


def make_pairs(
    traj: md.Trajectory,
    mapping: CGMapping,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    n_blocks: int = 10,
    seed: int = 0,
) -> dict[str, PairDataset]:
    """Build train / val / test :class:`PairDataset` s from a trajectory and a mapping."""
    if traj.n_atoms != mapping.n_aa:
        raise ValueError(
            f"the trajectory has {traj.n_atoms} atoms but the mapping expects {mapping.n_aa}"
        )
    x = traj.xyz.astype(np.float64)
    mapping.check_positions(x, "trajectory coordinates")
    X = mapping.project(x)
    return {
        name: PairDataset(x[idx], X[idx], idx)
        for name, idx in block_split(traj.n_frames, fractions, n_blocks, seed).items()
    }


# ---------------------------------------------------------------------------- reference MD
def constraints_from_system(system) -> list[tuple[int, int, float]]:
    """The System's distance constraints as (i, j, length in nm)."""
    from openmm import unit

    out = []
    for k in range(system.getNumConstraints()):
        i, j, d = system.getConstraintParameters(k)
        out.append((int(i), int(j), float(d.value_in_unit(unit.nanometer))))
    return out


def builtin_system(name: str):
    """(openmm.app.Topology, openmm.System, positions) for a built-in system.

    ``ala2``: alanine dipeptide in vacuum (openmmtools' ``AlanineDipeptideVacuum``, amber99sb-ildn
    style parameters, X-H bonds constrained). ``chignolin``: the 10-residue peptide GYDPETGTWG,
    built extended and shipped in ``data/chignolin.pdb``, amber14 with GBn2 implicit solvent, X-H
    bonds constrained.
    """
    from openmm import app

    if name == "ala2":
        from openmm_backmap._compat import import_openmmtools

        ts = import_openmmtools().testsystems.AlanineDipeptideVacuum(constraints=app.HBonds)
        return ts.topology, ts.system, ts.positions
    if name == "chignolin":
        pdb = app.PDBFile(str(DATA_DIR / "chignolin.pdb"))
        ff = app.ForceField("amber14-all.xml", "implicit/gbn2.xml")
        system = ff.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff, constraints=app.HBonds)
        return pdb.topology, system, pdb.positions
    raise ValueError(f"unknown built-in system {name!r}; choose one of {', '.join(BUILTIN_SYSTEMS)}")


def backbone_torsions(topology: Any) -> list[list[int]]:
    """Atom indices of the (phi, psi) pair of every residue that has both, as
    ``[phi_0, psi_0, phi_1, psi_1, ...]`` (4 atoms each)."""
    top = as_mdtraj_topology(topology)
    probe = md.Trajectory(np.zeros((1, top.n_atoms, 3), dtype=np.float32), top)
    phi_idx, psi_idx = md.compute_phi(probe)[0], md.compute_psi(probe)[0]
    psi_by_ca = {int(q[1]): q for q in psi_idx}
    out = []
    for q in phi_idx:
        if int(q[2]) in psi_by_ca:
            out += [[int(a) for a in q], [int(a) for a in psi_by_ca[int(q[2])]]]
    if not out:
        raise ValueError("the topology has no residue with both a phi and a psi dihedral")
    return out


def basin_restraint(topology: Any, basin: str, k_kjmol_rad2: float = 500.0):
    """A flat-bottom restraint holding every residue's (phi, psi) in ``BASIN_WINDOWS[basin]``.

    Zero inside the window, ``k (d - w)^2`` outside, with d the periodic distance to the window's
    centre and w its half-width. Returns the OpenMM ``CustomTorsionForce`` and a description of it
    (the JSON written beside a restrained run).

    A restraint that depends only on atoms that are CG beads by themselves is a function of the CG
    coordinates X, so it changes p(X) but leaves p(x | X) exact: such a run is valid training data
    for a backmapper of that mapping (e.g. to cover a basin that unbiased MD rarely visits), but not
    for a CG potential, nor as a reference ensemble.
    """
    import openmm

    if basin not in BASIN_WINDOWS:
        raise ValueError(f"unknown basin {basin!r}; choose one of {', '.join(BASIN_WINDOWS)}")
    torsions = backbone_torsions(topology)
    force = openmm.CustomTorsionForce("k*step(d-w)*(d-w)^2; d=abs(atan2(sin(theta-theta0), cos(theta-theta0)))")
    for name in ("k", "theta0", "w"):
        force.addPerTorsionParameter(name)
    for t, atoms in enumerate(torsions):
        centre, half = BASIN_WINDOWS[basin][t % 2]
        force.addTorsion(*atoms, [k_kjmol_rad2, np.radians(centre), np.radians(half)])
    info = {
        "basin": basin,
        "windows_deg": {"phi": list(BASIN_WINDOWS[basin][0]), "psi": list(BASIN_WINDOWS[basin][1])},
        "k_kjmol_rad2": float(k_kjmol_rad2),
        "torsions": torsions,
        "atoms": sorted({a for q in torsions for a in q}),
    }
    return force, info


def reference_restraint(trajectory: str | Path) -> dict | None:
    """The restraint a trajectory written by :func:`generate_reference` was run with (from the JSON
    beside it), or None for an unrestrained run or a trajectory without that JSON."""
    meta_path = Path(trajectory).with_suffix(".json")
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return meta.get("restraint") if isinstance(meta, dict) else None


def require_unrestrained(trajectory: str | Path, purpose: str) -> None:
    """Raise when ``trajectory`` comes from a restrained run: its p(X) is biased."""
    restraint = reference_restraint(trajectory)
    if restraint is not None:
        raise ValueError(
            f"{trajectory} was run with a {restraint.get('basin')} restraint on (phi, psi), which biases the "
            f"ensemble; it cannot serve {purpose}. Use an unrestrained run (restrained runs are training data "
            "for backmappers only)"
        )


def check_restraint_for_mapping(trajectory: str | Path, mapping: CGMapping) -> None:
    """Raise unless every atom the trajectory's restraint (if any) acts on is a CG bead by itself,
    the condition under which the restrained run's p(x | X) is unbiased."""
    restraint = reference_restraint(trajectory)
    if restraint is None:
        return
    beads = {int(g[0]) for g in mapping.groups if g.size == 1}
    missing = [a for a in restraint.get("atoms", []) if int(a) not in beads]
    if missing:
        raise ValueError(
            f"{trajectory} was run with a {restraint.get('basin')} restraint on atoms {missing} that are not CG "
            "beads by themselves in this mapping, so its x|X statistics are biased; train this mapping on "
            "unrestrained data only"
        )


def _langevin_context(system, positions, temperature: float, friction_per_ps: float, timestep_fs: float, seed: int,
                      platform: str):
    """(Context, LangevinMiddleIntegrator) seeded with ``seed``, energy-minimised from ``positions``,
    with Maxwell-Boltzmann velocities at ``temperature``."""
    import openmm
    from openmm import unit

    integrator = openmm.LangevinMiddleIntegrator(temperature * unit.kelvin, friction_per_ps / unit.picosecond,
                                                 timestep_fs * unit.femtoseconds)
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
    context, integrator = _langevin_context(system, positions, temperature, friction_per_ps, timestep_fs, seed,
                                            platform)
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


# ---------------------------------------------------------------------------- analysis helpers
def backbone_dihedrals(traj: md.Trajectory) -> tuple[np.ndarray, np.ndarray]:
    """(phi, psi) in degrees, shape (n_frames, n_residues_with_both), for any peptide trajectory."""
    phi_idx, phi = md.compute_phi(traj)
    psi_idx, psi = md.compute_psi(traj)
    # pair phi and psi of the same residue: phi's CA is atom 2, psi's CA is atom 1
    psi_by_ca = {int(q[1]): k for k, q in enumerate(psi_idx)}
    pairs = [(k, psi_by_ca[int(q[2])]) for k, q in enumerate(phi_idx) if int(q[2]) in psi_by_ca]
    if not pairs:
        raise ValueError("the topology has no residue with both a phi and a psi dihedral")
    a, b = zip(*pairs)
    return np.degrees(phi[:, list(a)]), np.degrees(psi[:, list(b)])


#: phi (degrees) above which a configuration belongs to the extended region across phi = 180
PHI_WRAP = 130.0


def basin_indicators(phi: np.ndarray, psi: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean indicators of the :data:`BASINS` for (phi, psi) arrays in degrees; they partition
    the plane. phi >= :data:`PHI_WRAP` is first wrapped to phi - 360: the extended (C5) region
    continues across phi = 180, and vacuum MD at 300 K visits phi = 165..180 often while it
    practically never crosses phi = 0 into C7ax.

    * alpha_L: 0 <= phi < 130 (alpha_L and C7ax);
    * alpha_R: phi < 0 and -120 <= psi < 0;
    * C5: phi < 0 and psi < -120, or phi < -115 and psi >= 100 (the extended region);
    * C7eq: the rest of phi < 0 (psi >= 0).
    """
    phi = np.asarray(phi)
    psi = np.asarray(psi)
    phi = np.where(phi >= PHI_WRAP, phi - 360.0, phi)
    left = phi < 0.0
    c5 = left & ((psi < -120.0) | ((phi < -115.0) & (psi >= 100.0)))
    alpha_r = left & (psi >= -120.0) & (psi < 0.0)
    return {"C7eq": left & ~c5 & ~alpha_r, "C5": c5, "alpha_R": alpha_r, "alpha_L": ~left}


# ---------------------------------------------------------------------------- umbrella reference
def mbar_free_energies(u_kn: np.ndarray, n_k: np.ndarray, tol: float = 1e-10, max_iter: int = 100_000) -> np.ndarray:
    """Dimensionless free energies f_k of K biased states (MBAR's self-consistent equations,
    f_0 = 0) from reduced potentials ``u_kn`` (K, N) of every sample in every state, with ``n_k``
    samples drawn from state k."""
    u_kn = np.asarray(u_kn, dtype=np.float64)
    log_n = np.log(np.asarray(n_k, dtype=np.float64))
    f = np.zeros(u_kn.shape[0])
    for _ in range(max_iter):
        # log of the mixture denominator per sample, then f_k = -log sum_n exp(-u_kn - log_den_n)
        a = log_n[:, None] + f[:, None] - u_kn
        log_den = np.logaddexp.reduce(a, axis=0)
        f_new = -np.logaddexp.reduce(-u_kn - log_den[None, :], axis=1)
        f_new -= f_new[0]
        if np.max(np.abs(f_new - f)) < tol:
            return f_new
        f = f_new
    raise RuntimeError("MBAR did not converge")


def umbrella_basin_populations(
    name: str = "ala2",
    n_windows: int = 36,
    ps_per_window: float = 500.0,
    k_kjmol_rad2: float = 150.0,
    temperature: float = 300.0,
    seed: int = 1,
    equilibrate_ps: float = 20.0,
    save_every_ps: float = 1.0,
    platform: str = "Reference",
    progress: bool = True,
) -> dict:
    """Basin populations of a built-in peptide from umbrella sampling along the first residue's
    phi, unbiased with MBAR: a reference for basins that plain MD does not reach in any affordable
    time (in vacuum, alanine dipeptide's phi > 0 basins lie behind a barrier that 240 ns of MD at
    300 K never crosses).

    ``n_windows`` harmonic restraints k/2 d^2 (d the periodic distance to the window's phi) centred
    evenly on [-180, 180), run one after the other from the previous window's end. Errors: half the
    difference between the estimates from the first and the second half of every window.

    Returns a dict with ``basins`` ({name: {"population", "error"}}), ``phi_profile`` (bin
    centres in degrees, free energy in kT) and the run settings.
    """
    import openmm
    from openmm import unit
    from tqdm.auto import tqdm

    from openmm_backmap.openmm.energies import kT

    if n_windows < 2 or ps_per_window <= 0:
        raise ValueError(
            f"umbrella sampling needs >= 2 windows of positive length, got {n_windows} x {ps_per_window} ps"
        )
    topology, system, positions = builtin_system(name)
    beta = 1.0 / kT(temperature)
    torsions = backbone_torsions(topology)
    restraint = openmm.CustomTorsionForce("0.5*k_umb*d^2; d=atan2(sin(theta-phi_umb), cos(theta-phi_umb))")
    restraint.addGlobalParameter("phi_umb", -math.pi)
    restraint.addGlobalParameter("k_umb", k_kjmol_rad2)
    restraint.addTorsion(*torsions[0], [])
    restraint.setForceGroup(31)
    system.addForce(restraint)
    context, integrator = _langevin_context(system, positions, temperature, 1.0, 2.0, seed, platform)
    centres = np.radians(np.linspace(-180.0, 180.0, n_windows, endpoint=False))
    steps_per_frame = max(1, int(round(save_every_ps * 500.0)))
    n_frames = max(2, int(round(ps_per_window / save_every_ps)))
    top = as_mdtraj_topology(topology)
    angles = np.empty((n_windows, n_frames, len(torsions)))
    for w in tqdm(range(n_windows), desc=f"umbrella {name}", unit="window", disable=not progress):
        context.setParameter("phi_umb", float(centres[w]))
        integrator.step(int(round(equilibrate_ps * 500.0)))
        xyz = np.empty((n_frames, top.n_atoms, 3))
        for k in range(n_frames):
            integrator.step(steps_per_frame)
            xyz[k] = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        angles[w] = md.compute_dihedrals(md.Trajectory(xyz, top), np.asarray(torsions))
    phi_all = angles[:, :, 0]
    psi_all = angles[:, :, 1]

    def estimate(part: slice) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
        phi = phi_all[:, part].reshape(-1)
        psi = psi_all[:, part].reshape(-1)
        d = np.angle(np.exp(1j * (phi[None, :] - centres[:, None])))
        u_kn = beta * 0.5 * k_kjmol_rad2 * d**2
        n_k = np.full(n_windows, phi_all[:, part].shape[1])
        f = mbar_free_energies(u_kn, n_k)
        log_w = -np.logaddexp.reduce(np.log(n_k)[:, None] + f[:, None] - u_kn, axis=0)
        w = np.exp(log_w - log_w.max())
        w /= w.sum()
        ind = basin_indicators(np.degrees(phi), np.degrees(psi))
        return {b: float(w[ind[b]].sum()) for b in BASINS}, np.degrees(phi), w

    full, phi_deg, weights = estimate(slice(None))
    first, _, _ = estimate(slice(0, n_frames // 2))
    second, _, _ = estimate(slice(n_frames // 2, None))
    hist, edges = np.histogram(phi_deg, bins=72, range=(-180.0, 180.0), weights=weights)
    with np.errstate(divide="ignore"):
        profile = -np.log(hist / hist.max())
    return {
        "basins": {b: {"population": full[b], "error": 0.5 * abs(first[b] - second[b])} for b in BASINS},
        "phi_profile": {"phi_deg": (0.5 * (edges[1:] + edges[:-1])).tolist(), "free_energy_kT": profile.tolist()},
        "settings": {"system": name, "n_windows": n_windows, "ps_per_window": ps_per_window,
                     "k_kjmol_rad2": k_kjmol_rad2, "temperature_K": temperature, "seed": seed,
                     "equilibrate_ps": equilibrate_ps, "save_every_ps": save_every_ps, "platform": platform},
    }
