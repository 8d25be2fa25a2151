"""Protein backmappers by name, and the chain a CG topology describes.

A transferable protein model (:class:`~openmm_backmap.models.protein.ProteinBackmapper`) backmaps
any chain. The shipped ones live in ``openmm_backmap/pretrained/<name>.pt`` and are loaded by name
(``protein-ca``, ``protein-backbone``) wherever a model path is accepted. Binding one to a CG
topology (:func:`read_cg_chain`) fixes the sequence, and :func:`chain_model_bytes` writes the bound
chain as an ordinary backmapper model file (TorchScript with ``metadata.json`` and
``topology.pdb``), so the rest of the package treats it like any other model file.

What a CG topology must hold (checked, with errors that name the residue):

* one or more chains (a complex: the chains are backmapped together, each residue seeing the
  nearest residues of every chain), each with its residues in order and consecutive residue
  numbers (a jump is a missing residue);
* three-letter residue names: the 20 standard amino acids, HID/HIE/HIP (HIS is read as HIE), and
  the caps ACE (first) and NME (last);
* per residue the beads of the model's mapping, named as the atoms they sit on, in this order:
  ``ca``: CA (ACE: CH3, NME: C); ``backbone``: N, CA, C (ACE: CH3, C; NME: N, C).

Termini follow from the CG chain: an ACE residue first (an NME residue last) caps that end;
without one the terminus is charged (NH3+ or COO-, amber14's N- and C-terminal residues). The AA
topology carries amber14 residue and atom names (HIE, not HIS) and the CG residue numbers.

The AA energy of a bound chain is amber14 + GBn2 (``force_field`` in the metadata: no cutoff,
bonds to hydrogen constrained), built by :func:`openmm_backmap.openmm.energies.model_system`.
No OpenMM here.
"""

from __future__ import annotations

import copy
import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from openmm_backmap.io.model_files import MODEL_FORMAT, MODEL_FORMAT_VERSION, _with_checksum
from openmm_backmap.io.pdb import topology_to_pdb
from openmm_backmap.models.protein import FORMAT as PROTEIN_FORMAT
from openmm_backmap.models.protein import PRETRAINED_DIR, ProteinBackmapper
from openmm_backmap.models.residues import CAP_ANCHOR, MAPPINGS, canonical_name, chain_label

__all__ = [
    "CA_CA_NM",
    "FORCE_FIELD",
    "CGChain",
    "check_cg_positions",
    "chain_model_bytes",
    "chain_topology",
    "load_cg_topology",
    "load_protein_model",
    "pretrained_names",
    "protein_model_path",
    "read_cg_chain",
]

FORCE_FIELD = ("amber14-all.xml", "implicit/gbn2.xml")  # U_AA of bound chains (the training data's)
CA_CA_NM = 0.38  # consecutive C-alpha distance of a trans peptide bond
GAP_NM = 0.55  # consecutive anchors further apart than this: a residue is missing (i, i+2 span 0.55-0.73)
ANGSTROM_NM = 2.0  # a median consecutive anchor distance above this: coordinates in Angstrom


# ---------------------------------------------------------------------------- names
def pretrained_names() -> list[str]:
    """Names of the shipped protein models (files ``openmm_backmap/pretrained/<name>.pt``)."""
    return sorted(p.stem for p in PRETRAINED_DIR.glob("*.pt")) if PRETRAINED_DIR.is_dir() else []


def _is_protein_file(path: Path) -> bool:
    """True for a file written by :meth:`ProteinBackmapper.save` (a ``torch.save`` zip without the
    ``code/`` folder of a TorchScript archive, holding the protein format name)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if any("/code/" in n for n in names):
                return False
            pkl = next((n for n in names if n.endswith("/data.pkl")), None)
            return pkl is not None and PROTEIN_FORMAT.encode() in archive.read(pkl)
    except (zipfile.BadZipFile, OSError):
        return False


def protein_model_path(source) -> Path | None:
    """The protein model file that ``source`` names, or None when it names another kind of model.

    ``source`` is a shipped model's name (``protein-ca``), or the path of a protein model file. A
    string that is no existing file, has no folder and no ``.pt``/``.pt2`` suffix is taken as a name.

    Raises
    ------
    ValueError
        For a name with no shipped file, listing the names there are.
    """
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = Path(source)
    if path.is_file():
        return path if _is_protein_file(path) else None
    text = str(source)
    if os.sep in text or "/" in text or path.suffix in (".pt", ".pt2"):
        return None  # a missing file: its loader says so
    found = PRETRAINED_DIR / f"{text}.pt"
    if not found.is_file():
        raise ValueError(
            f"no model file {text!r} and no pretrained model of that name; pretrained models: "
            f"{', '.join(pretrained_names()) or 'none'} (in {PRETRAINED_DIR})"
        )
    return found


def load_protein_model(path: str | Path) -> ProteinBackmapper:
    """The :class:`ProteinBackmapper` in a protein model file, in float32 and eval mode."""
    model = ProteinBackmapper.load(path).float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------- the CG chain
@dataclass(frozen=True)
class CGChain:
    """The chain, or chains, of a CG topology.

    Attributes
    ----------
    names
        Residue names as given (``HIS`` kept), one per residue, chain after chain.
    res_seq
        Residue numbers.
    bead_names
        Bead names in topology order.
    anchors
        Index (among the beads) of each residue's anchor bead (CA; CH3 of ACE, C of NME).
    mapping
        ``ca`` or ``backbone``.
    lengths
        Residues per chain, in order (one entry for a single chain).
    chain_ids
        The chains' identifiers as the topology gives them (PDB chain letters), or A, B, ...
    """

    names: tuple[str, ...]
    res_seq: tuple[int, ...]
    bead_names: tuple[str, ...]
    anchors: tuple[int, ...]
    mapping: str
    lengths: tuple[int, ...] = ()
    chain_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.lengths:
            object.__setattr__(self, "lengths", (len(self.names),))
        if not self.chain_ids:
            object.__setattr__(self, "chain_ids", tuple(chain_label(n) for n in range(len(self.lengths))))

    @property
    def sequences(self) -> list[list[str]]:
        """Residue names per chain."""
        ends = np.cumsum((0, *self.lengths))
        return [list(self.names[a:b]) for a, b in zip(ends[:-1], ends[1:])]

    @property
    def linked(self) -> np.ndarray:
        """Indices r of consecutive residues r, r + 1 of one chain."""
        last = np.cumsum(self.lengths) - 1
        return np.setdiff1d(np.arange(len(self.names) - 1), last)

    def label(self, r: int) -> str:
        """The residue's name and number, with its chain's identifier in a complex."""
        if len(self.lengths) == 1:
            return f"{self.names[r]}{self.res_seq[r]}"
        c = int(np.searchsorted(np.cumsum(self.lengths), r, side="right"))
        return f"{self.names[r]}{self.res_seq[r]} of chain {self.chain_ids[c]}"


def load_cg_topology(topology):
    """An mdtraj topology of a CG topology: mdtraj or OpenMM topology, or a file (a PDB is read
    without mdtraj's renaming, so HID/HIE/HIP and bead names stay as written)."""
    import mdtraj as md

    if isinstance(topology, md.Topology):
        return topology
    if isinstance(topology, (str, os.PathLike)):
        path = Path(topology)
        if not path.is_file():
            raise FileNotFoundError(f"CG topology {path} does not exist")
        try:
            if path.suffix.lower() == ".pdb":
                top = md.load_pdb(str(path), standard_names=False).topology
            else:
                top = md.load_topology(str(path))
        except Exception as err:  # noqa: BLE001 - mdtraj raises many kinds for unreadable files
            raise ValueError(f"cannot read the CG topology {path}: {type(err).__name__}: {err}") from err
        if top.n_atoms == 0:
            raise ValueError(f"the CG topology {path} holds no atoms")
        return top
    return md.Topology.from_openmm(topology)


def read_cg_chain(topology, mapping: str, what: str = "the CG topology") -> CGChain:
    """The chain, or the chains of a complex, of a CG topology (mdtraj or OpenMM topology, or a
    file), checked against ``mapping``.

    Raises
    ------
    ValueError
        For an unknown residue name, beads that do not match the mapping (naming the residue, its
        beads and the expected ones), a jump in residue numbers (a missing residue), a cap away from
        its end of its chain, a chain of fewer than two residues, or beads out of chain and residue
        order; each names the chain when there are several.
    """
    top = load_cg_topology(topology)
    chains = [c for c in top.chains if c.n_atoms]
    if not chains:
        raise ValueError(f"{what} holds no chain with beads")
    ids = [str(getattr(c, "chain_id", None) or chain_label(n)) for n, c in enumerate(chains)]
    if len(set(ids)) != len(ids):
        ids = [chain_label(n) for n in range(len(chains))]
    names, seqs, beads, anchors, lengths = [], [], [], [], []
    for n, ch in enumerate(chains):
        where = what if len(chains) == 1 else f"{what}, chain {ids[n]}"
        residues = list(ch.residues)
        if len(residues) < 2:
            raise ValueError(f"{where} has {len(residues)} residue(s); a chain needs at least two")
        for r, res in enumerate(residues):
            try:
                canon = canonical_name(res.name)
            except ValueError as err:
                raise ValueError(
                    f"{where}: residue {res.name}{res.resSeq} (number {r + 1} in the chain): {err}"
                ) from None
            want = list(MAPPINGS[mapping][canon])
            got = [a.name for a in res.atoms]
            if got != want:
                raise ValueError(
                    f"{where}: residue {res.name}{res.resSeq} has beads {got}, but the '{mapping}' mapping "
                    f"expects {want} (beads are named as the atoms they sit on, in that order)"
                )
            if r > 0 and res.resSeq != residues[r - 1].resSeq + 1:
                prev = residues[r - 1]
                raise ValueError(
                    f"{where}: residue numbers jump from {prev.name}{prev.resSeq} to {res.name}{res.resSeq}: "
                    "a residue is missing from the chain (the model needs the unbroken chain)"
                )
            if canon == "ACE" and r != 0 or canon == "NME" and r != len(residues) - 1:
                raise ValueError(f"{where}: cap {res.name}{res.resSeq} is not at its end of the chain")
            anchors.append(len(beads) + want.index(CAP_ANCHOR.get(canon, "CA")))
            beads.extend(got)
            names.append(res.name)
            seqs.append(int(res.resSeq))
        lengths.append(len(residues))
    order = [a.index for c in chains for a in c.atoms]
    if order != sorted(order) or top.n_atoms != len(beads):
        raise ValueError(f"{what}: the beads are not consecutive in chain and residue order")
    return CGChain(tuple(names), tuple(seqs), tuple(beads), tuple(anchors), mapping, tuple(lengths), tuple(ids))


def check_cg_positions(X: np.ndarray, chain: CGChain, what: str = "CG coordinates") -> None:
    """Refuse CG positions X (B, n_cg, 3) or (n_cg, 3) that are not in nm or break the chain.

    Raises
    ------
    ValueError
        When consecutive anchor beads (C-alphas) are a median of more than 2 nm apart (Angstrom
        instead of nm: 3.8 instead of 0.38), or any pair is more than 0.55 nm apart (a missing
        residue), naming the residues and the frame.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 2:
        X = X[None]
    a = X[:, list(chain.anchors)]
    linked = chain.linked
    d = np.linalg.norm(a[:, linked + 1] - a[:, linked], axis=-1)
    if not d.size:
        return
    median = float(np.median(d))
    if median > ANGSTROM_NM:
        raise ValueError(
            f"{what}: consecutive C-alpha beads are a median {median:.2f} nm apart (expected about "
            f"{CA_CA_NM} nm): the coordinates look like Angstrom; give them in nm (divide by 10)"
        )
    if float(d.max()) > GAP_NM:
        f, k = np.unravel_index(int(np.argmax(d)), d.shape)
        r = int(linked[k])
        raise ValueError(
            f"{what}: the C-alpha beads of {chain.label(r)} and {chain.label(r + 1)} are {d[f, k]:.2f} nm apart"
            f"{f' in frame {f}' if X.shape[0] > 1 else ''} (expected about {CA_CA_NM} nm): a residue is missing "
            "between them or the chain is broken"
        )


# ---------------------------------------------------------------------------- the bound chain as a model file
def chain_topology(module, res_seq, chain_ids=None) -> object:
    """The AA mdtraj topology of a bound chain module (amber14 names, residue numbers ``res_seq``;
    one mdtraj chain per chain of a complex, identified by ``chain_ids`` when given)."""
    import mdtraj as md

    ch = module.chain
    n_chains = max(1, len(ch.parts))
    top = md.Topology()
    chains = [top.add_chain(chain_id=None if chain_ids is None else str(chain_ids[n])) for n in range(n_chains)]
    of_residue = ch.residue_chain
    atoms = []
    for r, name in enumerate(ch.names):
        res = top.add_residue(name, chains[of_residue[r]], resSeq=int(res_seq[r]))
        for a in sorted(ch.residue_atoms[r].values()):
            atoms.append(top.add_atom(ch.atom_names[a], md.element.get_by_symbol(ch.elements[a]), res))
    for a, b in ch.bonds:
        top.add_bond(atoms[a], atoms[b])
    return top


def chain_model_bytes(protein: ProteinBackmapper, chain: CGChain, source: str) -> tuple[bytes, object]:
    """(model-file bytes, AA mdtraj topology) of ``protein`` bound to the sequence of ``chain``.

    The file is an ordinary backmapper model file (TorchScript ``sample``, ``log_prob``,
    ``sample_with_noise``; ``metadata.json``; ``topology.pdb``) whose metadata names the force field
    of U_AA (``force_field``) instead of embedding a System. ``source`` (the name or path of the
    protein model) is recorded.
    """
    from openmm_backmap import __version__

    if protein.mapping != chain.mapping:
        raise ValueError(f"the model uses the '{protein.mapping}' mapping, the chain was read for '{chain.mapping}'")
    module = copy.deepcopy(protein.for_chains(chain.sequences)).float().eval()
    top = chain_topology(module, chain.res_seq, chain.chain_ids)
    scripted = torch.jit.script(module)
    beads = module.beads.tolist()
    free = module.free.tolist()
    rows = module.rows.tolist()
    r0 = module.r0.tolist()
    constraints = [[int(rows[n][0]), int(rows[n][1]), float(r0[n])] for n in range(len(rows)) if not free[n]]
    atoms = list(top.atoms)
    meta = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "package_version": __version__,
        "kind": "backmapper",
        "temperature": float(getattr(protein, "info", {}).get("temperature", 300.0)),
        "units": {"positions": "nm", "log_q": "nats per Cartesian nm^3 of each free atom", "energy": "kJ/mol"},
        "dtype": "float32",
        "n_aa": int(module.n_aa),
        "n_cg": int(module.n_cg),
        "n_free_dof": 3 * int(module.n_rows) - len(constraints),
        "temporal": False,
        "methods": ["sample", "log_prob", "sample_with_noise"],
        "mapping": {
            "weighting": "mass",
            "groups": [{"name": n, "atoms": [int(a)], "weights": [1.0]} for n, a in zip(chain.bead_names, beads)],
        },
        "atom_names": [a.name for a in atoms],
        "elements": [a.element.symbol for a in atoms],
        "residues": [
            {"name": r.name, "resSeq": int(r.resSeq), "atoms": [a.index for a in r.atoms]} for r in top.residues
        ],
        "bead_names": list(chain.bead_names),
        "constraints": constraints,
        "cg_bonds": [],
        "cg_bond_range_nm": None,
        "has_system": False,
        "force_field": list(FORCE_FIELD),
        "protein": {
            "source": source,
            "mapping": chain.mapping,
            "residue_names": list(chain.names),
            "chain_lengths": list(chain.lengths),
            "chain_ids": list(chain.chain_ids),
        },
        "architecture": dict(protein.config),
        "training": dict(getattr(protein, "info", {}) or {}),
    }
    extra = {"topology.pdb": topology_to_pdb(top)}
    extra["metadata.json"] = json.dumps(_with_checksum(meta, scripted, extra), indent=1, default=str)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer, _extra_files=extra)
    return buffer.getvalue(), top
