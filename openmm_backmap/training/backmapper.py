"""Training of backmappers: maximum likelihood on (x, X) pairs and energy-based refinement.

* :func:`train_ml` minimises -log q(x | X) over AA frames in the shared training loop
  (:func:`~openmm_backmap.training.loop.fit_epochs`: AdamW with a cosine learning rate, the
  parameters with the lowest validation NLL kept, a checkpoint every epoch to resume from).
  Methyl hydrogens are permuted cyclically as free data augmentation (the energy is invariant and
  the rotor is circular).
* :func:`refine_energy` minimises the reverse KL E_q[beta U_AA(x) + log q(x | X)] over CG frames,
  with energies and forces from an AA energy module (:mod:`openmm_backmap.openmm.energies`), tempered from
  a high temperature down to the target, with energy soft-clipping, gradient clipping and an
  optional maximum-likelihood term that keeps the flow on the data.

Checkpoints and the model ``spec`` they carry are :mod:`openmm_backmap.io.checkpoints`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from openmm_backmap.io.checkpoints import save_checkpoint
from openmm_backmap.models.backmapper import Backmapper
from openmm_backmap.training.loop import FitSettings, fit_epochs, progress_bar
from openmm_backmap.units import kT


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
        The model (statistics already fitted) and its :func:`~openmm_backmap.io.checkpoints.make_spec` dict.
    train, val
        ``(x, X)`` or ``(x, X, previous)`` with positions (N, n_aa, 3) and beads (N, n_cg, 3) in nm
        and, for temporal models, the index of each frame's predecessor (-1 for none).
    epochs, batch_size, lr, weight_decay
        Adam(W) settings; the learning rate follows a cosine from ``lr`` to ``lr / 20``.
    seed
        Seeds shuffling, augmentation and temporal drop-out: runs are deterministic.
    checkpoint, resume
        Write ``checkpoint`` after every epoch; with ``resume`` continue from it when it exists
        (:mod:`openmm_backmap.training.loop`).
    augment
        Cyclic permutations of methyl hydrogens.
    keep_previous
        Temporal models: probability of conditioning on the previous frame (else the flag is 0,
        which trains :meth:`Backmapper.sample` too).
    time_limit
        Stop after this many seconds (finishing the current epoch).

    Returns
    -------
    dict
        The summary of :func:`~openmm_backmap.training.loop.fit_epochs` (``history``, ``best_val_nll``,
        ``best_epoch``, ...), also recorded in ``spec["training"]["ml"]``. After training the model
        holds the parameters of the best validation epoch.
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
    methyls = methyl_groups(model.mapping.topology, exclude=model.pivots.tolist()) if augment else []

    def batch_loss(idx: Tensor, gen: torch.Generator) -> Tensor:
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
            return -model.log_prob_train(xb, Xb, pb, keep).mean()
        return -model.log_prob(xb, Xb).mean()

    def validate() -> float:
        return mean_nll(model, x_va, X_va, prev=prev_va if model.temporal else None)

    settings = FitSettings(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        seed=seed,
        time_limit=time_limit,
        progress=progress,
    )
    return fit_epochs(
        model,
        int(x_tr.shape[0]),
        batch_loss,
        validate,
        settings,
        spec,
        spec_key="ml",
        checkpoint=checkpoint,
        resume=resume,
        desc="ML",
        stage="ml",
    )


# ----------------------------------------------------------------------------- energy refinement
def soft_clip(u: Tensor, cap: float) -> Tensor:
    """u below ``cap`` unchanged, above it ``cap + log(1 + u - cap)``; NaN/inf become large finite."""
    u = torch.nan_to_num(u, nan=cap + 50.0, posinf=cap + 50.0)
    return torch.where(u > cap, cap + torch.log1p(torch.clamp(u - cap, min=0.0)), u)


def soft_clip_above_quartile(u: Tensor, floor: float) -> Tensor:
    """:func:`soft_clip` of reduced energies u at the larger of ``floor`` and the batch's upper
    quartile of its finite values (not differentiated): only the worst quarter of a batch is damped
    when most samples lie above the floor, so the damped energy term cannot lose to the entropy term
    and let the samples spread until they clash (reverse KL's guard rail in ``finetune`` and in
    corpus training)."""
    finite = u.detach()[torch.isfinite(u.detach())]
    cap = max(floor, float(torch.quantile(finite, 0.75))) if finite.numel() else floor
    return soft_clip(u, cap)


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
    bar = progress_bar(steps, "energy", progress)
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
