"""Fine-tuning a protein backmapper on one protein from its CG frames alone.

``openmm-backmap finetune`` refines a transferable protein model (``protein-ca``, ``protein-backbone``
or a file) for the chain of a CG topology by reverse KL against the AA Boltzmann density of
amber14 + GBn2 (the force field of the training corpus), conditioned on the user's CG frames:

    L = E_X E_{x ~ q(.|X)} [ beta U_AA(x) + log q(x | X) ]  =  E_X [ KL(q(.|X) || p(.|X)) ] - E_X [ log Z(X) ],

X drawn from the given CG frames (for example a CG run of the protein), x drawn by the flow with
reparameterised noise so that the gradient reaches every parameter through the sample. No AA data
are needed: U_AA and its forces come from the batched torch energy
(:class:`~openmm_backmap.openmm.energies.TorchSystemEnergy`, GBn2 included).

Guard rails reverse KL needs on molecules:

* **tempering**: beta runs from 1/kT_start to 1/kT geometrically over the first ``anneal_fraction``
  of the steps (a hot start lets the entropy term keep the samples spread while clashes are removed);
* **energy cap**: the reduced energies of a batch above ``beta U_cap`` grow logarithmically (a
  clash still pushes back, but cannot blow up a step). The cap is the larger of a floor, the
  minimised energy of the model's own samples plus ``cap_dof`` kT per free degree of freedom
  (thermal energy is about kT/2 per degree of freedom), and the batch's upper quartile of beta U
  (not differentiated). The quartile matters: with a fixed cap below most samples' energies, the
  damped energy term cannot hold against the entropy term -log q, and the samples spread until
  they clash (runaway energies); above the quartile only the worst quarter is damped;
* gradient-norm clipping;
* optionally (``pair_core_kt``) a linear core on every non-bonded pair in the loss's energy, so that
  atoms placed inside each other keep a gradient that pushes them apart;
* **model selection**: every ``eval_every`` steps after the anneal, on held-out CG frames (the last
  ``val_fraction`` of the frames, fixed noise), the median over samples of beta U + log q (a
  robust reverse-KL estimate: a mean would follow the few clashing samples); the best parameters
  are kept, the starting ones included. Median U_AA and the conditional ESS are recorded.

The result is a protein model file (the format of the shipped models) that loads by path wherever a
model is accepted; its training record names the sequence it was tuned on.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from openmm_backmap.analysis.reweighting import conditional_ess
from openmm_backmap.models.protein import ProteinBackmapper
from openmm_backmap.training.backmapper import soft_clip_above_quartile
from openmm_backmap.training.config import ProteinFinetuning
from openmm_backmap.training.joint import minimise
from openmm_backmap.units import kT as kT_of

__all__ = ["chain_system", "finetune", "finetune_files"]


def chain_system(chain_module, constrained: bool = True):
    """The amber14 + GBn2 System (no cutoff, bonds to hydrogen constrained: the corpus's settings;
    harmonic instead when not ``constrained``) of a bound chain
    (:class:`~openmm_backmap.models.protein.ChainBackmapper`), atoms in chain order."""
    from openmm import app

    from openmm_backmap.io.protein_models import FORCE_FIELD, chain_topology

    top = chain_topology(chain_module, list(range(1, chain_module.n_res + 1)))
    return app.ForceField(*FORCE_FIELD).createSystem(
        top.to_openmm(), nonbondedMethod=app.NoCutoff, constraints=app.HBonds if constrained else None
    )


def finetune(
    model: ProteinBackmapper,
    residue_names: list[str] | list[list[str]],
    cg_frames: np.ndarray,
    out: str | Path,
    config: ProteinFinetuning | None = None,
    log=print,
) -> dict:
    """Refine ``model`` in place for the chain ``residue_names`` (or the complex of chains, one list
    of names per chain) by reverse KL against amber14 + GBn2,
    conditioned on ``cg_frames`` (N, n_cg, 3) nm, and write the best state to ``out`` (a protein
    model file, written atomically). Returns the summary (also stored in the file's training record
    under ``finetune``) with the per-evaluation history.

    Raises
    ------
    ValueError
        For fewer than 2 CG frames, frames of the wrong shape, or settings that cannot work.
    """
    config = config or ProteinFinetuning()
    config.check()
    out = Path(out)
    X = np.asarray(cg_frames, dtype=np.float32)
    torch.set_num_threads(int(config.threads))
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    model.float().train()
    for p in model.net.parameters():
        p.requires_grad_(True)
    sequences = [list(residue_names)] if isinstance(residue_names[0], str) else [list(q) for q in residue_names]
    chain = model.for_chains(sequences)
    if X.ndim != 3 or X.shape[1:] != (chain.n_cg, 3):
        raise ValueError(f"CG frames must have shape (N, {chain.n_cg}, 3) for this chain, got {X.shape}")
    if X.shape[0] < 2:
        raise ValueError(f"fine-tuning needs at least 2 CG frames (training and held out), got {X.shape[0]}")
    n_val = min(max(1, int(round(config.val_fraction * X.shape[0]))), X.shape[0] - 1)
    X_train = torch.as_tensor(X[: X.shape[0] - n_val])
    pick = np.linspace(X.shape[0] - n_val, X.shape[0] - 1, min(config.val_frames, n_val)).round().astype(int)
    X_val = torch.as_tensor(X[np.unique(pick)])
    system = chain_system(chain)
    from openmm_backmap.openmm.energies import TorchSystemEnergy

    energy = TorchSystemEnergy(system).double()
    beta = 1.0 / kT_of(config.temperature)
    # the loss's energy: with linear pair cores when asked (evaluations keep the exact one)
    pair_core = config.pair_core_kt / beta if config.pair_core_kt > 0 else None
    n_dof = 3 * system.getNumParticles() - system.getNumConstraints() - 3 * chain.n_cg
    with torch.no_grad():
        seeds, _ = chain.sample(X_train[:: max(1, X_train.shape[0] // 4)][:4], 1)
    t_min = time.time()
    # the floor of the cap: the lowest energy the seeds minimise to (harmonic hydrogen bonds instead
    # of constraints, which OpenMM's minimiser enforces by slow repeated restrained minimisations)
    unconstrained = chain_system(chain, constrained=False)
    u_min = min(minimise(unconstrained, xi, 10.0, 1000, "CPU")[1] for xi in seeds.double().numpy())
    cap = beta * u_min + config.cap_dof * n_dof
    log(
        f"fine-tuning {chain.n_res} residues ({chain.n_aa} atoms, {n_dof} free degrees of freedom) on "
        f"{X_train.shape[0]} CG frames, {X_val.shape[0]} held out; minimised U {u_min:.1f} kJ/mol, "
        f"cap {cap / beta:.1f} kJ/mol ({time.time() - t_min:.0f} s)"
    )
    # the held-out frames' noise is drawn once: every evaluation compares the models on the same draws
    torch.manual_seed(config.seed + 1)
    val_noise = chain.sample_noise(X_val.shape[0] * config.val_samples, torch.float32, torch.device("cpu"))
    torch.manual_seed(config.seed)
    X_rep = torch.repeat_interleave(X_val, config.val_samples, dim=0)

    @torch.no_grad()
    def validate() -> dict:
        model.eval()
        aa, lq = chain.sample_with_noise(X_rep, val_noise)
        u = energy(aa.double())
        model.train()
        shape = (X_val.shape[0], config.val_samples)
        u_f, lq_f = u.numpy().reshape(shape), lq.double().numpy().reshape(shape)
        return {
            "val_kl": float(torch.median(beta * u + lq.double())),
            "val_median_u": float(torch.median(u)),
            "val_ess": conditional_ess(u_f, lq_f, config.temperature),
        }

    opt = torch.optim.Adam(model.net.parameters(), lr=config.lr)
    n_anneal = max(1, int(config.anneal_fraction * config.steps))
    t_ratio = config.temperature / config.t_start
    start = validate()
    log(f"start: val KL {start['val_kl']:.1f}, median U {start['val_median_u']:.1f} kJ/mol, ESS {start['val_ess']:.3f}")
    history = [{"step": 0, "T": config.t_start, **start}]
    best = {"step": 0, **start, "state": copy.deepcopy(model.net.state_dict())}
    t0 = time.time()
    step = 0
    for step in range(1, config.steps + 1):
        T = config.t_start * t_ratio ** min(step / n_anneal, 1.0)
        b_t = 1.0 / kT_of(T)
        idx = torch.randint(0, X_train.shape[0], (config.batch_frames,), generator=gen)
        aa, lq = chain.sample(X_train[idx], 1)
        u = energy(aa.double(), pair_core=pair_core)
        loss = torch.mean(soft_clip_above_quartile(b_t * u, cap * b_t / beta) + lq.double())
        opt.zero_grad()
        if torch.isfinite(loss):
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.net.parameters(), config.grad_clip)
            opt.step()
        rec = {"step": step, "T": T, "loss": float(loss.detach()), "median_u": float(u.detach().median())}
        if step >= n_anneal and (step % config.eval_every == 0 or step == config.steps):
            rec.update(validate())
            if rec["val_kl"] < best["val_kl"]:
                best = {"step": step, **{k: rec[k] for k in start}, "state": copy.deepcopy(model.net.state_dict())}
            log(
                f"step {step} T {T:.0f} K: val KL {rec['val_kl']:.1f}, median U {rec['val_median_u']:.1f} kJ/mol, "
                f"ESS {rec['val_ess']:.3f} ({time.time() - t0:.0f} s)"
            )
            history.append(rec)
        elif step % config.eval_every == 0:
            elapsed = time.time() - t0
            log(f"step {step} T {T:.0f} K: loss {rec['loss']:.1f}, median U {rec['median_u']:.1f} ({elapsed:.0f} s)")
        if time.time() - t0 > config.time_limit:
            log(f"time limit {config.time_limit:.0f} s reached at step {step}")
            break
    if history[-1]["step"] != step:
        # stopped between evaluations (time limit): the last state is a candidate too
        rec = {"step": step, "T": T, **validate()}
        history.append(rec)
        if rec["val_kl"] < best["val_kl"]:
            best = {"step": step, **{k: rec[k] for k in start}, "state": copy.deepcopy(model.net.state_dict())}
    model.net.load_state_dict(best["state"])
    model.eval()
    for p in model.net.parameters():
        p.requires_grad_(False)
    summary = {
        "sequence": [n for q in sequences for n in q],
        "chain_lengths": [len(q) for q in sequences],
        "config": asdict(config),
        "steps_run": step,
        "seconds": time.time() - t0,
        "minimised_u_kjmol": u_min,
        "start": start,
        "best_step": best["step"],
        "best": {k: best[k] for k in start},
        "history": history,
    }
    info = dict(getattr(model, "info", {}) or {})
    info["finetune"] = {k: v for k, v in summary.items() if k != "history"}
    model.save(out, extra=info)  # written whole or not at all
    model.info = info
    log(
        f"best step {best['step']}: val KL {best['val_kl']:.1f} (start {start['val_kl']:.1f}), median U "
        f"{best['val_median_u']:.1f} kJ/mol (start {start['val_median_u']:.1f}), ESS {best['val_ess']:.3f} "
        f"(start {start['val_ess']:.3f}) -> {out}"
    )
    return summary


def finetune_files(
    model: str | Path,
    cg: str | Path,
    cg_topology: str | Path,
    out: str | Path,
    config: ProteinFinetuning | None = None,
    log=print,
) -> dict:
    """:func:`finetune` from files: ``model`` a protein model's name (``protein-ca``,
    ``protein-backbone``) or file, ``cg`` a CG trajectory (any format mdtraj reads, nm) of the chain
    in ``cg_topology`` (one chain, beads named as the model's mapping, three-letter residue names).

    Raises
    ------
    ValueError
        When ``model`` is not a protein model, or the CG input does not fit it (each error names the
        file and the residue or frame at fault).
    """
    from openmm_backmap.backmap import read_cg_frames
    from openmm_backmap.io.protein_models import (
        load_cg_topology,
        load_protein_model,
        protein_model_path,
        read_cg_chain,
    )

    path = protein_model_path(model)
    if path is None:
        raise ValueError(
            f"{model} is not a protein model: finetune refines protein-ca, protein-backbone or a file they "
            "were fine-tuned into (per-molecule backmappers are refined with `train --energy-steps`)"
        )
    protein = load_protein_model(path)
    top = load_cg_topology(cg_topology)
    chain = read_cg_chain(top, protein.mapping, f"the CG topology {cg_topology} (for {model})")
    X = read_cg_frames(cg, top, len(chain.bead_names), chain, cg_topology)
    summary = finetune(protein, chain.sequences, X, out, config, log)
    summary["model"] = str(model)
    return summary
