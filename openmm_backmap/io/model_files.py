"""Model files: what this package writes and reads, with every format name and version in one place.

A **backmapper model file** is one ``torch.jit.save`` archive that ``torch.jit.load`` opens without
this package:

* methods ``sample(cg[B, n_cg, 3], n) -> (aa[B*n, n_aa, 3], log_q[B*n])``,
  ``log_prob(aa[B, n_aa, 3], cg[B, n_cg, 3]) -> [B]``, ``sample_with_noise(cg, u)``, and for
  temporal models ``sample_next(cg, previous_aa) -> (aa[B, n_aa, 3], log_q[B])`` and
  ``log_prob_next``; positions in nm, log densities in nats w.r.t. Cartesian nm (float32);
* extra files ``metadata.json`` (format and package version, temperature, mapping, atom and bead
  names, elements, residues, constraints, training summary), ``topology.pdb`` (the AA topology)
  and, when the training had one, ``system.xml`` (the AA OpenMM System).

A **CG potential model file** has openmm-torch's ``forward(positions[n_cg, 3]) -> energy`` and the
methods ``energy``, ``log_prob``, ``prior_energy``, ``sample``, with ``metadata.json`` and
``cg_topology.pdb``.  Both kinds carry ``"format": MODEL_FORMAT`` and their ``kind``;
:func:`read_model_file` is the one reader of their metadata.  Both record in ``"checksum"`` the
SHA-256 of their payload (:func:`payload_checksum`: every weight and buffer, and the extra files
other than ``metadata.json``); a file whose payload no longer matches is refused on load.  Files
written before the checksum existed load without the check.

A **compiled force package** (``.pt2``, :mod:`openmm_backmap.openmm.compiled`) is an AOTInductor
zip whose metadata :func:`read_compiled_metadata` reads without loading its library.
**Checkpoints** (:mod:`openmm_backmap.io.checkpoints`) and **mapping files**
(:class:`~openmm_backmap.mapping.CGMapping`) carry the format names below as well.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from openmm_backmap.io.pdb import topology_from_pdb
from openmm_backmap.mapping import FORMAT_NAME as MAPPING_FORMAT
from openmm_backmap.mapping import FORMAT_VERSION as MAPPING_FORMAT_VERSION

# Every file format of the package: name and the newest version this code writes and reads.
MODEL_FORMAT = "openmm-backmap-model"  # TorchScript model files, both kinds
MODEL_FORMAT_VERSION = 1  # kind "backmapper"
CG_KIND = "cg-potential"
CG_FORMAT_VERSION = 1  # kind "cg-potential"
CHECKPOINT_FORMAT = "openmm-backmap-checkpoint"  # torch.save training checkpoints
CHECKPOINT_VERSION = 1
COMPILED_FORMAT = "openmm-backmap-compiled-force"  # AOTInductor force packages (.pt2)
COMPILED_VERSION = "1"
__all__ = [
    "CG_FORMAT_VERSION",
    "CG_KIND",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "COMPILED_FORMAT",
    "COMPILED_VERSION",
    "MAPPING_FORMAT",
    "MAPPING_FORMAT_VERSION",
    "MODEL_FORMAT",
    "MODEL_FORMAT_VERSION",
    "export_cg",
    "export_model",
    "is_compiled_package",
    "load_cg_potential",
    "load_model_bytes",
    "load_torchscript",
    "parse_compiled_metadata",
    "payload_checksum",
    "read_compiled_metadata",
    "read_model_file",
    "torchscript_metadata",
    "verify_checksum",
]

# The newest format_version readable per kind, and the extra files a model file may carry.
_KIND_VERSIONS = {"backmapper": MODEL_FORMAT_VERSION, CG_KIND: CG_FORMAT_VERSION}
_KIND_NAMES = {"backmapper": "backmapper", CG_KIND: "CG-potential"}
EXTRA_FILES = ("metadata.json", "topology.pdb", "system.xml", "cg_topology.pdb")
_PACKAGE_MARKER = "data/aotinductor/"


# ---------------------------------------------------------------------------- reading
def read_model_file(
    source: str | os.PathLike | bytes, device: str = "cpu", kind: str | None = None
) -> tuple[torch.jit.ScriptModule, dict[str, Any], dict[str, str]]:
    """(module in eval mode, parsed ``metadata.json``, extra files as text) of a model file.

    Parameters
    ----------
    source
        The file's path or bytes.
    device
        Where the module is loaded (``map_location``).
    kind
        ``"backmapper"`` or ``"cg-potential"`` to refuse the other kind; None accepts both.

    Raises
    ------
    FileNotFoundError
        The path does not exist.
    ValueError
        The file is truncated, corrupt, not an openmm-backmap model file, of another kind, or of a
        format version newer than this package reads.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        origin, data = "the model bytes", bytes(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"model file {path} does not exist")
        try:
            origin, data = str(path), path.read_bytes()
        except OSError as err:
            raise OSError(f"cannot read model file {path}: {err.strerror or err}") from err
    if is_compiled_package(data):
        raise ValueError(
            f"{origin} is a compiled force package (.pt2, a CG force for OpenMM), not a TorchScript "
            f"model file: give the .pt model file it was compiled from"
        )
    stream = io.BytesIO(data)
    files = {name: "" for name in EXTRA_FILES}
    try:
        module = torch.jit.load(stream, map_location=device, _extra_files=files)
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError and others for bad archives
        raise ValueError(
            f"{origin} is not a readable TorchScript model file (truncated or corrupt?): "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from err
    files = {k: (v.decode("utf-8") if isinstance(v, bytes) else str(v)) for k, v in files.items()}
    text = files["metadata.json"]
    if not text:
        raise ValueError(f"{origin} has no metadata.json: it is not an openmm-backmap model file")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{origin}: metadata.json is not valid JSON ({err})") from err
    if meta.get("format") != MODEL_FORMAT:
        raise ValueError(f"{origin}: metadata format is {meta.get('format')!r}, not {MODEL_FORMAT!r}")
    found = meta.get("kind")
    if kind is not None and found != kind:
        what = f"a {_KIND_NAMES[found]}" if found in _KIND_NAMES else f"a model file of kind {found!r}"
        raise ValueError(f"{origin} is {what}, not a {_KIND_NAMES.get(kind, kind)}")
    newest = _KIND_VERSIONS.get(found, MODEL_FORMAT_VERSION)
    if int(meta.get("format_version", 0)) > newest:
        raise ValueError(
            f"{origin}: model format version {meta['format_version']} is newer than this package reads "
            f"({newest}); upgrade openmm-backmap"
        )
    verify_checksum(module, meta, files, origin)
    return module.eval(), meta, files


def payload_checksum(module: torch.nn.Module, files: Mapping[str, str]) -> str:
    """SHA-256 (hex) of a model file's payload: the name, dtype, shape and bytes of every entry of
    the module's state dict (on the CPU, in name order), then each extra file but ``metadata.json``
    (in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for name in sorted(files):
        if name != "metadata.json" and files[name]:
            digest.update(f"{name}|".encode())
            digest.update(files[name].encode("utf-8"))
    return digest.hexdigest()


def verify_checksum(module: torch.nn.Module, meta: Mapping[str, Any], files: Mapping[str, str], origin: str) -> None:
    """ValueError when ``meta`` records a payload checksum that ``module`` and ``files`` do not match
    (a file without a recorded checksum passes)."""
    recorded = (meta.get("checksum") or {}).get("sha256")
    if recorded and payload_checksum(module, files) != recorded:
        raise ValueError(
            f"{origin} is corrupt: its weights or embedded files do not match the SHA-256 "
            f"checksum recorded when it was written (damaged in copying or edited?)"
        )


def _with_checksum(meta: dict, scripted: torch.nn.Module, extra: Mapping[str, str]) -> dict:
    meta["checksum"] = {
        "sha256": payload_checksum(scripted, extra),
        "of": "state dict (name, dtype, shape, bytes) and extra files other than metadata.json",
    }
    return meta


def torchscript_metadata(data: bytes) -> dict[str, Any]:
    """The metadata of an openmm-backmap model file's bytes, or {} for any other TorchScript file."""
    try:
        return read_model_file(data)[1]
    except ValueError:
        return {}


def load_cg_potential(path: str | Path) -> tuple[torch.jit.ScriptModule, dict]:
    """(scripted CG potential, its metadata with ``cg_topology_pdb``) from a file written by
    :func:`export_cg`; ValueError for a file of another kind."""
    module, meta, files = read_model_file(path, kind=CG_KIND)
    meta["cg_topology_pdb"] = files["cg_topology.pdb"]
    return module, meta


# ---------------------------------------------------------------------------- writing
def _metadata(model, spec: dict) -> dict:
    """The ``metadata.json`` of a backmapper model file."""
    from openmm_backmap import __version__

    top = topology_from_pdb(spec["topology_pdb"])
    atoms = list(top.atoms)
    methods = ["sample", "log_prob", "sample_with_noise"]
    if model.temporal:
        methods += ["sample_next", "log_prob_next"]
    return {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "package_version": __version__,
        "kind": "backmapper",
        "temperature": float(spec["temperature"]),
        "units": {"positions": "nm", "log_q": "nats per Cartesian nm^3 of each free atom", "energy": "kJ/mol"},
        "dtype": "float32",
        "n_aa": int(model.n_aa),
        "n_cg": int(model.n_cg),
        "n_free_dof": int(model.dim),
        "temporal": bool(model.temporal),
        "methods": methods,
        "mapping": spec["mapping"],
        "atom_names": [a.name for a in atoms],
        "elements": [a.element.symbol if a.element is not None else "" for a in atoms],
        "residues": [
            {"name": r.name, "resSeq": int(r.resSeq), "atoms": [a.index for a in r.atoms]} for r in top.residues
        ],
        "bead_names": [g["name"] for g in spec["mapping"]["groups"]],
        "constraints": spec["model"].get("constraints") or [],
        "cg_bonds": spec["model"].get("cg_bonds") or [],
        "cg_bond_range_nm": spec.get("cg_bond_range_nm"),
        "has_system": spec.get("system_xml") is not None,
        "architecture": {
            k: v for k, v in spec["model"].items() if k not in ("bonds", "cg_bonds", "constraints", "circular")
        },
        "training": spec.get("training", {}),
    }


def export_model(model, spec: dict, path: str | Path) -> Path:
    """Script ``model`` (a :class:`~openmm_backmap.models.backmapper.Backmapper`) in float32 and save it with
    its metadata; returns the path."""
    import copy

    path = Path(path)
    m = copy.deepcopy(model).float().eval()
    for p in m.parameters():
        p.requires_grad_(False)
    scripted = torch.jit.script(m)
    extra = {"topology.pdb": spec["topology_pdb"]}
    if spec.get("system_xml"):
        extra["system.xml"] = spec["system_xml"]
    extra["metadata.json"] = json.dumps(_with_checksum(_metadata(model, spec), scripted, extra), indent=1)
    torch.jit.save(scripted, str(path), _extra_files=extra)
    return path


def export_cg(model, spec: dict, path: str | Path | None = None) -> bytes:
    """Script ``model`` (a :class:`~openmm_backmap.models.cg_potential.CGFlowPotential`) and write one
    TorchScript file with ``metadata.json`` and ``cg_topology.pdb``.

    The module's ``forward(positions[n_cg, 3] nm) -> energy kJ/mol`` is openmm-torch's signature;
    ``energy``, ``log_prob``, ``prior_energy`` and ``sample`` are exported methods. Returns the
    file's bytes (written to ``path`` when given).
    """
    from openmm_backmap import __version__

    model = model.eval()
    scripted = torch.jit.script(model)
    meta = {
        "format": MODEL_FORMAT,
        "kind": CG_KIND,
        "format_version": CG_FORMAT_VERSION,
        "package_version": __version__,
        "temperature": float(model.temperature),
        "kT_kjmol": float(model.kT),
        "n_beads": int(model.n_cg),
        "bead_names": list(spec.get("bead_names") or [f"B{i}" for i in range(model.n_cg)]),
        "masses": spec.get("masses"),
        "cg_bonds": model.spec["cg_bonds"],
        "cg_bond_range_nm": spec.get("cg_bond_range_nm"),
        "mapping": spec.get("mapping"),
        "dtype": str(model._model_dtype()).replace("torch.", ""),
        "units": {"positions": "nm", "energy": "kJ/mol", "log_prob": "nats w.r.t. Cartesian nm^(3n-6)"},
        "methods": {
            "forward": "positions[n_cg, 3] -> energy (kJ/mol)",
            "energy": "X[B, n_cg, 3] -> [B] kJ/mol",
            "log_prob": "X[B, n_cg, 3] -> [B] nats (flow only)",
            "prior_energy": "X[B, n_cg, 3] -> [B] kJ/mol",
            "sample": "n -> (X[n, n_cg, 3], log_q[n])",
        },
        "model": {k: v for k, v in model.spec.items() if k != "priors"},
        "training": spec.get("training", {}),
        "data": spec.get("data"),
        "priors": model.prior_parameters(),
    }
    extra = {"cg_topology.pdb": spec.get("cg_topology_pdb") or ""}
    extra["metadata.json"] = json.dumps(_with_checksum(meta, scripted, extra), indent=1)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer, _extra_files=extra)
    data = buffer.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


# ---------------------------------------------------------------------------- TorchScript and package bytes
def load_model_bytes(model: str | os.PathLike | bytes | bytearray | torch.nn.Module) -> bytes:
    """The TorchScript file content for ``model``, checked to load (or a compiled package's bytes).

    Parameters
    ----------
    model
        Path of a ``.pt`` file written by ``torch.jit.save``, its bytes, a ``torch.jit.ScriptModule``,
        or an ``nn.Module`` that ``torch.jit.script`` can compile; or a compiled force package
        (``.pt2``) or its bytes, returned as they are.

    Raises
    ------
    FileNotFoundError
        The path does not exist.
    ValueError
        The content is not a TorchScript module (corrupt or truncated file).
    TypeError
        ``model`` is none of the accepted kinds, or an ``nn.Module`` that does not script.
    """
    origin = "the model bytes"
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"TorchScript model file not found: {path}")
        data = path.read_bytes()
        origin = str(path)
    elif isinstance(model, (bytes, bytearray, memoryview)):
        data = bytes(model)
    elif isinstance(model, torch.jit.ScriptModule):
        buffer = io.BytesIO()
        torch.jit.save(model, buffer)
        return buffer.getvalue()
    elif isinstance(model, torch.nn.Module):
        try:
            scripted = torch.jit.script(model)
        except Exception as error:
            raise TypeError(f"{type(model).__name__} cannot be compiled by torch.jit.script: {error}") from error
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
        return buffer.getvalue()
    else:
        raise TypeError(f"model must be a path, bytes or a torch module, not {type(model).__name__}")
    if is_compiled_package(data):
        return data
    files = {name: "" for name in EXTRA_FILES}
    module = load_torchscript(data, origin, files)
    files = {k: (v.decode("utf-8") if isinstance(v, bytes) else str(v)) for k, v in files.items()}
    try:
        meta = json.loads(files["metadata.json"]) if files["metadata.json"] else {}
    except json.JSONDecodeError:
        meta = {}
    if isinstance(meta, dict) and meta.get("format") == MODEL_FORMAT:
        verify_checksum(module, meta, files, origin)
    return data


def load_torchscript(
    data: bytes, origin: str = "the model bytes", extra_files: dict | None = None
) -> torch.jit.ScriptModule:
    """The TorchScript module in ``data``, in eval mode on the CPU (ValueError naming ``origin`` if it is not one);
    ``extra_files`` (name -> "") is filled with the archive's extra files, as ``torch.jit.load`` does."""
    try:
        module = torch.jit.load(io.BytesIO(data), map_location="cpu", _extra_files=extra_files or {})
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{origin} is not a TorchScript module (corrupt or truncated file?): {first_line}") from error
    return module.eval()


def is_compiled_package(data: bytes) -> bool:
    """True for the bytes of an AOTInductor package (a zip with a ``data/aotinductor/`` entry)."""
    if data[:2] != b"PK":
        return False
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return any(_PACKAGE_MARKER in name for name in archive.namelist())
    except zipfile.BadZipFile:
        return False


def parse_compiled_metadata(raw: Mapping[str, str], origin: str) -> dict[str, Any]:
    """The metadata a compiled package was written with, checked and typed (ValueError naming ``origin``)."""
    if raw.get("format") != COMPILED_FORMAT:
        raise ValueError(
            f"{origin} is an AOTInductor package but not an openmm-backmap compiled force "
            f"(metadata format {raw.get('format')!r})"
        )
    if raw.get("version") != COMPILED_VERSION:
        raise ValueError(
            f"{origin} has compiled-force version {raw.get('version')!r}; this openmm-backmap "
            f"reads version {COMPILED_VERSION}"
        )
    meta: dict[str, Any] = {"format": raw["format"], "version": raw["version"]}
    meta["num_particles"] = int(raw["num_particles"])
    meta["periodic"] = raw["periodic"] == "1"
    meta["global_parameters"] = json.loads(raw["global_parameters"])
    meta["torch_version"] = raw.get("torch_version", "")
    meta["model_metadata"] = json.loads(raw["model_metadata"]) if raw.get("model_metadata") else {}
    return meta


def read_compiled_metadata(model: str | os.PathLike | bytes) -> dict[str, Any]:
    """The metadata of a compiled package, read without loading its library."""
    data = Path(model).read_bytes() if isinstance(model, (str, os.PathLike)) else bytes(model)
    if not is_compiled_package(data):
        raise ValueError("not a compiled force package (.pt2 written by openmm-backmap compile)")
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = [n for n in archive.namelist() if n.endswith("_metadata.json") and _PACKAGE_MARKER in n]
        for name in names:
            raw = json.loads(archive.read(name))
            if raw.get("format") == COMPILED_FORMAT:
                return parse_compiled_metadata(raw, "the package")
    raise ValueError("the package has no openmm-backmap metadata (not written by openmm-backmap compile)")
