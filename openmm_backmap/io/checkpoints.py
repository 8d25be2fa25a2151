"""Training checkpoints: the ``spec`` that rebuilds a model, and writing and reading checkpoints.

A checkpoint is a ``torch.save`` dict ``{"spec", "state_dict", ...}``: the spec (format
:data:`~openmm_backmap.io.model_files.CHECKPOINT_FORMAT`, the model's hyperparameters, mapping,
topology PDB text, temperature and, for backmappers, constraints and the optional AA System XML)
rebuilds the model without the training data; ``spec["kind"]`` is ``"cg-potential"`` for a CG
potential, ``"joint"`` for a joint model q(X) q(x | X) (``spec["cg"]`` and ``spec["backmapper"]``
are then the specs of its two parts) and absent for a backmapper.  The training loop
(:mod:`openmm_backmap.training.loop`) adds what it needs to resume.  :func:`export_checkpoint` turns
any kind into model files.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch

from openmm_backmap.geometry import bond_length_range
from openmm_backmap.io.model_files import (
    CG_KIND,
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    export_cg,
    export_model,
)
from openmm_backmap.io.pdb import topology_from_pdb, topology_to_pdb
from openmm_backmap.mapping import CGMapping
from openmm_backmap.models.backmapper import Backmapper
from openmm_backmap.models.cg_potential import CGFlowPotential
from openmm_backmap.models.joint import JointModel

JOINT_KIND = "joint"


def make_spec(
    model: Backmapper, temperature: float, reference_xyz=None, system_xml: str | None = None, cg_xyz=None
) -> dict:
    """Everything needed to rebuild ``model`` (and to export it) without the training data.

    ``cg_xyz`` (N, n_cg, 3) nm, the CG frames of the training data (default: the projection of
    ``reference_xyz``), gives ``cg_bond_range_nm``, the shortest and longest CG bond seen, which a
    loaded model checks its CG input against (coordinates in Angstrom are refused).
    """
    cg_bonds = model.spec.get("cg_bonds") or []
    if cg_xyz is None and reference_xyz is not None:
        cg_xyz = model.mapping.project(np.asarray(reference_xyz, dtype=np.float64)[None])
    bond_range = list(bond_length_range(cg_xyz, cg_bonds)) if cg_xyz is not None and cg_bonds else None
    return {
        "cg_bond_range_nm": bond_range,
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model": copy.deepcopy(model.spec),
        "mapping": model.mapping.to_dict(),
        "topology_pdb": topology_to_pdb(model.mapping.topology, reference_xyz),
        "temperature": float(temperature),
        "system_xml": system_xml,
        "training": {},
    }


def build_from_spec(spec: dict) -> Backmapper:
    """A Backmapper with the architecture of ``spec`` (parameters and statistics not loaded)."""
    top = topology_from_pdb(spec["topology_pdb"])
    mapping = CGMapping.from_dict(spec["mapping"], top)
    kw = dict(spec["model"])
    kw["constraints"] = [tuple(c) for c in kw.get("constraints") or []]
    kw["bonds"] = [tuple(b) for b in kw["bonds"]]
    kw["cg_bonds"] = [tuple(b) for b in kw["cg_bonds"]]
    return Backmapper(mapping, **kw)


def save_checkpoint(path: str | Path, model: torch.nn.Module | dict, spec: dict, **state: Any) -> None:
    """Write a checkpoint (backmapper or CG potential) atomically: temporary file, then rename.

    ``model`` is the model whose parameters are saved, or its state dict; ``state`` are further
    entries (what resuming needs, the training stage).
    """
    path = Path(path)
    payload = {"spec": spec, "state_dict": model if isinstance(model, dict) else model.state_dict(), **state}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict of any openmm-backmap checkpoint; its ``spec["kind"]`` says what it holds
    (``"cg-potential"``, or a backmapper when absent).

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        The file is not a readable openmm-backmap checkpoint (corrupt, truncated, or another file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for corrupt files
        raise ValueError(f"{path} is not a readable checkpoint ({type(err).__name__}: {err})") from err
    if (
        not isinstance(ckpt, dict)
        or not isinstance(ckpt.get("spec"), dict)
        or ckpt["spec"].get("format") != CHECKPOINT_FORMAT
    ):
        raise ValueError(f"{path} is not an openmm-backmap checkpoint")
    return ckpt


def load_checkpoint(path: str | Path) -> tuple[Backmapper, dict]:
    """(backmapper with the checkpoint's parameters, the checkpoint dict); see :func:`read_checkpoint`."""
    ckpt = read_checkpoint(path)
    if ckpt["spec"].get("kind", "backmapper") != "backmapper":
        raise ValueError(f"{path} holds a {ckpt['spec']['kind']} checkpoint, not a backmapper")
    model = build_from_spec(ckpt["spec"])
    model.load_state_dict(ckpt["state_dict"])
    return model, ckpt


def make_cg_spec(model: CGFlowPotential, mapping=None, reference_xyz=None) -> dict:
    """Everything needed to rebuild ``model`` (and to export it) without the training data.

    ``mapping`` (a :class:`~openmm_backmap.mapping.CGMapping`) is carried along with its all-atom
    topology so a model file can name its beads; ``reference_xyz`` (n_aa, 3) nm gives that topology
    coordinates.
    """
    spec: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "kind": CG_KIND,
        "version": CHECKPOINT_VERSION,
        "model": copy.deepcopy(model.spec),
        "temperature": float(model.temperature),
        "mapping": None,
        "topology_pdb": None,
        "cg_topology_pdb": None,
        "bead_names": [f"B{i}" for i in range(model.n_cg)],
        "masses": None,
        "training": {},
    }
    if mapping is not None:
        if mapping.n_cg != model.n_cg:
            raise ValueError(f"the mapping has {mapping.n_cg} beads, the model {model.n_cg}")
        spec["mapping"] = mapping.to_dict()
        spec["topology_pdb"] = topology_to_pdb(mapping.topology, reference_xyz)
        cg_xyz = None if reference_xyz is None else mapping.project(np.asarray(reference_xyz, dtype=np.float64))
        spec["cg_topology_pdb"] = topology_to_pdb(mapping.cg_topology, cg_xyz)
        spec["bead_names"] = list(mapping.names)
        spec["masses"] = [float(m) for m in mapping.masses()]
    return spec


def build_cg_from_spec(spec: dict) -> CGFlowPotential:
    """A :class:`CGFlowPotential` with the architecture of ``spec`` (parameters not loaded)."""
    if spec.get("kind") != CG_KIND:
        raise ValueError(f"the spec is of kind {spec.get('kind')!r}, not {CG_KIND!r}")
    kw = dict(spec["model"])
    return CGFlowPotential(kw.pop("n_cg"), kw.pop("cg_bonds"), **kw)


def load_cg_checkpoint(path: str | Path) -> tuple[CGFlowPotential, dict]:
    """(model with the checkpoint's parameters, the checkpoint dict).

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        The file is not a readable CG-potential checkpoint.
    """
    ckpt = read_checkpoint(path)
    if ckpt["spec"].get("kind") != CG_KIND:
        raise ValueError(f"{path} is not an openmm-backmap CG-potential checkpoint")
    model = build_cg_from_spec(ckpt["spec"])
    state = ckpt["state_dict"]
    if any(v.is_floating_point() and v.dtype == torch.float64 for v in state.values()):
        model = model.double()
    model.load_state_dict(state)
    return model.eval(), ckpt


def make_joint_spec(cg_spec: dict, bm_spec: dict, temperature: float) -> dict:
    """The spec of a joint model from the specs of its CG flow and its backmapper."""
    return {
        "format": CHECKPOINT_FORMAT,
        "kind": JOINT_KIND,
        "version": CHECKPOINT_VERSION,
        "temperature": float(temperature),
        "cg": cg_spec,
        "backmapper": bm_spec,
        "training": {},
    }


def build_joint_from_spec(spec: dict) -> JointModel:
    """A :class:`JointModel` with the architecture of a joint ``spec`` (parameters not loaded)."""
    if spec.get("kind") != JOINT_KIND:
        raise ValueError(f"the spec is of kind {spec.get('kind')!r}, not {JOINT_KIND!r}")
    return JointModel(build_cg_from_spec(spec["cg"]), build_from_spec(spec["backmapper"]))


def load_joint_checkpoint(path: str | Path) -> tuple[JointModel, dict]:
    """(joint model with the checkpoint's parameters, the checkpoint dict); ValueError for a
    checkpoint of another kind."""
    ckpt = read_checkpoint(path)
    if ckpt["spec"].get("kind") != JOINT_KIND:
        raise ValueError(f"{path} is not a joint checkpoint (openmm-backmap train-joint)")
    model = build_joint_from_spec(ckpt["spec"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt


def joint_cg_path(path: str | Path) -> Path:
    """Where ``export`` writes the CG potential of a joint checkpoint by default: ``<stem>_cg.pt``
    beside the backmapper file ``path``."""
    path = Path(path)
    return path.with_name(path.stem + "_cg" + (path.suffix or ".pt"))


def export_checkpoint(checkpoint: str | Path, path: str | Path, cg_path: str | Path | None = None) -> str:
    """Write a training checkpoint of any kind (``openmm-backmap train``, ``train-cg`` or
    ``train-joint``) as a model file at ``path``; returns its kind (``"backmapper"``,
    ``"cg-potential"`` or ``"joint"``).

    A joint checkpoint gives two files: the backmapper at ``path`` and the CG potential
    U_CG = -kT log q(X) + priors at ``cg_path`` (default :func:`joint_cg_path`), both in the
    formats ``train`` and ``train-cg`` export.
    """
    kind = str(read_checkpoint(checkpoint)["spec"].get("kind", "backmapper"))
    if kind == JOINT_KIND:
        model, ckpt = load_joint_checkpoint(checkpoint)
        export_model(model.bm, ckpt["spec"]["backmapper"], path)
        export_cg(model.cg, ckpt["spec"]["cg"], joint_cg_path(path) if cg_path is None else cg_path)
    elif kind == CG_KIND:
        model, ckpt = load_cg_checkpoint(checkpoint)
        export_cg(model, ckpt["spec"], path)
    else:
        model, ckpt = load_checkpoint(checkpoint)
        export_model(model, ckpt["spec"], path)
    return kind


def cg_potential_from_file(path: str | Path) -> tuple[CGFlowPotential, dict]:
    """(trainable CG flow potential, its spec) from a ``train-cg`` checkpoint or an exported ``.pt``
    CG-potential model file: the model file's metadata rebuilds the architecture, priors and spec
    (what :func:`~openmm_backmap.io.model_files.export_cg` needs to write it again) and its state
    dict fills in the parameters, statistics and prior bounds.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        The file is neither kind of CG-potential file.
    """
    from openmm_backmap.io.model_files import read_model_file
    from openmm_backmap.models.cg_potential import DEFAULT_PRIORS

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CG potential {path} does not exist")
    if path.suffix == ".ckpt":
        model, ckpt = load_cg_checkpoint(path)
        return model, ckpt["spec"]
    try:
        module, meta, files = read_model_file(path, kind=CG_KIND)
    except ValueError as err:
        try:
            model, ckpt = load_cg_checkpoint(path)
        except ValueError:
            raise err from None
        return model, ckpt["spec"]
    kw = dict(meta["model"])
    kw["priors"] = {k: v for k, v in (meta.get("priors") or {}).items() if k in DEFAULT_PRIORS}
    model = CGFlowPotential(kw.pop("n_cg"), kw.pop("cg_bonds"), **kw)
    # the scripted module also lists the non-persistent buffers the constructor rebuilds
    keys = set(model.state_dict())
    state = {k: v for k, v in module.state_dict().items() if k in keys}
    if any(v.is_floating_point() and v.dtype == torch.float64 for v in state.values()):
        model = model.double()
    model.load_state_dict(state)
    spec: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "kind": CG_KIND,
        "version": CHECKPOINT_VERSION,
        "model": copy.deepcopy(model.spec),
        "temperature": float(meta["temperature"]),
        "mapping": meta.get("mapping"),
        "topology_pdb": None,
        "cg_topology_pdb": files.get("cg_topology.pdb") or None,
        "bead_names": meta.get("bead_names"),
        "masses": meta.get("masses"),
        "cg_bond_range_nm": meta.get("cg_bond_range_nm"),
        "training": meta.get("training", {}),
        "data": meta.get("data"),
    }
    return model.eval(), spec
