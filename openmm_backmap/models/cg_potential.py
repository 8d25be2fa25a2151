"""CG potentials: a normalizing flow q(X) over CG coordinates, used as U_CG(X) = -kT log q(X) + priors.

The flow acts on the internal coordinates of a Z-matrix over the CG bond graph with no anchors (the
3 n_cg - 6 internal degrees of freedom: bonds, angles, dihedrals and the three root coordinates of
the frame beads), standardised by :class:`~openmm_backmap.flows.internal.ICLayer`; dihedrals that
spread widely are circular variables. ``log q(X)`` is in nats w.r.t. Cartesian nm of those degrees
of freedom (the Jacobian r^2 sin(theta) of every placed bead is included), so exp(-beta U_CG) with
U_CG = -kT log q is, up to a constant, the density the flow learned, and a Langevin simulation of it
samples the flow's ensemble.

Priors cover what the data cannot teach, and are exactly zero inside the range seen in the data so
they do not bias it:

* flat-bottom harmonic walls on every CG bond length and every bond angle outside
  [data min - margin, data max + margin]; angles are also kept at least ``ANGLE_EDGE`` away from 0
  and pi, because the Jacobian's log sin(theta) makes -kT log q fall to -infinity at linear angles;
* a one-sided harmonic repulsion between every pair of beads that is not bonded, under the pair's
  smallest distance in the data minus a margin.

:class:`CGFlowPotential` scripts with ``torch.jit.script``; its ``forward(positions[n, 3]) -> energy``
is openmm-torch's signature, so the exported file runs in :func:`openmm_backmap.openmm.forces.create_force`.
This module never imports OpenMM.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from openmm_backmap.flows.distributions import MixedBase
from openmm_backmap.flows.internal import ICLayer
from openmm_backmap.flows.transforms import CouplingFlow
from openmm_backmap.geometry import angles, build_zmatrix, distances
from openmm_backmap.units import kT as thermal_energy

__all__ = ["ANGLE_EDGE", "DEFAULT_PRIORS", "CGFlowPotential"]

# closest a prior allows a bond angle to 0 or pi (rad), whatever the data range
ANGLE_EDGE = 0.15

DEFAULT_PRIORS: dict[str, float] = {
    "bond_margin_nm": 0.005,
    "angle_margin_rad": 0.1,
    "pair_margin_nm": 0.02,
    "k_bond": 1.0e5,  # kJ/mol/nm^2
    "k_angle": 1.0e3,  # kJ/mol/rad^2
    "k_pair": 1.0e4,  # kJ/mol/nm^2
}


def _graph(n: int, bonds: Sequence[Sequence[int]]) -> tuple[list[list[int]], np.ndarray, np.ndarray, np.ndarray]:
    """Adjacency lists, bonds (nb, 2), angles (na, 3) (i, centre, k) and non-bonded pairs (np, 2)."""
    nbrs: list[list[int]] = [[] for _ in range(n)]
    bond_set = set()
    for i, j in bonds:
        i, j = int(i), int(j)
        if not (0 <= i < n and 0 <= j < n) or i == j:
            raise ValueError(f"bond ({i}, {j}) is not a pair of distinct beads among {n}")
        if (min(i, j), max(i, j)) in bond_set:
            continue
        bond_set.add((min(i, j), max(i, j)))
        nbrs[i].append(j)
        nbrs[j].append(i)
    b = np.array(sorted(bond_set), dtype=np.int64).reshape(-1, 2)
    a = [(i, j, k) for j in range(n) for i in sorted(nbrs[j]) for k in sorted(nbrs[j]) if i < k]
    p = [(i, j) for i in range(n) for j in range(i + 1, n) if (i, j) not in bond_set]
    return (
        nbrs,
        b,
        np.array(a, dtype=np.int64).reshape(-1, 3),
        np.array(p, dtype=np.int64).reshape(-1, 2),
    )


def _outward(bound: Tensor, dtype: torch.dtype, up: bool) -> Tensor:
    """``bound`` in ``dtype``, rounded away from the data so that a float32 bound never cuts into it."""
    b = bound.to(dtype)
    limit = torch.full_like(b, math.inf if up else -math.inf)
    inside = b.double() < bound if up else b.double() > bound
    return torch.where(inside, torch.nextafter(b, limit), b)


def _flat_bottom(v: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """(v - hi)^2 above hi, (lo - v)^2 below lo, zero between; summed over the last axis."""
    return torch.sum(torch.square(torch.relu(lo - v)) + torch.square(torch.relu(v - hi)), dim=-1)


class CGFlowPotential(nn.Module):
    """Flow density q(X) over CG positions and the potential U_CG(X) = -kT log q(X) + priors.

    Parameters
    ----------
    n_cg
        Number of beads (at least 3).
    cg_bonds
        Bead pairs bonded in the CG graph (the Z-matrix follows it; priors are built on it).
    temperature
        Kelvin; U_CG is in kJ/mol at this temperature.
    circular
        Per internal coordinate, whether it is a circular variable (from :meth:`from_data`).
    n_layers, hidden, n_hidden, n_bins
        Coupling layers, MLP width and depth, spline bins.
    seed
        Seed of the coupling masks.
    priors
        Prior settings, keys of :data:`DEFAULT_PRIORS` (margins, force constants in kJ/mol).

    Call :meth:`fit_statistics` (or use :meth:`from_data`) before training: it fits the
    standardisation and the prior bounds on data.
    """

    __jit_ignored_attributes__ = ["spec", "zmatrix"]  # noqa: RUF012 - TorchScript reads this list

    def __init__(
        self,
        n_cg: int,
        cg_bonds: Sequence[Sequence[int]],
        temperature: float = 300.0,
        circular: Sequence[bool] | None = None,
        n_layers: int = 6,
        hidden: int = 64,
        n_hidden: int = 2,
        n_bins: int = 8,
        seed: int = 0,
        priors: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        n_cg = int(n_cg)
        if n_cg < 3:
            raise ValueError(f"a CG flow potential needs at least 3 beads, got {n_cg}")
        pri = dict(DEFAULT_PRIORS)
        for key, value in (priors or {}).items():
            if key not in DEFAULT_PRIORS:
                raise ValueError(f"unknown prior setting {key!r}; known: {', '.join(DEFAULT_PRIORS)}")
            pri[key] = float(value)
        nbrs, bonds, angle_idx, pairs = _graph(n_cg, cg_bonds)
        self.spec: dict[str, Any] = {
            "n_cg": n_cg,
            "cg_bonds": [[int(i), int(j)] for i, j in bonds],
            "temperature": float(temperature),
            "circular": None if circular is None else [bool(c) for c in circular],
            "n_layers": int(n_layers),
            "hidden": int(hidden),
            "n_hidden": int(n_hidden),
            "n_bins": int(n_bins),
            "seed": int(seed),
            "priors": pri,
        }
        self.n_cg = n_cg
        self.temperature = float(temperature)
        self.kT = float(thermal_energy(temperature))
        self.zmatrix = build_zmatrix(nbrs, [])
        self.ic = ICLayer(self.zmatrix)
        self.dim = int(self.ic.dim)
        circ = torch.zeros(self.dim, dtype=torch.bool)
        if circular is not None:
            if len(circular) != self.dim:
                raise ValueError(f"circular flags for {len(circular)} variables, the model has {self.dim}")
            circ = torch.as_tensor([bool(c) for c in circular], dtype=torch.bool)
        self.ic.circular.copy_(circ)
        self.flow = CouplingFlow(circ, 0, n_layers, n_bins, hidden, n_hidden, seed=seed)
        self.base = MixedBase(circ)

        dtype = torch.get_default_dtype()
        self.register_buffer("bond_idx", torch.as_tensor(bonds, dtype=torch.long).reshape(-1, 2))
        self.register_buffer("bond_lo", torch.zeros(len(bonds), dtype=dtype))
        self.register_buffer("bond_hi", torch.full((len(bonds),), math.inf, dtype=dtype))
        self.register_buffer("angle_idx", torch.as_tensor(angle_idx, dtype=torch.long).reshape(-1, 3))
        self.register_buffer("angle_lo", torch.full((len(angle_idx),), ANGLE_EDGE, dtype=dtype))
        self.register_buffer("angle_hi", torch.full((len(angle_idx),), math.pi - ANGLE_EDGE, dtype=dtype))
        self.register_buffer("pair_idx", torch.as_tensor(pairs, dtype=torch.long).reshape(-1, 2))
        self.register_buffer("pair_min", torch.zeros(len(pairs), dtype=dtype))
        self.k_bond = float(pri["k_bond"])
        self.k_angle = float(pri["k_angle"])
        self.k_pair = float(pri["k_pair"])

    # ------------------------------------------------------------------ set-up
    @classmethod
    def from_data(
        cls, X, cg_bonds: Sequence[Sequence[int]], circular_spread: float | None = None, **kwargs
    ) -> CGFlowPotential:
        """A potential whose circular flags, standardisation and prior bounds are fitted on CG
        positions X (N, n_cg, 3) nm (numpy array or tensor); keyword arguments as the constructor.

        ``circular_spread`` (rad): also model as circular every dihedral whose spread on X exceeds
        it. By default only dihedrals that spread widely are circular, and a torsion seen in one
        basin (phi of alanine dipeptide in 300 K MD) is a line variable standardised by its spread:
        the flow then cannot grow a basin across the barrier (it lies beyond the splines' bound),
        which the cycle's refits need to do.
        """
        X = torch.as_tensor(np.asarray(X), dtype=torch.float64)
        if X.dim() != 3 or X.shape[-1] != 3:
            raise ValueError(f"CG positions must have shape (N, n_cg, 3), got {tuple(X.shape)}")
        kwargs.pop("n_cg", None)
        probe = cls(int(X.shape[1]), cg_bonds, **kwargs)
        probe.ic.double().fit(X)
        circular = probe.ic.circular.clone()
        if circular_spread is not None:
            circular |= (probe.ic.kind == 2) & (probe.ic.scale > float(circular_spread))
        kwargs["circular"] = circular.tolist()
        model = cls(int(X.shape[1]), cg_bonds, **kwargs)
        model.fit_statistics(X)
        return model

    @torch.jit.ignore
    def fit_statistics(self, X: Tensor) -> None:
        """Fit the internal-coordinate standardisation and the prior bounds on positions (N, n_cg, 3) nm.

        The circular flags are part of the architecture and are kept as constructed.
        """
        X = torch.as_tensor(X, dtype=torch.float64)
        self._check_batch(X)
        circ = self.ic.circular.clone()
        ic = ICLayer(self.zmatrix).double()
        ic.fit(X)
        self.ic.shift.copy_(ic.shift)
        self.ic.scale.copy_(torch.where(circ, torch.ones_like(ic.scale), ic.scale))
        self.fit_priors(X)

    @torch.jit.ignore
    def fit_priors(self, X: Tensor) -> None:
        """Fit the prior bounds (bond and angle walls, pair repulsion) on positions (N, n_cg, 3) nm,
        leaving the flow and its standardisation unchanged (e.g. on the flow's own samples)."""
        X = torch.as_tensor(X, dtype=torch.float64)
        self._check_batch(X)
        pri = self.spec["priors"]
        with torch.no_grad():
            if self.bond_idx.shape[0]:
                r = distances(X[:, self.bond_idx[:, 0]], X[:, self.bond_idx[:, 1]])
                lo = torch.clamp(r.min(0).values - pri["bond_margin_nm"], min=0.0)
                self.bond_lo.copy_(_outward(lo, self.bond_lo.dtype, up=False))
                self.bond_hi.copy_(_outward(r.max(0).values + pri["bond_margin_nm"], self.bond_hi.dtype, up=True))
            if self.angle_idx.shape[0]:
                a = self._angles(X)
                amin, amax = a.min(0).values, a.max(0).values
                # never tighter than the data, never closer to 0 or pi than ANGLE_EDGE unless the data are
                lo = torch.minimum(torch.clamp(amin - pri["angle_margin_rad"], min=ANGLE_EDGE), amin)
                hi = torch.maximum(torch.clamp(amax + pri["angle_margin_rad"], max=math.pi - ANGLE_EDGE), amax)
                self.angle_lo.copy_(_outward(lo, self.angle_lo.dtype, up=False))
                self.angle_hi.copy_(_outward(hi, self.angle_hi.dtype, up=True))
            if self.pair_idx.shape[0]:
                d = distances(X[:, self.pair_idx[:, 0]], X[:, self.pair_idx[:, 1]])
                dmin = torch.clamp(d.min(0).values - pri["pair_margin_nm"], min=0.0)
                self.pair_min.copy_(_outward(dmin, self.pair_min.dtype, up=False))

    @torch.jit.ignore
    def prior_parameters(self) -> dict[str, Any]:
        """The prior settings and the fitted bounds, JSON-serialisable (nm, rad, kJ/mol)."""
        out: dict[str, Any] = dict(self.spec["priors"])
        out["angle_edge_rad"] = ANGLE_EDGE
        out["bonds"] = [
            [int(i), int(j), float(lo), float(hi)]
            for (i, j), lo, hi in zip(self.bond_idx.tolist(), self.bond_lo.tolist(), self.bond_hi.tolist())
        ]
        out["angles"] = [
            [int(i), int(j), int(k), float(lo), float(hi)]
            for (i, j, k), lo, hi in zip(self.angle_idx.tolist(), self.angle_lo.tolist(), self.angle_hi.tolist())
        ]
        out["pairs"] = [[int(i), int(j), float(d)] for (i, j), d in zip(self.pair_idx.tolist(), self.pair_min.tolist())]
        return out

    # ------------------------------------------------------------------ helpers
    def _check_batch(self, X: Tensor) -> None:
        if X.dim() != 3 or X.shape[1] != self.n_cg or X.shape[2] != 3:
            raise ValueError(
                "CG positions must have shape [B, n_cg, 3] with n_cg = "
                + str(self.n_cg)
                + ", got "
                + str(list(X.shape))
            )

    def _model_dtype(self) -> torch.dtype:
        return self.ic.shift.dtype

    def _angles(self, X: Tensor) -> Tensor:
        return angles(X[:, self.angle_idx[:, 0]], X[:, self.angle_idx[:, 1]], X[:, self.angle_idx[:, 2]])

    def _context(self, X: Tensor) -> Tensor:
        return torch.zeros(X.shape[0], 0, dtype=X.dtype, device=X.device)

    # ------------------------------------------------------------------ densities and energies
    def _log_prob(self, X: Tensor) -> Tensor:
        z, ladj_ic = self.ic(X)
        u, ladj_flow = self.flow(z, self._context(X))
        return self.base.log_prob(u) + ladj_flow + ladj_ic

    @torch.jit.export
    def log_prob(self, X: Tensor) -> Tensor:
        """log q(X) (nats w.r.t. Cartesian nm of the 3 n_cg - 6 internal degrees of freedom) for
        X (B, n_cg, 3) nm -> (B,). Rigid motions do not change it."""
        self._check_batch(X)
        X = X.to(self._model_dtype())
        # Two copies of one graph (see energy): TorchScript's profiling executor otherwise drops
        # the gradient w.r.t. X after it has run this method on an X without requires_grad.
        if X.requires_grad:
            return self._log_prob(X)
        return self._log_prob(X)

    @torch.jit.export
    def prior_energy(self, X: Tensor) -> Tensor:
        """The prior terms (kJ/mol) for X (B, n_cg, 3) nm -> (B,); zero inside the data range."""
        self._check_batch(X)
        return self._prior_energy(X.to(self._model_dtype()))

    def _prior_energy(self, X: Tensor) -> Tensor:
        e = torch.zeros(X.shape[0], dtype=X.dtype, device=X.device)
        if self.bond_idx.shape[0] > 0:
            r = distances(X[:, self.bond_idx[:, 0]], X[:, self.bond_idx[:, 1]])
            e = e + self.k_bond * _flat_bottom(r, self.bond_lo.to(X.dtype), self.bond_hi.to(X.dtype))
        if self.angle_idx.shape[0] > 0:
            a = self._angles(X)
            e = e + self.k_angle * _flat_bottom(a, self.angle_lo.to(X.dtype), self.angle_hi.to(X.dtype))
        if self.pair_idx.shape[0] > 0:
            d = distances(X[:, self.pair_idx[:, 0]], X[:, self.pair_idx[:, 1]])
            e = e + self.k_pair * torch.sum(torch.square(torch.relu(self.pair_min.to(X.dtype) - d)), dim=-1)
        return e

    def _energy(self, X: Tensor) -> Tensor:
        return -self.kT * self._log_prob(X) + self._prior_energy(X)

    @torch.jit.export
    def energy(self, X: Tensor) -> Tensor:
        """U_CG(X) = -kT log q(X) + priors (kJ/mol) for X (B, n_cg, 3) nm -> (B,)."""
        self._check_batch(X)
        X = X.to(self._model_dtype())
        # The same graph in both branches on purpose. TorchScript's profiling executor specialises
        # a method on the first calls' requires_grad flags; once it has seen positions without
        # requires_grad (an energy-only evaluation, e.g. OpenMM asking for the energy alone), it
        # silently loses the gradient w.r.t. the positions in later calls. Branching on the flag
        # gives each case its own profiled copy, so forces stay exact whatever the call order.
        if X.requires_grad:
            return self._energy(X)
        return self._energy(X)

    def forward(self, positions: Tensor) -> Tensor:
        """openmm-torch's signature: positions (n_cg, 3) nm -> energy (kJ/mol), a 0-d tensor."""
        if positions.dim() != 2 or positions.shape[0] != self.n_cg or positions.shape[1] != 3:
            raise ValueError(
                "positions must have shape [n_cg, 3] with n_cg = "
                + str(self.n_cg)
                + ", got "
                + str(list(positions.shape))
            )
        X = positions.to(self._model_dtype()).unsqueeze(0)
        if X.requires_grad:
            return self._energy(X)[0]
        return self._energy(X)[0]

    @torch.jit.export
    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        """Draw n configurations from the flow: X (n, n_cg, 3) nm (frame beads at the origin, on
        the x axis and in the xy plane), log q (n,) nats. The priors are not applied."""
        dtype = self._model_dtype()
        device = self.ic.shift.device
        u = self.base.sample(n, dtype, device)
        ctx = torch.zeros(n, 0, dtype=dtype, device=device)
        z, ladj_flow = self.flow.inverse(u, ctx)
        X, ladj_ic = self.ic.inverse(z, torch.zeros(n, 0, 3, dtype=dtype, device=device))
        return X, self.base.log_prob(u) - ladj_flow - ladj_ic
