"""Training of backmappers: maximum likelihood on (x, X) pairs and energy-based refinement.

* :func:`train_ml` minimises -log q(x | X) over AA frames with Adam (cosine learning rate), keeps
  the parameters with the lowest validation NLL, writes a checkpoint every epoch and resumes from
  one. Methyl hydrogens are permuted cyclically as free data augmentation (the energy is invariant
  and the rotor is circular).
* :func:`refine_energy` minimises the reverse KL E_q[beta U_AA(x) + log q(x | X)] over CG frames,
  with energies and forces from an AA energy module (:mod:`openmm_backmap.openmm.energies`), tempered from
  a high temperature down to the target, with energy soft-clipping, gradient clipping and an
  optional maximum-likelihood term that keeps the flow on the data.

Checkpoints (``torch.save`` dicts) carry the model ``spec`` (mapping, topology PDB text, model
hyperparameters, temperature, constraints, optional System XML) so :func:`load_checkpoint` rebuilds
the model without the training data.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from openmm_backmap.openmm.energies import kT
from openmm_backmap.models.backmapper import Backmapper

CHECKPOINT_FORMAT = "openmm-backmap-checkpoint"
CHECKPOINT_VERSION = 1


# ----------------------------------------------------------------------------- helpers
def methyl_groups(topology, exclude=()) -> list[list[int]]:
    """``[h1, h2, h3]`` of every carbon carrying exactly three hydrogens (none of them in ``exclude``)."""
    nbrs: dict[int, list] = {a.index: [] for a in topology.atoms}
    for a, b in topology.bonds:
        nbrs[a.index].append(b)
        nbrs[b.index].append(a)
    exclude = set(int(i) for i in exclude)
    out = []
    for atom in topology.atoms:
        if atom.element is None or atom.element.symbol != "C":
            continue
        hs = sorted(n.index for n in nbrs[atom.index] if n.element is not None and n.element.symbol == "H")
        if len(hs) == 3 and not exclude.intersection(hs):
            out.append(hs)
    return out


def permute_methyls(x: Tensor, methyls: list[list[int]], generator: torch.Generator) -> Tensor:
    """Rotate the three hydrogens of each methyl by a random cyclic permutation, per frame.

    Cyclic (even) permutations keep the handedness of the H1 -> H2 -> H3 ordering, so the narrow
    relative torsions of H2 and H3 stay unimodal while the rotor torsion of H1 becomes 3-fold.
    """
    if not methyls:
        return x
    x = x.clone()
    b = x.shape[0]
    for hs in methyls:
        idx = torch.as_tensor(hs, dtype=torch.long)
        shift = torch.randint(0, 3, (b,), generator=generator)
        perm = (torch.arange(3).unsqueeze(0) + shift.unsqueeze(1)) % 3  # (B, 3)
        src = idx[perm]
        x[:, idx] = torch.gather(x, 1, src.unsqueeze(-1).expand(b, 3, 3))
    return x


def topology_to_pdb(topology, xyz: np.ndarray | None = None) -> str:
    """PDB text of an mdtraj topology (with coordinates ``xyz`` (n, 3) nm, or zeros)."""
    import mdtraj as md

    if xyz is None:
        xyz = np.zeros((topology.n_atoms, 3))
    traj = md.Trajectory(np.asarray(xyz, dtype=np.float32).reshape(1, -1, 3), topology)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "top.pdb"
        traj.save_pdb(str(path))
        return path.read_text()


def topology_from_pdb(text: str):
    """mdtraj topology from PDB text."""
    import mdtraj as md

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "top.pdb"
        path.write_text(text)
        return md.load_pdb(str(path)).topology


def make_spec(model: Backmapper, temperature: float, reference_xyz=None, system_xml: str | None = None) -> dict:
    """Everything needed to rebuild ``model`` (and to export it) without the training data."""
    return {
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
    from openmm_backmap.mapping import CGMapping

    top = topology_from_pdb(spec["topology_pdb"])
    mapping = CGMapping.from_dict(spec["mapping"], top)
    kw = dict(spec["model"])
    kw["constraints"] = [tuple(c) for c in kw.get("constraints") or []]
    kw["bonds"] = [tuple(b) for b in kw["bonds"]]
    kw["cg_bonds"] = [tuple(b) for b in kw["cg_bonds"]]
    return Backmapper(mapping, **kw)


def save_checkpoint(path: str | Path, model: torch.nn.Module, spec: dict, **state: Any) -> None:
    """Write a checkpoint (backmapper or CG potential) atomically: temporary file, then rename."""
    path = Path(path)
    payload = {"spec": spec, "state_dict": model.state_dict(), **state}
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
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("spec"), dict) \
            or ckpt["spec"].get("format") != CHECKPOINT_FORMAT:
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


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True)


@torch.no_grad()
def mean_nll(model: Backmapper, x: Tensor, X: Tensor, batch_size: int = 1024, prev: Tensor | None = None) -> float:
    """Mean -log q(x | X) (nats per frame) over a data set; temporal models use ``prev`` when given."""
    total = 0.0
    for s in range(0, x.shape[0], batch_size):
        xb, Xb = x[s : s + batch_size], X[s : s + batch_size]
        if model.temporal and prev is not None:
            pb = prev[s : s + batch_size]
            keep = torch.ones(xb.shape[0], dtype=xb.dtype)
            lp = model.log_prob_train(xb, Xb, pb, keep)
        else:
            lp = model.log_prob(xb, Xb)
        total += float(-lp.sum())
    return total / max(int(x.shape[0]), 1)


def _previous_frames(x: Tensor, previous: np.ndarray | None) -> tuple[Tensor, Tensor]:
    """Predecessor positions and a 0/1 flag of whether each frame has one."""
    if previous is None:
        return x, torch.zeros(x.shape[0], dtype=x.dtype)
    prev_idx = torch.as_tensor(previous, dtype=torch.long)
    has = prev_idx >= 0
    return x[torch.where(has, prev_idx, torch.arange(x.shape[0]))], has.to(x.dtype)


# ----------------------------------------------------------------------------- maximum likelihood
def train_ml(
    model: Backmapper,
    spec: dict,
    train: tuple,
    val: tuple,
    epochs: int = 50,
    batch_size: int = 256,
    lr: float = 2e-3,
    weight_decay: float = 1e-5,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    augment: bool = True,
    keep_previous: float = 0.8,
    time_limit: float | None = None,
) -> dict:
    """Maximum-likelihood training with validation-NLL model selection.

    Parameters
    ----------
    model, spec
        The model (statistics already fitted) and its :func:`make_spec` dict.
    train, val
        ``(x, X)`` or ``(x, X, previous)`` with positions (N, n_aa, 3) and beads (N, n_cg, 3) in nm
        and, for temporal models, the index of each frame's predecessor (-1 for none).
    epochs, batch_size, lr, weight_decay
        Adam(W) settings; the learning rate follows a cosine from ``lr`` to ``lr / 20``.
    seed
        Seeds shuffling, augmentation and temporal drop-out: runs are deterministic.
    checkpoint, resume
        Write ``checkpoint`` after every epoch; with ``resume`` continue from it when it exists.
    augment
        Cyclic permutations of methyl hydrogens.
    keep_previous
        Temporal models: probability of conditioning on the previous frame (else the flag is 0,
        which trains :meth:`Backmapper.sample` too).
    time_limit
        Stop after this many seconds (finishing the current epoch).

    Returns
    -------
    dict with ``history`` (per-epoch train and validation NLL), ``best_val_nll``, ``best_epoch``.
    After training the model holds the parameters of the best validation epoch.
    """
    dtype = model.M.dtype
    x_tr = torch.as_tensor(np.asarray(train[0]), dtype=dtype)
    X_tr = torch.as_tensor(np.asarray(train[1]), dtype=dtype)
    x_va = torch.as_tensor(np.asarray(val[0]), dtype=dtype)
    X_va = torch.as_tensor(np.asarray(val[1]), dtype=dtype)
    prev_tr, has_tr = _previous_frames(x_tr, train[2] if len(train) > 2 else None)
    prev_va, has_va = _previous_frames(x_va, val[2] if len(val) > 2 else None)
    if model.temporal:
        sel = has_va > 0
        x_va, X_va, prev_va = x_va[sel], X_va[sel], prev_va[sel]
    n = x_tr.shape[0]
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    total_steps = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / max(total_steps, 1)))
    )
    gen = torch.Generator().manual_seed(seed)
    methyls = methyl_groups(model.mapping.topology, exclude=model.pivots.tolist()) if augment else []
    history: list[dict] = []
    best = {"val_nll": math.inf, "epoch": -1, "state": copy.deepcopy(model.state_dict())}
    start_epoch = 0
    ckpt = None
    if resume and checkpoint is not None and Path(checkpoint).is_file():
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if "optimizer" not in ckpt:  # a finished run: nothing to resume
            ckpt = None
    if ckpt is not None:
        model.load_state_dict(ckpt.get("last_state_dict", ckpt["state_dict"]))
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        gen.set_state(ckpt["generator"])
        history = ckpt["history"]
        best = ckpt["best"]
        start_epoch = ckpt["epoch"] + 1
    torch.manual_seed(seed + start_epoch)
    t0 = time.time()
    bar = _progress(total_steps, "ML", progress)
    bar.update(start_epoch * steps_per_epoch)
    for epoch in range(start_epoch, epochs):
        model.train()
        order = torch.randperm(n, generator=gen)
        run = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * batch_size : (b + 1) * batch_size]
            state = gen.get_state()
            xb = permute_methyls(x_tr[idx], methyls, gen)
            Xb = X_tr[idx]
            if model.temporal:
                # the same relabelling of the methyl hydrogens in a frame and its predecessor
                after = gen.get_state()
                gen.set_state(state)
                pb = permute_methyls(prev_tr[idx], methyls, gen)
                gen.set_state(after)
                keep = (torch.rand(idx.shape[0], generator=gen) < keep_previous).to(dtype) * has_tr[idx]
                lp = model.log_prob_train(xb, Xb, pb, keep)
            else:
                lp = model.log_prob(xb, Xb)
            loss = -lp.mean()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss at epoch {epoch}, step {b}")
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 100.0)
            opt.step()
            sched.step()
            run = 0.9 * run + 0.1 * float(loss.detach()) if b else float(loss.detach())
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{run:.2f}", val=f"{best['val_nll']:.2f}")
        model.eval()
        val_nll = mean_nll(model, x_va, X_va, prev=prev_va if model.temporal else None)
        history.append({"epoch": epoch, "train_nll": run, "val_nll": val_nll})
        if val_nll < best["val_nll"]:
            best = {"val_nll": val_nll, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
        bar.set_postfix(epoch=epoch, loss=f"{run:.2f}", val=f"{val_nll:.2f}")
        if checkpoint is not None:
            spec["training"]["ml"] = {"epochs": epoch + 1, "best_val_nll": best["val_nll"], "best_epoch": best["epoch"]}
            save_checkpoint(
                checkpoint,
                model,
                spec,
                optimizer=opt.state_dict(),
                scheduler=sched.state_dict(),
                generator=gen.get_state(),
                history=history,
                best=best,
                epoch=epoch,
                stage="ml",
            )
        if time_limit is not None and time.time() - t0 > time_limit:
            break
    bar.close()
    last_state = copy.deepcopy(model.state_dict())
    last_epoch = history[-1]["epoch"] if history else -1
    model.load_state_dict(best["state"])
    summary = {
        "history": history,
        "best_val_nll": best["val_nll"],
        "best_epoch": best["epoch"],
        "n_free_dof": int(model.dim),
        "seconds": time.time() - t0,
    }
    spec["training"]["ml"] = {k: v for k, v in summary.items() if k != "history"}
    if checkpoint is not None:
        # the best parameters for use, the last ones (and the optimiser) to resume from
        save_checkpoint(
            checkpoint,
            model,
            spec,
            last_state_dict=last_state,
            optimizer=opt.state_dict(),
            scheduler=sched.state_dict(),
            generator=gen.get_state(),
            history=history,
            best=best,
            epoch=last_epoch,
            stage="ml",
        )
    return summary


# ----------------------------------------------------------------------------- energy refinement
def soft_clip(u: Tensor, cap: float) -> Tensor:
    """u below ``cap`` unchanged, above it ``cap + log(1 + u - cap)``; NaN/inf become large finite."""
    u = torch.nan_to_num(u, nan=cap + 50.0, posinf=cap + 50.0)
    return torch.where(u > cap, cap + torch.log1p(torch.clamp(u - cap, min=0.0)), u)


def refine_energy(
    model: Backmapper,
    spec: dict,
    energy: Callable[[Tensor], Tensor],
    cg_frames,
    temperature: float,
    steps: int = 1000,
    batch_size: int = 128,
    lr: float = 2e-4,
    t_start: float | None = None,
    anneal_fraction: float = 0.5,
    ml_data: tuple | None = None,
    ml_weight: float = 0.5,
    energy_cap: float | None = None,
    grad_clip: float = 10.0,
    seed: int = 0,
    val_frames=None,
    eval_every: int = 50,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    time_limit: float | None = None,
) -> dict:
    """Reverse-KL refinement: minimise E_X E_{x~q(.|X)} [beta U(x) + log q(x|X)] (+ ML term).

    Parameters
    ----------
    energy
        U_AA(x) in kJ/mol for positions (B, n_aa, 3) nm, differentiable (e.g.
        ``openmm_backmap.openmm.energies.aa_energy(system)``).
    cg_frames
        CG configurations (N, n_cg, 3) nm to condition on (training frames).
    temperature
        Target temperature (K). Training starts at ``t_start`` (default 4 x target) and anneals
        geometrically to the target over the first ``anneal_fraction`` of the steps.
    ml_data, ml_weight
        Optional ``(x, X)`` pairs: the loss adds ``ml_weight`` x their NLL (keeps q covering the data).
    energy_cap
        Reduced energies above it are soft-clipped (log growth); default: 50 kT above the largest
        reduced energy of ``ml_data`` when given, else 1e3.
    grad_clip
        Gradient-norm clip.
    val_frames
        CG frames for model selection: every ``eval_every`` steps after annealing, the reverse-KL
        estimate at the target temperature on them; the best parameters are kept.
    """
    dtype = model.M.dtype
    X_all = torch.as_tensor(np.asarray(cg_frames), dtype=dtype)
    beta_target = 1.0 / kT(temperature)
    t_start = 4.0 * temperature if t_start is None else float(t_start)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if ml_data is not None:
        x_ml = torch.as_tensor(np.asarray(ml_data[0]), dtype=dtype)
        X_ml = torch.as_tensor(np.asarray(ml_data[1]), dtype=dtype)
        if energy_cap is None:
            with torch.no_grad():
                u = torch.cat([energy(x_ml[s : s + 512]) for s in range(0, min(len(x_ml), 4096), 512)])
            energy_cap = float(u.max()) * beta_target + 50.0
    if energy_cap is None:
        energy_cap = 1e3
    methyls = methyl_groups(model.mapping.topology, exclude=model.pivots.tolist())
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n_anneal = max(1, int(anneal_fraction * steps))
    X_val = None if val_frames is None else torch.as_tensor(np.asarray(val_frames), dtype=dtype)

    def temperature_at(step: int) -> float:
        f = min(step / n_anneal, 1.0)
        return t_start * (temperature / t_start) ** f

    @torch.no_grad()
    def val_kl() -> float:
        assert X_val is not None
        g = torch.get_rng_state()
        torch.manual_seed(seed + 1)
        aa, lq = model.sample(X_val, 8)
        torch.set_rng_state(g)
        u = beta_target * energy(aa)
        return float(torch.mean(soft_clip(u, energy_cap) + lq))

    history: list[dict] = []
    best = {"val_kl": math.inf, "step": -1, "state": copy.deepcopy(model.state_dict())}
    t0 = time.time()
    bar = _progress(steps, "energy", progress)
    model.train()
    for step in range(steps):
        T = temperature_at(step)
        beta = 1.0 / kT(T)
        idx = torch.randint(0, X_all.shape[0], (batch_size,), generator=gen)
        aa, lq = model.sample(X_all[idx], 1)
        u = soft_clip(beta * energy(aa), energy_cap * beta / beta_target)
        kl = torch.mean(u + lq)
        loss = kl
        nll = torch.zeros((), dtype=dtype)
        if ml_data is not None and ml_weight > 0:
            j = torch.randint(0, x_ml.shape[0], (batch_size,), generator=gen)
            nll = -model.log_prob(permute_methyls(x_ml[j], methyls, gen), X_ml[j]).mean()
            loss = loss + ml_weight * nll
        opt.zero_grad()
        if torch.isfinite(loss):
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
        rec = {
            "step": step,
            "T": T,
            "kl": float(kl.detach()),
            "nll": float(nll.detach()),
            "u_mean": float(u.detach().mean()),
        }
        if X_val is not None and step >= n_anneal and (step % eval_every == 0 or step == steps - 1):
            model.eval()
            rec["val_kl"] = val_kl()
            model.train()
            if rec["val_kl"] < best["val_kl"]:
                best = {"val_kl": rec["val_kl"], "step": step, "state": copy.deepcopy(model.state_dict())}
        history.append(rec)
        bar.update(1)
        bar.set_postfix(T=f"{T:.0f}", kl=f"{rec['kl']:.2f}", nll=f"{rec['nll']:.2f}")
        if time_limit is not None and time.time() - t0 > time_limit:
            break
    bar.close()
    model.eval()
    if X_val is not None and best["step"] >= 0:
        model.load_state_dict(best["state"])
    summary = {
        "steps": len(history),
        "final_T": history[-1]["T"] if history else t_start,
        "best_val_kl": best["val_kl"],
        "best_step": best["step"],
        "seconds": time.time() - t0,
    }
    spec["training"]["energy"] = dict(summary)
    if checkpoint is not None:
        save_checkpoint(checkpoint, model, spec, history=history, stage="energy-done")
    summary["history"] = history
    return summary


# ----------------------------------------------------------------------------- from files (CLI)
def detect_constraints(traj, tol: float = 1e-4) -> list[tuple[int, int, float]]:
    """Bonds whose length varies by less than ``tol`` nm (std) over a trajectory: constrained."""
    pairs = np.array([(a.index, b.index) for a, b in traj.topology.bonds], dtype=np.int64).reshape(-1, 2)
    if pairs.size == 0:
        return []
    d = np.linalg.norm(traj.xyz[:, pairs[:, 0]] - traj.xyz[:, pairs[:, 1]], axis=-1).astype(np.float64)
    std, mean = d.std(0), d.mean(0)
    return [(int(i), int(j), float(m)) for (i, j), s, m in zip(pairs, std, mean) if s < tol]


def _previous_index(frames: np.ndarray, first: np.ndarray | None = None) -> np.ndarray:
    """Position in ``frames`` of each frame's predecessor (-1 when it is not in ``frames``, or when
    ``first[f]`` marks frame f as the first of its trajectory)."""
    pos = {int(f): i for i, f in enumerate(frames)}
    return np.array(
        [-1 if first is not None and first[int(f)] else pos.get(int(f) - 1, -1) for f in frames], dtype=np.int64
    )


def train_from_files(
    topology: str,
    trajectory: str | Sequence[str],
    mapping: str,
    out: str | Path,
    epochs: int = 30,
    aa_system: str | None = None,
    temporal: bool = False,
    temperature: float = 300.0,
    energy_steps: int = 2000,
    batch_size: int = 256,
    lr: float = 2e-3,
    hidden: int = 128,
    layers: int = 6,
    bins: int = 8,
    val_fraction: float = 0.1,
    stride: int = 1,
    seed: int = 0,
    resume: bool = False,
    ml_weight: float = 0.3,
    energy_lr: float = 3e-4,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """What ``openmm-backmap train`` does: load, split, fit, ML-train, energy-refine, checkpoint.

    ``trajectory`` may be several files of the same topology (e.g. an unrestrained run plus runs
    restrained to rare basins by ``openmm-backmap reference --restrain``); a restrained run is
    accepted only when every restrained atom is a CG bead by itself, so that p(x | X) is unbiased.
    Validation frames are contiguous time blocks of each file (``data.block_split``); constraints
    come from the AA System when given, else from bonds whose length does not vary in the data.
    Energy refinement runs when ``aa_system`` is given and ``energy_steps > 0``.
    """
    from openmm_backmap.systems.builtin import block_split, check_restraint_for_mapping, load_trajectory
    from openmm_backmap.mapping import CGMapping

    torch.manual_seed(seed)
    np.random.seed(seed)
    files = [trajectory] if isinstance(trajectory, (str, Path)) else list(trajectory)
    if not files:
        raise ValueError("no trajectory given")
    parts = [load_trajectory(f, topology, stride=stride) for f in files]
    cg_map = CGMapping.from_spec(mapping, parts[0].topology)
    for f in files:
        check_restraint_for_mapping(f, cg_map)
    traj = parts[0].join(parts[1:], check_topology=True) if len(parts) > 1 else parts[0]
    first = np.zeros(traj.n_frames, dtype=bool)
    first[np.cumsum([0] + [p.n_frames for p in parts[:-1]])] = True
    system_xml = None
    if aa_system is not None:
        from openmm_backmap.systems.builtin import constraints_from_system
        from openmm_backmap.openmm.energies import load_system

        system = load_system(aa_system)
        if system.getNumParticles() != traj.n_atoms:
            raise ValueError(
                f"the AA System has {system.getNumParticles()} particles but the topology has {traj.n_atoms} atoms"
            )
        constraints = constraints_from_system(system)
        system_xml = Path(aa_system).read_text()
    else:
        constraints = detect_constraints(traj)
    split = {"train": [], "val": []}
    offset = 0
    for part in parts:
        one = block_split(part.n_frames, (1.0 - val_fraction, val_fraction, 0.0), n_blocks=10, seed=seed)
        for key in split:
            split[key].append(one[key] + offset)
        offset += part.n_frames
    split = {key: np.concatenate(v) for key, v in split.items()}
    x = traj.xyz.astype(np.float64)
    X = cg_map.project(x)
    tr, va = split["train"], split["val"]
    log(
        f"{traj.n_frames} frames ({len(tr)} train, {len(va)} validation), {cg_map.n_aa} atoms -> "
        f"{cg_map.n_cg} beads, {len(constraints)} constraints"
    )
    model = Backmapper.from_data(
        cg_map,
        x[tr],
        constraints=constraints,
        temporal=temporal,
        hidden=hidden,
        n_layers=layers,
        n_bins=bins,
        seed=seed,
    )
    spec = make_spec(model, temperature, x[0], system_xml)
    log(f"model: {model.dim} internal DOF, {sum(p.numel() for p in model.parameters())} parameters")
    train_set = (x[tr], X[tr], _previous_index(tr, first)) if temporal else (x[tr], X[tr])
    val_set = (x[va], X[va], _previous_index(va, first)) if temporal else (x[va], X[va])
    ml = train_ml(
        model,
        spec,
        train_set,
        val_set,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        checkpoint=out,
        resume=resume,
        progress=progress,
    )
    log(f"ML: best validation NLL {ml['best_val_nll']:.3f} nats/frame at epoch {ml['best_epoch']}")
    summary = {"ml": {k: v for k, v in ml.items() if k != "history"}}
    if aa_system is not None and energy_steps > 0:
        from openmm_backmap.openmm.energies import aa_energy

        # keep the maximum-likelihood model beside the refined one, for comparison
        ml_path = Path(out).with_suffix(".ml" + (Path(out).suffix or ".ckpt"))
        save_checkpoint(ml_path, model, copy.deepcopy(spec), stage="ml-done")
        log(f"maximum-likelihood model written to {ml_path}")

        energy = aa_energy(system)
        en = refine_energy(
            model,
            spec,
            energy,
            X[tr],
            temperature,
            steps=energy_steps,
            ml_data=(x[tr], X[tr]),
            ml_weight=ml_weight,
            lr=energy_lr,
            seed=seed,
            val_frames=X[va][:: max(1, len(va) // 100)],
            progress=progress,
        )
        log(f"energy refinement: {en['steps']} steps, best validation reverse KL {en['best_val_kl']:.3f}")
        summary["energy"] = {k: v for k, v in en.items() if k != "history"}
    spec["training"]["data"] = {
        "trajectory": str(files[0]) if len(files) == 1 else [str(f) for f in files],
        "n_frames": int(traj.n_frames),
        "stride": int(stride),
        "n_train": int(len(tr)),
        "n_val": int(len(va)),
        "seed": int(seed),
    }
    with torch.no_grad():
        val_nll = mean_nll(
            model, torch.as_tensor(x[va], dtype=model.M.dtype), torch.as_tensor(X[va], dtype=model.M.dtype)
        )
    spec["training"]["final_val_nll"] = val_nll
    save_checkpoint(out, model, spec, stage="done")
    log(f"final validation NLL {val_nll:.3f} nats/frame; checkpoint written to {out}")
    summary["final_val_nll"] = val_nll
    return summary
