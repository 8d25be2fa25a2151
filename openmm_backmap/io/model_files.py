"""TorchScript export of backmappers with their metadata, and :func:`load_model`.

A model file is one ``torch.jit.save`` archive that ``torch.jit.load`` opens without this package:

* methods ``sample(cg[B, n_cg, 3], n) -> (aa[B*n, n_aa, 3], log_q[B*n])``,
  ``log_prob(aa[B, n_aa, 3], cg[B, n_cg, 3]) -> [B]``, ``sample_with_noise(cg, u)``, and for
  temporal models ``sample_next(cg, previous_aa) -> (aa[B, n_aa, 3], log_q[B])`` and
  ``log_prob_next``; positions in nm, log densities in nats w.r.t. Cartesian nm (float32);
* extra files ``metadata.json`` (format and package version, temperature, mapping, atom and bead
  names, elements, residues, constraints, training summary), ``topology.pdb`` (the AA topology)
  and, when the training had one, ``system.xml`` (the AA OpenMM System).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

MODEL_FORMAT = "openmm-backmap-model"
MODEL_FORMAT_VERSION = 1
EXTRA_FILES = ("metadata.json", "topology.pdb", "system.xml")


def _metadata(model, spec: dict) -> dict:
    from openmm_backmap import __version__
    from openmm_backmap.training.backmapper import topology_from_pdb

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
    extra = {
        "metadata.json": json.dumps(_metadata(model, spec), indent=1),
        "topology.pdb": spec["topology_pdb"],
    }
    if spec.get("system_xml"):
        extra["system.xml"] = spec["system_xml"]
    torch.jit.save(scripted, str(path), _extra_files=extra)
    return path


def export_checkpoint(checkpoint: str | Path, path: str | Path) -> Path:
    """Export a training checkpoint (``openmm-backmap train --out``) to a model file."""
    from openmm_backmap.training.backmapper import load_checkpoint

    model, ckpt = load_checkpoint(checkpoint)
    return export_model(model, ckpt["spec"], path)


def read_extra_files(path: str | Path, device: str = "cpu") -> tuple[Any, dict[str, str]]:
    """(scripted module, extra files) of a model file.

    Raises
    ------
    ValueError
        When the file is missing, truncated, corrupt, or not an openmm-backmap model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    files = {name: "" for name in EXTRA_FILES}
    try:
        module = torch.jit.load(str(path), map_location=device, _extra_files=files)
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError and others for bad archives
        raise ValueError(
            f"{path} is not a readable TorchScript model file (truncated or corrupt?): "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from err
    files = {k: (v.decode("utf-8") if isinstance(v, bytes) else str(v)) for k, v in files.items()}
    text = files["metadata.json"]
    if not text:
        raise ValueError(f"{path} has no metadata.json: it is not an openmm-backmap model file")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: metadata.json is not valid JSON ({err})") from err
    if meta.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path}: metadata format is {meta.get('format')!r}, not {MODEL_FORMAT!r}")
    if int(meta.get("format_version", 0)) > MODEL_FORMAT_VERSION:
        raise ValueError(
            f"{path}: model format version {meta['format_version']} is newer than this package reads "
            f"({MODEL_FORMAT_VERSION}); upgrade openmm-backmap"
        )
    return module, files


class BackmapModel:
    """A loaded backmapper model file: metadata, topology, mapping and checked sampling.

    Attributes
    ----------
    module
        The TorchScript module.
    metadata
        The parsed ``metadata.json``.
    topology
        The AA topology (mdtraj).
    mapping
        The :class:`~openmm_backmap.mapping.CGMapping`.
    temperature
        Kelvin.
    system_xml
        The embedded AA System XML, or ``None``.
    device
        The torch device the module runs on.
    """

    def __init__(self, path: str | Path, device: str | torch.device | None = None, topology=None) -> None:
        from openmm_backmap.mapping import CGMapping
        from openmm_backmap.training.backmapper import topology_from_pdb

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.path = Path(path)
        self.module, files = read_extra_files(path, str(self.device))
        self.metadata: dict = json.loads(files["metadata.json"])
        if not files["topology.pdb"]:
            raise ValueError(f"{path} has no topology.pdb")
        self.topology = topology_from_pdb(files["topology.pdb"])
        self.system_xml: str | None = files["system.xml"] or None
        self.mapping = CGMapping.from_dict(self.metadata["mapping"], self.topology)
        self.temperature = float(self.metadata["temperature"])
        self.n_aa = int(self.metadata["n_aa"])
        self.n_cg = int(self.metadata["n_cg"])
        self.temporal = bool(self.metadata.get("temporal", False))
        self._compiled: CompiledBackmapper | None = None
        if topology is not None:
            self.check_topology(topology)

    # ------------------------------------------------------------------ compiled paths
    def compile(self, batch_size: int) -> None:
        """Compile sampling (and log q) for batches of exactly ``batch_size`` reconstructions.

        The TorchScript methods are traced into aten graphs (``make_fx``) and compiled by inductor
        into fused loops: at batch 1024 that is about twice the TorchScript speed on a CPU
        (benchmarks/RESULTS.md). Takes a minute or two; :meth:`sample` and :meth:`log_prob` then
        use the compiled code for that batch size and TorchScript for every other. Same random
        stream as TorchScript: with the same seed, both give the same samples to float rounding.
        """
        self._compiled = CompiledBackmapper(self.module, int(batch_size), self.n_cg, self.n_aa, self.device)

    # ------------------------------------------------------------------ checks
    def check_topology(self, topology) -> None:
        """Raise ValueError unless ``topology`` (AA, mdtraj/OpenMM/path) is the model's molecule."""
        from openmm_backmap.mapping import as_mdtraj_topology

        top = as_mdtraj_topology(topology)
        if top.n_atoms != self.n_aa:
            raise ValueError(
                f"the model is for a molecule of {self.n_aa} atoms but the topology has {top.n_atoms}: "
                "this model was trained for another molecule"
            )
        for a, name, el in zip(top.atoms, self.metadata["atom_names"], self.metadata["elements"]):
            sym = a.element.symbol if a.element is not None else ""
            if a.name != name or sym != el:
                raise ValueError(
                    f"atom {a.index} is {a.residue.name}{a.residue.resSeq}-{a.name} ({sym}) in the topology "
                    f"but {name} ({el}) in the model: this model was trained for another molecule"
                )

    def check_cg_topology(self, topology) -> None:
        """Raise ValueError unless a CG topology has the model's bead count (and bead names)."""
        from openmm_backmap.mapping import as_mdtraj_topology

        top = as_mdtraj_topology(topology)
        if top.n_atoms != self.n_cg:
            raise ValueError(
                f"the CG topology has {top.n_atoms} beads but the model expects {self.n_cg} "
                f"({', '.join(self.metadata['bead_names'])})"
            )

    def _as_tensor(self, value, shape_tail: tuple[int, int], what: str) -> tuple[torch.Tensor, bool, bool]:
        is_numpy = not isinstance(value, torch.Tensor)
        t = torch.as_tensor(np.asarray(value) if is_numpy else value)
        single = t.dim() == 2
        if single:
            t = t.unsqueeze(0)
        if t.dim() != 3 or tuple(t.shape[1:]) != shape_tail:
            n = shape_tail[0]
            unit = "beads" if what == "CG coordinates" else "atoms"
            raise ValueError(
                f"{what} have shape {tuple(t.shape)}; the model expects [B, {n}, 3] ({n} {unit})"
                + (f", got {t.shape[-2]} {unit}" if t.dim() >= 2 else "")
            )
        if not torch.isfinite(t).all():
            bad = torch.nonzero(~torch.isfinite(t))[0].tolist()
            raise ValueError(f"{what} contain NaN or infinite values (first at index {tuple(bad)})")
        return t.to(device=self.device, dtype=torch.float32), is_numpy, single

    @staticmethod
    def _out(t: torch.Tensor, is_numpy: bool):
        return t.detach().cpu().numpy() if is_numpy else t

    # ------------------------------------------------------------------ sampling
    def sample(self, cg, n: int = 1, seed: int | None = None):
        """``n`` reconstructions per CG frame: cg (B, n_cg, 3) or (n_cg, 3) nm -> (aa (B*n, n_aa,
        3) nm, log_q (B*n,) nats). numpy in, numpy out; torch in, torch out."""
        X, is_numpy, _ = self._as_tensor(cg, (self.n_cg, 3), "CG coordinates")
        if int(n) < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if seed is not None:
            torch.manual_seed(int(seed))
        with torch.no_grad():
            if self._compiled is not None and self._compiled.batch == X.shape[0] * int(n):
                aa, lq = self._compiled.sample(X, int(n))
            else:
                aa, lq = self.module.sample(X, int(n))
        return self._out(aa, is_numpy), self._out(lq, is_numpy)

    def log_prob(self, aa, cg=None):
        """log q(aa | cg) (nats); ``cg`` defaults to the mapping's projection of ``aa``."""
        x, is_numpy, _ = self._as_tensor(aa, (self.n_aa, 3), "all-atom coordinates")
        if cg is None:
            X = torch.as_tensor(self.mapping.matrix, dtype=x.dtype, device=x.device) @ x
        else:
            X, _, _ = self._as_tensor(cg, (self.n_cg, 3), "CG coordinates")
        if X.shape[0] != x.shape[0]:
            raise ValueError(f"{x.shape[0]} AA frames but {X.shape[0]} CG frames")
        with torch.no_grad():
            if self._compiled is not None and self._compiled.batch == x.shape[0]:
                lq = self._compiled.log_prob(x, X)
            else:
                lq = self.module.log_prob(x, X)
        return self._out(lq, is_numpy)

    def sample_next(self, cg, previous_aa, seed: int | None = None):
        """One reconstruction per frame conditioned on the previous AA frame (temporal models)."""
        if not self.temporal:
            raise ValueError(f"{self.path} is not a temporal model (train with --temporal)")
        X, is_numpy, _ = self._as_tensor(cg, (self.n_cg, 3), "CG coordinates")
        prev, _, _ = self._as_tensor(previous_aa, (self.n_aa, 3), "previous all-atom coordinates")
        if seed is not None:
            torch.manual_seed(int(seed))
        with torch.no_grad():
            aa, lq = self.module.sample_next(X, prev)
        return self._out(aa, is_numpy), self._out(lq, is_numpy)

    def aa_energy(self):
        """The embedded AA System as a batched energy module (kJ/mol), or ``None``."""
        if self.system_xml is None:
            return None
        from openmm_backmap.openmm.energies import aa_energy

        return aa_energy(self.system_xml)

    def summary(self) -> str:
        m = self.metadata
        lines = [
            f"{self.path}: openmm-backmap {m['kind']} (format {m['format_version']}, package {m['package_version']})",
            f"  atoms {m['n_aa']}, beads {m['n_cg']} ({', '.join(m['bead_names'])}), free DOF {m['n_free_dof']}",
            f"  residues: {' '.join(r['name'] + str(r['resSeq']) for r in m['residues'])}",
            f"  temperature {m['temperature']} K, constraints {len(m['constraints'])}, "
            f"temporal {m['temporal']}, AA System embedded {m['has_system']}",
            f"  methods: {', '.join(m['methods'])}",
            f"  architecture: {json.dumps(m['architecture'])}",
        ]
        tr = m.get("training", {})
        for stage, info in tr.items():
            if isinstance(info, dict):
                lines.append(f"  training {stage}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in info.items()))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"BackmapModel({str(self.path)!r}, n_aa={self.n_aa}, n_cg={self.n_cg}, device={self.device})"


class CompiledBackmapper:
    """Inductor-compiled ``sample`` and ``log_prob`` of an exported backmapper for one batch size.

    Each TorchScript method is traced at that batch size into a graph of aten operators (values do
    not change the graph: the model does not branch on them) and compiled by ``torch.compile``;
    construction compiles both (a minute or two). :meth:`sample` draws the base noise with the
    module's own sampler, as its TorchScript ``sample`` does, so a seed gives the same frames.
    """

    def __init__(self, module: torch.jit.ScriptModule, batch_size: int, n_cg: int, n_aa: int,
                 device: torch.device | str = "cpu") -> None:
        from torch.fx.experimental.proxy_tensor import make_fx

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.module = module
        self.batch = int(batch_size)
        generator = torch.Generator().manual_seed(0)
        cg = torch.randn(batch_size, n_cg, 3, generator=generator).to(device) * 0.3
        aa = torch.randn(batch_size, n_aa, 3, generator=generator).to(device) * 0.3
        u = torch.randn(batch_size, int(module.dim), generator=generator).to(device)
        with torch.no_grad():
            sample_graph = make_fx(lambda c, z: module.sample_with_noise(c, z), tracing_mode="real")(cg, u)
            log_prob_graph = make_fx(lambda a, c: module.log_prob(a, c), tracing_mode="real")(aa, cg)
            self._sample_with_noise = torch.compile(sample_graph, dynamic=False)
            self._log_prob = torch.compile(log_prob_graph, dynamic=False)
            self._sample_with_noise(cg, u)  # compile now, not in the middle of the first batch
            self._log_prob(aa, cg)

    def sample(self, cg: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """As the module's ``sample``: n per frame, frame-major; cg.shape[0] * n must be the batch."""
        cg_rep = torch.repeat_interleave(cg, int(n), dim=0)
        if cg_rep.shape[0] != self.batch:
            raise ValueError(f"compiled for batches of {self.batch} samples, got {cg_rep.shape[0]}")
        u = self.module.base.sample(cg_rep.shape[0], cg_rep.dtype, cg_rep.device)
        return self._sample_with_noise(cg_rep, u)

    def log_prob(self, aa: torch.Tensor, cg: torch.Tensor) -> torch.Tensor:
        if aa.shape[0] != self.batch:
            raise ValueError(f"compiled for batches of {self.batch} samples, got {aa.shape[0]}")
        return self._log_prob(aa, cg)


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def load_model(path: str | Path, device: str | torch.device | None = None, topology=None) -> BackmapModel:
    """Load a backmapper model file into a checked :class:`BackmapModel`.

    Parameters
    ----------
    device
        Torch device (default CUDA when available, else CPU).
    topology
        Optional AA topology to check the model against (another molecule raises ValueError).
    """
    return BackmapModel(path, device=device, topology=topology)


def backmap_trajectory(
    model_path: str | Path,
    cg: str | Path,
    cg_topology: str | Path,
    out: str | Path,
    samples: int = 1,
    seed: int = 0,
    energies: str | Path | None = None,
    batch_size: int = 1024,
    device: str | None = None,
    progress: bool = True,
    compile: bool = False,
) -> dict:
    """Backmap a CG trajectory (any format mdtraj reads) with a model file and write the AA
    trajectory (``samples`` reconstructions per frame, frame-major) and optionally a CSV of
    ``frame, sample, log_q`` (+ ``U_AA`` in kJ/mol when the model embeds its System).

    Temporal models run ``samples`` chains, each frame conditioned on the chain's previous frame.
    ``compile`` compiles the full batches first (:meth:`BackmapModel.compile`; not for temporal
    models): worth it for long trajectories, as it costs a minute or two and doubles the speed.
    """
    import mdtraj as md
    from tqdm.auto import tqdm

    model = load_model(model_path, device=device)
    cg_path = Path(cg)
    if not cg_path.is_file():
        raise FileNotFoundError(f"CG trajectory {cg_path} does not exist")
    top = md.load_topology(str(cg_topology))
    model.check_cg_topology(top)
    try:
        traj = md.load(str(cg_path), top=top)
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - mdtraj raises many kinds for mismatched files
        raise ValueError(f"cannot read {cg_path} with the CG topology {cg_topology}: {err}") from err
    if traj.n_atoms != model.n_cg:
        raise ValueError(f"the CG trajectory has {traj.n_atoms} beads but the model expects {model.n_cg}")
    X = traj.xyz.astype(np.float32)
    if not np.all(np.isfinite(X)):
        frame = int(np.argwhere(~np.isfinite(X))[0][0])
        raise ValueError(f"the CG trajectory contains NaN or infinite coordinates (first in frame {frame})")
    energy = model.aa_energy() if energies is not None else None
    frames_per_batch = max(1, int(batch_size) // int(samples))
    if compile:
        if model.temporal:
            raise ValueError("compile works for independent sampling, not for temporal models")
        model.compile(min(frames_per_batch, traj.n_frames) * int(samples))
    torch.manual_seed(int(seed))
    aa_all, lq_all, u_all = [], [], []
    bar = tqdm(total=traj.n_frames, desc="backmap", unit="frame", disable=not progress, dynamic_ncols=True)
    if model.temporal:
        prev = None
        for f in range(traj.n_frames):
            cg_f = torch.as_tensor(X[f : f + 1]).repeat(int(samples), 1, 1)
            if prev is None:
                aa, lq = model.sample(cg_f[:1], int(samples))
            else:
                aa, lq = model.sample_next(cg_f, prev)
            prev = aa
            aa_all.append(aa.cpu().numpy())
            lq_all.append(lq.cpu().numpy())
            bar.update(1)
    else:
        for s in range(0, traj.n_frames, frames_per_batch):
            aa, lq = model.sample(torch.as_tensor(X[s : s + frames_per_batch]), int(samples))
            aa_all.append(aa.cpu().numpy())
            lq_all.append(lq.cpu().numpy())
            bar.update(min(frames_per_batch, traj.n_frames - s))
    bar.close()
    aa = np.concatenate(aa_all).astype(np.float32)
    lq = np.concatenate(lq_all)
    if energy is not None:
        with torch.no_grad():
            for s in range(0, len(aa), 1024):
                u_all.append(energy(torch.as_tensor(aa[s : s + 1024], dtype=torch.float64)).numpy())
    if Path(out).suffix.lower() == ".xtc":
        print(
            "warning: XTC rounds coordinates to 1e-3 nm, enough to shift AA energies by ~1 kT; "
            "prefer DCD, HDF5 or NetCDF for reweighting"
        )
    md.Trajectory(aa, model.topology).save(str(out))
    n = int(samples)
    if energies is not None:
        import csv

        with open(energies, "w", newline="") as fh:
            w = csv.writer(fh)
            header = ["frame", "sample", "log_q"] + (["u_aa_kjmol"] if u_all else [])  # names as in the reporter
            w.writerow(header)
            u = np.concatenate(u_all) if u_all else None
            for k in range(len(aa)):
                # temporal chains are stored frame-major too: row k = frame k // n, chain k % n
                row = [k // n, k % n, f"{lq[k]:.6f}"]
                if u is not None:
                    row.append(f"{u[k]:.6f}")
                w.writerow(row)
        if not u_all:
            print("note: the model embeds no AA System, so the energies file has no U_AA column")
    return {"n_frames": int(traj.n_frames), "n_samples": int(len(aa)), "out": str(out)}
