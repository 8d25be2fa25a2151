"""Peptide builder and amber14 + GBn2 implicit-solvent MD corpus generator.

Peptides are built from residue names: an extended trans backbone (N, CA, C, L geometry) is
placed by internal coordinates, pdbfixer adds the missing heavy side-chain atoms from its
templates, and OpenMM's Modeller adds hydrogens at pH 7 (histidine as HID, HIE or HIP by
residue name). Every peptide bond and every stereocentre is checked numerically after building
and after minimisation, so a corpus never silently contains cis bonds or D residues.

The corpus layout, one directory per peptide under ``<out>/<id>/``::

    topology.pdb  amber14 atom/residue names with hydrogens (openmm PDBFile of the final Topology)
    traj.dcd      production frames (mdtraj reads them in nm)
    system.xml    the amber14 + GBn2 System with standard masses
    meta.json     sequence, termini, temperature, time step, masses, frames, seed, speed, platform

plus ``<out>/manifest.json`` (finished ids) and ``<out>/gen.log``. A peptide is written to a
temporary directory and renamed when complete, so a killed job restarted skips finished ones.

Run ``python -m openmm_backmap.systems.peptides --out DIR`` to generate the default corpus.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# Standard residues accepted by the builder (amber14 names; HIS is not accepted: choose a tautomer).
STANDARD_RESIDUES = (
    "ALA",
    "ARG",
    "ASN",
    "ASP",
    "CYS",
    "GLN",
    "GLU",
    "GLY",
    "HID",
    "HIE",
    "HIP",
    "ILE",
    "LEU",
    "LYS",
    "MET",
    "PHE",
    "PRO",
    "SER",
    "THR",
    "TRP",
    "TYR",
    "VAL",
)
CAPS = ("ACE", "NME")
ONE_LETTER = {
    "ALA": "A",
    "ARG": "R",
    "ASN": "N",
    "ASP": "D",
    "CYS": "C",
    "GLN": "Q",
    "GLU": "E",
    "GLY": "G",
    "HID": "H",
    "HIE": "H",
    "HIP": "H",
    "ILE": "I",
    "LEU": "L",
    "LYS": "K",
    "MET": "M",
    "PHE": "F",
    "PRO": "P",
    "SER": "S",
    "THR": "T",
    "TRP": "W",
    "TYR": "Y",
    "VAL": "V",
}
TERMINI = ("charged", "capped")

# Backbone internal coordinates (Angstrom, degrees; Engh & Huber values).
_BOND = {"N-CA": 1.458, "CA-C": 1.525, "C-N": 1.329}
_ANGLE = {"N-CA-C": 111.2, "CA-C-N": 116.2, "C-N-CA": 121.7}
# (phi, psi) in degrees of the built backbone, for residues other than proline and for proline
# (its ring fixes phi near -65 degrees): an extended strand (proline in PPII) or an alpha helix.
BACKBONE_STARTS = {
    "extended": ((-120.0, 130.0), (-65.0, 140.0)),
    "helix": ((-57.0, -47.0), (-65.0, -40.0)),
}

# Signs of the triple products that define the natural stereocentres (see ``_chirality``):
# CA of L residues: (N-CA) x (C-CA) . (CB-CA); Ile CB (3S): (CA-CB) x (CG1-CB) . (CG2-CB);
# Thr CB (3R; OG1 takes CG1's place): (CA-CB) x (OG1-CB) . (CG2-CB).
# Checked against pdbfixer's ideal (CCD) templates in the tests.
_CHIRAL_CENTRES = {
    "CA": (("N", "C", "CB"), +1.0),
    "ILE:CB": (("CA", "CG1", "CG2"), +1.0),
    "THR:CB": (("CA", "OG1", "CG2"), +1.0),
}
OMEGA_TRANS_MIN = 150.0  # |omega| (degrees) required of a trans peptide bond
OMEGA_CIS_MAX = 30.0  # |omega| (degrees) required of a requested cis X-Pro bond
# Thermal frames fluctuate (|omega| of trans bonds dips to ~130 deg at 300 K, cis Pro reaches ~32
# deg), so MD frames are checked only for isomerisation: trans beyond 110 deg, cis within 70 deg.
OMEGA_TRANS_MIN_MD = 110.0
OMEGA_CIS_MAX_MD = 70.0

log = logging.getLogger("openmm_backmap.peptides")


def _check_start(start: str) -> None:
    """Raise ValueError unless ``start`` names a backbone of ``BACKBONE_STARTS``."""
    if start not in BACKBONE_STARTS:
        raise ValueError(f"start must be one of {tuple(BACKBONE_STARTS)}, got {start!r}")


def _place(a: np.ndarray, b: np.ndarray, c: np.ndarray, bond: float, angle: float, torsion: float) -> np.ndarray:
    """Place atom d from a, b, c with |cd| = bond, angle bcd and dihedral abcd (Angstrom, deg)."""
    angle, torsion = math.radians(angle), math.radians(torsion)
    bc = c - b
    bc /= np.linalg.norm(bc)
    n = np.cross(b - a, bc)
    n /= np.linalg.norm(n)
    m = np.cross(n, bc)
    d2 = np.array(
        [
            -bond * math.cos(angle),
            bond * math.sin(angle) * math.cos(torsion),
            bond * math.sin(angle) * math.sin(torsion),
        ]
    )
    return c + d2[0] * bc + d2[1] * m + d2[2] * n


def dihedral(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, p3: np.ndarray) -> float:
    """Dihedral angle p0-p1-p2-p3 in degrees, in (-180, 180]."""
    b0, b1, b2 = p0 - p1, p2 - p1, p3 - p2
    b1 = b1 / np.linalg.norm(b1)
    v = b0 - np.dot(b0, b1) * b1
    w = b2 - np.dot(b2, b1) * b1
    return math.degrees(math.atan2(np.dot(np.cross(b1, v), w), np.dot(v, w)))


def _full_sequence(sequence: list[str], termini: str) -> list[str]:
    """Validate residue names and add ACE/NME caps for ``termini='capped'``."""
    if termini not in TERMINI:
        raise ValueError(f"termini must be one of {TERMINI}, got {termini!r}")
    residues = [str(r).upper() for r in sequence]
    if len(residues) < 1:
        raise ValueError("a peptide needs at least one residue")
    for i, name in enumerate(residues):
        if name not in STANDARD_RESIDUES:
            hint = " (choose HID, HIE or HIP)" if name == "HIS" else ""
            raise ValueError(f"unknown residue name {name!r} at position {i}{hint}")
    return ["ACE", *residues, "NME"] if termini == "capped" else residues


def _backbone_pdb(full: list[str], cis_bonds: set[int], start: str = "extended") -> str:
    """PDB text with N, CA, C of every residue (CH3, C of ACE; N, C of NME) on the backbone
    ``start`` names in ``BACKBONE_STARTS``.

    ``cis_bonds`` holds indices i (into ``full``) whose preceding peptide bond (i-1, i) is cis.
    """
    torsions, pro_torsions = BACKBONE_STARTS[start]
    # Each residue contributes (atom name, role) with role in {"N", "CA", "C"}.
    roles = []
    for name in full:
        if name == "ACE":
            roles.append([("CH3", "CA"), ("C", "C")])
        elif name == "NME":
            roles.append([("N", "N"), ("C", "CA")])
        else:
            roles.append([("N", "N"), ("CA", "CA"), ("C", "C")])
    atoms: list[tuple[int, str, np.ndarray]] = []
    chain: list[np.ndarray] = []  # positions along N-CA-C-N-CA-C...
    chain_roles: list[str] = []
    for i, name in enumerate(full):
        phi = (pro_torsions if name == "PRO" else torsions)[0]
        for atom_name, role in roles[i]:
            if not chain:
                pos = np.zeros(3)
            elif len(chain) == 1:
                key = f"{chain_roles[-1]}-{role}"
                pos = chain[0] + np.array([_BOND[key], 0.0, 0.0])
            elif len(chain) == 2:
                key = f"{chain_roles[-1]}-{role}"
                ang = math.radians(_ANGLE[f"{chain_roles[-2]}-{chain_roles[-1]}-{role}"])
                pos = chain[1] + _BOND[key] * np.array([-math.cos(ang), math.sin(ang), 0.0])
            else:
                key = f"{chain_roles[-1]}-{role}"
                ang = _ANGLE[f"{chain_roles[-2]}-{chain_roles[-1]}-{role}"]
                if role == "N":  # psi(i-1) = N(i-1)-CA(i-1)-C(i-1)-N(i); ACE has no N
                    torsion = (pro_torsions if full[i - 1] == "PRO" else torsions)[1]
                elif role == "CA":  # omega CA(i-1)-C(i-1)-N(i)-CA(i)
                    torsion = 0.0 if i in cis_bonds else 180.0
                else:  # role == "C": phi(i) = C(i-1)-N(i)-CA(i)-C(i)
                    torsion = phi
                pos = _place(chain[-3], chain[-2], chain[-1], _BOND[key], ang, torsion)
            chain.append(pos)
            chain_roles.append(role)
            atoms.append((i, atom_name, pos))
    atoms += _carbonyl_o_and_cb(full, atoms)
    atoms.sort(key=lambda a: a[0])  # stable: keeps the backbone order within each residue
    lines = []
    for serial, (i, atom_name, pos) in enumerate(atoms, start=1):
        resname = "HIS" if full[i] in ("HID", "HIE", "HIP") else full[i]
        padded = f" {atom_name:<3}" if len(atom_name) < 4 else atom_name
        lines.append(
            f"ATOM  {serial:5d} {padded} {resname:>3} A{i + 1:4d}    "
            f"{pos[0]:8.3f}{pos[1]:8.3f}{pos[2]:8.3f}  1.00  0.00"
            f"          {atom_name[0]:>2}"
        )
    lines += ["TER", "END", ""]
    return "\n".join(lines)


def _carbonyl_o_and_cb(
    full: list[str],
    atoms: list[tuple[int, str, np.ndarray]],
) -> list[tuple[int, str, np.ndarray]]:
    """Carbonyl O of every residue with a C, and an L-configured CB of every non-Gly residue.

    pdbfixer overlays its templates on the atoms present with a Kabsch fit that does not exclude
    reflections; on N, CA, C alone it can mirror a side chain into the D form. With O and CB
    placed (non-coplanar), the proper rotation is the exact fit.
    """
    by_res: dict[int, dict[str, np.ndarray]] = {}
    for i, name, pos in atoms:
        by_res.setdefault(i, {})[name] = pos
    extra = []
    for i, res in by_res.items():
        ca = res.get("CA", res.get("CH3"))
        if "C" in res and full[i] != "NME":
            nxt = by_res.get(i + 1, {}).get("N")
            if nxt is not None:
                u = (ca - res["C"]) / np.linalg.norm(ca - res["C"])
                v = (nxt - res["C"]) / np.linalg.norm(nxt - res["C"])
                o = res["C"] - 1.229 * (u + v) / np.linalg.norm(u + v)
            else:  # C-terminal carboxylate: O anti to N; pdbfixer adds OXT
                o = _place(res["N"], ca, res["C"], 1.25, 120.5, -60.0)
            extra.append((i, "O", o))
        if full[i] not in ("GLY", "ACE", "NME"):
            # Torsion C-N-CA-CB = -122.5 deg gives the L configuration (see _CHIRAL_CENTRES).
            extra.append((i, "CB", _place(res["C"], res["N"], res["CA"], 1.53, 110.5, -122.5)))
    return extra


@contextlib.contextmanager
def _proper_template_overlay():
    """Make pdbfixer overlay residue templates by proper rotations only (no reflections).

    pdbfixer's Kabsch fit (``pdbfixer.pdbfixer._overlayPoints``) omits the determinant
    correction, so on our N, CA, C, O, CB scaffold it often returns a reflection and builds the
    mirror image of a side chain (a Pro ring through its own C, strained Gln/Arg side chains).
    This context swaps in the corrected fit and restores pdbfixer's afterwards.
    """
    import pdbfixer.pdbfixer as pdbfixer_module
    from openmm import unit

    original = pdbfixer_module._overlayPoints

    def overlay(points1, points2):
        if len(points1) < 3:
            return original(points1, points2)
        center1 = unit.sum(points1) / float(len(points1))
        center2 = unit.sum(points2) / float(len(points2))
        x = np.array([p - center1 for p in points1])
        y = np.array([p - center2 for p in points2])
        u, _, vt = np.linalg.svd(y.T @ x)
        u[:, -1] *= np.sign(np.linalg.det(u @ vt))
        return (-1 * center2, (u @ vt).T, center1)

    pdbfixer_module._overlayPoints = overlay
    try:
        yield
    finally:
        pdbfixer_module._overlayPoints = original


def _atom_positions(topology, positions) -> list[dict[str, np.ndarray]]:
    """Per residue, a dict atom name -> position (Angstrom)."""
    xyz = np.asarray(_to_angstrom(positions))
    return [{a.name: xyz[a.index] for a in res.atoms()} for res in topology.residues()]


def _to_angstrom(positions) -> np.ndarray:
    from openmm import unit

    if unit.is_quantity(positions):
        return np.asarray(positions.value_in_unit(unit.angstrom))
    return np.asarray(positions) * 10.0  # bare numbers are nm (OpenMM convention)


def _chirality(res: dict[str, np.ndarray], centre: str, neighbours: tuple[str, str, str]) -> float:
    c = res[centre]
    a, b, d = (res[n] - c for n in neighbours)
    return float(np.dot(np.cross(a, b), d))


def check_geometry(
    topology,
    positions,
    cis_prolines: tuple[int, ...] | list[int] = (),
    trans_min: float = OMEGA_TRANS_MIN,
    cis_max: float = OMEGA_CIS_MAX,
) -> dict:
    """Check peptide-bond omegas and stereocentres; raise ValueError naming a bad residue.

    Parameters
    ----------
    topology : openmm.app.Topology
        One peptide chain (caps allowed).
    positions : Quantity or array
        Positions (length unit, or bare nm).
    cis_prolines : sequence of int
        Residue indices (0-based, counted in the Topology, caps included) of prolines whose
        preceding peptide bond must be cis (|omega| < ``cis_max``). All other bonds must be
        trans (|omega| > ``trans_min``).
    trans_min, cis_max : float
        Thresholds in degrees: 150 and 30 for built or minimised structures (the defaults);
        ``OMEGA_TRANS_MIN_MD`` and ``OMEGA_CIS_MAX_MD`` for thermal MD frames.

    Returns
    -------
    dict
        ``omega`` (list of degrees, bond i precedes residue i+1) and ``chirality`` (dict name -> sign).
    """
    residues = list(topology.residues())
    atoms = _atom_positions(topology, positions)
    cis = set(int(i) for i in cis_prolines)
    for i in cis:
        if not 0 < i < len(residues) or residues[i].name != "PRO":
            raise ValueError(f"cis proline requested at residue {i}, which is not a preceded PRO")
    omegas = []
    for i in range(1, len(residues)):
        prev, cur = atoms[i - 1], atoms[i]
        ca_prev = prev.get("CA", prev.get("CH3"))
        ca_cur = cur.get("CA", cur.get("C") if residues[i].name == "NME" else None)
        omega = dihedral(ca_prev, prev["C"], cur["N"], ca_cur)
        omegas.append(omega)
        label = f"{residues[i - 1].name}{i - 1}-{residues[i].name}{i}"
        if i in cis:
            if abs(omega) > cis_max:
                raise ValueError(f"peptide bond {label} should be cis but omega = {omega:.1f} deg")
        elif abs(omega) < trans_min:
            raise ValueError(f"peptide bond {label} is not trans: omega = {omega:.1f} deg")
    signs = {}
    for i, (res, pos) in enumerate(zip(residues, atoms)):
        checks = []
        if "CB" in pos and "CA" in pos:
            checks.append(("CA", *_CHIRAL_CENTRES["CA"]))
        if res.name in ("ILE", "THR"):
            checks.append(("CB", *_CHIRAL_CENTRES[f"{res.name}:CB"]))
        for centre, neighbours, sign in checks:
            value = _chirality(pos, centre, neighbours)
            if value * sign <= 0:
                raise ValueError(f"residue {res.name}{i}: wrong chirality at {centre} (triple product {value:.3f})")
            signs[f"{res.name}{i}:{centre}"] = math.copysign(1.0, value)
    return {"omega": omegas, "chirality": signs}


def build_peptide(
    sequence: list[str] | tuple[str, ...],
    termini: str = "charged",
    cis_prolines: tuple[int, ...] | list[int] = (),
    forcefield=None,
    max_attempts: int = 20,
    relax: bool = True,
    seed: int = 0,
    start: str = "extended",
):
    """Build an all-atom peptide (amber14 names, hydrogens at pH 7) on an extended or helical backbone.

    Parameters
    ----------
    sequence : list of str
        amber14 residue names without caps, e.g. ``["ALA", "HID", "PRO"]``. HIS is refused:
        give HID, HIE or HIP. CYS is built as free thiol CYS.
    termini : {"charged", "capped"}
        ``"charged"``: NH3+ and COO- termini; ``"capped"``: ACE and NME caps.
    cis_prolines : sequence of int
        Indices into ``sequence`` of prolines whose preceding peptide bond is built cis.
    forcefield : openmm.app.ForceField, optional
        Used for hydrogen placement; defaults to amber14 + GBn2.
    max_attempts : int
        Builds tried (pdbfixer seeds ``seed``, ``seed + 1``, ...) before giving up on a geometry
        that fails the checks.
    relax : bool
        Minimise the built peptide with amber14 + GBn2 (standard masses, CPU, one thread) and
        check it again; the returned positions are the minimised ones.
    seed : int
        First pdbfixer seed.
    start : {"extended", "helix"}
        Backbone torsions of the build (``BACKBONE_STARTS``): an extended strand or an alpha helix.

    Returns
    -------
    topology : openmm.app.Topology
    positions : Quantity
        Positions in nm.

    Raises
    ------
    ValueError
        Unknown residue name (with its position), a cis request on a non-proline or first residue,
        an unknown ``start``, or a built geometry with a non-trans omega or a non-L stereocentre
        (naming the residue).
    """
    from openmm import app, unit
    from pdbfixer import PDBFixer

    _check_start(start)
    full = _full_sequence(list(sequence), termini)
    offset = 1 if termini == "capped" else 0
    cis_full = set()
    for i in cis_prolines:
        if not 0 <= i < len(sequence) or full[i + offset] != "PRO":
            raise ValueError(f"cis proline requested at position {i}, which is not PRO")
        if i + offset == 0:
            raise ValueError(f"cis proline at position {i} has no preceding peptide bond")
        cis_full.add(i + offset)
    ff = forcefield or make_forcefield()
    pdb_text = _backbone_pdb(full, cis_full, start)
    variants = [name if name in ("HID", "HIE", "HIP", "CYS") else None for name in full]
    error = None
    # pdbfixer's relaxation of added atoms is stochastic and can leave a clash whose minimisation
    # inverts a stereocentre or flips a peptide bond; such builds are refused by the checks and
    # rebuilt from the next seed.
    for attempt in range(max_attempts):
        fixer = PDBFixer(pdbfile=io.StringIO(pdb_text))
        fixer.missingResidues = {}
        fixer.findMissingAtoms()
        if termini == "capped":
            fixer.missingTerminals = {}
        with _proper_template_overlay():
            fixer.addMissingAtoms(seed=seed + attempt)
        modeller = app.Modeller(fixer.topology, fixer.positions)
        modeller.addHydrogens(ff, pH=7.0, variants=variants)
        for res, name in zip(modeller.topology.residues(), full):
            res.name = name  # HIS -> HID/HIE/HIP (ForceField matches templates by bonded graph)
        positions = np.asarray(modeller.positions.value_in_unit(unit.nanometer))
        try:
            check_geometry(modeller.topology, positions, sorted(cis_full))
            if relax:
                positions = _relax(modeller.topology, positions, ff)
                check_geometry(modeller.topology, positions, sorted(cis_full))
        except ValueError as exc:
            error = exc
            continue
        return modeller.topology, unit.Quantity(positions, unit.nanometer)
    raise ValueError(f"no valid build in {max_attempts} attempts: {error}")


def _relax(
    topology, positions: np.ndarray, forcefield, tolerance: float = 10.0, max_iterations: int = 1000
) -> np.ndarray:
    """Minimise positions (nm) with amber14 + GBn2 on one CPU thread; returns nm array."""
    import openmm
    from openmm import unit

    system = make_gbn2_system(topology, None, forcefield)
    platform, props = make_platform("CPU")
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), platform, props)
    context.setPositions(positions)
    openmm.LocalEnergyMinimizer.minimize(context, tolerance, max_iterations)
    state = context.getState(getPositions=True)
    return state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)


def make_forcefield():
    """amber14 protein force field with the GBn2 implicit-solvent model."""
    from openmm import app

    return app.ForceField("amber14-all.xml", "implicit/gbn2.xml")


def make_gbn2_system(topology, hydrogen_mass: float | None = None, forcefield=None):
    """amber14 + GBn2 System: no cutoff, H-bond constraints, optional hydrogen mass (amu).

    ``hydrogen_mass`` repartitions mass from heavy atoms onto bonded hydrogens (HMR); pass None
    for standard masses (the System written to disk always has standard masses).
    """
    from openmm import app, unit

    ff = forcefield or make_forcefield()
    kwargs = {"hydrogenMass": hydrogen_mass * unit.amu} if hydrogen_mass else {}
    return ff.createSystem(topology, nonbondedMethod=app.NoCutoff, constraints=app.HBonds, **kwargs)


def make_platform(name: str):
    """An OpenMM platform and its properties, restricted to one thread for CPU."""
    import openmm

    platform = openmm.Platform.getPlatformByName(name)
    props = {"Threads": "1"} if name == "CPU" else {}
    return platform, props


@dataclass
class MDConfig:
    """Settings of one peptide run (times in ps, temperature in K, masses in amu)."""

    temperature: float = 300.0
    timestep_fs: float = 4.0
    hydrogen_mass: float = 4.0
    friction_per_ps: float = 1.0
    equilibration_ps: float = 10.0
    production_ps: float = 60.0
    save_interval_ps: float = 0.5
    platform: str = "CPU"
    seed: int = 0

    @property
    def steps_per_frame(self) -> int:
        return max(1, round(self.save_interval_ps * 1000.0 / self.timestep_fs))

    @property
    def n_frames(self) -> int:
        return max(1, round(self.production_ps / self.save_interval_ps))


def _simulation(topology, positions, config: MDConfig, forcefield=None):
    import openmm
    from openmm import app, unit

    system = make_gbn2_system(topology, config.hydrogen_mass, forcefield)
    integrator = openmm.LangevinMiddleIntegrator(
        config.temperature * unit.kelvin,
        config.friction_per_ps / unit.picosecond,
        config.timestep_fs * unit.femtosecond,
    )
    integrator.setRandomNumberSeed(config.seed)
    platform, props = make_platform(config.platform)
    sim = app.Simulation(topology, system, integrator, platform, props)
    sim.context.setPositions(positions)
    return sim


def run_peptide_md(
    topology,
    positions,
    config: MDConfig,
    dcd_path: str | os.PathLike,
    cis_prolines: tuple[int, ...] | list[int] = (),
    forcefield=None,
) -> dict:
    """Minimise, equilibrate and run production MD, writing frames to a DCD file.

    Geometry (trans omegas, L chirality) is checked after minimisation (strict thresholds) and
    on the last frame (isomerisation thresholds, see :func:`check_geometry`).

    Parameters
    ----------
    topology, positions
        From :func:`build_peptide`.
    config : MDConfig
        Temperature, time step, hydrogen mass, durations, save interval, platform and seed.
    dcd_path : path
        Output DCD (Angstrom on disk; mdtraj reads nm).
    cis_prolines : sequence of int
        Topology residue indices of cis prolines (for the geometry checks).

    Returns
    -------
    dict
        ``n_frames``, ``steps_per_s`` (production, wall clock), ``cpu_steps_per_s`` (per
        second of this process's CPU time), ``final_positions`` (nm array),
        ``final_potential_kj_mol``.
    """
    from openmm import app, unit

    sim = _simulation(topology, positions, config, forcefield)
    sim.minimizeEnergy(tolerance=1.0, maxIterations=2000)
    state = sim.context.getState(getPositions=True)
    check_geometry(topology, state.getPositions(asNumpy=True), cis_prolines)
    sim.context.setVelocitiesToTemperature(config.temperature * unit.kelvin, config.seed)
    n_eq = round(config.equilibration_ps * 1000.0 / config.timestep_fs)
    if n_eq:
        sim.step(n_eq)
    reporter = app.DCDReporter(str(dcd_path), config.steps_per_frame)
    sim.reporters.append(reporter)
    start, cpu_start = time.perf_counter(), time.process_time()
    n_steps = config.n_frames * config.steps_per_frame
    sim.step(n_steps)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    sim.reporters.remove(reporter)
    del reporter  # DCDReporter closes its file when collected
    state = sim.context.getState(getPositions=True, getEnergy=True)
    energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    if not math.isfinite(energy):
        raise ValueError(f"non-finite potential energy {energy} at the end of the run")
    final = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    check_geometry(topology, final, cis_prolines, OMEGA_TRANS_MIN_MD, OMEGA_CIS_MAX_MD)
    return {
        "n_frames": config.n_frames,
        "steps_per_s": n_steps / elapsed,
        "cpu_steps_per_s": n_steps / max(cpu, 1e-9),
        "final_positions": final,
        "final_potential_kj_mol": energy,
    }


def measure_speed(
    platform: str, sequence=("ALA", "LYS", "PHE", "GLU", "SER"), n_steps: int = 500, config: MDConfig | None = None
) -> float:
    """Steps per second of amber14 + GBn2 MD of a peptide on one platform (one thread)."""
    config = config or MDConfig()
    config = MDConfig(**{**asdict(config), "platform": platform})
    topology, positions = build_peptide(list(sequence))
    sim = _simulation(topology, positions, config)
    sim.minimizeEnergy(maxIterations=200)
    sim.context.setVelocitiesToTemperature(config.temperature)
    sim.step(50)
    start = time.perf_counter()
    sim.step(n_steps)
    return n_steps / (time.perf_counter() - start)


@dataclass
class PeptideSpec:
    """One corpus entry: residues (no caps), termini kind, cis prolines, temperature (K), and the
    backbone the MD starts from (a key of ``BACKBONE_STARTS``)."""

    id: str
    sequence: list[str]
    termini: str = "charged"
    cis_prolines: list[int] = field(default_factory=list)
    temperature: float = 300.0
    start: str = "extended"


def _write_manifest(out_dir: Path) -> list[str]:
    ids = sorted(
        p.name for p in out_dir.iterdir() if p.is_dir() and not p.name.endswith(".tmp") and (p / "meta.json").exists()
    )
    # a temporary file of its own: two jobs (or threads) writing one corpus must not replace or
    # truncate each other's file; the rename is atomic, so a reader sees one whole manifest
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".manifest.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"finished": ids}, indent=1))
    os.replace(tmp, out_dir / "manifest.json")
    return ids


def generate_peptide(
    spec: PeptideSpec, out_dir: str | os.PathLike, config: MDConfig, forcefield=None, build_seed: int = 0
) -> Path:
    """Build, simulate and write one peptide to ``out_dir/<id>/`` (via a temporary directory).

    Raises ValueError (leaving no finished directory) when a geometry check fails.
    """
    import openmm
    from openmm import app, unit

    out_dir = Path(out_dir)
    final_dir = out_dir / spec.id
    tmp_dir = out_dir / f"{spec.id}.tmp"
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir(parents=True)
    ff = forcefield or make_forcefield()
    topology, positions = build_peptide(
        spec.sequence, spec.termini, spec.cis_prolines, ff, seed=build_seed, start=spec.start
    )
    offset = 1 if spec.termini == "capped" else 0
    cis_topology = [i + offset for i in spec.cis_prolines]
    run_config = MDConfig(**{**asdict(config), "temperature": spec.temperature})
    t0 = time.time()
    result = run_peptide_md(topology, positions, run_config, tmp_dir / "traj.dcd", cis_topology, ff)
    with open(tmp_dir / "topology.pdb", "w") as fh:
        app.PDBFile.writeFile(topology, result["final_positions"] * unit.nanometer, fh)
    system = make_gbn2_system(topology, None, ff)
    (tmp_dir / "system.xml").write_text(openmm.XmlSerializer.serialize(system))
    meta = {
        "id": spec.id,
        "sequence": [r.name for r in topology.residues()],
        "one_letter": "".join(ONE_LETTER[r] for r in spec.sequence),
        "termini": spec.termini,
        "cis_pro": cis_topology,
        "temperature_K": spec.temperature,
        "start": spec.start,
        "timestep_fs": run_config.timestep_fs,
        "hmr_mass_amu": run_config.hydrogen_mass,
        "friction_per_ps": run_config.friction_per_ps,
        "equilibration_ps": run_config.equilibration_ps,
        "production_ps": run_config.n_frames * run_config.save_interval_ps,
        "save_interval_ps": run_config.save_interval_ps,
        "n_frames": result["n_frames"],
        "n_atoms": topology.getNumAtoms(),
        "seed": run_config.seed,
        "steps_per_s": round(result["steps_per_s"], 1),
        "cpu_steps_per_s": round(result["cpu_steps_per_s"], 1),
        "platform": run_config.platform,
        "force_field": ["amber14-all.xml", "implicit/gbn2.xml"],
        "final_potential_kj_mol": result["final_potential_kj_mol"],
        "wall_s": round(time.time() - t0, 1),
    }
    (tmp_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    if final_dir.exists():
        shutil.rmtree(final_dir)
    tmp_dir.rename(final_dir)
    return final_dir


def generate_corpus(
    specs: list[PeptideSpec],
    out_dir: str | os.PathLike,
    config: MDConfig,
) -> list[str]:
    """Generate every peptide in ``specs`` not already finished in ``out_dir``; resumable.

    Each finished peptide is renamed into place and listed in ``out_dir/manifest.json``; a
    restarted job skips ids whose directory holds a ``meta.json``. A peptide whose geometry
    checks fail is rebuilt from other pdbfixer seeds (3 tries) and then skipped with a
    ``FAILED`` log line. Progress goes to ``out_dir/gen.log``. Returns the finished ids.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out_dir / "gen.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    ff = make_forcefield()
    try:
        for k, spec in enumerate(specs):
            if (out_dir / spec.id / "meta.json").exists():
                log.info("skip %s (finished)", spec.id)
                continue
            seed = config.seed + 1000 * k
            t0 = time.time()
            for retry in range(3):
                try:
                    generate_peptide(
                        spec, out_dir, MDConfig(**{**asdict(config), "seed": seed}), ff, build_seed=100 * retry
                    )
                    break
                except ValueError as exc:  # a geometry check failed: rebuild from other seeds
                    log.info("retry %s after: %s", spec.id, exc)
            else:
                log.info("FAILED %s: gave up after 3 builds", spec.id)
                continue
            done = _write_manifest(out_dir)
            meta = json.loads((out_dir / spec.id / "meta.json").read_text())
            log.info(
                "done %s %s %s T=%.0fK atoms=%d frames=%d %.0f steps/s (%.0f per CPU s) %.0fs (%d/%d finished)",
                spec.id,
                "-".join(meta["sequence"]),
                spec.termini,
                spec.temperature,
                meta["n_atoms"],
                meta["n_frames"],
                meta["steps_per_s"],
                meta["cpu_steps_per_s"],
                time.time() - t0,
                sum(s.id in done for s in specs),  # the manifest may list other calls' peptides too
                len(specs),
            )
        return _write_manifest(out_dir)
    finally:
        log.removeHandler(handler)
        handler.close()


# the twenty amino acids, histidine once (the corpus spreads it over HID, HIE and HIP)
_TWENTY = tuple(sorted({"HIS" if r in ("HID", "HIE", "HIP") else r for r in STANDARD_RESIDUES}))
N_CIS_PEPTIDES = 6
# GB cost grows ~N^2 with atoms, so short peptides give more residue-samples per CPU second;
# lengths 3-8 are drawn with weight on 3-5.
_LENGTHS = (3, 4, 5, 6, 7, 8)
_LENGTH_WEIGHTS = (0.25, 0.25, 0.2, 0.12, 0.1, 0.08)


def heldout_sequences() -> list[PeptideSpec]:
    """Three held-out peptides of 12-16 residues that together contain all 20 amino acids."""
    return [
        PeptideSpec(
            "ho01",
            ["MET", "LYS", "THR", "TRP", "ILE", "ASP", "GLY", "HIE", "SER", "PHE", "ARG", "VAL", "ASN", "LEU"],
            "capped",
        ),
        PeptideSpec(
            "ho02",
            ["GLU", "TYR", "PRO", "CYS", "ALA", "GLN", "HID", "LYS", "ILE", "SER", "TRP", "ASP", "VAL", "THR"],
            "charged",
        ),
        PeptideSpec(
            "ho03",
            ["ARG", "LEU", "GLY", "PHE", "MET", "HIP", "TYR", "ASN", "GLU", "PRO", "ALA", "CYS", "GLN", "THR"],
            "capped",
        ),
    ]


def _heldout_words(k: int) -> set[str]:
    words = set()
    for spec in heldout_sequences():
        s = "".join(ONE_LETTER[r] for r in spec.sequence)
        words.update(s[i : i + k] for i in range(len(s) - k + 1))
    return words


def _draw_sequence(rng: np.random.Generator, length: int, counts: dict[str, int]) -> list[str] | None:
    """A random sequence that prefers the least-used residue types of ``counts`` (HID, HIE, HIP
    counted apart) and never repeats a residue in a row; None (and ``counts`` unchanged) when it
    holds a 3-residue window of a held-out sequence, else ``counts`` is updated."""
    names: list[str] = []
    for _ in range(length):
        weights = np.array([1.0 / (1.0 + counts[r]) ** 2 for r in STANDARD_RESIDUES])
        if names:
            weights[STANDARD_RESIDUES.index(names[-1])] = 0.0
        names.append(STANDARD_RESIDUES[int(rng.choice(len(weights), p=weights / weights.sum()))])
    letters = "".join(ONE_LETTER[r] for r in names)
    if any(letters[i : i + 3] in _heldout_words(3) for i in range(len(letters) - 2)):
        return None
    for r in names:
        counts[r] += 1
    return names


def default_corpus_sequences(seed: int = 2024, n_peptides: int = 60) -> list[PeptideSpec]:
    """Deterministic training corpus: short peptides covering every residue in varied neighbours.

    Lengths 3-8 (mostly 3-5); residues drawn so each of the 22 types (20 amino acids, histidine
    as HID, HIE and HIP) appears about equally often, never twice in a row; alternating charged
    termini and ACE/NME caps; up to ``N_CIS_PEPTIDES`` peptides with their first X-Pro bond
    built cis; one peptide in six at 350 K or 400 K, the rest at 300 K. No training peptide contains a
    3-residue window of a held-out sequence, so held-out peptides are not subsequences of it.
    """
    rng = np.random.default_rng(seed)
    specs: list[PeptideSpec] = []
    counts = {r: 0 for r in STANDARD_RESIDUES}
    n_cis = 0
    while len(specs) < n_peptides:
        k = len(specs)
        names = _draw_sequence(rng, int(rng.choice(_LENGTHS, p=_LENGTH_WEIGHTS)), counts)
        if names is None:
            continue
        termini = TERMINI[k % 2]
        first = 0 if termini == "capped" else 1  # a charged N-terminal Pro has no omega
        pro = [i for i, r in enumerate(names) if r == "PRO" and i >= first]
        cis = [pro[0]] if pro and n_cis < N_CIS_PEPTIDES and rng.random() < 0.5 else []
        n_cis += bool(cis)
        temperature = (350.0, 400.0)[(k // 6) % 2] if k % 6 == 5 else 300.0
        specs.append(PeptideSpec(f"p{k:03d}", names, termini, cis, temperature))
    return specs


def trans_proline_sequences(seed: int = 2024) -> list[PeptideSpec]:
    """Short peptides X-PRO-Y (ids ``tp00``...), one per residue type X before the proline, all
    X-Pro bonds trans, at 300 K; X's and Y's neighbours drawn at random, alternating caps and
    charged termini, no 3-residue window of a held-out sequence.

    The random corpus holds few X-Pro bonds, and ``N_CIS_PEPTIDES`` of them are built cis, so that
    the cis bond (about one X-Pro bond in twenty in folded proteins) has examples; without these the
    trans bond, which proteins mostly have, was the rarer one (2 trans against 4 cis in the default
    48 peptides' training set) and the model placed the amide of a held-out trans proline as cis.
    """
    rng = np.random.default_rng(seed + 1)
    forbidden = _heldout_words(3)
    others = [r for r in STANDARD_RESIDUES if r != "PRO"]
    specs: list[PeptideSpec] = []
    for k, x in enumerate(others):
        while True:
            before = [str(rng.choice(others))] if rng.random() < 0.5 else []
            names = before + [x, "PRO", str(rng.choice(others))]
            letters = "".join(ONE_LETTER[r] for r in names)
            if not any(letters[i : i + 3] in forbidden for i in range(len(letters) - 2)):
                break
        specs.append(PeptideSpec(f"tp{k:02d}", names, TERMINI[k % 2]))
    return specs


LONG_LENGTHS = (10, 11, 12, 13, 14)


def long_peptide_sequences(seed: int = 2024, n_peptides: int = 12, start: str = "extended") -> list[PeptideSpec]:
    """Longer peptides (10-14 residues) at 300 K, long enough to fold back on themselves: in GBn2 a
    14-mer collapses within ~100 ps (held-out ho02: radius of gyration 1.2 to 0.7 nm), and the short
    corpus peptides never show a residue packed against one far along the chain. Residues drawn for
    even coverage as in :func:`default_corpus_sequences`, alternating charged termini and caps, all
    X-Pro bonds trans, no 3-residue window of a held-out sequence.

    ``start="extended"`` (ids ``lp00``...) builds them as strands; ``start="helix"`` (ids
    ``hx00``..., sequences drawn apart) as alpha helices, whose i, i+3 and i+4 side chains pack
    against each other from the first frame: 150 ps from a strand rarely reaches such contacts."""
    _check_start(start)
    helix = start == "helix"
    rng = np.random.default_rng(seed + (4 if helix else 2))
    counts = {r: 0 for r in STANDARD_RESIDUES}
    specs: list[PeptideSpec] = []
    while len(specs) < n_peptides:
        k = len(specs)
        names = _draw_sequence(rng, LONG_LENGTHS[k % len(LONG_LENGTHS)], counts)
        if names is not None:
            specs.append(PeptideSpec(f"{'hx' if helix else 'lp'}{k:02d}", names, TERMINI[k % 2], start=start))
    return specs


def openmm_topology(residue_names: list[str] | tuple[str, ...], chain=None):
    """An ``openmm.app.Topology`` of the chain, or of the chains of a complex ``chain`` (atoms,
    elements, residues, bonds; no positions).

    Residue names are the template names (HID/HIE/HIP for histidine), which amber14's force field
    matches directly; the termini follow from the caps as in :func:`openmm_backmap.models.residues.build_chain`.
    """
    from openmm import app

    from openmm_backmap.models.residues import build_chain, chain_label

    chain = chain or build_chain(residue_names)
    top = app.Topology()
    omm_chains = [top.addChain(chain_label(n)) for n in range(max(1, len(chain.parts)))]
    of_residue = chain.residue_chain
    atoms = []
    for r, name in enumerate(chain.names):
        res = top.addResidue(name, omm_chains[of_residue[r]], id=str(r + 1))
        for a in sorted(chain.residue_atoms[r].values()):
            atoms.append(top.addAtom(chain.atom_names[a], app.Element.getBySymbol(chain.elements[a]), res))
    for a, b in chain.bonds:
        top.addBond(atoms[a], atoms[b])
    return top


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``peptides`` command (corpus generation)."""
    parser.add_argument("--out", required=True, help="output directory (train/ and heldout/)")
    parser.add_argument(
        "--ns", type=float, default=None, help="production ns per training peptide (default: sized to ~1 h)"
    )
    parser.add_argument(
        "--n-peptides",
        type=int,
        default=None,
        help="number of random training peptides (default 48; the 21 trans X-Pro peptides come on top)",
    )
    parser.add_argument(
        "--n-long",
        type=int,
        default=0,
        help="number of longer (10-14 residue) peptides that fold back on themselves (ids lp00...; default 0)",
    )
    parser.add_argument(
        "--n-helical",
        type=int,
        default=0,
        help="number of longer (10-14 residue) peptides built as alpha helices (ids hx00...; default 0)",
    )
    parser.add_argument("--long-ps", type=float, default=150.0, help="production ps per longer (and helical) peptide")
    parser.add_argument("--save-interval-ps", type=float, default=0.5)
    parser.add_argument("--timestep-fs", type=float, default=4.0)
    parser.add_argument("--hydrogen-mass", type=float, default=4.0, help="HMR mass (amu)")
    parser.add_argument("--platform", default=None, help="CPU or Reference (default: faster)")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument(
        "--heldout", action="store_true", help="also generate the held-out set after the training corpus"
    )
    parser.add_argument(
        "--heldout-ps", type=float, default=110.0, help="production ps per held-out peptide (frames every 1 ps)"
    )
    parser.add_argument("--heldout-only", action="store_true")


# Sized from measured single-thread CPU speed (amber14 + GBn2, HMR 4 amu, 4 fs): ~0.7 ms/step at
# 30 atoms, 3.4 ms at 80, 10 ms at 165, 19 ms at 226; 48 peptides x 60 ps take ~52 CPU-minutes.
DEFAULT_NS = 0.06
DEFAULT_N_PEPTIDES = 48


def run(args: argparse.Namespace) -> None:
    """Generate the training corpus (and the held-out set with ``--heldout``)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    platform = args.platform
    if platform is None:
        speeds = {p: measure_speed(p) for p in ("CPU", "Reference")}
        platform = max(speeds, key=speeds.get)
        print(f"steps/s on a 5-mer: {speeds}; using {platform}", flush=True)
    base = MDConfig(
        timestep_fs=args.timestep_fs,
        hydrogen_mass=args.hydrogen_mass,
        save_interval_ps=args.save_interval_ps,
        platform=platform,
        seed=args.seed,
    )
    if not args.heldout_only:
        ns = args.ns if args.ns is not None else DEFAULT_NS
        specs = default_corpus_sequences(args.seed, args.n_peptides or DEFAULT_N_PEPTIDES)
        config = MDConfig(**{**asdict(base), "production_ps": ns * 1000.0})
        generate_corpus(specs + trans_proline_sequences(args.seed), out / "train", config)
        # seeds of their own: generate_corpus numbers each list's runs from its config's seed
        for n, start, offset in ((args.n_long, "extended", 3), (args.n_helical, "helix", 5)):
            if n:
                config = MDConfig(**{**asdict(base), "production_ps": args.long_ps, "seed": args.seed + offset})
                generate_corpus(long_peptide_sequences(args.seed, n, start), out / "train", config)
    if args.heldout or args.heldout_only:
        config = MDConfig(
            **{**asdict(base), "production_ps": args.heldout_ps, "save_interval_ps": 1.0, "seed": args.seed + 7}
        )
        ala2 = PeptideSpec("ala2-gbn2", ["ALA"], "capped")
        generate_corpus([ala2], out / "heldout", MDConfig(**{**asdict(config), "production_ps": 200.0}))
        generate_corpus(heldout_sequences(), out / "heldout", config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m openmm_backmap.systems.peptides", description=__doc__.splitlines()[0]
    )
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
