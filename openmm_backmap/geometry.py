"""Internal coordinates: Z-matrices built from the bond graph, NeRF placement and their Jacobians.

Every atom that is not an *anchor* is placed from three already-placed reference atoms ``(j, k, l)``
by a bond length ``r = |x_i - x_j|``, a bond angle ``theta = angle(x_i, x_j, x_k)`` and a dihedral
``phi = dihedral(x_i, x_j, x_k, x_l)``. Anchors are the atoms whose positions are given (CG beads of
a slice mapping, or the pivot atoms of centre-of-mass beads). With no anchors the first three atoms
define the frame (a0 at the origin, a1 on the x axis, a2 in the xy plane) and only the 3n - 6
internal degrees of freedom remain.

Volume elements (Cartesian nm^3 per placed atom): ``dx_i = r^2 sin(theta) dr dtheta dphi``. A bond
held at a constraint length keeps ``r^2 sin(theta) dtheta dphi`` (the surface measure of the sphere
of radius r), so the same log-Jacobian ``2 log r + log sin theta`` is used for constrained and free
bonds; only the density factor over ``r`` is dropped.

This module never imports OpenMM; its torch functions are TorchScript-compatible.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "ZMatrix",
    "bond_length_range",
    "check_box_fits",
    "check_length_scale",
    "build_zmatrix",
    "bond_graph",
    "distances",
    "angles",
    "dihedrals",
    "nerf",
    "ic_log_jacobian",
    "wrap_angle",
    "random_placement",
    "random_rotation",
    "random_rotations",
]


# ----------------------------------------------------------------------------- torch geometry
def _norm(v: Tensor) -> Tensor:
    return torch.sqrt(torch.sum(v * v, dim=-1))


def distances(xi: Tensor, xj: Tensor) -> Tensor:
    """|xi - xj| over the last axis (nm)."""
    return _norm(xi - xj)


def angles(xi: Tensor, xj: Tensor, xk: Tensor) -> Tensor:
    """The angle at ``xj`` between ``xi`` and ``xk`` (radians, in [0, pi])."""
    u = xi - xj
    v = xk - xj
    # atan2 form: accurate near 0 and pi, unlike acos of the cosine
    cross = torch.linalg.cross(u, v, dim=-1)
    return torch.atan2(_norm(cross), torch.sum(u * v, dim=-1))


def dihedrals(xi: Tensor, xj: Tensor, xk: Tensor, xl: Tensor) -> Tensor:
    """Dihedral of the chain ``l - k - j - i`` (radians, in (-pi, pi]), IUPAC sign convention.

    Equal to the usual dihedral(l, k, j, i) = dihedral(i, j, k, l).
    """
    b1 = xk - xl
    b2 = xj - xk
    b3 = xi - xj
    n1 = torch.linalg.cross(b1, b2, dim=-1)
    n2 = torch.linalg.cross(b2, b3, dim=-1)
    y = _norm(b2) * torch.sum(b1 * n2, dim=-1)
    return torch.atan2(y, torch.sum(n1 * n2, dim=-1))


def nerf(xj: Tensor, xk: Tensor, xl: Tensor, r: Tensor, theta: Tensor, phi: Tensor) -> Tensor:
    """Place atom i from references (j, k, l) and (r, theta, phi) (Natural Extension Reference Frame).

    Inverse of (:func:`distances`, :func:`angles`, :func:`dihedrals`): the result has
    ``|x_i - x_j| = r``, ``angle(i, j, k) = theta`` and ``dihedral(i, j, k, l) = phi``.
    """
    bc = xj - xk
    bc = bc / _norm(bc).unsqueeze(-1)
    n = torch.linalg.cross(xk - xl, bc, dim=-1)
    n = n / _norm(n).unsqueeze(-1)
    m = torch.linalg.cross(n, bc, dim=-1)
    a = -r * torch.cos(theta)
    b = r * torch.sin(theta) * torch.cos(phi)
    c = r * torch.sin(theta) * torch.sin(phi)
    return xj + a.unsqueeze(-1) * bc + b.unsqueeze(-1) * m + c.unsqueeze(-1) * n


def ic_log_jacobian(r: Tensor, theta: Tensor) -> Tensor:
    """log |det d x_i / d(r, theta, phi)| = 2 log r + log sin theta, summed over the last axis."""
    return torch.sum(2.0 * torch.log(r) + torch.log(torch.sin(theta)), dim=-1)


def wrap_angle(phi: Tensor) -> Tensor:
    """Wrap angles to [-pi, pi)."""
    return torch.remainder(phi + math.pi, 2.0 * math.pi) - math.pi


# ----------------------------------------------------------------------------- Z-matrix
def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` rotation matrices (n, 3, 3) drawn uniformly from SO(3): QR of Gaussian matrices with
    the signs fixed so that R has positive diagonal in the QR factor and det(R) = +1."""
    q, r = np.linalg.qr(rng.normal(size=(n, 3, 3)))
    q = q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]
    flip = np.linalg.det(q) < 0
    q[flip, :, 0] = -q[flip, :, 0]
    return q


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """One rotation matrix drawn uniformly from SO(3) (see :func:`random_rotations`)."""
    return random_rotations(1, rng)[0]


def random_placement(X: np.ndarray, centre: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``X`` (n, 3) turned by a uniform random rotation about its centroid and moved so that its
    centroid is ``centre`` (3,): the rigid part of an independent proposal for a density invariant
    under rigid motions (the proposal is then symmetric in centroid and orientation)."""
    return (X - X.mean(0)) @ random_rotation(rng).T + centre


def bond_graph(topology) -> list[list[int]]:
    """Adjacency lists of an mdtraj topology's bond graph."""
    nbrs: list[list[int]] = [[] for _ in range(topology.n_atoms)]
    for a, b in topology.bonds:
        nbrs[a.index].append(b.index)
        nbrs[b.index].append(a.index)
    return nbrs


@dataclass
class ZMatrix:
    """A placement plan: anchors, then rows ``(i, j, k, l)`` in an order where refs come first.

    Attributes
    ----------
    n_atoms
        Atoms in the molecule.
    anchors
        Atom indices whose positions are given (may be empty: then ``root`` defines the frame).
    root
        With no anchors, the three frame atoms ``(a0, a1, a2)``: a0 at the origin, a1 on +x bonded
        to a0, a2 in the xy plane bonded to ``root_ref`` (a0 or a1); else empty.
    rows
        (n_rows, 4) int array ``i, j, k, l``; atom i is placed from j (bond), k (angle), l (dihedral).
    levels
        Row indices grouped so that every row's references are anchors, root atoms or atoms of an
        earlier level: rows of one level are placed together.
    fixed_bond
        (n_rows,) bool: the bond i-j is held at a constraint length (``fixed_length``, nm).
    """

    n_atoms: int
    anchors: np.ndarray
    rows: np.ndarray
    levels: list[np.ndarray]
    fixed_bond: np.ndarray
    fixed_length: np.ndarray
    root: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    root_ref: int = -1

    @property
    def n_rows(self) -> int:
        return int(self.rows.shape[0])

    def describe(self, names: Sequence[str] | None = None) -> str:
        lab = (lambda i: names[i]) if names is not None else str
        out = [f"anchors: {[lab(int(a)) for a in self.anchors]}"]
        if self.root.size:
            out.append(f"root: {[lab(int(a)) for a in self.root]}")
        for row, fixed in zip(self.rows, self.fixed_bond):
            i, j, k, m = (int(v) for v in row)
            out.append(f"{lab(i)} <- {lab(j)} {lab(k)} {lab(m)}" + (" (fixed bond)" if fixed else ""))
        return "\n".join(out)


def build_zmatrix(
    neighbours: Sequence[Sequence[int]],
    anchors: Sequence[int],
    heavy: Sequence[bool] | None = None,
    constraints: Sequence[tuple[int, int, float]] | None = None,
) -> ZMatrix:
    """Build a Z-matrix from a bond graph, anchored on ``anchors``.

    Heavy atoms are placed first (breadth first from the anchors), hydrogens after, so that a
    hydrogen's angle and dihedral references are heavy atoms on its own centre where possible:
    the dihedral reference ``l`` is another placed neighbour of ``j`` (an improper-like torsion,
    narrow) when one exists, else a neighbour of ``k`` (a proper torsion), else the nearest placed
    atom in the graph. Components of the graph without an anchor are attached to the nearest placed
    atom by index distance (no bond term then describes a real bond, but the map stays a bijection).

    Parameters
    ----------
    neighbours
        Adjacency lists of the bond graph.
    anchors
        Atoms with given positions. Either none or at least three.
    heavy
        Per-atom flag (non-hydrogen); default all heavy.
    constraints
        ``(i, j, length_nm)`` of constrained pairs; a row whose bond is constrained is marked fixed.
    """
    n = len(neighbours)
    anchors = [int(a) for a in anchors]
    if len(set(anchors)) != len(anchors):
        raise ValueError("anchors contain a repeated atom")
    if 0 < len(anchors) < 3:
        raise ValueError(
            f"a Z-matrix needs no anchors or at least 3 (got {len(anchors)}): with 1 or 2 CG beads "
            "the orientation of the atoms is not defined by the beads"
        )
    if n - len(anchors) > 0 and n < 3:
        raise ValueError("a molecule needs at least 3 atoms")
    heavy = [True] * n if heavy is None else [bool(h) for h in heavy]
    plan = _Placement(neighbours, heavy)
    root, root_ref = ([], -1) if anchors else _frame_atoms(neighbours, heavy)
    for a in anchors + root:
        plan.give(a)
    plan.grow(heavy_only=True)
    plan.grow(heavy_only=False)
    plan.attach_leftovers()
    return _assemble(n, anchors, root, root_ref, plan.rows, constraints)


def _frame_atoms(neighbours: Sequence[Sequence[int]], heavy: list[bool]) -> tuple[list[int], int]:
    """With no anchors: the frame atoms (a0, a1, a2) and a2's bonded reference (a1 or a0).

    a0 is a heavy atom of highest degree, a1 its neighbour, a2 a neighbour of either (heavy first).
    """
    n = len(neighbours)
    a0 = max(range(n), key=lambda a: (heavy[a], len(neighbours[a]), -a))
    cand = sorted(neighbours[a0], key=lambda a: (not heavy[a], a)) or [a for a in range(n) if a != a0]
    a1 = cand[0]
    cand2 = [a for a in neighbours[a1] if a != a0] + [a for a in neighbours[a0] if a != a1]
    cand2 = sorted(set(cand2), key=lambda a: (not heavy[a], a))
    if not cand2:
        cand2 = [a for a in range(n) if a not in (a0, a1)]
    a2 = cand2[0]
    return [a0, a1, a2], (a1 if a2 in neighbours[a1] else a0)


class _Placement:
    """The placement order being built: atoms with known positions, and a row (i, j, k, l) for
    every atom placed from them."""

    def __init__(self, neighbours: Sequence[Sequence[int]], heavy: list[bool]) -> None:
        self.neighbours = neighbours
        self.heavy = heavy
        self.order: dict[int, int] = {}  # atom -> placement rank
        self.rows: list[tuple[int, int, int, int]] = []

    def give(self, atom: int) -> None:
        """An atom whose position is given (an anchor or a frame atom)."""
        self.order[atom] = len(self.order)

    def place(self, i: int, j: int) -> None:
        """Place atom i bonded to the placed atom j, with its angle and dihedral references."""
        k, m = self._refs(i, j)
        self.rows.append((i, j, k, m))
        self.order[i] = len(self.order)

    def grow(self, heavy_only: bool) -> None:
        """Breadth first through the bond graph from the placed atoms (heavy atoms only, or all)."""
        while True:
            frontier = [
                (i, j)
                for j in sorted(self.order, key=self.order.get)
                for i in self.neighbours[j]
                if i not in self.order and (not heavy_only or self.heavy[i])
            ]
            if not frontier:
                return
            self.place(*frontier[0])

    def attach_leftovers(self) -> None:
        """Disconnected components: attach each to the nearest placed atom by index; its own
        neighbours follow through the graph."""
        for i in range(len(self.neighbours)):
            if i in self.order:
                continue
            self.place(i, min(self.order, key=lambda a: (abs(a - i), a)))
            q = deque([i])
            while q:
                u = q.popleft()
                for v in sorted(self.neighbours[u], key=lambda a: (not self.heavy[a], a)):
                    if v not in self.order:
                        self.place(v, u)
                        q.append(v)

    def _graph_distances(self, src: int) -> dict[int, int]:
        dist = {src: 0}
        q = deque([src])
        while q:
            u = q.popleft()
            for v in self.neighbours[u]:
                if v not in dist:
                    dist[v] = dist[u] + 1
                    q.append(v)
        return dist

    def _refs(self, i: int, j: int) -> tuple[int, int]:
        """Angle and dihedral references (k, l) of atom i placed from j: placed neighbours of j
        first (heavy, then early), else of k, else the placed atoms nearest in the graph."""
        n = len(self.neighbours)

        def key(a: int) -> tuple:
            return (not self.heavy[a], self.order[a])

        nj = sorted((a for a in self.neighbours[j] if a in self.order and a != i), key=key)
        dist = self._graph_distances(j)
        far = sorted((a for a in self.order if a not in (i, j)), key=lambda a: (dist.get(a, n + abs(a - j)), key(a)))
        k = nj[0] if nj else far[0]
        others_j = [a for a in nj if a != k]
        if others_j:
            return k, others_j[0]
        nk = sorted((a for a in self.neighbours[k] if a in self.order and a not in (i, j)), key=key)
        if nk:
            return k, nk[0]
        return k, [a for a in far if a != k][0]


def _assemble(
    n: int,
    anchors: list[int],
    root: list[int],
    root_ref: int,
    rows: list[tuple[int, int, int, int]],
    constraints: Sequence[tuple[int, int, float]] | None,
) -> ZMatrix:
    """The :class:`ZMatrix` of placement rows: levels of rows placed together, constrained bonds."""
    cons = {}
    for i, j, length in constraints or ():
        cons[(int(i), int(j))] = float(length)
        cons[(int(j), int(i))] = float(length)
    level = {a: 0 for a in anchors + root}
    row_level = []
    for i, j, k, m in rows:
        level[i] = 1 + max(level[j], level[k], level[m])
        row_level.append(level[i])
    row_level = np.array(row_level, dtype=np.int64)
    levels = [np.flatnonzero(row_level == lv) for lv in sorted(set(row_level.tolist()))]
    return ZMatrix(
        n_atoms=n,
        anchors=np.array(anchors, dtype=np.int64),
        rows=np.array(rows, dtype=np.int64).reshape(-1, 4),
        levels=levels,
        fixed_bond=np.array([(int(i), int(j)) in cons for i, j, _, _ in rows], dtype=bool),
        fixed_length=np.array([cons.get((int(i), int(j)), 0.0) for i, j, _, _ in rows], dtype=np.float64),
        root=np.array(root, dtype=np.int64),
        root_ref=root_ref,
    )


def zmatrix_from_topology(
    topology,
    anchors: Sequence[int],
    constraints: Sequence[tuple[int, int, float]] | None = None,
) -> ZMatrix:
    """:func:`build_zmatrix` on an mdtraj topology (hydrogens recognised by element)."""
    heavy = [a.element is None or a.element.symbol != "H" for a in topology.atoms]
    return build_zmatrix(bond_graph(topology), anchors, heavy, constraints)


# ----------------------------------------------------------------------------- torch module
class InternalCoordinates(torch.nn.Module):
    """Cartesian <-> internal coordinates for a fixed :class:`ZMatrix` (TorchScript-able).

    ``to_internal(x)`` returns ``(r, theta, phi)`` each (B, n_rows) and, with no anchors, the root
    coordinates ``(r01, r2, theta2)`` (B, 3); ``to_cartesian(anchor_xyz, r, theta, phi, root)``
    places the atoms. ``log_jacobian(r, theta, root)`` is log |det dx / d(ic)| over the placed atoms
    (nm^3 per atom), excluding rigid-body motion when there are no anchors.
    """

    def __init__(self, zmatrix: ZMatrix) -> None:
        super().__init__()
        z = zmatrix
        self.n_atoms = int(z.n_atoms)
        self.n_rows = int(z.n_rows)
        self.has_root = bool(z.root.size > 0)
        self.register_buffer("anchors", torch.as_tensor(z.anchors, dtype=torch.long))
        self.register_buffer("rows", torch.as_tensor(z.rows, dtype=torch.long).reshape(-1, 4))
        root = z.root if z.root.size else np.zeros(3, dtype=np.int64)
        self.register_buffer("root", torch.as_tensor(root, dtype=torch.long))
        self.root_ref = int(z.root_ref)
        # whether the third root atom hangs on the second (Python bool: no tensor reads at run time)
        self.root_ref_is_a1 = bool(z.root.size > 0 and int(z.root_ref) == int(root[1]))
        order = np.concatenate(z.levels) if z.levels else np.zeros(0, dtype=np.int64)
        self.register_buffer("level_order", torch.as_tensor(order, dtype=torch.long))
        bounds = [0]
        for lv in z.levels:
            bounds.append(bounds[-1] + int(lv.size))
        self.level_bounds = bounds

    def to_internal(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        xi = x[:, self.rows[:, 0]]
        xj = x[:, self.rows[:, 1]]
        xk = x[:, self.rows[:, 2]]
        xl = x[:, self.rows[:, 3]]
        r = distances(xi, xj)
        theta = angles(xi, xj, xk)
        phi = dihedrals(xi, xj, xk, xl)
        if self.has_root:
            a = x[:, self.root]
            a0, a1, a2 = a[:, 0], a[:, 1], a[:, 2]
            ref = a1 if self.root_ref_is_a1 else a0
            other = a0 if self.root_ref_is_a1 else a1
            root = torch.stack([distances(a1, a0), distances(a2, ref), angles(a2, ref, other)], dim=-1)
        else:
            root = torch.zeros(x.shape[0], 3, dtype=x.dtype, device=x.device)
        return r, theta, phi, root

    def to_cartesian(self, anchor_xyz: Tensor, r: Tensor, theta: Tensor, phi: Tensor, root: Tensor) -> Tensor:
        batch = r.shape[0]
        x = torch.zeros(batch, self.n_atoms, 3, dtype=r.dtype, device=r.device)
        if self.has_root:
            zero = torch.zeros_like(root[:, 0])
            a0 = torch.stack([zero, zero, zero], dim=-1)
            a1 = torch.stack([root[:, 0], zero, zero], dim=-1)
            if self.root_ref_is_a1:
                # a2 bonded to a1, angle a2-a1-a0 = theta2, measured from a1 towards -x
                a2 = torch.stack(
                    [root[:, 0] - root[:, 1] * torch.cos(root[:, 2]), root[:, 1] * torch.sin(root[:, 2]), zero],
                    dim=-1,
                )
            else:
                a2 = torch.stack([root[:, 1] * torch.cos(root[:, 2]), root[:, 1] * torch.sin(root[:, 2]), zero], dim=-1)
            x = x.index_copy(1, self.root, torch.stack([a0, a1, a2], dim=1))
        else:
            x = x.index_copy(1, self.anchors, anchor_xyz)
        for n in range(len(self.level_bounds) - 1):
            lv = self.level_order[self.level_bounds[n] : self.level_bounds[n + 1]]
            rw = self.rows[lv]
            xi = nerf(x[:, rw[:, 1]], x[:, rw[:, 2]], x[:, rw[:, 3]], r[:, lv], theta[:, lv], phi[:, lv])
            x = x.index_copy(1, rw[:, 0], xi)
        return x

    def log_jacobian(self, r: Tensor, theta: Tensor, root: Tensor) -> Tensor:
        out = ic_log_jacobian(r, theta)
        if self.has_root:
            # a1: r01^2 (its direction is rotation); a2: r^2 sin(theta) (its azimuth is rotation)
            out = out + 2.0 * torch.log(root[:, 0]) + 2.0 * torch.log(root[:, 1]) + torch.log(torch.sin(root[:, 2]))
        return out


# ---------------------------------------------------------------------------------------------
# Length-scale checks (coordinates in the wrong unit)
# ---------------------------------------------------------------------------------------------

# Covalent bond lengths of biomolecules, nm: C-H/N-H/O-H about 0.1, heavy atoms 0.12-0.16, S-S 0.2.
COVALENT_BOND_RANGE_NM = (0.08, 0.22)


def bond_length_range(xyz, bonds) -> tuple[float, float]:
    """(shortest, longest) distance between bonded particles over all frames of ``xyz`` (N, n, 3) or
    (n, 3) nm; ``bonds`` are index pairs.  ValueError when there are no bonds."""
    x = np.asarray(xyz, dtype=np.float64).reshape(-1, np.shape(xyz)[-2], 3)
    pairs = np.asarray(list(bonds), dtype=np.int64).reshape(-1, 2)
    if len(pairs) == 0:
        raise ValueError("no bonds to measure")
    r = np.linalg.norm(x[:, pairs[:, 0]] - x[:, pairs[:, 1]], axis=-1)
    return float(r.min()), float(r.max())


def check_length_scale(
    found: tuple[float, float], expected: tuple[float, float], what: str, tolerance: float = 3.0
) -> None:
    """Refuse coordinates whose bond lengths ``found`` (shortest, longest; nm) leave the ``expected``
    range widened by ``tolerance`` either way; the message says when a factor of 10 (Angstrom given
    for nm) explains it.

    Raises
    ------
    ValueError
        Naming ``what``, both ranges and the likely unit error.
    """
    lo, hi = float(expected[0]) / tolerance, float(expected[1]) * tolerance
    if lo <= found[0] and found[1] <= hi:
        return
    message = f"{what}: bond lengths {found[0]:.3g}-{found[1]:.3g} nm, expected {expected[0]:.3g}-{expected[1]:.3g} nm"
    if lo <= found[0] / 10.0 and found[1] / 10.0 <= hi:
        message += "; the coordinates look like Angstrom (10x too large): convert them to nm"
    elif lo <= found[0] * 10.0 and found[1] * 10.0 <= hi:
        message += "; the coordinates look 10x too small (nm given where Angstrom was expected?)"
    else:
        message += " (wrong units, a wrong mapping or broken molecules?)"
    raise ValueError(message)


def check_box_fits(box, longest_bond_nm: float, what: str = "the periodic box") -> None:
    """Refuse a periodic box (3, 3) nm, in OpenMM's reduced form, narrower than twice the longest
    CG bond: molecules are made whole by taking each bond's nearest image, which is only
    unambiguous while every bond is shorter than half the box.

    Raises
    ------
    ValueError
        Naming the narrowest width, the longest bond and the width needed.
    """
    b = np.asarray(box, dtype=np.float64).reshape(3, 3)
    width = float(min(b[0, 0], b[1, 1], b[2, 2]))
    if width < 2.0 * float(longest_bond_nm):
        raise ValueError(
            f"{what} is {width:.3g} nm wide at its narrowest, less than twice the longest CG bond "
            f"({longest_bond_nm:.3g} nm): bonds would be wrapped to shorter images; use a box of at "
            f"least {2.0 * float(longest_bond_nm):.3g} nm (is the box in Angstrom or the wrong size?)"
        )
