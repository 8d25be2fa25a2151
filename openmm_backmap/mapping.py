"""Linear coarse-graining maps X = M x.

A :class:`CGMapping` holds the (n_cg x n_aa) matrix ``M`` whose rows sum to 1: bead ``I`` sits at
``X_I = sum_i M_Ii x_i``. Groups are lists of atom indices with weights (mass-weighted by default,
or equal weights for a centre of geometry, or explicit weights); a single-atom group is a *slice*
bead that sits exactly on its atom. The mapping also yields the CG topology (one bead per group,
named, in the residue of its atoms) and the bead masses for a CG OpenMM System.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mdtraj as md
import numpy as np

PRESETS = ("ca", "backbone", "heavy-backbone", "residue-com")

_PRESET_ATOMS = {
    "ca": ("CA",),
    "backbone": ("N", "CA", "C"),
    "heavy-backbone": ("N", "CA", "C", "O", "CB"),
}

# Residues that carry a backbone in the sense of the slice presets: the standard amino acids and
# the protonation / disulfide variants force fields name separately. Caps (ACE, NME, NH2), water,
# ions and ligands are not amino acids and are skipped by the slice presets.
AMINO_ACIDS = frozenset(
    "ALA ARG ASN ASP CYS GLN GLU GLY HIS ILE LEU LYS MET PHE PRO SER THR TRP TYR VAL "
    "HID HIE HIP HSD HSE HSP CYX CYM ASH GLH LYN SEC PYL MSE".split()
)

FORMAT_NAME = "openmm-backmap-mapping"
FORMAT_VERSION = 1
_WEIGHT_TOL = 1e-6


def as_mdtraj_topology(topology: Any) -> md.Topology:
    """Return an mdtraj Topology for an mdtraj or OpenMM topology (or a path mdtraj can read)."""
    if isinstance(topology, md.Topology):
        return topology
    if isinstance(topology, md.Trajectory):
        return topology.topology
    if isinstance(topology, (str, Path)):
        return md.load_topology(str(topology))
    if type(topology).__module__.startswith("openmm"):  # an openmm.app.Topology; mdtraj converts it
        return md.Topology.from_openmm(topology)
    raise TypeError(f"expected an mdtraj or OpenMM Topology, got {type(topology).__name__}")


def atom_label(atom: md.core.topology.Atom) -> str:
    """A stable, human-readable label for an atom: ``RESNAME<resSeq>-NAME`` (e.g. ``ALA2-CA``)."""
    return f"{atom.residue.name}{atom.residue.resSeq}-{atom.name}"


class CGMapping:
    """A linear map from all-atom coordinates x (n_aa, 3) to CG coordinates X = M x (n_cg, 3).

    Parameters
    ----------
    topology
        The all-atom topology (mdtraj or OpenMM).
    groups
        One sequence of atom indices per bead.
    weights
        Optional per-group weights (each group's weights must sum to 1). ``None`` uses
        ``weighting`` for every group.
    names
        Optional bead names (at most 4 characters are kept by PDB writers); by default a
        single-atom bead takes its atom's name and a multi-atom bead is called ``CM``.
    weighting
        ``"mass"`` (centre of mass, the default) or ``"geometry"`` (equal weights), used for
        groups without explicit weights.

    Raises
    ------
    ValueError
        For an empty group, an atom index out of range, a repeated atom within a group, weights of
        the wrong length, negative weights, or weights that do not sum to 1; the message names the
        group and the atom.
    """

    def __init__(
        self,
        topology: Any,
        groups: Sequence[Sequence[int]],
        weights: Sequence[Sequence[float] | None] | None = None,
        names: Sequence[str] | None = None,
        weighting: str = "mass",
    ) -> None:
        self.topology = as_mdtraj_topology(topology)
        if weighting not in ("mass", "geometry"):
            raise ValueError(f"weighting must be 'mass' or 'geometry', got {weighting!r}")
        if len(groups) == 0:
            raise ValueError("a mapping needs at least one group")
        if weights is not None and len(weights) != len(groups):
            raise ValueError(f"got {len(weights)} weight lists for {len(groups)} groups")
        if names is not None and len(names) != len(groups):
            raise ValueError(f"got {len(names)} bead names for {len(groups)} groups")
        n_aa = self.topology.n_atoms
        atoms = list(self.topology.atoms)
        self.weighting = weighting
        self.groups: list[np.ndarray] = []
        self.weights: list[np.ndarray] = []
        self.names: list[str] = []
        for g, group in enumerate(groups):
            label = f"group {g}" + (f" ({names[g]})" if names is not None else "")
            idx = np.asarray(group, dtype=np.int64).reshape(-1)
            if idx.size == 0:
                raise ValueError(f"{label} is empty")
            for i in idx:
                if i < 0 or i >= n_aa:
                    raise ValueError(f"{label}: atom index {int(i)} is out of range for a topology of {n_aa} atoms")
            if len(set(idx.tolist())) != idx.size:
                dup = [int(i) for i in idx if (idx == i).sum() > 1][0]
                raise ValueError(f"{label}: atom {atom_label(atoms[dup])} ({dup}) appears twice")
            w = None if weights is None else weights[g]
            if w is None:
                if weighting == "mass":
                    w = np.array([_atom_mass(atoms[i]) for i in idx], dtype=np.float64)
                    if w.sum() <= 0:
                        raise ValueError(f"{label}: its atoms have zero total mass")
                else:
                    w = np.ones(idx.size)
                w = w / w.sum()
            else:
                w = np.asarray(w, dtype=np.float64).reshape(-1)
                if w.size != idx.size:
                    raise ValueError(f"{label}: {w.size} weights for {idx.size} atoms")
                if np.any(w < 0) or not np.all(np.isfinite(w)):
                    bad = int(np.flatnonzero((w < 0) | ~np.isfinite(w))[0])
                    raise ValueError(
                        f"{label}: weight {w[bad]} of atom {atom_label(atoms[idx[bad]])} is not a "
                        "finite non-negative number"
                    )
                if abs(w.sum() - 1.0) > _WEIGHT_TOL:
                    raise ValueError(f"{label}: weights sum to {w.sum():.8g}, not 1")
            self.groups.append(idx)
            self.weights.append(w)
            if names is not None:
                self.names.append(str(names[g]))
            else:
                self.names.append(atoms[idx[0]].name if idx.size == 1 else "CM")
        self._matrix: np.ndarray | None = None
        self._cg_topology: md.Topology | None = None
        self._torch_cache: dict = {}

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_preset(cls, topology: Any, preset: str, weighting: str = "mass") -> CGMapping:
        """Build a mapping from a named preset.

        ``ca``, ``backbone`` (N, CA, C) and ``heavy-backbone`` (N, CA, C, O, CB) place one bead on
        each named atom of every amino-acid residue (caps, water, ions and ligands are skipped);
        ``residue-com`` places one bead at the centre of mass of every residue.

        Raises
        ------
        ValueError
            If the preset is unknown, the topology has no amino acid, or a residue lacks an atom the
            preset needs (e.g. CB in glycine for ``heavy-backbone``).
        """
        top = as_mdtraj_topology(topology)
        if preset == "residue-com":
            groups = [[a.index for a in res.atoms] for res in top.residues]
            return cls(top, groups, names=["CM"] * len(groups), weighting=weighting)
        if preset not in _PRESET_ATOMS:
            raise ValueError(f"unknown mapping preset {preset!r}; choose one of {', '.join(PRESETS)}")
        wanted = _PRESET_ATOMS[preset]
        groups, names = [], []
        for res in top.residues:
            if res.name not in AMINO_ACIDS:
                continue
            by_name = {a.name: a.index for a in res.atoms}
            for name in wanted:
                if name not in by_name:
                    raise ValueError(
                        f"residue {res.name}{res.resSeq} (index {res.index}) has no atom {name}, "
                        f"which the '{preset}' preset needs for group {len(groups)}"
                    )
                groups.append([by_name[name]])
                names.append(name)
        if not groups:
            raise ValueError(f"the '{preset}' preset found no amino-acid residue in the topology")
        return cls(top, groups, names=names)

    @classmethod
    def from_dict(cls, data: dict, topology: Any) -> CGMapping:
        """Build a mapping from the dict written by :meth:`to_dict` (or a groups JSON file).

        Each group is ``{"atoms": [...], "weights": [...]?, "name": "..."?, "labels": [...]?}``;
        ``labels`` (``RESNAME<resSeq>-NAME``), when present, are checked against the topology so a
        mapping written for another molecule is refused.
        """
        top = as_mdtraj_topology(topology)
        if not isinstance(data, dict) or "groups" not in data:
            raise ValueError("a mapping file needs a top-level object with a 'groups' list")
        n_atoms = data.get("n_atoms")
        if n_atoms is not None and int(n_atoms) != top.n_atoms:
            raise ValueError(f"the mapping was written for {n_atoms} atoms but the topology has {top.n_atoms}")
        groups, weights, names = [], [], []
        atoms = list(top.atoms)
        for g, entry in enumerate(data["groups"]):
            if isinstance(entry, dict):
                idx = entry.get("atoms")
                if idx is None:
                    raise ValueError(f"group {g} has no 'atoms' list")
                labels = entry.get("labels")
                if labels is not None:
                    for i, lab in zip(idx, labels):
                        if not 0 <= int(i) < top.n_atoms:
                            break  # the constructor reports the out-of-range index
                        if atom_label(atoms[int(i)]) != lab:
                            raise ValueError(
                                f"group {g}: atom {i} is {atom_label(atoms[int(i)])} in this topology "
                                f"but {lab} in the mapping; the mapping is for another topology"
                            )
                groups.append(idx)
                weights.append(entry.get("weights"))
                names.append(entry.get("name"))
            else:
                groups.append(entry)
                weights.append(None)
                names.append(None)
        weighting = data.get("weighting", "mass")
        default = cls(top, groups, weighting=weighting)  # validates groups, fills default names
        final_names = [n if n is not None else d for n, d in zip(names, default.names)]
        final_weights = [w if w is not None else d for w, d in zip(weights, default.weights)]
        return cls(top, groups, final_weights, final_names, weighting=weighting)

    @classmethod
    def from_json(cls, path: str | Path, topology: Any) -> CGMapping:
        """Read a groups JSON file (see :meth:`to_json`)."""
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        return cls.from_dict(data, topology)

    @classmethod
    def from_spec(cls, spec: str, topology: Any) -> CGMapping:
        """A preset name or the path of a groups JSON file, as the CLI's ``--mapping`` takes."""
        if spec in PRESETS:
            return cls.from_preset(topology, spec)
        if Path(spec).is_file():
            return cls.from_json(spec, topology)
        raise ValueError(f"--mapping {spec!r} is neither a preset ({', '.join(PRESETS)}) nor an existing JSON file")

    def to_dict(self) -> dict:
        """A JSON-serialisable description with atom labels for checking against a topology."""
        atoms = list(self.topology.atoms)
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "n_atoms": self.n_aa,
            "weighting": self.weighting,
            "groups": [
                {
                    "name": name,
                    "atoms": [int(i) for i in idx],
                    "weights": [float(x) for x in w],
                    "labels": [atom_label(atoms[i]) for i in idx],
                }
                for name, idx, w in zip(self.names, self.groups, self.weights)
            ],
        }

    def to_json(self, path: str | Path) -> None:
        """Write the mapping as a groups JSON file that :meth:`from_json` reads back."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    # ------------------------------------------------------------------ properties
    @property
    def n_aa(self) -> int:
        return self.topology.n_atoms

    @property
    def n_cg(self) -> int:
        return len(self.groups)

    def check_disjoint(self, purpose: str) -> None:
        """ValueError naming the first atom that is in two groups (``purpose`` says what needs them disjoint)."""
        owner: dict[int, int] = {}
        for b, idx in enumerate(self.groups):
            for i in (int(j) for j in idx):
                if i in owner:
                    raise ValueError(
                        f"CG groups overlap: atom {i} is in bead {owner[i]} ({self.names[owner[i]]}) "
                        f"and bead {b} ({self.names[b]}); {purpose} needs disjoint groups"
                    )
                owner[i] = b

    @property
    def is_slice(self) -> bool:
        """True when every bead is a single atom (C-alpha, backbone, chosen atoms)."""
        return all(g.size == 1 for g in self.groups)

    @property
    def bead_atoms(self) -> np.ndarray | None:
        """The atom index under each bead for a slice mapping, else ``None``."""
        if not self.is_slice:
            return None
        return np.array([int(g[0]) for g in self.groups], dtype=np.int64)

    @property
    def matrix(self) -> np.ndarray:
        """The dense (n_cg, n_aa) matrix M (float64), rows summing to 1."""
        if self._matrix is None:
            m = np.zeros((self.n_cg, self.n_aa))
            for b, (idx, w) in enumerate(zip(self.groups, self.weights)):
                m[b, idx] = w
            self._matrix = m
        return self._matrix

    def masses(self) -> np.ndarray:
        """Bead masses in daltons: the sum of the masses of each group's atoms."""
        atoms = list(self.topology.atoms)
        return np.array([sum(_atom_mass(atoms[i]) for i in idx) for idx in self.groups])

    def check_positions(self, x: np.ndarray, what: str = "all-atom positions") -> None:
        """Raise ValueError unless ``x`` has shape (..., n_aa, 3) and is finite."""
        x = np.asarray(x)
        if x.ndim < 2 or x.shape[-2:] != (self.n_aa, 3):
            raise ValueError(f"{what} have shape {tuple(x.shape)}; the mapping expects (..., {self.n_aa}, 3)")
        if not np.all(np.isfinite(x)):
            frame = tuple(int(i) for i in np.argwhere(~np.isfinite(x))[0])
            raise ValueError(f"{what} contain NaN or infinite values (first at index {frame})")

    # ------------------------------------------------------------------ projection
    def project(self, x):
        """Project AA coordinates (..., n_aa, 3) to CG coordinates (..., n_cg, 3).

        Works on numpy arrays and torch tensors (any batch shape, autograd flows through). Units
        are kept (nm in, nm out).
        """
        if type(x).__module__.startswith("torch"):
            return self._project_torch(x)
        x = np.asarray(x)
        if x.shape[-2:] != (self.n_aa, 3):
            raise ValueError(f"positions have shape {tuple(x.shape)}; the mapping expects (..., {self.n_aa}, 3)")
        return np.einsum("ij,...jk->...ik", self.matrix, x)

    def _project_torch(self, x):
        import torch

        if x.shape[-2:] != (self.n_aa, 3):
            raise ValueError(f"positions have shape {tuple(x.shape)}; the mapping expects (..., {self.n_aa}, 3)")
        key = (x.dtype, x.device)
        if key not in self._torch_cache:
            self._torch_cache[key] = torch.as_tensor(self.matrix, dtype=x.dtype, device=x.device)
        return torch.matmul(self._torch_cache[key], x)

    # ------------------------------------------------------------------ CG topology
    def cg_bonds(self) -> list[tuple[int, int]]:
        """Pairs of beads joined through the AA bond graph without passing another bead's atoms."""
        owner = -np.ones(self.n_aa, dtype=np.int64)
        for b, idx in enumerate(self.groups):
            owner[idx] = b
        neighbours: list[list[int]] = [[] for _ in range(self.n_aa)]
        for a1, a2 in self.topology.bonds:
            neighbours[a1.index].append(a2.index)
            neighbours[a2.index].append(a1.index)
        bonds = set()
        for b, idx in enumerate(self.groups):
            seen = set(int(i) for i in idx)
            queue = deque(seen)
            while queue:
                i = queue.popleft()
                for j in neighbours[i]:
                    if j in seen:
                        continue
                    seen.add(j)
                    if owner[j] == -1:
                        queue.append(j)
                    elif owner[j] != b:
                        bonds.add((min(b, int(owner[j])), max(b, int(owner[j]))))
        return sorted(bonds)

    @property
    def cg_topology(self) -> md.Topology:
        """The CG topology: one bead per group, named, in the residue of its first atom.

        Single-atom beads keep their atom's element; multi-atom beads are virtual sites. Bonds are
        those of :meth:`cg_bonds`.
        """
        if self._cg_topology is not None:
            return self._cg_topology
        atoms = list(self.topology.atoms)
        cg = md.Topology()
        chains: dict[int, Any] = {}
        beads = []
        last_res, cg_res = None, None
        for name, idx in zip(self.names, self.groups):
            first = atoms[idx[0]]
            res = first.residue
            if res.chain.index not in chains:
                chains[res.chain.index] = cg.add_chain()
            # bead i is atom i of the CG topology, so a residue whose beads are not consecutive
            # (e.g. CB listed after the next residue's beads) is split into consecutive pieces,
            # which file writers need
            if res.index != last_res:
                cg_res = cg.add_residue(res.name, chains[res.chain.index], resSeq=res.resSeq)
                last_res = res.index
            element = first.element if idx.size == 1 else md.element.virtual
            beads.append(cg.add_atom(name, element, cg_res))
        for i, j in self.cg_bonds():
            cg.add_bond(beads[i], beads[j])
        self._cg_topology = cg
        return cg

    def cg_trajectory(self, traj: md.Trajectory) -> md.Trajectory:
        """Project an AA mdtraj trajectory to a CG trajectory with the CG topology."""
        if traj.n_atoms != self.n_aa:
            raise ValueError(f"the trajectory has {traj.n_atoms} atoms; the mapping expects {self.n_aa}")
        return md.Trajectory(
            self.project(traj.xyz.astype(np.float64)).astype(np.float32),
            self.cg_topology,
            time=traj.time,
            unitcell_lengths=traj.unitcell_lengths,
            unitcell_angles=traj.unitcell_angles,
        )

    def __repr__(self) -> str:
        kind = "slice" if self.is_slice else self.weighting
        return f"CGMapping(n_aa={self.n_aa}, n_cg={self.n_cg}, {kind})"


def _atom_mass(atom) -> float:
    element = atom.element
    if element is None:
        return 0.0
    return float(element.mass)
