"""A backmapper model file at run time: :func:`load_model` and :class:`BackmapModel`.

:func:`load_model` also takes the name of a shipped protein model (``protein-ca``,
``protein-backbone``) or a protein model file: that gives a :class:`ProteinModel`, which
:meth:`ProteinModel.bind` turns into a :class:`ProteinChainModel` (a :class:`BackmapModel`) for
the chain of a CG topology (:mod:`openmm_backmap.io.protein_models`); ``load_model(name,
cg_topology=...)`` does both.

:class:`BackmapModel` wraps a loaded model file (:mod:`openmm_backmap.io.model_files`) with its
metadata, AA topology, mapping and embedded AA System XML, checks inputs (shapes, atom counts,
finite values, the molecule) and converts numpy <-> torch; :meth:`BackmapModel.compile` swaps in
the inductor-compiled sampler (:class:`CompiledBackmapper`) for one batch size.  No OpenMM here:
AA energies of the embedded System come from :func:`openmm_backmap.openmm.energies.aa_energy`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from openmm_backmap.geometry import bond_length_range, check_length_scale
from openmm_backmap.io.model_files import read_model_file
from openmm_backmap.io.pdb import topology_from_pdb
from openmm_backmap.io.protein_models import (
    CGChain,
    chain_model_bytes,
    check_cg_positions,
    load_protein_model,
    protein_model_path,
    read_cg_chain,
)
from openmm_backmap.mapping import CGMapping, as_mdtraj_topology

__all__ = ["BackmapModel", "CompiledBackmapper", "ProteinChainModel", "ProteinModel", "load_model"]


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

    def __init__(self, path: str | Path | bytes, device: str | torch.device | None = None, topology=None) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.path = None if isinstance(path, bytes) else Path(path)
        self.module, self.metadata, files = read_model_file(path, str(self.device), kind="backmapper")
        if not files["topology.pdb"]:
            raise ValueError(f"{self.path or 'the model bytes'} has no topology.pdb")
        self.topology = topology_from_pdb(files["topology.pdb"])
        self.system_xml: str | None = files["system.xml"] or None
        self.mapping = CGMapping.from_dict(self.metadata["mapping"], self.topology)
        self.temperature = float(self.metadata["temperature"])
        self.n_aa = int(self.metadata["n_aa"])
        self.n_cg = int(self.metadata["n_cg"])
        self.temporal = bool(self.metadata.get("temporal", False))
        self._compiled: CompiledBackmapper | None = None
        self._cg_bonds: list | None = None  # the CG bonds whose lengths are checked (found on first use)
        if topology is not None:
            self.check_topology(topology)

    def on_device(self, device: str | torch.device) -> BackmapModel:
        """This model on another torch device (itself when already there)."""
        if torch.device(device) == self.device:
            return self
        return BackmapModel(self.path, device=device)

    # ------------------------------------------------------------------ compiled paths
    def compile(self, batch_size: int) -> None:
        """Compile sampling (and log q) for batches of exactly ``batch_size`` reconstructions.

        The TorchScript methods are traced into aten graphs (``make_fx``) and compiled by inductor
        into fused loops, faster than TorchScript on a CPU at large batches (benchmarks/RESULTS.md,
        "Backmapper"). Takes a minute or two; :meth:`sample` and :meth:`log_prob` then
        use the compiled code for that batch size and TorchScript for every other. Same random
        stream as TorchScript: with the same seed, both give the same samples to float rounding.
        """
        self._compiled = CompiledBackmapper(self.module, int(batch_size), self.n_cg, self.n_aa, self.device)

    # ------------------------------------------------------------------ checks
    def check_topology(self, topology) -> None:
        """Raise ValueError unless ``topology`` (AA, mdtraj/OpenMM/path) is the model's molecule."""
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
        if what == "CG coordinates":
            self.check_cg(t.detach().to("cpu", torch.float64).numpy(), what)
        return t.to(device=self.device, dtype=torch.float32), is_numpy, single

    def check_cg(self, X: np.ndarray, what: str = "CG coordinates") -> None:
        """Refuse CG positions X (B, n_cg, 3) nm whose CG bond lengths leave the training data's
        range widened 3x either way (a 10x unit error cannot pass); no check without that range."""
        expected = self.metadata.get("cg_bond_range_nm")
        if not expected:
            return
        if self._cg_bonds is None:
            self._cg_bonds = self.metadata.get("cg_bonds") or self.mapping.cg_bonds()
        if self._cg_bonds:
            found = bond_length_range(X, self._cg_bonds)
            check_length_scale(found, expected, f"{what} (CG bonds of the training data)")

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

    def __getstate__(self) -> dict:
        # pickled as the file it was loaded from (a TorchScript module does not pickle)
        return {
            "path": str(self.path),
            "device": str(self.device),
            "compiled_batch": None if self._compiled is None else self._compiled.batch,
        }

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], device=state["device"])
        if state["compiled_batch"] is not None:
            self.compile(state["compiled_batch"])


class CompiledBackmapper:
    """Inductor-compiled ``sample`` and ``log_prob`` of an exported backmapper for one batch size.

    Each TorchScript method is traced at that batch size into a graph of aten operators (values do
    not change the graph: the model does not branch on them) and compiled by ``torch.compile``;
    construction compiles both (a minute or two). :meth:`sample` draws the base noise with the
    module's own sampler, as its TorchScript ``sample`` does, so a seed gives the same frames.
    """

    def __init__(
        self, module: torch.jit.ScriptModule, batch_size: int, n_cg: int, n_aa: int, device: torch.device | str = "cpu"
    ) -> None:
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


def load_model(
    path: str | Path, device: str | torch.device | None = None, topology=None, cg_topology=None
) -> BackmapModel | ProteinModel:
    """Load a backmapper model file, or a protein model by name, into a checked model.

    Parameters
    ----------
    path
        A backmapper model file (``openmm-backmap export``), a protein model file, or the name of a
        shipped protein model (``protein-ca``, ``protein-backbone``).
    device
        Torch device (default CUDA when available, else CPU).
    topology
        Optional AA topology to check the model against (another molecule raises ValueError).
    cg_topology
        The CG topology (mdtraj or OpenMM topology, or a file) of the molecule: binds a protein
        model to its chain (without it a protein model is returned unbound, as a
        :class:`ProteinModel`); for a model file, checked against the model's beads.

    Raises
    ------
    ValueError
        For a name that is neither a file nor a shipped model (listing the shipped ones), and the
        errors of :class:`BackmapModel` and :func:`~openmm_backmap.io.protein_models.read_cg_chain`.
    """
    protein = protein_model_path(path)
    if protein is None:
        model = BackmapModel(path, device=device, topology=topology)
        if cg_topology is not None:
            model.check_cg_topology(cg_topology)
        return model
    unbound = ProteinModel(path, protein)
    if cg_topology is None:
        if topology is not None:
            raise ValueError(f"{path} is a protein model: pass the CG topology (cg_topology=) to bind it to a chain")
        return unbound
    bound = unbound.bind(cg_topology, device=device)
    if topology is not None:
        bound.check_topology(topology)
    return bound


class ProteinModel:
    """A transferable protein backmapper, not yet bound to a chain.

    Attributes
    ----------
    name
        What it was loaded as (a shipped model's name or a path).
    path
        Its file.
    mapping
        ``ca`` or ``backbone``: the beads per residue it expects.
    protein
        The :class:`~openmm_backmap.models.protein.ProteinBackmapper` (float32, eval).
    """

    def __init__(self, name: str | Path, path: Path) -> None:
        self.name = str(name)
        self.path = Path(path)
        self.protein = load_protein_model(path)
        self.mapping = self.protein.mapping

    def bind(self, cg_topology, device: str | torch.device | None = None) -> ProteinChainModel:
        """The model of the chain, or the chains, in ``cg_topology`` (mdtraj or OpenMM topology, or a
        file).

        Raises
        ------
        ValueError
            When a chain of the topology is not a chain of known residues with this model's beads
            (:func:`~openmm_backmap.io.protein_models.read_cg_chain`).
        """
        chain = read_cg_chain(cg_topology, self.mapping, f"the CG topology (for {self.name})")
        return ProteinChainModel(self, chain, device=device)

    def __getattr__(self, name: str):
        # what a bound model has (topology, sample, n_aa ...): say how to bind rather than just fail
        if name.startswith("__") or name in ("name", "path", "protein", "mapping"):
            raise AttributeError(name)
        raise AttributeError(
            f"{self.name} is a protein model not yet bound to a chain, so it has no {name!r}: bind it with "
            f".bind(cg_topology) or load_model({self.name!r}, cg_topology=...)"
        )

    def describe(self) -> dict:
        """Name, file, mapping, architecture and training record."""
        return {
            "name": self.name,
            "path": str(self.path),
            "mapping": self.mapping,
            "architecture": dict(self.protein.config),
            "training": dict(getattr(self.protein, "info", {}) or {}),
        }

    def summary(self) -> str:
        d = self.describe()
        tr = {k: v for k, v in d["training"].items() if not isinstance(v, (list, dict, str)) or k == "val_ids"}
        return "\n".join(
            [
                f"{d['name']}: openmm-backmap protein model ({d['path']}, {self.path.stat().st_size / 2**20:.1f} MB)",
                f"  mapping {self.mapping}: beads per residue "
                + ("CA (ACE: CH3, NME: C)" if self.mapping == "ca" else "N, CA, C (ACE: CH3, C; NME: N, C)"),
                f"  architecture: {json.dumps(d['architecture'])}",
                "  training: " + ", ".join(f"{k}={_fmt(v)}" for k, v in tr.items()),
                *self._finetune_lines(d["training"].get("finetune")),
                "  bind it to a chain: load_model(name, cg_topology=...), or --cg-topology on the command line",
            ]
        )

    @staticmethod
    def _finetune_lines(record: dict | None) -> list[str]:
        """What `finetune` recorded: the chain, the steps, the held-out figures before and after."""
        if not record:
            return []
        a, b = record["start"], record["best"]
        return [
            f"  fine-tuned on {'-'.join(record['sequence'])}: {record['steps_run']} steps, best step "
            f"{record['best_step']}; held-out median U_AA {a['val_median_u']:.1f} -> {b['val_median_u']:.1f} "
            f"kJ/mol, conditional ESS {a['val_ess']:.3f} -> {b['val_ess']:.3f}"
        ]

    def __repr__(self) -> str:
        return f"ProteinModel({self.name!r}, mapping={self.mapping!r})"


class ProteinChainModel(BackmapModel):
    """A :class:`ProteinModel` bound to one chain or a complex of several: a :class:`BackmapModel`
    whose AA topology is built from the CG chains' residue names (amber14 names) and whose CG inputs
    are checked chain by chain
    (Angstrom coordinates, missing residues; :func:`~openmm_backmap.io.protein_models.check_cg_positions`).
    Its AA energy is the force field in ``metadata["force_field"]`` (amber14 + GBn2).

    Attributes
    ----------
    cg_chain
        The :class:`~openmm_backmap.io.protein_models.CGChain` it was bound to.
    protein_model
        The unbound :class:`ProteinModel`.
    """

    def __init__(self, protein: ProteinModel, chain: CGChain, device: str | torch.device | None = None) -> None:
        data, top = chain_model_bytes(protein.protein, chain, protein.name)
        super().__init__(data, device=device)
        self.path = protein.path
        self.protein_model = protein
        self.cg_chain = chain
        self.topology = top  # amber14 names as built (a PDB read back would call HIE "HIS")
        self.mapping = CGMapping.from_dict(self.metadata["mapping"], top)

    def on_device(self, device: str | torch.device) -> ProteinChainModel:
        if torch.device(device) == self.device:
            return self
        return ProteinChainModel(self.protein_model, self.cg_chain, device=device)

    def check_cg_topology(self, topology) -> None:
        """Raise ValueError unless a CG topology is this model's chain or chains (residues and beads)."""
        chain = read_cg_chain(topology, self.cg_chain.mapping)
        if chain.sequences != self.cg_chain.sequences:

            def residues(c: CGChain) -> str:  # chains separated by " / "
                return " / ".join(" ".join(q) for q in c.sequences)

            raise ValueError(
                f"the CG topology's residues {residues(chain)} are not the model's chain {residues(self.cg_chain)}"
            )

    def check_cg(self, X: np.ndarray, what: str = "CG coordinates") -> None:
        """Refuse CG positions (B, n_cg, 3) in Angstrom or with a missing residue, naming the residues
        (:func:`~openmm_backmap.io.protein_models.check_cg_positions`)."""
        check_cg_positions(X, self.cg_chain, what)

    def compile(self, batch_size: int) -> None:
        raise ValueError("compile is for per-molecule model files; a protein chain model runs as TorchScript")

    def __repr__(self) -> str:
        return (
            f"ProteinChainModel({self.protein_model.name!r}, {len(self.cg_chain.names)} residues in "
            f"{len(self.cg_chain.lengths)} chain(s), "
            f"n_aa={self.n_aa}, n_cg={self.n_cg}, device={self.device})"
        )

    def __getstate__(self) -> dict:
        return {
            "name": self.protein_model.name,
            "path": str(self.path),
            "chain": self.cg_chain,
            "device": str(self.device),
        }

    def __setstate__(self, state: dict) -> None:
        self.__init__(ProteinModel(state["name"], Path(state["path"])), state["chain"], device=state["device"])
