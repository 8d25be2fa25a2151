"""Protein chain models in the hybrid sampler: the proposals and the AA System.

A protein model bound to a chain (:class:`~openmm_backmap.io.backmap_model.ProteinChainModel`)
checks its CG input as a user's chain (no bead gaps, nm); in the hybrid sampler the CG positions are
the CG kernel's own proposals, so :class:`ProposalModel` draws without those checks. Its U_AA is
amber14 + GBn2 on the chain (:func:`protein_system`), with the constrained bond lengths the model's,
so that AA dynamics and the flow's proposals live on the same constraint manifold.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from openmm_backmap.openmm.energies import load_system, model_system

__all__ = ["ProposalModel", "proposal_model", "protein_system"]


class ProposalModel:
    """A loaded protein chain model whose ``sample`` and ``log_prob`` skip the checks of user input:
    the CG kernel's proposals are the sampler's own, and one whose chain is broken (beads too far
    apart) is a proposal that the acceptance test refuses, not an error. Pickles as the model."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def sample(self, cg: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` reconstructions per CG frame (B, n_cg, 3) nm: (aa (B*n, n_aa, 3) nm, log q (B*n,) nats)."""
        with torch.no_grad():
            return self.model.module.sample(cg.to(self.model.device, torch.float32), int(n))

    def log_prob(self, aa: torch.Tensor, cg: torch.Tensor) -> torch.Tensor:
        """log q(aa | cg) (nats) of AA frames (B, n_aa, 3) nm given CG frames (B, n_cg, 3) nm."""
        device = self.model.device
        with torch.no_grad():
            return self.model.module.log_prob(aa.to(device, torch.float32), cg.to(device, torch.float32))


def proposal_model(model: Any) -> Any:
    """What the chains draw from: a protein chain model without the input checks, else the model."""
    from openmm_backmap.io.backmap_model import ProteinChainModel

    return ProposalModel(model) if isinstance(model, ProteinChainModel) else model


def protein_system(bm: Any, aa_system: Any, perm: np.ndarray) -> Any:
    """The AA System of a bound protein model: amber14 + GBn2 on its chain with the constrained
    bond lengths set to the model's (the AA dynamics and the flow's proposals must share the
    constraint manifold), or ``aa_system`` when it lists the atoms in the model's order and has
    the model's constraints."""
    from openmm_backmap.analysis.entropy import check_system

    if aa_system is None:
        system = model_system(bm)
        lengths = {(min(int(i), int(j)), max(int(i), int(j))): float(d) for i, j, d in bm.metadata["constraints"]}
        for c in range(system.getNumConstraints()):
            i, j, _ = system.getConstraintParameters(c)
            key = (min(i, j), max(i, j))
            if key not in lengths:
                raise ValueError(f"amber14 constrains atoms {key} but the model does not: {bm.path} is damaged")
            system.setConstraintParameters(c, i, j, lengths[key])
        check_system(system, bm)
        return system
    if not np.array_equal(perm, np.arange(len(perm))):
        raise ValueError(
            "the start structure lists atoms in another order than the protein model (amber14 template order), "
            "so the AA System (--aa-system, in the start's order) cannot run the model's frames: leave "
            "--aa-system out (amber14 + GBn2 is built on the chain) or start from a structure in the model's "
            "order (the aa.pdb that `openmm-backmap backmap` writes)"
        )
    system = load_system(aa_system)
    check_system(system, bm)
    return system
