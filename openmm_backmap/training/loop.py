"""The one training loop, shared by the backmapper and the CG potential.

:func:`fit_epochs` runs epochs of minibatch gradient steps on a loss the caller defines per batch:

* AdamW with a cosine learning rate from ``lr`` down to ``lr / 20`` over all steps, gradient norms
  clipped at :data:`GRAD_CLIP`; shuffling (and any augmentation the batch loss draws) from one
  ``torch.Generator`` seeded with ``seed``, so runs are deterministic;
* model selection: after every epoch the validation score (lower is better) is computed, and the
  parameters of the best epoch (or the starting ones, if no epoch beats them) are kept;
* checkpoints: after every epoch, and once at the end, the checkpoint holds the best parameters
  (``state_dict``, what a user exports) and what resuming needs: the last parameters, the optimiser,
  the schedule, the generator, the history and the best state.  ``resume=True`` continues from it;
* a time limit: training stops after the epoch during which it ran out.

The loop writes its summary into the model's ``spec["training"]`` so that the checkpoint and the
exported model file carry it.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from openmm_backmap.io.checkpoints import save_checkpoint

__all__ = ["GRAD_CLIP", "FitSettings", "cosine_schedule", "fit_epochs", "progress_bar"]

GRAD_CLIP = 100.0  # largest gradient norm of a maximum-likelihood step


@dataclass(frozen=True)
class FitSettings:
    """Settings of :func:`fit_epochs`.

    Attributes
    ----------
    epochs, batch_size
        Passes over the training set and frames per step.
    lr, weight_decay
        AdamW settings; the learning rate follows a cosine from ``lr`` to ``lr / 20``.
    seed
        Seeds shuffling and everything the batch loss draws from the loop's generator.
    time_limit
        Stop after this many seconds (finishing the current epoch); None for no limit.
    progress
        Show a progress bar.
    """

    epochs: int = 50
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-5
    seed: int = 0
    time_limit: float | None = None
    progress: bool = True


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar over ``total`` steps (disabled when not ``enabled``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning-rate factor 0.05 + 0.95 (1 + cos(pi s / total_steps)) / 2 at step s: 1 down to 1/20."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / max(total_steps, 1))),
    )


def fit_epochs(
    model: torch.nn.Module,
    n_train: int,
    batch_loss: Callable[[Tensor, torch.Generator], Tensor],
    validate: Callable[[], float],
    settings: FitSettings,
    spec: dict,
    spec_key: str | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    desc: str = "train",
    stage: str = "ml",
) -> dict[str, Any]:
    """Train ``model`` by minibatch gradient descent, keeping the parameters with the best validation score.

    Parameters
    ----------
    model
        The model; after training it holds the best parameters, in eval mode.
    n_train
        Training-set size: each epoch visits a fresh permutation of ``range(n_train)`` in batches.
    batch_loss
        ``batch_loss(indices, generator) -> loss`` for the training frames ``indices``: a scalar to
        minimise (mean negative log-likelihood); random augmentation draws from ``generator``.
    validate
        The validation score of the current parameters (lower is better), called in eval mode.
    settings
        :class:`FitSettings`.
    spec
        The model's checkpoint spec (:mod:`openmm_backmap.io.checkpoints`); the loop records its
        summary in ``spec["training"][spec_key]``, or in ``spec["training"]`` itself when
        ``spec_key`` is None.
    checkpoint, resume
        Write this checkpoint after every epoch and at the end; with ``resume``, continue from it
        when it exists and was written by an unfinished loop.
    desc, stage
        Progress-bar label; the checkpoint's ``stage``.

    Returns
    -------
    dict
        ``history`` (per-epoch ``train_nll``, a running mean of the loss, and ``val_nll``),
        ``best_val_nll``, ``best_epoch`` (-1: the starting parameters), ``epochs``, ``n_train``,
        ``seconds``.

    Raises
    ------
    FloatingPointError
        A training loss is NaN or infinite.
    """
    s = settings
    steps_per_epoch = max(1, math.ceil(n_train / s.batch_size))
    total_steps = s.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    schedule = cosine_schedule(optimizer, total_steps)
    generator = torch.Generator().manual_seed(s.seed)
    history: list[dict] = []
    start_epoch = 0
    saved = _resumable(checkpoint) if resume else None
    if saved is not None:
        model.load_state_dict(saved.get("last_state_dict", saved["state_dict"]))
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["scheduler"])
        generator.set_state(saved["generator"])
        history, best, start_epoch = saved["history"], saved["best"], saved["epoch"] + 1
    else:
        model.eval()
        best = {"val_nll": validate(), "epoch": -1, "state": copy.deepcopy(model.state_dict())}
    torch.manual_seed(s.seed + start_epoch)

    def record(info: dict) -> None:
        if spec_key is None:
            spec["training"] = info
        else:
            spec["training"][spec_key] = info

    def save() -> None:
        # the best parameters for use, the last ones (and the optimiser) to resume from
        save_checkpoint(
            checkpoint,
            best["state"],
            spec,
            last_state_dict=model.state_dict(),
            optimizer=optimizer.state_dict(),
            scheduler=schedule.state_dict(),
            generator=generator.get_state(),
            history=history,
            best=best,
            epoch=history[-1]["epoch"] if history else start_epoch - 1,
            stage=stage,
        )

    start = time.time()
    bar = progress_bar(total_steps, desc, s.progress)
    bar.update(start_epoch * steps_per_epoch)
    for epoch in range(start_epoch, s.epochs):
        model.train()
        order = torch.randperm(n_train, generator=generator)
        running = 0.0
        for b in range(steps_per_epoch):
            loss = batch_loss(order[b * s.batch_size : (b + 1) * s.batch_size], generator)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss at epoch {epoch}, step {b}")
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()
            schedule.step()
            value = float(loss.detach())
            running = 0.9 * running + 0.1 * value if b else value
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{running:.3f}", best_val=f"{best['val_nll']:.3f}")
        model.eval()
        val_nll = validate()
        history.append({"epoch": epoch, "train_nll": running, "val_nll": val_nll})
        if val_nll < best["val_nll"]:
            best = {"val_nll": val_nll, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
        if checkpoint is not None:
            record({"epochs": epoch + 1, "best_val_nll": best["val_nll"], "best_epoch": best["epoch"]})
            save()
        if s.time_limit is not None and time.time() - start > s.time_limit:
            break
    bar.close()
    summary = {
        "history": history,
        "best_val_nll": best["val_nll"],
        "best_epoch": best["epoch"],
        "epochs": len(history),
        "n_train": int(n_train),
        "seconds": time.time() - start,
    }
    record({k: v for k, v in summary.items() if k != "history"})
    if checkpoint is not None:
        save()
    model.load_state_dict(best["state"])
    model.eval()
    return summary


def _resumable(checkpoint: str | Path | None) -> dict | None:
    """The checkpoint dict when ``checkpoint`` exists and an unfinished loop wrote it, else None."""
    if checkpoint is None or not Path(checkpoint).is_file():
        return None
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    return saved if "optimizer" in saved else None  # a finished run has no optimiser state: nothing to resume
