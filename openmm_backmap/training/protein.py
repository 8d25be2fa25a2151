"""Maximum-likelihood training of the transferable protein backmapper on a peptide corpus.

Corpus layout: ``<data>/<id>/`` holds ``topology.pdb`` (amber14 names, hydrogens), ``traj.dcd``
and ``meta.json``; ``<data>/manifest.json`` lists the finished ids. Several corpus directories
train together (their ids must differ). Each optimisation step sums the
negative log-likelihood (per residue) of a batch of frames from each of several peptides; a few
peptides are held out for validation, and the model with the lowest validation NLL is written to
the output file (format of :meth:`ProteinBackmapper.save`) whenever it improves.

With ``energy_weight`` w > 0 each step also adds w times the reverse KL per residue against
amber14 + GBn2 (the corpus's force field) at the corpus's CG frames:

    L = E_data[-log q(x | X)] / n + w E_X E_{x ~ q(.|X)}[beta U_AA(x) + log q(x | X)] / n,

the forward KL (coverage of the data) plus the reverse KL (samples where the Boltzmann density is),
the combination Boltzmann generators train with. Maximum likelihood alone leaves a tail of samples
whose atoms overlap (an energy far above the data's at no cost in likelihood); the energy term
pushes them out, for every residue type at once, so that what it learns transfers to sequences no
corpus peptide has. The guard rails are those of ``finetune``: reduced energies above a cap grow
logarithmically (the cap is the larger of the peptide's median reference energy plus ``cap_dof``
kT per free degree of freedom and the batch's upper quartile) and the gradient norm is clipped.
The model kept is then the one with the lowest validation objective (NLL plus w times the median of
beta U + log q per residue over one sample per validation frame, fixed noise).

Run ``python -m openmm_backmap.training.protein --data DIR [DIR ...] --out FILE [--mapping ca] [--energy-weight W]``.
Trajectories are read with mdtraj; OpenMM only builds the energy term's Systems.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from openmm_backmap.io.protein_models import protein_model_path
from openmm_backmap.models.protein import ChainBackmapper, ProteinBackmapper
from openmm_backmap.models.residues import TREE_VERSION, build_chain, canonical_hydrogens, residue_template_name
from openmm_backmap.training.backmapper import soft_clip_above_quartile
from openmm_backmap.units import kT as kT_of

DEFAULT_HIDDEN = 96  # conditioner width of a model trained from scratch


@dataclass
class TrainConfig:
    """Settings of :func:`train` (times in s). Training stops at ``time_limit`` or after ``max_steps``
    steps (0: no step limit); the learning rate follows a cosine from ``lr`` to ``lr / 20`` over
    whichever comes first. ``energy_weight`` > 0 adds the reverse-KL term (module docstring) on
    ``energy_frames`` CG frames (one sample each) of each of ``energy_peptides`` peptides per step,
    at ``temperature`` K, with the cap's ``cap_dof`` kT per free degree of freedom and, when
    ``pair_core_kt`` > 0, non-bonded pairs with a linear core above that many kT (the ``pair_core``
    of :class:`~openmm_backmap.openmm.energies.TorchSystemEnergy`: atoms inside each other keep a
    gradient that pushes them apart). ``tree_version`` is the model's placement tree
    (:func:`~openmm_backmap.models.residues.build_tree`); 0 means the ``init`` model's, else the
    current one; another converts the ``init`` model (rows it never had get embeddings and
    statistics of their own). ``hidden`` is the conditioner's width: 0 means the
    ``init`` model's (else ``DEFAULT_HIDDEN``); a larger one widens the ``init`` model without
    changing its densities (:meth:`ProteinBackmapper.widen`), a smaller one is refused.
    ``data`` is a corpus directory or a tuple of them; ``val_data`` one (or a tuple) whose
    finished peptides join the validation set and are never trained on (for example longer chains
    than the corpus's validation peptides)."""

    data: str | tuple[str, ...]
    out: str
    mapping: str = "ca"
    time_limit: float = 2700.0
    max_steps: int = 0
    batch_frames: int = 32
    peptides_per_step: int = 4
    lr: float = 2e-3
    val_every: int = 200
    n_val: int = 4
    seed: int = 0
    threads: int = 1
    hidden: int = 0
    n_bins: int = 8
    n_knn: int = 6
    stats_frames: int = 60
    refresh_every: int = 100
    init: str = ""
    tree_version: int = 0
    energy_weight: float = 0.0
    energy_peptides: int = 2
    energy_frames: int = 8
    temperature: float = 300.0
    cap_dof: float = 1.0
    pair_core_kt: float = 0.0
    val_data: str | tuple[str, ...] = ""


def chain_permutation(topology) -> tuple[list[str], np.ndarray]:
    """Residue names of an mdtraj topology and the permutation ``perm`` with chain atom a at
    topology index ``perm[a]`` (chain order: amber14 templates).

    Raises
    ------
    ValueError
        When the topology's atoms are not those of the chain built from its residue names.
    """
    residues = list(topology.residues)
    names = [residue_template_name(r.name, [a.name for a in r.atoms], f"residue {r}") for r in residues]
    chain = build_chain(names)
    index = {(a.residue.index, a.name): a.index for a in topology.atoms}
    perm = []
    for i, name in enumerate(chain.atom_names):
        key = (int(chain.atom_residue[i]), name)
        if key not in index:
            r = residues[key[0]]
            raise ValueError(
                f"residue {r} has no atom {name} (the template expects {sorted(chain.residue_atoms[key[0]])})"
            )
        perm.append(index[key])
    if len(perm) != topology.n_atoms:
        raise ValueError(f"the topology has {topology.n_atoms} atoms, its chain template {len(perm)}")
    return names, np.asarray(perm)


def chain_positions(topology, xyz: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Residue names and positions (N, n_atoms, 3) nm in chain order of an mdtraj topology and its
    coordinates (N, n_atoms_topology, 3) (see :func:`chain_permutation`), with equivalent hydrogens
    named canonically (:func:`~openmm_backmap.models.residues.canonical_hydrogens`)."""
    names, perm = chain_permutation(topology)
    return names, canonical_hydrogens(build_chain(names), np.asarray(xyz)[:, perm])


def load_peptide(path: str | Path) -> tuple[list[str], np.ndarray, dict]:
    """(residue names, positions (N, n_atoms, 3) nm in chain order, meta) of a corpus entry."""
    import mdtraj as md

    path = Path(path)
    traj = md.load(str(path / "traj.dcd"), top=str(path / "topology.pdb"))
    names, x = chain_positions(traj.topology, traj.xyz)
    meta = json.loads((path / "meta.json").read_text()) if (path / "meta.json").exists() else {}
    return names, x.astype(np.float32), meta


def corpus_ids(data: str | Path) -> list[str]:
    """Finished ids of a corpus directory (its manifest.json)."""
    manifest = Path(data) / "manifest.json"
    if not manifest.exists():
        raise FileNotFoundError(f"{manifest} does not exist: is {data} a peptide corpus?")
    ids = json.loads(manifest.read_text())
    return list(ids["finished"] if isinstance(ids, dict) else ids)


def corpus_entries(data: str | Path | Sequence[str | Path]) -> dict[str, Path]:
    """The finished peptides of one corpus directory or of several, id -> entry directory, in
    directory then manifest order.

    Raises
    ------
    ValueError
        When two directories hold the same id (naming both).
    """
    dirs = [data] if isinstance(data, (str, Path)) else list(data)
    out: dict[str, Path] = {}
    for d in dirs:
        for i in corpus_ids(d):
            if i in out:
                raise ValueError(f"peptide {i} is in both {out[i].parent} and {d}: corpus ids must differ")
            out[i] = Path(d) / i
    return out


class CorpusEnergies:
    """The reverse-KL term of corpus training: per peptide, the batched torch energy of its
    amber14 + GBn2 System (bonds to hydrogen constrained, as the corpus ran and the model holds them)
    and the cap of its reduced energies, both built on first use and kept.

    The cap is beta times the median energy of up to 16 of the peptide's own frames plus
    ``cap_dof`` per free degree of freedom (those the flow places). With ``pair_core_kt`` > 0 the
    loss's energy gives non-bonded pairs a linear core above that many kT (see :class:`TrainConfig`);
    validation asks for the exact energy."""

    def __init__(self, temperature: float, cap_dof: float, pair_core_kt: float = 0.0) -> None:
        self.beta = 1.0 / kT_of(temperature)
        self.cap_dof = cap_dof
        self.pair_core = pair_core_kt / self.beta if pair_core_kt > 0 else None
        self._energy: dict[str, tuple[torch.nn.Module, float]] = {}

    def of(self, key: str, chain: ChainBackmapper, frames: torch.Tensor) -> tuple[torch.nn.Module, float]:
        """(energy module, reduced-energy cap) of peptide ``key`` bound as ``chain``."""
        if key not in self._energy:
            from openmm_backmap.openmm.energies import TorchSystemEnergy
            from openmm_backmap.training.finetune import chain_system

            system = chain_system(chain)
            energy = TorchSystemEnergy(system).double()
            with torch.no_grad():
                u_ref = energy(frames[:: max(1, frames.shape[0] // 16)][:16].double())
            n_dof = 3 * system.getNumParticles() - system.getNumConstraints() - 3 * chain.n_cg
            self._energy[key] = (energy, self.beta * float(u_ref.median()) + self.cap_dof * n_dof)
        return self._energy[key]

    def reduced(
        self, key: str, chain: ChainBackmapper, frames: torch.Tensor, aa: torch.Tensor, exact: bool = False
    ) -> torch.Tensor:
        """beta U_AA(aa) per sample (with the loss's pair cores, or with ``exact`` without),
        soft-clipped above the larger of the peptide's cap and the batch's upper quartile (not
        differentiated); non-finite energies become large finite ones."""
        energy, cap = self.of(key, chain, frames)
        u = energy(aa.double(), pair_core=None if exact else self.pair_core)
        return soft_clip_above_quartile(self.beta * u, cap)


def train(config: TrainConfig, log=print) -> ProteinBackmapper:
    """Train a :class:`ProteinBackmapper` on the corpus ``config.data``; the best model (lowest
    validation objective: the NLL per residue, plus with the energy term its weighted median) is
    saved to ``config.out`` whenever it improves. Returns it."""
    if config.pair_core_kt < 0 or config.hidden < 0:
        raise ValueError(
            f"pair_core_kt and hidden must be >= 0 (0: exact energy, the init model's width), "
            f"got {config.pair_core_kt} and {config.hidden}"
        )
    torch.set_num_threads(config.threads)
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    sources = corpus_entries(config.data)
    ids = list(sources)
    peptides = [load_peptide(sources[i]) for i in ids]
    order = rng.permutation(len(ids))
    val_idx = sorted(order[: config.n_val].tolist()) if len(ids) > config.n_val + 1 else []
    start = ProteinBackmapper.load(protein_model_path(config.init) or config.init) if config.init else None
    if start is not None and start.mapping != config.mapping:
        raise ValueError(f"{config.init} maps {start.mapping!r}, not {config.mapping!r}")
    pending_val: set[str] = set()
    if start is not None and getattr(start, "info", {}).get("val_ids"):
        # continue with the validation peptides of the run that wrote the checkpoint; those the
        # corpus has not finished yet join the validation set (never the training set) when they do
        val_idx = sorted(ids.index(i) for i in start.info["val_ids"] if i in ids)
        pending_val = {i for i in start.info["val_ids"] if i not in ids}
    train_idx = [i for i in range(len(ids)) if i not in val_idx]
    for i, path in (corpus_entries(config.val_data) if config.val_data else {}).items():
        if i in sources:
            raise ValueError(
                f"validation peptide {i} of {path.parent} is also in the training corpus {sources[i].parent}"
            )
        ids.append(i)
        peptides.append(load_peptide(path))
        val_idx.append(len(ids) - 1)
    log(f"{len(ids)} peptides: {len(train_idx)} training, validation {[ids[i] for i in val_idx]}")
    examples = []
    for i in train_idx:
        names, x, _ = peptides[i]
        take = rng.choice(x.shape[0], min(config.stats_frames, x.shape[0]), replace=False)
        examples.append((names, x[take].astype(np.float64)))
    version = config.tree_version or (start.config["tree_version"] if start is not None else TREE_VERSION)
    stats = ProteinBackmapper.fit_statistics(examples, config.mapping, version)
    if start is not None:
        # keep the checkpoint's weights, embedded keys and statistics; new keys get fresh statistics
        model = start
        model.set_tree_version(version)
        model.stats.update({k: v for k, v in stats.items() if k not in model.stats})
        added = model.add_keys(sorted(stats))
        log(
            f"continuing from {config.init} (step {start.info.get('step', '?')}); "
            f"{len(added)} row keys new to it get embeddings of their own"
        )
        released = model.release_bounds(stats)
        if released:
            log(f"dihedrals no longer bounded to a narrow interval (statistics refitted): {released}")
        if config.hidden and config.hidden != model.config["hidden"]:
            log(f"conditioner widened from {model.config['hidden']} to {config.hidden} units")
            model.widen(config.hidden, config.seed)
    else:
        model = ProteinBackmapper(
            config.mapping,
            stats,
            hidden=config.hidden or DEFAULT_HIDDEN,
            n_bins=config.n_bins,
            n_knn=config.n_knn,
            tree_version=version,
        )
    n_params = sum(p.numel() for p in model.net.parameters())
    log(f"{len(stats)} row keys, {n_params} parameters, mapping {config.mapping}, tree version {version}")
    opt = torch.optim.Adam(model.net.parameters(), lr=config.lr)
    tensors = [torch.as_tensor(p[1]) for p in peptides]
    val_frames = {i: tensors[i][:: max(1, tensors[i].shape[0] // 64)] for i in val_idx}
    energies = (
        CorpusEnergies(config.temperature, config.cap_dof, config.pair_core_kt) if config.energy_weight > 0 else None
    )
    val_noise: dict[int, torch.Tensor] = {}

    def validate() -> dict:
        """The validation NLL per residue and, with the energy term, the median of (beta U + log q)
        per residue over one sample per frame (the same noise every time); ``objective`` is the NLL
        plus the energy weight times that median."""
        if not val_idx:
            return {"objective": float("nan")}
        tot, n, kl = 0.0, 0, []
        with torch.no_grad():
            for i in val_idx:
                ch = model.for_sequence(peptides[i][0])
                x = val_frames[i]
                X = ch.project(x)
                lp = ch.log_prob(x, X)
                tot += -float(lp.sum()) / ch.n_res
                n += x.shape[0]
                if energies is not None:
                    if i not in val_noise:
                        with torch.random.fork_rng():
                            torch.manual_seed(config.seed + 1 + i)
                            val_noise[i] = ch.sample_noise(x.shape[0], x.dtype, x.device)
                    aa, lq = ch.sample_with_noise(X, val_noise[i])
                    red = energies.reduced(ids[i], ch, tensors[i], aa, exact=True)
                    kl.append((red + lq.double()) / ch.n_res)
        out = {"nll": tot / n}
        if kl:
            out["reverse_kl"] = float(torch.cat(kl).median())
        out["objective"] = out["nll"] + config.energy_weight * out.get("reverse_kl", 0.0)
        return out

    def refresh() -> bool:
        """Add peptides the corpus finished since the start to the training set (a validation
        peptide of the checkpoint to the validation set); statistics of row keys not seen before are
        fitted on the training ones (known keys keep theirs). Returns whether the validation set grew."""
        new = {i: path for i, path in corpus_entries(config.data).items() if i not in ids}
        if not new:
            return False
        examples = []
        grew = False
        for i, path in new.items():
            names, x, meta = load_peptide(path)
            ids.append(i)
            peptides.append((names, x, meta))
            tensors.append(torch.as_tensor(x))
            if i in pending_val:
                val_idx.append(len(ids) - 1)
                val_frames[len(ids) - 1] = tensors[-1][:: max(1, x.shape[0] // 64)]
                info["val_ids"] = [ids[k] for k in val_idx]
                grew = True
                continue
            train_idx.append(len(ids) - 1)
            take = rng.choice(x.shape[0], min(config.stats_frames, x.shape[0]), replace=False)
            examples.append((names, x[take].astype(np.float64)))
        fresh = ProteinBackmapper.fit_statistics(examples, config.mapping, version) if examples else {}
        added = {k: v for k, v in fresh.items() if k not in model.stats}
        model.stats.update(added)
        # new keys share the unseen-key embedding until a later run (--init) gives them their own:
        # growing the table here would leave the optimiser with the old parameter
        model._chains.clear()
        info["train_ids"] = [ids[i] for i in train_idx]
        log(
            f"added peptides {list(new)} ({len(added)} new row keys); {len(train_idx)} training peptides, "
            f"validation {info['val_ids']}"
        )
        return grew

    t0 = time.time()
    best = math.inf
    step = 0
    info: dict = {
        "config": asdict(config),
        "init": config.init or None,
        "init_step": int(start.info.get("step", 0)) if start is not None else 0,
        "train_ids": [ids[i] for i in train_idx],
        "val_ids": [ids[i] for i in val_idx],
    }
    while True:
        elapsed = time.time() - t0
        if elapsed > config.time_limit or (config.max_steps and step >= config.max_steps):
            break
        done = max(elapsed / config.time_limit, step / config.max_steps if config.max_steps else 0.0)
        for g in opt.param_groups:
            g["lr"] = config.lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * done)))
        opt.zero_grad()
        loss_total = 0.0
        for i in rng.choice(train_idx, config.peptides_per_step):
            ch = model.for_sequence(peptides[i][0])
            xt = tensors[i]
            take = torch.as_tensor(rng.choice(xt.shape[0], min(config.batch_frames, xt.shape[0]), replace=False))
            x = xt[take]
            loss = -ch.log_prob(x, ch.project(x)).mean() / ch.n_res / config.peptides_per_step
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss on peptide {ids[i]} at step {step}")
            loss.backward()
            loss_total += float(loss.detach())
        if energies is not None:
            for i in rng.choice(train_idx, config.energy_peptides):
                ch = model.for_sequence(peptides[i][0])
                xt = tensors[i]
                take = torch.as_tensor(rng.choice(xt.shape[0], min(config.energy_frames, xt.shape[0]), replace=False))
                aa, lq = ch.sample(ch.project(xt[take]), 1)
                red = energies.reduced(ids[i], ch, xt, aa)
                loss = (red + lq.double()).mean() / ch.n_res * (config.energy_weight / config.energy_peptides)
                if torch.isfinite(loss):
                    loss.backward()
                    loss_total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.net.parameters(), 10.0)
        opt.step()
        step += 1
        if config.refresh_every and step % config.refresh_every == 0 and refresh():
            best = math.inf  # objectives over a larger validation set do not compare with the old ones
        if step % config.val_every == 0:
            val = validate()
            v = val["objective"]
            improved = v < best or not val_idx
            if improved:
                best = v
                info.update(step=step, elapsed_s=time.time() - t0, **_val_record(val))
                model.save(config.out, extra=info)
            saved = " (saved)" if improved else ""
            log(f"step {step} t {time.time() - t0:.0f}s train {loss_total:.3f} {_val_line(val)}{saved}")
    val = validate()
    v = val["objective"]
    if v < best or not val_idx:
        info.update(step=step, elapsed_s=time.time() - t0, **_val_record(val))
        model.save(config.out, extra=info)
    log(f"done: {step} steps, best validation objective {min(best, v):.3f} nats per residue")
    return ProteinBackmapper.load(config.out)


def _val_record(val: dict) -> dict:
    """The training record's validation fields (per residue)."""
    out = {"val_nll_per_residue": val.get("nll", float("nan")), "val_objective_per_residue": val["objective"]}
    if "reverse_kl" in val:
        out["val_reverse_kl_per_residue"] = val["reverse_kl"]
    return out


def _val_line(val: dict) -> str:
    line = f"val NLL {val.get('nll', float('nan')):.3f}"
    if "reverse_kl" in val:
        line += f", median beta U + log q {val['reverse_kl']:.3f}, objective {val['objective']:.3f}"
    return line + " per residue"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    fields = TrainConfig.__dataclass_fields__
    parser.add_argument("--data", required=True, nargs="+", help="corpus directories (ids must differ)")
    parser.add_argument("--val-data", nargs="+", default=(), help="corpus directories for validation only")
    parser.add_argument("--out", required=True)
    for name, f in fields.items():
        if name in ("data", "val_data", "out"):
            continue
        parser.add_argument("--" + name.replace("_", "-"), type=type(f.default), default=f.default)
    args = parser.parse_args(argv)
    config = TrainConfig(**{**vars(args), "data": tuple(args.data), "val_data": tuple(args.val_data)})

    def log(msg: str) -> None:
        print(time.strftime("%H:%M:%S"), msg, flush=True)

    train(config, log)


if __name__ == "__main__":
    main()
