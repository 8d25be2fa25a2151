"""Backmapper: a conditional normalizing flow q(x | X) of all-atom coordinates given CG beads.

Construction (split-flows): every CG bead has a *pivot* atom (the bead's atom for a slice mapping,
a central atom of the group for a centre-of-mass bead). The pivots are the anchors of a Z-matrix
built from the bond graph; all other atoms are placed by NeRF from internal coordinates that a
conditional coupling flow generates. For centre-of-mass beads the pivots are first put on the beads
and then every group is shifted rigidly by ``X_I - (M y)_I``, so ``M x = X`` holds exactly; the
shift is a bijection between the internal coordinates and the fibre {x : M x = X} whose
log-Jacobian is zero in the convention p(x) = p(X) q(x | X) (both densities w.r.t. Cartesian nm).

log q(x | X) = log p_base(u) + ladj(flow) + ladj(Cartesian -> internal), in nats w.r.t. Cartesian
nm^(3 n_free_atoms) (constrained bonds: the surface measure at their length). The conditioner sees
SE(3)-invariant features of the beads (pair distances and internal coordinates of a CG Z-matrix,
dihedrals as cos and sin, so mirror images are distinguished); samples are equivariant by
construction and take their chirality from the beads.

No OpenMM here: the module scripts with ``torch.jit.script``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from openmm_backmap.flows.distributions import MixedBase
from openmm_backmap.flows.internal import ICLayer
from openmm_backmap.flows.transforms import CouplingFlow
from openmm_backmap.geometry import (
    COVALENT_BOND_RANGE_NM,
    InternalCoordinates,
    bond_graph,
    bond_length_range,
    build_zmatrix,
    check_length_scale,
    distances,
)

MAX_PAIR_BEADS = 40  # all bead-pair distances are features up to this many beads


class CGFeatures(nn.Module):
    """SE(3)-invariant, parity-sensitive features of a CG configuration (B, n_cg, 3) -> (B, F).

    Features: internal coordinates of a Z-matrix over the CG bond graph (bonds, angles, cos and
    sin of dihedrals, the frame's root coordinates) and, for up to ``MAX_PAIR_BEADS`` beads, all
    pair distances; standardised by statistics fitted on data.
    """

    def __init__(self, neighbours: Sequence[Sequence[int]]) -> None:
        super().__init__()
        n = len(neighbours)
        if n < 3:
            raise ValueError(f"a backmapper needs at least 3 CG beads, got {n}")
        self.ic = InternalCoordinates(build_zmatrix(neighbours, []))
        pairs = np.array([(i, j) for i in range(n) for j in range(i + 1, n)], dtype=np.int64)
        if n > MAX_PAIR_BEADS:
            pairs = np.zeros((0, 2), dtype=np.int64)
        self.register_buffer("pairs", torch.as_tensor(pairs, dtype=torch.long).reshape(-1, 2))
        self.dim = 4 * self.ic.n_rows + 3 + int(pairs.shape[0])
        self.register_buffer("mean", torch.zeros(self.dim))
        self.register_buffer("std", torch.ones(self.dim))

    def raw(self, X: Tensor) -> Tensor:
        r, theta, phi, root = self.ic.to_internal(X)
        d = distances(X[:, self.pairs[:, 0]], X[:, self.pairs[:, 1]])
        return torch.cat([r, theta, torch.cos(phi), torch.sin(phi), root, d], dim=-1)

    @torch.jit.ignore
    def fit(self, X: Tensor) -> None:
        with torch.no_grad():
            f = self.raw(X.to(self.mean.dtype))
            self.mean.copy_(f.mean(0))
            self.std.copy_(torch.clamp(f.std(0), min=1e-3))

    def forward(self, X: Tensor) -> Tensor:
        return (self.raw(X) - self.mean.to(X.dtype)) / self.std.to(X.dtype)


def choose_pivots(mapping) -> np.ndarray:
    """The pivot atom of every bead: its atom for a single-atom bead; for a group, the heavy atom
    most central in the group's bond graph (smallest eccentricity, then heaviest, then lowest index)."""
    top = mapping.topology
    nbrs = bond_graph(top)
    atoms = list(top.atoms)
    pivots = []
    for idx in mapping.groups:
        idx = [int(i) for i in idx]
        if len(idx) == 1:
            pivots.append(idx[0])
            continue
        members = set(idx)
        best = None
        for a in idx:
            dist = {a: 0}
            q = deque([a])
            while q:
                u = q.popleft()
                for v in nbrs[u]:
                    if v in members and v not in dist:
                        dist[v] = dist[u] + 1
                        q.append(v)
            ecc = max(dist.values()) + (len(members) - len(dist)) * len(members)
            mass = atoms[a].element.mass if atoms[a].element is not None else 0.0
            key = (ecc, -mass, a)
            if best is None or key < best[0]:
                best = (key, a)
        pivots.append(best[1])
    return np.array(pivots, dtype=np.int64)


class Backmapper(nn.Module):
    """Conditional flow q(x | X) over all-atom positions x (nm) given CG positions X = M x (nm).

    Parameters
    ----------
    mapping
        The :class:`~openmm_backmap.mapping.CGMapping` (>= 3 beads).
    constraints
        ``(i, j, length_nm)`` pairs held at fixed length (left out of the density).
    temporal
        Also condition on the previous AA frame (``sample_next`` / ``log_prob_next``).
    n_layers, hidden, n_hidden, n_bins
        Coupling layers, MLP width and depth, spline bins.
    seed
        Seed of the coupling masks.

    Call :meth:`fit_statistics` on training positions before training.
    """

    __jit_ignored_attributes__ = ["spec", "zmatrix", "mapping"]

    def __init__(
        self,
        mapping,
        constraints: Sequence[tuple[int, int, float]] | None = None,
        temporal: bool = False,
        n_layers: int = 6,
        hidden: int = 128,
        n_hidden: int = 2,
        n_bins: int = 8,
        seed: int = 0,
        circular: Sequence[bool] | None = None,
        bonds: Sequence[tuple[int, int]] | None = None,
        cg_bonds: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        super().__init__()
        self.mapping = mapping
        if bonds is None:
            bonds = [(a.index, b.index) for a, b in mapping.topology.bonds]
        if cg_bonds is None:
            cg_bonds = mapping.cg_bonds()
        bonds = sorted((min(int(i), int(j)), max(int(i), int(j))) for i, j in bonds)
        cg_bonds = sorted((min(int(i), int(j)), max(int(i), int(j))) for i, j in cg_bonds)
        mapping.check_disjoint("a backmapper")
        self.spec = dict(
            constraints=[[int(i), int(j), float(d)] for i, j, d in (constraints or [])],
            temporal=bool(temporal),
            n_layers=int(n_layers),
            hidden=int(hidden),
            n_hidden=int(n_hidden),
            n_bins=int(n_bins),
            seed=int(seed),
            circular=None if circular is None else [bool(c) for c in circular],
            bonds=[list(b) for b in bonds],
            cg_bonds=[list(b) for b in cg_bonds],
        )
        self.n_aa = int(mapping.n_aa)
        self.n_cg = int(mapping.n_cg)
        self.is_slice = bool(mapping.is_slice)
        self.temporal = bool(temporal)
        pivots = choose_pivots(mapping)
        self.register_buffer("pivots", torch.as_tensor(pivots, dtype=torch.long))
        M = torch.as_tensor(mapping.matrix, dtype=torch.get_default_dtype())
        self.register_buffer("M", M)
        self.register_buffer("S", (M > 0).to(M.dtype))
        nbrs: list[list[int]] = [[] for _ in range(self.n_aa)]
        for i, j in bonds:
            nbrs[i].append(j)
            nbrs[j].append(i)
        heavy = [a.element is None or a.element.symbol != "H" for a in mapping.topology.atoms]
        self.zmatrix = build_zmatrix(nbrs, pivots, heavy, constraints)
        self.ic = ICLayer(self.zmatrix)
        cg_nbrs: list[list[int]] = [[] for _ in range(self.n_cg)]
        for i, j in cg_bonds:
            cg_nbrs[i].append(j)
            cg_nbrs[j].append(i)
        self.cg_features = CGFeatures(cg_nbrs)
        ctx = self.cg_features.dim
        if self.temporal:
            ctx += self.ic.dim + self.ic.n_rows + self.cg_features.dim + 1
        self.context_dim = int(ctx)
        self.dim = int(self.ic.dim)
        circ = torch.zeros(self.dim, dtype=torch.bool)
        if circular is not None:
            if len(circular) != self.dim:
                raise ValueError(f"circular flags for {len(circular)} variables, model has {self.dim}")
            circ = torch.as_tensor([bool(c) for c in circular], dtype=torch.bool)
        self.ic.circular.copy_(circ)
        self.flow = CouplingFlow(circ, ctx, n_layers, n_bins, hidden, n_hidden, seed=seed)
        self.base = MixedBase(circ)

    # ------------------------------------------------------------------ set-up
    @classmethod
    def from_data(cls, mapping, x, **kwargs) -> Backmapper:
        """Build a backmapper whose standardisation and circular dihedrals are fitted on positions
        x (N, n_aa, 3) nm (a numpy array or tensor); keyword arguments as the constructor."""
        x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
        bonds = [(a.index, b.index) for a, b in mapping.topology.bonds]
        if bonds:
            check_length_scale(bond_length_range(x.numpy(), bonds), COVALENT_BOND_RANGE_NM, "the training coordinates")
        probe = cls(mapping, **kwargs).double()
        probe.ic.fit(probe._to_pivot_frame(x, probe.project(x)))
        kwargs["circular"] = probe.ic.circular.tolist()
        model = cls(mapping, **kwargs)
        model.fit_statistics(x)
        return model

    @torch.jit.ignore
    def fit_statistics(self, x: Tensor) -> None:
        """Fit the internal-coordinate and CG-feature standardisation on positions (N, n_aa, 3) nm.

        The circular flags are part of the architecture (constructor argument ``circular``): they
        are kept as constructed.
        """
        x = torch.as_tensor(x, dtype=torch.float64)
        circ = self.ic.circular.clone()
        ic = ICLayer(self.zmatrix).double()
        M, S = self.M.double(), self.S.double()
        X = torch.matmul(M, x)
        # statistics of the coordinates the flow sees: pivots on the beads (split-flows frame)
        y = x if self.is_slice else x - torch.matmul(S.t(), x[:, self.pivots] - X)
        ic.fit(y)
        self.ic.shift.copy_(ic.shift)
        self.ic.scale.copy_(torch.where(circ, torch.ones_like(ic.scale), ic.scale))
        self.cg_features.fit(X)

    # ------------------------------------------------------------------ helpers
    def project(self, x: Tensor) -> Tensor:
        """X = M x for (B, n_aa, 3) positions."""
        return torch.matmul(self.M.to(x.dtype), x)

    def _context(self, cg: Tensor, prev: Tensor, keep: Tensor) -> Tensor:
        c = self.cg_features(cg)
        if self.temporal:
            zp, _ = self.ic(prev)
            pf = torch.cat([self.ic.features(zp), self.cg_features(self.project(prev))], dim=-1)
            k = keep.to(cg.dtype).unsqueeze(-1)
            c = torch.cat([c, pf * k, k], dim=-1)
        return c

    def _to_pivot_frame(self, aa: Tensor, cg: Tensor) -> Tensor:
        # undo the group shifts: pivots onto the beads
        if self.is_slice:
            return aa
        s = aa[:, self.pivots] - cg
        return aa - torch.matmul(self.S.to(aa.dtype).t(), s)

    def _from_pivot_frame(self, y: Tensor, cg: Tensor) -> Tensor:
        if self.is_slice:
            return y
        return y + torch.matmul(self.S.to(y.dtype).t(), cg - self.project(y))

    def _check(self, cg: Tensor) -> None:
        if cg.dim() != 3 or cg.shape[1] != self.n_cg or cg.shape[2] != 3:
            raise ValueError("cg must have shape [B, n_cg, 3] with n_cg = " + str(self.n_cg))

    # ------------------------------------------------------------------ density
    @torch.jit.export
    def to_internal(self, aa: Tensor, cg: Tensor) -> tuple[Tensor, Tensor]:
        """The fibre's standardised internal coordinates z (B, dim) of atoms aa (B, n_aa, 3) given
        the beads cg (B, n_cg, 3), and log |det dz/daa| (B,) w.r.t. the fibre's measure."""
        return self.ic(self._to_pivot_frame(aa, cg))

    @torch.jit.export
    def from_internal(self, z: Tensor, cg: Tensor) -> tuple[Tensor, Tensor]:
        """Inverse of :meth:`to_internal`: atoms (B, n_aa, 3) with M aa = cg, and log |det daa/dz|."""
        y, ladj = self.ic.inverse(z, cg)
        return self._from_pivot_frame(y, cg), ladj

    def _log_prob(self, aa: Tensor, cg: Tensor, context: Tensor) -> Tensor:
        z, ladj_ic = self.to_internal(aa, cg)
        u, ladj_flow = self.flow(z, context)
        return self.base.log_prob(u) + ladj_flow + ladj_ic

    def forward(self, aa: Tensor, cg: Tensor) -> Tensor:
        return self.log_prob(aa, cg)

    @torch.jit.export
    def log_prob(self, aa: Tensor, cg: Tensor) -> Tensor:
        """log q(aa | cg) (nats, Cartesian nm) for aa (B, n_aa, 3), cg (B, n_cg, 3) -> (B,)."""
        self._check(cg)
        keep = torch.zeros(cg.shape[0], dtype=cg.dtype, device=cg.device)
        return self._log_prob(aa, cg, self._context(cg, aa, keep))

    @torch.jit.export
    def log_prob_next(self, aa: Tensor, cg: Tensor, previous_aa: Tensor) -> Tensor:
        """log q(aa | cg, previous AA frame) for a temporal model -> (B,)."""
        self._check(cg)
        if not self.temporal:
            raise RuntimeError("this backmapper was not trained with --temporal")
        keep = torch.ones(cg.shape[0], dtype=cg.dtype, device=cg.device)
        return self._log_prob(aa, cg, self._context(cg, previous_aa, keep))

    # ------------------------------------------------------------------ sampling
    def _sample(self, cg: Tensor, u: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        z, ladj_flow = self.flow.inverse(u, context)
        aa, ladj_ic = self.from_internal(z, cg)
        return aa, self.base.log_prob(u) - ladj_flow - ladj_ic

    @torch.jit.export
    def sample_with_noise(self, cg: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        """Deterministic sampling from given base noise u (B, dim), one sample per CG frame."""
        self._check(cg)
        keep = torch.zeros(cg.shape[0], dtype=cg.dtype, device=cg.device)
        # unused previous frame (keep = 0); zeros give finite features
        dummy = torch.zeros(cg.shape[0], self.n_aa, 3, dtype=cg.dtype, device=cg.device)
        return self._sample(cg, u, self._context(cg, dummy, keep))

    @torch.jit.export
    def sample(self, cg: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """Draw n samples per CG frame: cg (B, n_cg, 3) nm -> aa (B*n, n_aa, 3), log_q (B*n,).

        Samples of frame b are rows b*n ... b*n + n - 1.
        """
        self._check(cg)
        cg_rep = torch.repeat_interleave(cg, n, dim=0)
        u = self.base.sample(cg_rep.shape[0], cg.dtype, cg.device)
        return self.sample_with_noise(cg_rep, u)

    @torch.jit.export
    def sample_next(self, cg: Tensor, previous_aa: Tensor) -> tuple[Tensor, Tensor]:
        """One sample per frame conditioned on the previous AA frame (temporal models):
        cg (B, n_cg, 3), previous_aa (B, n_aa, 3) -> aa (B, n_aa, 3), log_q (B,)."""
        self._check(cg)
        if not self.temporal:
            raise RuntimeError("this backmapper was not trained with --temporal")
        keep = torch.ones(cg.shape[0], dtype=cg.dtype, device=cg.device)
        u = self.base.sample(cg.shape[0], cg.dtype, cg.device)
        return self._sample(cg, u, self._context(cg, previous_aa, keep))

    @torch.jit.export
    def log_prob_train(self, aa: Tensor, cg: Tensor, previous_aa: Tensor, keep: Tensor) -> Tensor:
        """log q with the temporal conditioning switched per row by ``keep`` (0 or 1)."""
        return self._log_prob(aa, cg, self._context(cg, previous_aa, keep))
