"""The joint model q(x) = q(X) q(x | X): a CG flow and a conditional backmapper sampled together.

:class:`JointModel` draws CG configurations X from a :class:`~openmm_backmap.models.cg_potential.CGFlowPotential`
(in the flow's canonical frame: frame beads at the origin, on the x axis and in the xy plane) and
reconstructs atoms x ~ q(x | X) with a :class:`~openmm_backmap.models.backmapper.Backmapper`; its
log density is log q(X) + log q(x | X) in nats w.r.t. Cartesian nm of the atoms, rigid-body motion
left out (the CG flow's density is w.r.t. the 3 n_cg - 6 internal degrees of freedom, the
backmapper's w.r.t. the fibre {x : M x = X}; their sum is a density of x modulo rotations and
translations, which is all an invariant energy sees). The importance log-weight of a sample for
the Boltzmann density exp(-beta U_AA) is therefore

    log w = -beta U_AA(x) - log q(X) - log q(x | X),

which is the reporter's and the hybrid sampler's log w with U_CG = -kT log q(X).

No OpenMM here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from openmm_backmap.models.backmapper import Backmapper
from openmm_backmap.models.cg_potential import CGFlowPotential

__all__ = ["JointCoordinates", "JointModel"]


class JointModel(nn.Module):
    """q(X) q(x | X) from a CG flow ``cg`` and a backmapper ``bm`` of the same beads.

    Parameters
    ----------
    cg
        The CG flow (its ``n_cg`` must equal the backmapper's).
    bm
        The conditional backmapper.
    """

    def __init__(self, cg: CGFlowPotential, bm: Backmapper) -> None:
        super().__init__()
        if int(cg.n_cg) != int(bm.n_cg):
            raise ValueError(f"the CG flow has {cg.n_cg} beads, the backmapper {bm.n_cg}")
        self.cg = cg
        self.bm = bm

    @property
    def dtype(self) -> torch.dtype:
        return self.bm.M.dtype

    def sample_parts(self, n: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """n joint samples: atoms x (n, n_aa, 3) nm, beads X (n, n_cg, 3) nm, log q(X) (n,),
        log q(x | X) (n,) nats; differentiable w.r.t. the parameters (reparameterised)."""
        X, log_qX = self.cg.sample(int(n))
        X = X.to(self.dtype)
        x, log_qx = self.bm.sample(X, 1)
        return x, X, log_qX.to(self.dtype), log_qx

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        """n samples x (n, n_aa, 3) nm and their joint log q (n,) nats."""
        x, _, log_qX, log_qx = self.sample_parts(n)
        return x, log_qX + log_qx

    def log_prob(self, x: Tensor) -> Tensor:
        """log q(M x) + log q(x | M x) (nats) for atoms x (B, n_aa, 3) nm -> (B,)."""
        X = self.bm.project(x)
        return self.cg.log_prob(X.to(self.cg.ic.shift.dtype)).to(x.dtype) + self.bm.log_prob(x, X)


class JointCoordinates:
    """The standardised internal coordinates of a CG flow and a backmapper together: z = (the CG
    flow's z of X = M x, the backmapper's fibre z of x given X).

    A coordinate map for :func:`~openmm_backmap.sampling.annealing.annealed_importance`: every point
    z is a molecule with the System's constrained bonds at their lengths, and log |det dx/dz| refers
    to the measure of :meth:`JointModel.log_prob` (the CG flow's internal degrees of freedom times the
    fibre's), so densities of x and z differ by exactly that term. Positions come out in the CG
    flow's canonical frame. ``bm`` may be a TorchScript backmapper that exports ``to_internal`` and
    ``from_internal``.
    """

    def __init__(self, cg: CGFlowPotential, bm) -> None:
        if not hasattr(bm, "from_internal"):
            raise ValueError(
                "this backmapper has no internal-coordinate map (from_internal): export it again with this "
                "version of openmm-backmap, or give its training checkpoint (.ckpt)"
            )
        self.cg, self.bm = cg, bm
        self.n_cg_dim = int(cg.ic.dim)
        self.bm_dtype = bm.M.dtype
        self.cg_dtype = cg.ic.shift.dtype

    def to_internal(self, x: Tensor) -> Tensor:
        X = self.bm.project(x.to(self.bm_dtype))
        z_cg, _ = self.cg.ic(X.to(self.cg_dtype))
        z_bm, _ = self.bm.to_internal(x.to(self.bm_dtype), X)
        return torch.cat([z_cg.to(x.dtype), z_bm.to(x.dtype)], dim=-1)

    def from_internal(self, z: Tensor) -> tuple[Tensor, Tensor]:
        n = z.shape[0]
        X, ladj_cg = self.cg.ic.inverse(
            z[:, : self.n_cg_dim].to(self.cg_dtype), torch.zeros(n, 0, 3, dtype=self.cg_dtype, device=z.device)
        )
        x, ladj_bm = self.bm.from_internal(z[:, self.n_cg_dim :].to(self.bm_dtype), X.to(self.bm_dtype))
        return x.to(z.dtype), ladj_cg.to(z.dtype) + ladj_bm.to(z.dtype)
