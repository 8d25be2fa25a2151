"""The built-in systems (alanine dipeptide, chignolin), their standard CG mapping and the basin
restraints of restrained reference runs.

The six-bead alanine dipeptide mapping (:func:`ala2_six_bead_mapping`) is the one the demo, the
tests and the benchmarks use: single-atom beads on C(ACE), N, CA, CB, C and N(NME), in residue
order so that the CG topology's residues are contiguous.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from openmm_backmap.analysis.basins import backbone_torsions
from openmm_backmap.mapping import CGMapping, atom_label

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
BUILTIN_SYSTEMS = ("ala2", "chignolin")

# The six-bead alanine dipeptide mapping: atom labels (RESNAME<resSeq>-NAME) and bead names.
ALA2_SIX_BEADS = ("ACE1-C", "ALA2-N", "ALA2-CA", "ALA2-CB", "ALA2-C", "NME3-N")
ALA2_SIX_NAMES = ("C1", "N", "CA", "CB", "C", "N2")
# Basin populations (as :func:`~openmm_backmap.analysis.basins.basin_indicators` defines the basins) of
# alanine dipeptide in vacuum at 300 K (benchmarks/RESULTS.md, "Basin populations"): C7eq, C5 and
# alpha_R from 240 ns of unbiased MD, alpha_L (which plain MD does not reach) from umbrella sampling
# along phi (36 windows x 2 ns, MBAR). The data-free demo and the ALA2 benchmarks compare with these.
ALA2_REFERENCE_POPULATIONS = {"C7eq": 0.4534, "C5": 0.5451, "alpha_R": 0.00068, "alpha_L": 0.00884}


# Windows for restrained reference runs, per basin: ((phi centre, half-width), (psi centre,
# half-width)) in degrees. Each sits inside its basin of analysis.basins.basin_indicators, with margins
# of 10 degrees or more for thermal excursions past the walls; the alpha_L window
# spans psi from -90 to 70, so it holds both alpha_L and C7ax.
BASIN_WINDOWS = {
    "C7eq": ((-80.0, 30.0), (70.0, 40.0)),
    "C5": ((-150.0, 25.0), (165.0, 30.0)),
    "alpha_R": ((-80.0, 40.0), (-50.0, 35.0)),
    "alpha_L": ((65.0, 35.0), (-10.0, 80.0)),
}


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


def ala2_six_bead_mapping(topology: Any) -> CGMapping:
    """The six-bead alanine dipeptide mapping (:data:`ALA2_SIX_BEADS`) on an AA topology of it.

    Raises
    ------
    ValueError
        When the topology lacks one of the six atoms (not alanine dipeptide).
    """
    from openmm_backmap.mapping import as_mdtraj_topology

    topology = as_mdtraj_topology(topology)
    by_label = {atom_label(a): a.index for a in topology.atoms}
    missing = [lab for lab in ALA2_SIX_BEADS if lab not in by_label]
    if missing:
        raise ValueError(f"the topology lacks the atoms {missing} of the six-bead ALA2 mapping")
    groups = [[by_label[lab]] for lab in ALA2_SIX_BEADS]
    return CGMapping(topology, groups, names=list(ALA2_SIX_NAMES))


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
