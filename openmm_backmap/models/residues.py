"""Residue templates of the amber14 protein force field and the internal-coordinate trees of chains.

A chain is a list of residue names: the 20 standard amino acids (histidine as HID, HIE or HIP; the
name HIS means HIE), optionally capped by ACE (first) and NME (last). A chain without a cap has a
charged terminus there: NH3+ (atoms H, H2, H3; H2, H3 for proline) at the N end, COO- (OXT) at the
C end, as amber14's N- and C-terminal templates. Atoms are those of amber14's templates
(``protein.ff14SB.xml``) in their order, named as OpenMM names them in PDB files (what
``PDBFile``/``Modeller`` produce and amber14 matches): the NH3+ hydrogens are H, H2, H3; the caps'
methyl hydrogens H1, H2, H3 and NME's methyl carbon C. Residues follow each other in chain order.

The internal-coordinate tree places every atom that is not a CG bead from three reference atoms
``(j, k, l)`` (bond i-j, angle i-j-k, dihedral i-j-k-l), in stages: stage 0 the backbone (for the
``ca`` mapping the peptide planes between consecutive C-alpha beads, in tree version 2 those of
even residues before those of odd ones, for ``backbone`` the carbonyl O and amide H), stage 1 the
side chains (with H-alpha) of even residues, stage 2 those of odd ones (:func:`build_tree`).
The anchor of every residue is its C-alpha (the methyl carbon for the caps: ACE CH3, NME C).
Atoms bonded to C-alpha (HA, CB) are placed by dihedrals about CA-N relative to C, so the
handedness of C-alpha follows from the construction.

No OpenMM here: :func:`openmm_backmap.systems.peptides.openmm_topology` builds the OpenMM topology of a chain.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

# name: (atom names in amber14 order, intra-residue bonds "A-B")
TEMPLATES: dict[str, tuple[str, str]] = {
    "ALA": (
        "N H CA HA CB HB1 HB2 HB3 C O",
        "N-H N-CA CA-HA CA-CB CA-C CB-HB1 CB-HB2 CB-HB3 C-O",
    ),
    "ARG": (
        "N H CA HA CB HB2 HB3 CG HG2 HG3 CD HD2 HD3 NE HE CZ NH1 HH11 HH12 NH2 HH21 HH22 C O",
        "N-H N-CA CA-HA CA-CB CA-C CB-HB2 CB-HB3 CB-CG CG-HG2 CG-HG3 CG-CD CD-HD2 CD-HD3 CD-NE NE-HE NE-CZ "
        "CZ-NH1 CZ-NH2 NH1-HH11 NH1-HH12 NH2-HH21 NH2-HH22 C-O",
    ),
    "ASN": (
        "N H CA HA CB HB2 HB3 CG OD1 ND2 HD21 HD22 C O",
        "N-H N-CA CA-HA CA-CB CA-C CB-HB2 CB-HB3 CB-CG CG-OD1 CG-ND2 ND2-HD21 ND2-HD22 C-O",
    ),
    "ASP": (
        "N H CA HA CB HB2 HB3 CG OD1 OD2 C O",
        "N-H N-CA CA-HA CA-CB CA-C CB-HB2 CB-HB3 CB-CG CG-OD1 CG-OD2 C-O",
    ),
    "CYS": (
        "N H CA HA CB HB2 HB3 SG HG C O",
        "N-H N-CA CA-HA CA-CB CA-C CB-HB2 CB-HB3 CB-SG SG-HG C-O",
    ),
    "GLN": (
        "N H CA HA CB HB2 HB3 CG HG2 HG3 CD OE1 NE2 HE21 HE22 C O",
        "N-H N-CA CA-HA CA-CB CA-C CB-HB2 CB-HB3 CB-CG CG-HG2 CG-HG3 CG-CD CD-OE1 CD-NE2 NE2-HE21 NE2-HE22 C-O",
    ),
    "GLU": (
        "N H CA HA CB HB2 HB3 CG HG2 HG3 CD OE1 OE2 C O",
        "N-H N-CA CA-HA CA-CB CA-C CB-HB2 CB-HB3 CB-CG CG-HG2 CG-HG3 CG-CD CD-OE1 CD-OE2 C-O",
    ),
    "GLY": (
        "N H CA HA2 HA3 C O",
        "N-H N-CA CA-HA2 CA-HA3 CA-C C-O",
    ),
    "HID": (
        "N H CA HA CB HB2 HB3 CG ND1 HD1 CE1 HE1 NE2 CD2 HD2 C O",
        "N-H N-CA CA-HA CA-CB CA-C CB-HB2 CB-HB3 CB-CG CG-ND1 CG-CD2 ND1-HD1 ND1-CE1 CE1-HE1 CE1-NE2 NE2-CD2 "
        "CD2-HD2 C-O",
    ),
    "HIE": (
        "N H CA HA CB HB2 HB3 CG ND1 CE1 HE1 NE2 HE2 CD2 HD2 C O",
        "N-H N-CA CA-HA CA-CB CA-C CB-HB2 CB-HB3 CB-CG CG-ND1 CG-CD2 ND1-CE1 CE1-HE1 CE1-NE2 NE2-HE2 NE2-CD2 "
        "CD2-HD2 C-O",
    ),
    "HIP": (
        "N H CA HA CB HB2 HB3 CG ND1 HD1 CE1 HE1 NE2 HE2 CD2 HD2 C O",
        "N-H N-CA CA-HA CA-CB CA-C CB-HB2 CB-HB3 CB-CG CG-ND1 CG-CD2 ND1-HD1 ND1-CE1 CE1-HE1 CE1-NE2 NE2-HE2 "
        "NE2-CD2 CD2-HD2 C-O",
    ),
    "ILE": (
        "N H CA HA CB HB CG2 HG21 HG22 HG23 CG1 HG12 HG13 CD1 HD11 HD12 HD13 C O",
        "N-H N-CA CA-HA CA-CB CA-C CB-HB CB-CG2 CB-CG1 CG2-HG21 CG2-HG22 CG2-HG23 CG1-HG12 CG1-HG13 CG1-CD1 "
        "CD1-HD11 CD1-HD12 CD1-HD13 C-O",
    ),
    "LEU": (
        "N H CA HA CB HB2 HB3 CG HG CD1 HD11 HD12 HD13 CD2 HD21 HD22 HD23 C O",
        "N-H N-CA CA-HA CA-CB CA-C CB-HB2 CB-HB3 CB-CG CG-HG CG-CD1 CG-CD2 CD1-HD11 CD1-HD12 CD1-HD13 CD2-HD21 "
        "CD2-HD22 CD2-HD23 C-O",
    ),
    "LYS": (
        "N H CA HA CB HB2 HB3 CG HG2 HG3 CD HD2 HD3 CE HE2 HE3 NZ HZ1 HZ2 HZ3 C O",
        "N-H N-CA CA-HA CA-CB CA-C CB-HB2 CB-HB3 CB-CG CG-HG2 CG-HG3 CG-CD CD-HD2 CD-HD3 CD-CE CE-HE2 CE-HE3 "
        "CE-NZ NZ-HZ1 NZ-HZ2 NZ-HZ3 C-O",
    ),
    "MET": (
        "N H CA HA CB HB2 HB3 CG HG2 HG3 SD CE HE1 HE2 HE3 C O",
        "N-H N-CA CA-HA CA-CB CA-C CB-HB2 CB-HB3 CB-CG CG-HG2 CG-HG3 CG-SD SD-CE CE-HE1 CE-HE2 CE-HE3 C-O",
    ),
    "PHE": (
        "N H CA HA CB HB2 HB3 CG CD1 HD1 CE1 HE1 CZ HZ CE2 HE2 CD2 HD2 C O",
        "N-H N-CA CA-HA CA-CB CA-C CB-HB2 CB-HB3 CB-CG CG-CD1 CG-CD2 CD1-HD1 CD1-CE1 CE1-HE1 CE1-CZ CZ-HZ "
        "CZ-CE2 CE2-HE2 CE2-CD2 CD2-HD2 C-O",
    ),
    "PRO": (
        "N CD HD2 HD3 CG HG2 HG3 CB HB2 HB3 CA HA C O",
        "N-CD N-CA CD-HD2 CD-HD3 CD-CG CG-HG2 CG-HG3 CG-CB CB-HB2 CB-HB3 CB-CA CA-HA CA-C C-O",
    ),
    "SER": (
        "N H CA HA CB HB2 HB3 OG HG C O",
        "N-H N-CA CA-HA CA-CB CA-C CB-HB2 CB-HB3 CB-OG OG-HG C-O",
    ),
    "THR": (
        "N H CA HA CB HB CG2 HG21 HG22 HG23 OG1 HG1 C O",
        "N-H N-CA CA-HA CA-CB CA-C CB-HB CB-CG2 CB-OG1 CG2-HG21 CG2-HG22 CG2-HG23 OG1-HG1 C-O",
    ),
    "TRP": (
        "N H CA HA CB HB2 HB3 CG CD1 HD1 NE1 HE1 CE2 CZ2 HZ2 CH2 HH2 CZ3 HZ3 CE3 HE3 CD2 C O",
        "N-H N-CA CA-HA CA-CB CA-C CB-HB2 CB-HB3 CB-CG CG-CD1 CG-CD2 CD1-HD1 CD1-NE1 NE1-HE1 NE1-CE2 CE2-CZ2 "
        "CE2-CD2 CZ2-HZ2 CZ2-CH2 CH2-HH2 CH2-CZ3 CZ3-HZ3 CZ3-CE3 CE3-HE3 CE3-CD2 C-O",
    ),
    "TYR": (
        "N H CA HA CB HB2 HB3 CG CD1 HD1 CE1 HE1 CZ OH HH CE2 HE2 CD2 HD2 C O",
        "N-H N-CA CA-HA CA-CB CA-C CB-HB2 CB-HB3 CB-CG CG-CD1 CG-CD2 CD1-HD1 CD1-CE1 CE1-HE1 CE1-CZ CZ-OH "
        "CZ-CE2 OH-HH CE2-HE2 CE2-CD2 CD2-HD2 C-O",
    ),
    "VAL": (
        "N H CA HA CB HB CG1 HG11 HG12 HG13 CG2 HG21 HG22 HG23 C O",
        "N-H N-CA CA-HA CA-CB CA-C CB-HB CB-CG1 CB-CG2 CG1-HG11 CG1-HG12 CG1-HG13 CG2-HG21 CG2-HG22 CG2-HG23 C-O",
    ),
    "ACE": (
        "H1 CH3 H2 H3 C O",
        "H1-CH3 CH3-H2 CH3-H3 CH3-C C-O",
    ),
    "NME": (
        "N H C H1 H2 H3",
        "N-H N-C C-H1 C-H2 C-H3",
    ),
}

CAPS = ("ACE", "NME")
STANDARD = tuple(sorted(name for name in TEMPLATES if name not in CAPS))
ALIASES = {"HIS": "HIE"}
RESIDUE_NAMES = STANDARD + CAPS  # the residue types a model knows, in a fixed order
BACKBONE_ATOMS = frozenset(("N", "H", "H2", "H3", "CA", "C", "O", "OXT"))
CAP_ANCHOR = {"ACE": "CH3", "NME": "C"}

# beads per residue for each mapping: atom names, in bead order
MAPPINGS: dict[str, dict[str, tuple[str, ...]]] = {
    "ca": {**{name: ("CA",) for name in STANDARD}, "ACE": ("CH3",), "NME": ("C",)},
    "backbone": {**{name: ("N", "CA", "C") for name in STANDARD}, "ACE": ("CH3", "C"), "NME": ("N", "C")},
}

# chiral centres (centre, a, b, c): the sign of det[a - centre, b - centre, c - centre] is the handedness
CHIRAL = {
    **{name: (("CA", "N", "C", "CB"),) for name in STANDARD if name != "GLY"},
    "ILE": (("CA", "N", "C", "CB"), ("CB", "CA", "CG1", "CG2")),
    "THR": (("CA", "N", "C", "CB"), ("CB", "CA", "OG1", "CG2")),
}


def residue_template_name(name: str, atom_names, what: str = "residue") -> str:
    """The template name of a residue of an all-atom structure, given its atom names: a histidine
    (HIS, HID, HIE or HIP) by its protons (HD1 and HE2: HIP, HD1 only: HID, else HIE), any other
    residue by its name.

    Raises
    ------
    ValueError
        For a name the templates do not know, naming ``what`` (the residue as the caller knows it).
    """
    if name in ("HIS", "HID", "HIE", "HIP"):
        atoms = set(atom_names)
        name = "HIP" if {"HD1", "HE2"} <= atoms else "HID" if "HD1" in atoms else "HIE"
    if name not in TEMPLATES:
        raise ValueError(f"{what} has a name the protein templates do not know")
    return name


def canonical_name(name: str, position: int | None = None) -> str:
    """The template name of a residue name (``HIS`` -> ``HIE``).

    Raises
    ------
    ValueError
        For a name the templates do not know, naming it (and its position when given).
    """
    key = str(name).strip().upper()
    key = ALIASES.get(key, key)
    if key not in TEMPLATES:
        where = "" if position is None else f" at position {position}"
        raise ValueError(
            f"unknown residue name {name!r}{where}; known: {', '.join(RESIDUE_NAMES)} (and HIS, read as HIE)"
        )
    return key


def residue_atoms(name: str, nterm: bool = False, cterm: bool = False) -> list[str]:
    """Atom names of residue ``name`` in amber14 order; ``nterm``/``cterm`` give the charged-terminus
    variants (NH3+: H2 H3 after H, or after N for proline; COO-: OXT appended)."""
    atoms = TEMPLATES[name][0].split()
    if nterm:
        h = atoms.index("N" if name == "PRO" else "H")
        atoms = atoms[: h + 1] + ["H2", "H3"] + atoms[h + 1 :]
    if cterm:
        atoms = atoms + ["OXT"]
    return atoms


@dataclass
class Chain:
    """The all-atom topology of a chain, built from residue names.

    Attributes
    ----------
    names
        Template names of the residues (``HIS`` already read as ``HIE``).
    atom_names, elements
        Per atom, in chain order.
    atom_residue
        (n_atoms,) residue index of every atom.
    residue_atoms
        Per residue, atom name -> atom index.
    bonds
        (i, j) pairs, i < j, including peptide bonds.
    nterm, cterm
        Whether the chain has a charged N (C) terminus, i.e. no ACE (NME) cap (of a complex: its
        first chain's N terminus, its last chain's C terminus).
    parts
        The chains of a complex (:func:`join_chains`), in order; empty for a single chain. Atoms and
        residues of a complex are those of its parts, one after the other.
    """

    names: list[str]
    atom_names: list[str]
    elements: list[str]
    atom_residue: np.ndarray
    residue_atoms: list[dict[str, int]]
    bonds: list[tuple[int, int]]
    nterm: bool
    cterm: bool
    neighbours: list[list[int]] = field(default_factory=list)
    parts: list[Chain] = field(default_factory=list)

    @property
    def n_atoms(self) -> int:
        return len(self.atom_names)

    @property
    def n_residues(self) -> int:
        return len(self.names)

    @property
    def residue_chain(self) -> np.ndarray:
        """(n_residues,) the index of the chain each residue belongs to (all 0 for one chain)."""
        lengths = [p.n_residues for p in self.parts] or [self.n_residues]
        return np.repeat(np.arange(len(lengths)), lengths)

    def anchor(self, r: int) -> int:
        """The anchor atom of residue r: CA, or the methyl carbon of a cap."""
        return self.residue_atoms[r][CAP_ANCHOR.get(self.names[r], "CA")]

    def atom(self, r: int, name: str) -> int:
        return self.residue_atoms[r][name]


def build_chain(residue_names: Sequence[str]) -> Chain:
    """The :class:`Chain` of a sequence of residue names.

    Raises
    ------
    ValueError
        For an unknown residue name, fewer than two residues, or a cap that is not at its end.
    """
    names = [canonical_name(n, i) for i, n in enumerate(residue_names)]
    if len(names) < 2:
        raise ValueError(f"a chain needs at least two residues, got {len(names)}")
    for i, n in enumerate(names):
        if n == "ACE" and i != 0:
            raise ValueError(f"ACE at position {i}: an ACE cap can only start a chain")
        if n == "NME" and i != len(names) - 1:
            raise ValueError(f"NME at position {i}: an NME cap can only end a chain")
    nterm = names[0] != "ACE"
    cterm = names[-1] != "NME"
    atom_names: list[str] = []
    atom_residue: list[int] = []
    per_residue: list[dict[str, int]] = []
    bonds: list[tuple[int, int]] = []
    for r, name in enumerate(names):
        first = nterm and r == 0
        last = cterm and r == len(names) - 1
        atoms = residue_atoms(name, first, last)
        index = {a: len(atom_names) + n for n, a in enumerate(atoms)}
        per_residue.append(index)
        atom_names.extend(atoms)
        atom_residue.extend([r] * len(atoms))
        pairs = [tuple(b.split("-")) for b in TEMPLATES[name][1].split()]
        if first:
            pairs = pairs + [("N", "H2"), ("N", "H3")]
        if last:
            pairs.append(("C", "OXT"))
        bonds.extend((index[a], index[b]) for a, b in pairs)
        if r > 0:
            bonds.append((per_residue[r - 1]["C"], index["N"]))
    bonds = sorted((min(a, b), max(a, b)) for a, b in bonds)
    neighbours: list[list[int]] = [[] for _ in atom_names]
    for a, b in bonds:
        neighbours[a].append(b)
        neighbours[b].append(a)
    elements = [n[0] for n in atom_names]
    return Chain(
        names,
        atom_names,
        elements,
        np.asarray(atom_residue, dtype=np.int64),
        per_residue,
        bonds,
        nterm,
        cterm,
        neighbours,
    )


def join_chains(chains: Sequence[Chain]) -> Chain:
    """The complex of several chains (no bonds between them): one :class:`Chain` whose atoms and
    residues are those of ``chains`` in order, with ``parts`` listing them. One chain is returned
    as it is."""
    chains = list(chains)
    if not chains:
        raise ValueError("a complex needs at least one chain")
    if len(chains) == 1:
        return chains[0]
    names: list[str] = []
    atom_names: list[str] = []
    elements: list[str] = []
    atom_residue: list[np.ndarray] = []
    per_residue: list[dict[str, int]] = []
    bonds: list[tuple[int, int]] = []
    neighbours: list[list[int]] = []
    for c in chains:
        if c.parts:
            raise ValueError("join_chains takes single chains, not complexes")
        a0, r0 = len(atom_names), len(names)
        names.extend(c.names)
        atom_names.extend(c.atom_names)
        elements.extend(c.elements)
        atom_residue.append(c.atom_residue + r0)
        per_residue.extend({k: v + a0 for k, v in res.items()} for res in c.residue_atoms)
        bonds.extend((a + a0, b + a0) for a, b in c.bonds)
        neighbours.extend([v + a0 for v in nb] for nb in c.neighbours)
    return Chain(
        names,
        atom_names,
        elements,
        np.concatenate(atom_residue),
        per_residue,
        bonds,
        chains[0].nterm,
        chains[-1].cterm,
        neighbours,
        chains,
    )


def build_chains(sequences: Sequence[Sequence[str]]) -> Chain:
    """The :class:`Chain` of one sequence of residue names, or the complex (:func:`join_chains`)
    of several, each built by :func:`build_chain`; errors name the chain (A, B, ...)."""
    if len(sequences) == 1:
        return build_chain(sequences[0])
    chains = []
    for n, seq in enumerate(sequences):
        try:
            chains.append(build_chain(seq))
        except ValueError as err:
            raise ValueError(f"chain {chain_label(n)}: {err}") from None
    return join_chains(chains)


def chain_label(n: int) -> str:
    """The PDB-style letter of the n-th chain (A, B, ..., Z, then numbers)."""
    return chr(ord("A") + n) if n < 26 else str(n)


# ----------------------------------------------------------------------------- beads
def bead_atoms(chain: Chain, mapping: str) -> tuple[list[int], list[str], list[int]]:
    """(atom index, bead name, residue index) of every bead of ``mapping`` (``ca`` or ``backbone``),
    in chain order; beads are single atoms (slice mapping)."""
    if mapping not in MAPPINGS:
        raise ValueError(f"unknown protein mapping {mapping!r}; choose one of {', '.join(MAPPINGS)}")
    atoms, names, residues = [], [], []
    for r, name in enumerate(chain.names):
        for bead in MAPPINGS[mapping][name]:
            atoms.append(chain.atom(r, bead))
            names.append(bead)
            residues.append(r)
    return atoms, names, residues


# ----------------------------------------------------------------------------- placement tree
@dataclass
class Tree:
    """Placement rows of a chain: atom ``rows[n, 0]`` from references ``rows[n, 1:]`` (j, k, l).

    Attributes
    ----------
    rows
        (R, 4) atom indices i, j, k, l.
    stage
        (R,) 0 backbone, 1 side chains of even residues, 2 side chains of odd residues.
    owner
        (R,) the residue a row belongs to for conditioning (a peptide plane belongs to the
        residue before it).
    keys
        Per row, the residue name, atom and reference pattern, e.g. ``ALA:CB<CA,N,C``; references
        in another residue carry their offset (``-1C``).
    fixed
        (R,) bond i-j involves a hydrogen (held at a constraint length).
    branch
        (R,) the dihedral reference l is bonded to j (an improper-like, narrow dihedral).
    chiral
        (R,) a branch row on a chiral centre j (C-alpha, or C-beta of ILE and THR) whose angle
        reference k is bonded to j too (i, k and l are substituents of j): its dihedral sets the
        handedness of j.
    phase
        (R,) within the backbone stage, 0 for rows placed first and 1 for rows placed after them
        that see them (tree version 2 under ``ca``: the peptide planes of odd residues and the C
        terminus); all 0 otherwise.
    pair
        (R,) tree version 3: heavy atom i is bonded to its angle reference k as well as to j, so
        the row draws the bond length i-k in place of the angle i-j-k (every bond of i is drawn,
        none follows from a combination of drawn coordinates); all False before. Its key marks k
        with ``=`` (``ALA:N<-1C,CA=,-1CA``).
    """

    rows: np.ndarray
    stage: np.ndarray
    owner: np.ndarray
    keys: list[str]
    fixed: np.ndarray
    branch: np.ndarray
    chiral: np.ndarray
    phase: np.ndarray
    pair: np.ndarray

    def placement_order(self) -> np.ndarray:
        """Row indices by stage, then phase, else in tree order: every row's references come
        before it."""
        return np.lexsort((np.arange(len(self.keys)), self.phase, self.stage))


def generic_key(key: str) -> str:
    """The residue-independent form of a row key (``ALA:C<...`` -> ``*:C<...``), used as fallback."""
    return "*:" + key.split(":", 1)[1]


def cap_analog_keys(key: str) -> list[str]:
    """Row keys that place an atom the same way with a chain residue's C-alpha where ``key`` has a
    cap's anchor: ACE's CH3 and NME's C are bonded to the peptide group as a C-alpha is, so a
    reference ``-1CH3`` or ``+1C`` / ``+2C`` (a cap's anchor: no other atom named so is referenced
    across residues) stands where a longer chain has ``-1CA`` or ``+1CA`` / ``+2CA``. Single
    substitutions first, then all; ``key`` itself is not listed. A one-residue chain (ACE-X-NME)
    has rows no longer chain has; their analogs carry what longer chains taught."""
    head, refs = key.split("<", 1)
    parts = refs.split(",")
    swaps = [n for n, p in enumerate(parts) if (p[0] == "-" and p[2:] == "CH3") or (p[0] == "+" and p[2:] == "C")]
    out = []
    for n in swaps:
        out.append(head + "<" + ",".join(p[:2] + "CA" if k == n else p for k, p in enumerate(parts)))
    if len(swaps) > 1:
        out.append(head + "<" + ",".join(p[:2] + "CA" if k in swaps else p for k, p in enumerate(parts)))
    return out


TREE_VERSION = 2  # the placement tree of new models; files record theirs (before versions: 1)
LATEST_TREE_VERSION = 3  # the newest tree this package builds


def check_tree_version(version: int) -> None:
    """Raise ValueError unless ``version`` is a placement-tree version this package builds."""
    if version not in range(1, LATEST_TREE_VERSION + 1):
        raise ValueError(f"unknown placement-tree version {version!r}; this package builds 1 to {LATEST_TREE_VERSION}")


def build_tree(chain: Chain, mapping: str, version: int = TREE_VERSION) -> Tree:
    """The staged placement rows of every non-bead atom of ``chain`` under ``mapping``.

    Under ``ca`` the backbone stage places each peptide plane (C, O of residue i, N, H of i + 1)
    from the C-alpha beads. The tree ``version`` says how:

    1. Every plane from the beads alone, so the N-CA-C angle of a residue, which its two planes
       make together, is never drawn as such; proline's CG by a dihedral about CD-N, the ring
       bond CB-CG closing implicitly.
    2. Alternating planes: those of even residues first (phase 0); the plane of an odd residue i
       then places its C by a dihedral about CA(i)-CA(i+1) relative to the N that the plane
       before put down, and its conditioner sees both neighbouring planes (phase 1); the
       C-terminal C hangs from its residue's N likewise. Every N-CA-C angle is made by a row that
       sees both of its atoms. Proline's CG from CD and CB (``CG<CD,CB,N``): the ring-closing
       distance CB-CG is set by a drawn angle at CD rather than by a dihedral.
    3. Version 2's rows, with every bond drawn as a length: a heavy atom bonded to two placed
       atoms is placed from both (``pair`` rows: the N of a peptide plane from the C before it and
       its own C-alpha, proline's CG from CD and CB, the atom that closes an aromatic ring from
       its two ring neighbours, with the dihedral about them against the first one's parent), and
       draws both bond lengths. Before, the second bond (N-CA, the ring-closing bond) followed
       from a drawn angle and length, and its spread came out two to ten times the data's in
       energy.

    Under ``backbone`` (N, CA, C beads) the planes hang from the beads in every version.

    Raises
    ------
    ValueError
        When a C-alpha trace is too short to orient a peptide plane (fewer than three residues
        under ``ca``), or for an unknown ``version``.
    """
    check_tree_version(version)
    if chain.parts:
        return _join_trees([build_tree(p, mapping, version) for p in chain.parts], chain.parts)
    beads = set(bead_atoms(chain, mapping)[0])
    n_res = chain.n_residues
    A = [chain.anchor(r) for r in range(n_res)]
    rows: list[tuple[int, int, int, int, int, int]] = []
    phases: list[int] = []
    phase = 0
    placed = set(beads)

    def has(r: int, name: str) -> bool:
        return name in chain.residue_atoms[r]

    def at(r: int, name: str) -> int:
        return chain.atom(r, name)

    def add(i: int, j: int, k: int, m: int, stage: int, owner: int) -> None:
        for ref in (j, k, m):
            if ref not in placed:
                raise AssertionError(f"reference {chain.atom_names[ref]} placed after {chain.atom_names[i]}")
        if i in placed:
            raise AssertionError(f"atom {chain.atom_names[i]} placed twice")
        rows.append((i, j, k, m, stage, owner))
        phases.append(phase)
        placed.add(i)

    if mapping == "ca" and n_res < 3:
        raise ValueError(f"the 'ca' mapping needs at least three C-alpha beads (caps count), got {n_res}")
    last = n_res - 1
    alternating = mapping == "ca" and version >= 2
    # stage 0: backbone (alternating: even residues' planes, then odd residues' planes)
    plane_order = list(range(n_res - 1))
    if alternating:
        plane_order = plane_order[0::2] + plane_order[1::2]
    for i in plane_order:
        c = at(i, "C")
        if mapping == "ca":
            phase = i % 2 if alternating else 0
            ref = at(i, "N") if phase == 1 else (A[i - 1] if i > 0 else A[i + 2])
            add(c, A[i], A[i + 1], ref, 0, i)
            n_next = at(i + 1, "N")
            add(n_next, c, A[i + 1], A[i], 0, i)
            add(at(i, "O"), c, n_next, A[i], 0, i)
        else:
            n_next = at(i + 1, "N")
            add(at(i, "O"), c, A[i], n_next, 0, i)
        if has(i + 1, "H"):
            add(at(i + 1, "H"), n_next, A[i + 1], c, 0, i)
    if chain.cterm:
        c = at(last, "C")
        if mapping == "ca":
            phase = 1 if alternating else 0
            add(c, A[last], A[last - 1], at(last, "N") if alternating else A[last - 2], 0, last)
            add(at(last, "O"), c, A[last], A[last - 1], 0, last)
        else:
            add(at(last, "O"), c, A[last], at(last, "N"), 0, last)
        add(at(last, "OXT"), c, A[last], at(last, "O"), 0, last)
    phase = 0
    if chain.nterm:
        n, c = at(0, "N"), at(0, "C")
        if mapping == "ca":
            add(n, A[0], c, A[1], 0, 0)
        first_h = "H2" if chain.names[0] == "PRO" else "H"
        add(at(0, first_h), n, A[0], c, 0, 0)
        for h in ("H", "H2", "H3"):
            if h != first_h and has(0, h):
                add(at(0, h), n, A[0], at(0, first_h), 0, 0)
    # stages 1 and 2: side chains (and cap methyl hydrogens), even residues before odd ones
    for r in range(n_res):
        stage = 1 + r % 2
        _side_chain_rows(chain, r, stage, add, placed, version)

    arr = np.asarray([row[:4] for row in rows], dtype=np.int64).reshape(-1, 4)
    heavy = np.asarray([e != "H" for e in chain.elements])
    pair = np.asarray(
        [version >= 3 and bool(heavy[[i, j, k]].all()) and int(k) in chain.neighbours[int(i)] for i, j, k, _ in arr],
        dtype=bool,
    )
    keys = [_row_key(chain, row[0], row[1:4], bool(p)) for row, p in zip(rows, pair)]
    fixed = ~(heavy[arr[:, 0]] & heavy[arr[:, 1]])
    branch = np.asarray([int(m) in chain.neighbours[int(j)] for _, j, _, m in arr], dtype=bool)
    centres = set(chiral_centres(chain)[:, 0].tolist())
    # the dihedral sets j's handedness only when i, k and l are all bonded to j (an improper);
    # C placed from its C-alpha against the next residue's C-alpha (k not bonded to j) has the
    # backbone's freedom: bounding it cut off valid structures of longer chains (log q = -inf)
    improper = np.asarray([int(k) in chain.neighbours[int(j)] for _, j, k, _ in arr], dtype=bool)
    chiral = branch & improper & np.asarray([int(j) in centres for j in arr[:, 1]], dtype=bool)
    return Tree(
        arr,
        np.asarray([row[4] for row in rows]),
        np.asarray([row[5] for row in rows]),
        keys,
        fixed,
        branch,
        chiral,
        np.asarray(phases, dtype=np.int64),
        pair,
    )


def _join_trees(trees: Sequence[Tree], chains: Sequence[Chain]) -> Tree:
    """The tree of a complex: the chains' trees one after the other, atoms and owners offset."""
    a_off = np.cumsum([0] + [c.n_atoms for c in chains])
    r_off = np.cumsum([0] + [c.n_residues for c in chains])
    return Tree(
        np.concatenate([t.rows + a_off[n] for n, t in enumerate(trees)]),
        np.concatenate([t.stage for t in trees]),
        np.concatenate([t.owner + r_off[n] for n, t in enumerate(trees)]),
        [k for t in trees for k in t.keys],
        np.concatenate([t.fixed for t in trees]),
        np.concatenate([t.branch for t in trees]),
        np.concatenate([t.chiral for t in trees]),
        np.concatenate([t.phase for t in trees]),
        np.concatenate([t.pair for t in trees]),
    )


def _side_chain_rows(chain: Chain, r: int, stage: int, add, placed: set[int], version: int) -> None:
    name = chain.names[r]
    atoms = chain.residue_atoms[r]
    nb = chain.neighbours
    is_h = [e == "H" for e in chain.elements]
    own = set(atoms.values())
    if name in CAPS:
        ch3 = atoms[CAP_ANCHOR[name]]
        parent = {ch3: atoms["C"] if name == "ACE" else atoms["N"]}
    else:
        ca, n, c = atoms["CA"], atoms["N"], atoms["C"]
        parent = {ca: n}
        cb = atoms.get("CB")
        if name == "PRO":
            # The ring from the amide plane: N is planar, so CD lies in the plane of N's other bonds,
            # opposite the C of the residue before across N-CA (an improper, narrow dihedral; at an
            # N terminus a proper one about N-CA from the residue's own C). CG then closes the
            # ring: bonded to CD, at an angle CG-CD-CB that sets the ring bond CB-CG (version 1:
            # a dihedral about CD-N, the bond closing implicitly), the pucker its dihedral about
            # CD-CB. (Placed from CB, CD's position would follow from two free dihedrals and the
            # ring could open onto the residue before.)
            cd, cg = atoms["CD"], atoms["CG"]
            before = [x for x in nb[n] if x not in own and not is_h[x]]
            add(cb, ca, n, c, stage, r)
            add(cd, n, ca, before[0] if before else c, stage, r)
            if version >= 2:
                add(cg, cd, cb, n, stage, r)
            else:
                add(cg, cd, n, ca, stage, r)
            parent.update({cb: ca, cd: n, cg: cd})
        elif cb is not None:
            add(cb, ca, n, c, stage, r)
            parent[cb] = ca
            # breadth first over the side chain's heavy atoms (never back into the backbone)
            queue = deque([cb])
            while queue:
                p = queue.popleft()
                for a in sorted(nb[p]):
                    if a in own and not is_h[a] and a not in placed and chain.atom_names[a] not in BACKBONE_ATOMS:
                        k = parent[p]
                        # version 3: an atom that closes a ring is placed from both ring neighbours,
                        # the dihedral about them against p's parent
                        closing = [x for x in sorted(nb[a]) if x in placed and x != p and not is_h[x] and x in own]
                        others = [x for x in sorted(nb[p]) if x in placed and not is_h[x] and x not in (k, a)]
                        if version >= 3 and closing:
                            k, m = closing[0], k
                        elif others:
                            m = others[0]
                        else:
                            m = _proper_ref(chain, k, p, placed)
                        add(a, p, k, m, stage, r)
                        parent[a] = p
                        queue.append(a)
    # hydrogens in template order
    for a in sorted(own):
        if not is_h[a] or a in placed:
            continue
        p = [x for x in nb[a]][0]
        if name not in CAPS and p == atoms["CA"]:
            add(a, p, atoms["N"], atoms["C"], stage, r)
            continue
        k = parent[p]
        heavy_others = [x for x in sorted(nb[p]) if x in placed and not is_h[x] and x not in (k, a)]
        h_others = [x for x in sorted(nb[p]) if x in placed and is_h[x] and x != a]
        if heavy_others:
            m = heavy_others[0]
        elif h_others:
            m = h_others[0]
        else:
            m = _proper_ref(chain, k, p, placed)
        add(a, p, k, m, stage, r)


def _proper_ref(chain: Chain, k: int, p: int, placed: set[int]) -> int:
    """A placed neighbour of k other than p for a proper dihedral: heavy first, own residue first
    (so C-alpha's reference is N), then lowest index."""
    res = chain.atom_residue[k]
    cand = [x for x in chain.neighbours[k] if x in placed and x != p]
    if not cand:
        raise AssertionError(f"no dihedral reference for {chain.atom_names[p]}")
    cand.sort(key=lambda x: (chain.elements[x] == "H", chain.atom_residue[x] != res, x))
    return cand[0]


def _row_key(chain: Chain, i: int, refs: Sequence[int], pair: bool = False) -> str:
    """``RES:ATOM<j,k,l`` with references in other residues carrying their offset; a ``pair`` row
    (tree version 3: i bonded to k, whose distance it draws) marks k with ``=``."""
    res = int(chain.atom_residue[i])

    def label(a: int) -> str:
        off = int(chain.atom_residue[a]) - res
        return chain.atom_names[a] if off == 0 else f"{off:+d}{chain.atom_names[a]}"

    labels = [label(int(a)) for a in refs]
    if pair:
        labels[1] += "="
    return f"{chain.names[res]}:{chain.atom_names[i]}<" + ",".join(labels)


def equivalent_hydrogen_pairs(chain: Chain) -> np.ndarray:
    """(n, 5) rows (a, b, j, k, l): hydrogens a < b placed from the same references j, k, l
    (methylene pairs such as HB2/HB3, the second and third hydrogen of a methyl or NH3+ group,
    glycine's HA2/HA3). The force field treats a and b alike, so swapping their names leaves the
    energy unchanged; :func:`canonical_hydrogens` fixes which is which (by the rows of tree
    version 1, so that data keep one naming whatever the version of a model)."""
    tree = build_tree(chain, "ca", 1)
    by_refs: dict[tuple[int, int, int], list[int]] = {}
    for i, j, k, m in tree.rows:
        if chain.elements[i] == "H":
            by_refs.setdefault((int(j), int(k), int(m)), []).append(int(i))
    out = [[a[0], a[1], *refs] for refs, a in by_refs.items() if len(a) == 2]
    return np.asarray(out, dtype=np.int64).reshape(-1, 5)


def canonical_hydrogens(chain: Chain, x: np.ndarray) -> np.ndarray:
    """Positions x (N, n_atoms, 3) with the names of every pair of :func:`equivalent_hydrogen_pairs`
    swapped where needed so that the first of the pair has the larger dihedral about j-k relative
    to l (e.g. HB2 at about +120 degrees, HB3 at -120 relative to CG). Data whose hydrogens were
    added without regard to their prochirality (as most builders do) then name them consistently;
    the energy is unchanged."""
    pairs = equivalent_hydrogen_pairs(chain)
    if pairs.size == 0:
        return x
    x = np.array(x, copy=True)

    def dih(a: np.ndarray) -> np.ndarray:
        b1 = x[:, pairs[:, 3]] - x[:, pairs[:, 4]]
        b2 = x[:, pairs[:, 2]] - x[:, pairs[:, 3]]
        b3 = x[:, a] - x[:, pairs[:, 2]]
        n1, n2 = np.cross(b1, b2), np.cross(b2, b3)
        return np.arctan2(np.linalg.norm(b2, axis=-1) * (b1 * n2).sum(-1), (n1 * n2).sum(-1))

    swap = dih(pairs[:, 0]) < dih(pairs[:, 1])  # (N, n_pairs)
    f, p = np.nonzero(swap)
    a, b = pairs[p, 0], pairs[p, 1]
    xa = x[f, a].copy()
    x[f, a] = x[f, b]
    x[f, b] = xa
    return x


def chiral_centres(chain: Chain) -> np.ndarray:
    """(n, 4) atom indices (centre, a, b, c) of the chiral centres of the chain."""
    out = []
    for r, name in enumerate(chain.names):
        for quad in CHIRAL.get(name, ()):
            out.append([chain.atom(r, a) for a in quad])
    return np.asarray(out, dtype=np.int64).reshape(-1, 4)


def signed_volumes(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """det[a - centre, b - centre, c - centre] of every chiral centre: x (..., n_atoms, 3) ->
    (..., n_centres) (nm^3); its sign is the handedness."""
    c = x[..., centres[:, 0], :]
    u = x[..., centres[:, 1], :] - c
    v = x[..., centres[:, 2], :] - c
    w = x[..., centres[:, 3], :] - c
    return np.einsum("...i,...i->...", u, np.cross(v, w))


# ----------------------------------------------------------------------------- OpenMM topology
