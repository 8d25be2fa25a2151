"""Training of CG flow potentials: maximum likelihood of q(X) on CG positions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from openmm_backmap.models.cg_potential import CGFlowPotential
from openmm_backmap.training.loop import FitSettings, fit_epochs


@torch.no_grad()
def mean_nll(model: CGFlowPotential, X: Tensor, batch_size: int = 4096) -> float:
    """Mean -log q(X) (nats per frame) over a data set."""
    total = 0.0
    for s in range(0, X.shape[0], batch_size):
        total += float(-model.log_prob(X[s : s + batch_size]).sum())
    return total / max(int(X.shape[0]), 1)


def train_cg(
    model: CGFlowPotential,
    spec: dict,
    X_train,
    X_val,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 2e-3,
    weight_decay: float = 1e-5,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    time_limit: float | None = None,
) -> dict:
    """Maximum likelihood of the flow q(X) on CG positions, keeping the best validation epoch.

    Parameters
    ----------
    model, spec
        The model (statistics already fitted, e.g. by :meth:`CGFlowPotential.from_data`) and its
        :func:`~openmm_backmap.io.checkpoints.make_cg_spec` dict (its ``training`` entry is filled in).
    X_train, X_val
        CG positions (N, n_cg, 3) nm.
    epochs, batch_size, lr, weight_decay
        AdamW settings; the learning rate follows a cosine from ``lr`` to ``lr / 20``.
    seed
        Seeds the shuffling: runs are deterministic.
    checkpoint
        Write this checkpoint after every epoch (the best parameters so far, and what resuming needs).
    time_limit
        Stop after this many seconds (finishing the current epoch).

    Returns
    -------
    dict
        The summary of :func:`~openmm_backmap.training.loop.fit_epochs` (``history``, ``best_val_nll``,
        ``best_epoch``, ``epochs``, ``n_train``, ``seconds``), also recorded as ``spec["training"]``.
        After training the model holds the parameters of the best validation epoch (or the starting
        ones, when no epoch beats them).
    """
    dtype = model._model_dtype()
    X_tr = torch.as_tensor(np.asarray(X_train), dtype=dtype)
    X_va = torch.as_tensor(np.asarray(X_val), dtype=dtype)
    model._check_batch(X_tr)
    model._check_batch(X_va)
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
        int(X_tr.shape[0]),
        lambda idx, gen: -model.log_prob(X_tr[idx]).mean(),
        lambda: mean_nll(model, X_va),
        settings,
        spec,
        spec_key=None,
        checkpoint=checkpoint,
        desc="train-cg",
        stage="cg",
    )
