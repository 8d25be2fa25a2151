"""A transferable, residue-local conditional flow q(x_AA | X_CG) for peptides and proteins.

Factorisation. Every atom that is not a CG bead is placed by NeRF from three reference atoms and
its internal coordinates (r, theta, phi), in the staged order of
:func:`~openmm_backmap.models.residues.build_tree` (backbone, then side chains of even residues,
then of odd ones). Rows are grouped into *levels*: a row's references and every atom its
conditioner sees lie at lower levels, so

    q(x | X) = prod_rows q(r, theta, phi | context of the row),

and the context of a row depends only on the beads and atoms already placed. In placement tree 3
a row whose atom is bonded to its angle reference k as well (a ``pair`` row) draws the bond length
to k in place of the angle (:func:`pair_angle`), so that no bond follows from other coordinates.
Within a row the dihedral is drawn first and (r, theta) given it, each by a monotone rational-quadratic spline
(circular for broad dihedrals). The conditioner of a row is one MLP shared by all rows of all
residues: it sees the positions of a fixed set of nearby atoms (the nearest placed atoms in the bond
graph, the anchors of residues i-2..i+2, for odd residues the first side-chain atoms of their
even neighbours) and of the ``n_knn`` nearest residue anchors (beads) in the row's own NeRF frame,
plus embeddings of the residue type, atom, row pattern and neighbouring residue types. Features are
coordinates in frames built from placed atoms, so rigid motions of the beads carry over to the
samples exactly, and mirror images are distinguished.

Density convention. log q is in nats w.r.t. Cartesian nm^3 for every placed atom; a bond to a
hydrogen is held at its constraint length (the data use HBonds constraints) and its atom has the
surface measure r^2 sin(theta) dtheta dphi of the sphere of that radius. The beads are copied, so
M x = X holds exactly. Every Jacobian is included: NeRF (2 log r + log sin theta per atom), the
bijections onto the real line (log r, logit(theta / pi), logit of a bounded dihedral) and the
splines.

Chirality. HA and CB are placed by dihedrals about CA-N relative to C that are bounded to
+-``BRANCH_HALF_WIDTH`` around their data mean (likewise the substituents of the C-beta of ILE and
THR), so these centres come out with the handedness of the training data whatever the beads; a
mirror-image CG input still yields L residues (their surroundings mirrored).

Cost. All rows of a level are one batched tensor operation over [frames, rows]; there is no
Python loop over residues or samples. The k-nearest-anchor search is a dense [L, L] distance
matrix per frame (cheap below a few hundred residues, the only part not linear in L).

Complexes. Several chains are bound as one module (:meth:`ProteinBackmapper.for_chains`): each
chain is placed as it would be alone (its own termini and rows), and the nearest anchors a residue
sees include the other chains' (sequence neighbours are excluded within a chain only), so the
packing of chains against each other conditions the reconstruction; chains further apart than the
anchor cutoff are reconstructed with exactly the density each has alone.

No OpenMM here; :class:`ChainBackmapper` scripts with ``torch.jit.script``.
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from openmm_backmap.flows.transforms import rq_spline
from openmm_backmap.geometry import angles, dihedrals, nerf, wrap_angle
from openmm_backmap.models.residues import (
    CAPS,
    MAPPINGS,
    RESIDUE_NAMES,
    TEMPLATES,
    TREE_VERSION,
    Chain,
    Tree,
    bead_atoms,
    build_chain,
    build_chains,
    build_tree,
    canonical_name,
    cap_analog_keys,
    check_tree_version,
    generic_key,
)

FORMAT = "openmm-backmap-protein"
FORMAT_VERSION = 1
BRANCH_HALF_WIDTH = 1.5  # rad: half-width of the interval of a narrow branch dihedral
BRANCH_REACH = 1.0  # rad: a branch dihedral whose data reach beyond this is not bounded narrowly
CIRCULAR_STD = 0.7  # rad: a proper dihedral spreading more than this is circular
CIRCULAR_REACH = 2.6
SPLINE_BOUND = 5.0
LENGTH_SCALE = 0.3  # nm: positions in features are divided by this
LOGP_BLOCK = 8192  # frames x rows per block of log_prob
ATOM_NAMES = sorted({a for atoms, _ in TEMPLATES.values() for a in atoms.split()} | {"H2", "H3", "OXT"})


# ----------------------------------------------------------------------------- statistics
def pair_angle(r: Tensor, th: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """The angle-like coordinate of a ``pair`` row (atom i bonded to j and k) and log |d alpha /
    d theta|: with r = |i - j|, d = |j - k| and theta the angle i-j-k, the bond length
    s = |i - k| = sqrt(r^2 + d^2 - 2 r d cos theta) lies in (|r - d|, r + d), and
    alpha = pi (s - |r - d|) / (r + d - |r - d|) in (0, pi) stands where the angle stands in the
    other rows' coordinates (its logit standardised by the key's statistics). At fixed r and d,
    alpha is monotone in theta."""
    s = torch.sqrt((r * r + d * d - 2.0 * r * d * torch.cos(th)).clamp_min(1e-18))
    lo = torch.abs(r - d)
    width = (r + d - lo).clamp_min(1e-12)
    alpha = math.pi * (s - lo) / width
    # d alpha / d theta = pi (ds/dtheta) / width, ds/dtheta = r d sin(theta) / s
    log_jac = math.log(math.pi) + torch.log(r * d * torch.sin(th)) - torch.log(s) - torch.log(width)
    return alpha, log_jac


def pair_theta(r: Tensor, alpha: Tensor, d: Tensor) -> Tensor:
    """The inverse of :func:`pair_angle`: the angle i-j-k of a ``pair`` row from its r, alpha, d."""
    lo = torch.abs(r - d)
    s = lo + (r + d - lo) * (alpha / math.pi)
    c = (r * r + d * d - s * s) / (2.0 * r * d)
    return torch.acos(c.clamp(-1.0 + 1e-12, 1.0 - 1e-12))


def _raw_values(x: np.ndarray, rows: np.ndarray, pair: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """(r nm, theta rad, phi rad) of every row for positions x (N, n_atoms, 3): each (N, R); for
    ``pair`` rows the angle-like alpha of :func:`pair_angle` stands in place of theta."""
    t = torch.as_tensor(x, dtype=torch.float64)
    i, j, k, m = (torch.as_tensor(rows[:, c]) for c in range(4))
    r = torch.linalg.norm(t[:, i] - t[:, j], dim=-1)
    th = angles(t[:, i], t[:, j], t[:, k])
    ph = dihedrals(t[:, i], t[:, j], t[:, k], t[:, m])
    if pair is not None and pair.any():
        alpha, _ = pair_angle(r, th, torch.linalg.norm(t[:, j] - t[:, k], dim=-1))
        th = torch.where(torch.as_tensor(pair), alpha, th)
    return r.numpy(), th.numpy(), ph.numpy()


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-9, 1 - 1e-9)
    return np.log(p) - np.log1p(-p)


def key_statistics(r: np.ndarray, theta: np.ndarray, phi: np.ndarray, chiral: bool) -> dict:
    """Standardisation of one row key from its samples (1-d arrays): length, angle and dihedral
    shifts/scales, the dihedral's kind and the constraint length (mean r, used when the bond is
    held fixed). A dihedral that sets a chiral centre (``chiral``) is bounded to its mean +-
    ``BRANCH_HALF_WIDTH``; others are circular when they spread, else logit-mapped from the whole
    circle (mean +- pi)."""
    lr = np.log(r)
    lt = _logit(theta / math.pi)
    mu = float(np.arctan2(np.sin(phi).mean(), np.cos(phi).mean()))
    dev = np.remainder(phi - mu + math.pi, 2 * math.pi) - math.pi
    dstd = float(np.sqrt((dev**2).mean()))
    reach = float(np.quantile(np.abs(dev), 0.999)) if dev.size > 20 else float(np.abs(dev).max())
    if chiral and reach < BRANCH_REACH:
        circ, h = False, BRANCH_HALF_WIDTH
    elif dstd > CIRCULAR_STD or reach > CIRCULAR_REACH:
        circ, h = True, math.pi
    else:
        circ, h = False, math.pi
    lp = _logit((dev + h) / (2 * h)) if not circ else np.zeros(1)
    return {
        "r0": float(r.mean()),
        "mr": float(lr.mean()),
        "sr": float(max(lr.std(), 1e-3)),
        "mt": float(lt.mean()),
        "st": float(max(lt.std(), 1e-3)),
        "circ": bool(circ),
        "mu": mu,
        "h": float(h),
        "mp": float(lp.mean()),
        "sp": float(max(lp.std(), 1e-3)),
        "n": int(r.size),
    }


DEFAULT_STATS = {
    "r0": 0.101, "mr": math.log(0.145), "sr": 0.1, "mt": float(_logit(np.array(1.92 / math.pi))),
    "st": 0.3, "circ": True, "mu": 0.0, "h": math.pi, "mp": 0.0, "sp": 1.0, "n": 0,
}  # fmt: skip


# ----------------------------------------------------------------------------- network
class ProteinNet(nn.Module):
    """The shared weights: embeddings, the row conditioner (a two-layer trunk) and spline heads."""

    def __init__(self, n_keys: int, n_ctx: int, n_knn: int, hidden: int = 96, n_bins: int = 8, emb: int = 16) -> None:
        super().__init__()
        self.n_bins = int(n_bins)
        self.n_types = len(RESIDUE_NAMES)
        self.res_emb = nn.Embedding(self.n_types + 1, emb)  # last index: no residue
        self.atom_emb = nn.Embedding(len(ATOM_NAMES), emb)
        self.key_emb = nn.Embedding(n_keys + 1, emb)  # last index: a key unseen in training
        nn.init.zeros_(self.key_emb.weight)
        self.nb_emb = nn.Embedding(self.n_types + 1, 8)
        self.knn_emb = nn.Embedding(self.n_types + 1, 4)
        n_static = emb + 2 * 8 + 3
        n_dyn = 5 * n_ctx + 9 * n_knn
        self.lin_static = nn.Linear(n_static, hidden)
        self.lin_dyn = nn.Linear(n_dyn, hidden, bias=False)
        self.lin2 = nn.Linear(hidden, hidden)
        self.head_phi = nn.Linear(hidden, 3 * n_bins)
        self.lin_rt = nn.Linear(hidden + 2, 64)
        self.head_rt = nn.Linear(64, 2 * 3 * n_bins)
        for head in (self.head_phi, self.head_rt):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def widen(self, hidden: int, init_std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Grow the conditioner to ``hidden`` units in place, leaving every output unchanged: the new
        units of both trunk layers get small random incoming weights (``init_std``) and zero
        outgoing ones, so they carry gradient from the first step of further training but change
        no density until it moves them."""
        old = self.lin2.out_features
        if hidden < old:
            raise ValueError(f"cannot narrow the conditioner from {old} to {hidden} units")
        if hidden == old:
            return
        extra = hidden - old
        like = {"dtype": self.lin2.weight.dtype, "device": self.lin2.weight.device}

        def grown(layer: nn.Linear, rows: int, cols: int) -> nn.Linear:
            """``layer`` with ``rows`` new random outputs and ``cols`` new inputs (appended), the old
            outputs ignoring the new inputs."""
            out = nn.Linear(layer.in_features + cols, layer.out_features + rows, layer.bias is not None, **like)
            with torch.no_grad():
                w = torch.zeros_like(out.weight)
                w[: layer.out_features, : layer.in_features] = layer.weight
                w[layer.out_features :] = init_std * torch.randn(rows, w.shape[1], generator=generator).to(**like)
                out.weight.copy_(w)
                if layer.bias is not None:
                    out.bias.zero_()
                    out.bias[: layer.out_features] = layer.bias
            return out

        def grown_inputs(layer: nn.Linear, first: int, cols: int) -> nn.Linear:
            """``layer`` with ``cols`` zero input columns inserted after its first ``first``."""
            out = nn.Linear(layer.in_features + cols, layer.out_features, layer.bias is not None, **like)
            with torch.no_grad():
                w = layer.weight
                out.weight.copy_(torch.cat([w[:, :first], w.new_zeros(w.shape[0], cols), w[:, first:]], dim=1))
                if layer.bias is not None:
                    out.bias.copy_(layer.bias)
            return out

        self.lin_static = grown(self.lin_static, extra, 0)
        self.lin_dyn = grown(self.lin_dyn, extra, 0)
        self.lin2 = grown(self.lin2, extra, extra)
        self.head_phi = grown_inputs(self.head_phi, old, extra)
        self.lin_rt = grown_inputs(self.lin_rt, old, extra)  # its inputs: hidden, then cos/sin phi

    def static(
        self, res_type: Tensor, atom: Tensor, key: Tensor, prev_type: Tensor, next_type: Tensor, stage: Tensor
    ) -> Tensor:
        """Per-row static part of the first layer, (R, hidden)."""
        e = self.res_emb(res_type) + self.atom_emb(atom) + self.key_emb(key)
        # one-hot of the stage (0, 1, 2) by comparison: traceable, unlike F.one_hot's range check
        s = (stage.unsqueeze(-1) == torch.arange(3, device=stage.device)).to(e.dtype)
        return self.lin_static(torch.cat([e, self.nb_emb(prev_type), self.nb_emb(next_type), s], dim=-1))

    def trunk(self, dyn: Tensor, static: Tensor, weight: Tensor) -> Tensor:
        """Hidden features (..., hidden) of rows from dynamic features ``dyn`` and ``weight``, the
        columns of the first layer's dynamic weight that multiply them (``lin_dyn.weight`` indexed
        by the columns ``dyn`` holds), plus the rest of the first layer's pre-activation ``static``
        (broadcast to (..., hidden))."""
        h = F.silu(F.linear(dyn, weight) + static)
        return F.silu(self.lin2(h))

    def rt_params(self, h: Tensor, phi: Tensor) -> Tensor:
        g = F.silu(self.lin_rt(torch.cat([h, torch.cos(phi).unsqueeze(-1), torch.sin(phi).unsqueeze(-1)], dim=-1)))
        return self.head_rt(g)


def _spline(x: Tensor, p: Tensor, circ: Tensor, inverse: bool, n_bins: int, line_bound: float) -> tuple[Tensor, Tensor]:
    """Rational-quadratic spline of x (..., m) with raw parameters p (..., m, 3 K): on [-pi, pi]
    with equal end slopes where ``circ`` (circular), else on [-line_bound, line_bound] with unit
    end slopes and identity tails."""
    k = n_bins
    wh = p[..., : 2 * k].reshape(p.shape[:-1] + (2, k))
    dd = F.softplus(p[..., 2 * k :] + 0.5413248546129181) + 1e-3  # softplus(.) = 1 at zero input
    edge = torch.where(circ, dd[..., k - 1], torch.ones_like(dd[..., k - 1])).unsqueeze(-1)
    d = torch.cat([edge, dd[..., : k - 1], edge], dim=-1)
    bound = torch.where(circ, torch.full_like(x, math.pi), torch.full_like(x, line_bound))
    return rq_spline(x, wh, d, -bound, bound, inverse)


def _normal(u: Tensor) -> Tensor:
    return -0.5 * u * u - 0.5 * math.log(2.0 * math.pi)


# ----------------------------------------------------------------------------- bound chain module
class ChainBackmapper(nn.Module):
    """q(x | X) for one chain (a sequence and a mapping), sharing the weights of a
    :class:`ProteinBackmapper`. TorchScript-able, with the model-file contract:

    * ``sample(cg[B, n_cg, 3], n) -> (aa[B*n, n_aa, 3], log_q[B*n])`` (samples of frame b are rows
      b*n ... b*n + n - 1),
    * ``log_prob(aa[B, n_aa, 3], cg[B, n_cg, 3]) -> [B]``,
    * ``sample_with_noise(cg[B, n_cg, 3], u[B, R, 3]) -> (aa, log_q)`` (deterministic),

    positions in nm, log q in nats w.r.t. Cartesian nm (hydrogen bonds at constraint length).
    Atoms are in the order of :attr:`atom_names` (amber14 templates).
    """

    __jit_ignored_attributes__ = ["chain", "atom_names", "bead_names", "residue_names", "keys", "order"]

    def __init__(
        self,
        net: ProteinNet,
        chain: Chain,
        mapping: str,
        tables: dict,
        n_knn: int,
        n_ctx: int,
        knn_cutoff: float,
        tree_version: int = TREE_VERSION,
    ) -> None:
        super().__init__()
        self.net = net
        self.chain = chain
        self.mapping = mapping
        self.atom_names = list(chain.atom_names)
        self.residue_names = list(chain.names)
        beads, self.bead_names, bead_res = bead_atoms(chain, mapping)
        tree = build_tree(chain, mapping, tree_version)
        self.keys = tree.keys
        self.n_aa = int(chain.n_atoms)
        self.n_cg = len(beads)
        self.n_res = int(chain.n_residues)
        self.n_knn = int(n_knn)
        self.knn_cutoff = float(knn_cutoff)
        self.n_bins = int(net.n_bins)
        n_rows = int(tree.rows.shape[0])
        # levels: 1 + the highest level among a row's references and context atoms. Rows are
        # visited in order of stage and phase (the tree lists side chains residue by residue, so a
        # stage-2 row may precede the stage-1 rows of the next residue that its context holds);
        # every dependency must already have its level, else sampling would read an unplaced atom
        ctx = _context_atoms(chain, tree, set(beads), n_ctx)
        level = np.zeros(self.n_aa, dtype=np.int64)
        done = np.zeros(self.n_aa, dtype=bool)
        done[beads] = True
        row_level = np.zeros(n_rows, dtype=np.int64)
        for n in tree.placement_order():
            deps = list(tree.rows[n, 1:]) + [a for a in ctx[n] if a >= 0]
            missing = [int(d) for d in deps if not done[d]]
            if missing:
                raise RuntimeError(f"row {tree.keys[n]} depends on atoms {missing} placed after it")
            row_level[n] = 1 + max(level[d] for d in deps)
            level[tree.rows[n, 0]] = row_level[n]
            done[tree.rows[n, 0]] = True
        order = np.argsort(row_level, kind="stable")
        bounds = [0]
        for lv in np.unique(row_level):
            bounds.append(bounds[-1] + int((row_level == lv).sum()))
        self.level_bounds = bounds
        self.order = order
        rows = tree.rows[order]
        ctx = ctx[order]
        owner = tree.owner[order]
        self.register_buffer("beads", torch.as_tensor(beads, dtype=torch.long))
        self.register_buffer("rows", torch.as_tensor(rows, dtype=torch.long))
        self.register_buffer("ctx", torch.as_tensor(np.maximum(ctx, 0), dtype=torch.long))
        # per row: the NeRF references j, k, l, then the context atoms (one gather in _features)
        self.register_buffer("gather_idx", torch.cat([self.rows[:, 1:], self.ctx], dim=1))
        # the first layer's dynamic input lists each point's (x, y, z, distance, mask) in turn, then
        # the anchors' 4-wide type embeddings. Its columns split three ways: the geometry of every
        # point (_features builds it component by component: all x, all y, all z, all distances),
        # the masks of the context atoms (fixed per row: folded into the static part) and the masks
        # and embeddings of the nearest anchors (per residue and frame: once per call)
        n_pts = n_ctx + self.n_knn
        geo = [5 * p + c for c in range(4) for p in range(n_pts)]
        ctx_cols = [5 * p + 4 for p in range(n_ctx)]
        knn_cols = [5 * p + 4 for p in range(n_ctx, n_pts)] + list(range(5 * n_pts, 5 * n_pts + 4 * self.n_knn))
        self.register_buffer("geo_cols", torch.as_tensor(geo, dtype=torch.long))
        self.register_buffer("ctx_mask_cols", torch.as_tensor(ctx_cols, dtype=torch.long))
        self.register_buffer("knn_cols", torch.as_tensor(knn_cols, dtype=torch.long))
        self.register_buffer("ctx_mask", torch.as_tensor(ctx >= 0, dtype=torch.get_default_dtype()))
        self.register_buffer("row_res", torch.as_tensor(owner, dtype=torch.long))
        types = [RESIDUE_NAMES.index(n) for n in chain.names]
        none = len(RESIDUE_NAMES)
        self.register_buffer("res_type", torch.as_tensor(types, dtype=torch.long))
        anchor_bead = [beads.index(chain.anchor(r)) for r in range(self.n_res)]
        self.register_buffer("anchor_bead", torch.as_tensor(anchor_bead, dtype=torch.long))
        res_of_atom = chain.atom_residue[rows[:, 0]]
        self.register_buffer("s_res", torch.as_tensor([types[r] for r in res_of_atom], dtype=torch.long))
        self.register_buffer("s_atom", torch.as_tensor([ATOM_NAMES.index(chain.atom_names[a]) for a in rows[:, 0]]))
        self.register_buffer(
            "s_key", torch.as_tensor([tables["embedding_index"](tree.keys[o]) for o in order], dtype=torch.long)
        )
        # sequence neighbours within a chain (the chains of a complex are not bonded)
        cid = chain.residue_chain
        has_prev = [r > 0 and cid[r - 1] == cid[r] for r in range(self.n_res)]
        has_next = [r + 1 < self.n_res and cid[r + 1] == cid[r] for r in range(self.n_res)]
        self.register_buffer("s_prev", torch.as_tensor([types[r - 1] if has_prev[r] else none for r in owner]))
        self.register_buffer("s_next", torch.as_tensor([types[r + 1] if has_next[r] else none for r in owner]))
        # residues that are not nearest-anchor candidates of each other: within 2 in one chain
        seq = np.arange(self.n_res)
        near = (np.abs(seq[:, None] - seq[None, :]) <= 2) & (cid[:, None] == cid[None, :])
        self.register_buffer("near", torch.as_tensor(near))
        # consecutive residues of one chain (their anchors are about 0.38 nm apart)
        linked = [r for r in range(self.n_res - 1) if has_next[r]]
        self.register_buffer("linked", torch.as_tensor(linked, dtype=torch.long))
        self.register_buffer("s_stage", torch.as_tensor(tree.stage[order], dtype=torch.long))
        st = [tables["lookup"](tree.keys[o]) for o in order]
        dt = torch.get_default_dtype()

        def col(name: str) -> Tensor:
            return torch.as_tensor([float(s[name]) for s in st], dtype=dt)

        self.register_buffer("free", torch.as_tensor(~tree.fixed[order], dtype=torch.bool))
        self.register_buffer("pair", torch.as_tensor(tree.pair[order], dtype=torch.bool))
        self.has_pair = bool(tree.pair.any())  # trees before version 3 have none: skip their maths
        self.register_buffer("r0", col("r0"))
        self.register_buffer("mr", col("mr"))
        self.register_buffer("sr", col("sr"))
        self.register_buffer("mt", col("mt"))
        self.register_buffer("st", col("st"))
        self.register_buffer("circ", torch.as_tensor([bool(s["circ"]) for s in st], dtype=torch.bool))
        self.register_buffer("mu", col("mu"))
        self.register_buffer("hw", col("h"))
        self.register_buffer("mp", col("mp"))
        self.register_buffer("sp", col("sp"))
        self.n_rows = n_rows
        self.length_scale = float(LENGTH_SCALE)
        self.logp_block = int(LOGP_BLOCK)
        self.spline_bound = float(SPLINE_BOUND)

    # ------------------------------------------------------------------ checks
    def _check_cg(self, cg: Tensor) -> None:
        if cg.dim() != 3 or cg.shape[1] != self.n_cg or cg.shape[2] != 3:
            raise ValueError(
                "cg must have shape [B, n_cg, 3] with n_cg = "
                + str(self.n_cg)
                + " beads for this chain, got "
                + str(list(cg.shape))
            )
        if cg.shape[0] > 0 and self.linked.shape[0] > 0:
            a = cg[:, self.anchor_bead]
            d = torch.linalg.norm(a[:, self.linked + 1] - a[:, self.linked], dim=-1)
            far = float(torch.max(d))
            if far > 2.0:
                raise ValueError(
                    "consecutive C-alpha beads are up to " + str(far) + " nm apart (expected about "
                    "0.38 nm): the CG coordinates look like Angstrom; convert them to nm"
                )
            if far > 0.6:
                gap = int(self.linked[int(torch.argmax(torch.max(d, dim=0)[0]))])
                raise ValueError(
                    "C-alpha beads of residues "
                    + str(gap)
                    + " and "
                    + str(gap + 1)
                    + " are "
                    + str(far)
                    + " nm apart (expected about 0.38 nm): a residue is missing from the chain"
                )

    # ------------------------------------------------------------------ features
    def _knn(self, cg: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per residue the n_knn nearest anchors within ``knn_cutoff`` of residues at least 3 apart
        in sequence within a chain (or in another chain): positions coordinate by coordinate
        (3, B, L, k), types (B, L, k), mask (B, L, k)."""
        a = cg[:, self.anchor_bead]
        b = a.shape[0]
        k = self.n_knn
        if k == 0:
            return (
                torch.zeros(3, b, self.n_res, 0, dtype=cg.dtype, device=cg.device),
                torch.zeros(b, self.n_res, 0, dtype=torch.long, device=cg.device),
                torch.zeros(b, self.n_res, 0, dtype=cg.dtype, device=cg.device),
            )
        d = torch.cdist(a, a)
        d = torch.where(self.near.unsqueeze(0), torch.full_like(d, 1e6), d)
        kk = min(k, self.n_res)
        dist, nb = torch.topk(d, kk, dim=-1, largest=False)
        mask = (dist < self.knn_cutoff).to(cg.dtype)
        pos = torch.gather(
            a.unsqueeze(1).expand(b, self.n_res, self.n_res, 3), 2, nb.unsqueeze(-1).expand(b, self.n_res, kk, 3)
        )
        types = self.res_type[nb]
        if kk < k:
            pad = k - kk
            pos = torch.cat([pos, torch.zeros(b, self.n_res, pad, 3, dtype=cg.dtype, device=cg.device)], dim=2)
            types = torch.cat([types, torch.zeros(b, self.n_res, pad, dtype=torch.long, device=cg.device)], dim=2)
            mask = torch.cat([mask, torch.zeros(b, self.n_res, pad, dtype=cg.dtype, device=cg.device)], dim=2)
        return pos.permute(3, 0, 1, 2), types, mask

    def _features(self, x: Tensor, s: int, e: int, knn_pos: Tensor, knn_mask: Tensor) -> Tensor:
        """Geometric features of rows s:e for positions x (B, n_aa, 3): context atoms and nearest
        anchors in each row's NeRF frame, masked, (B, e - s, 4 P) in the first layer's columns
        ``geo_cols`` (x of every point, then y, z and distance). ``knn_pos`` (3, B, L, k) holds the
        nearest anchors coordinate by coordinate.

        The geometry runs on coordinate planes (3, B, ...): every step is elementwise on contiguous
        arrays, where a trailing axis of 3 would make each product and sum a strided, unvectorised
        loop on CPU."""
        b = x.shape[0]
        n = e - s
        xt = x.permute(2, 0, 1)
        # one gather for the three NeRF references and the context atoms of every row
        g = xt.index_select(2, self.gather_idx[s:e].reshape(-1)).reshape(3, b, n, -1)
        xj = g[:, :, :, 0]
        bc = xj - g[:, :, :, 1]
        bc = bc / torch.sqrt(bc[0] * bc[0] + bc[1] * bc[1] + bc[2] * bc[2]).clamp_min(1e-6)
        kl = g[:, :, :, 1] - g[:, :, :, 2]
        nn_ = torch.stack([kl[1] * bc[2] - kl[2] * bc[1], kl[2] * bc[0] - kl[0] * bc[2], kl[0] * bc[1] - kl[1] * bc[0]])
        nn_ = nn_ / torch.sqrt(nn_[0] * nn_[0] + nn_[1] * nn_[1] + nn_[2] * nn_[2]).clamp_min(1e-6)
        mm = torch.stack(
            [nn_[1] * bc[2] - nn_[2] * bc[1], nn_[2] * bc[0] - nn_[0] * bc[2], nn_[0] * bc[1] - nn_[1] * bc[0]]
        )
        res = self.row_res[s:e]
        pts = torch.cat([g[:, :, :, 3:], knn_pos.index_select(2, res)], dim=3)
        mask = torch.cat(
            [self.ctx_mask[s:e].to(x.dtype).unsqueeze(0).expand(b, n, -1), knn_mask.index_select(1, res)], dim=2
        )
        # masked offsets in length units: a masked point's components are exactly zero (the mask is
        # 0 or 1, so folding it into the scale changes no bit of the unmasked ones)
        q = (pts - xj.unsqueeze(-1)) * (mask * (1.0 / self.length_scale))  # (3, B, n, P)
        q0, q1, q2 = q[0], q[1], q[2]
        lx = q0 * bc[0].unsqueeze(-1) + q1 * bc[1].unsqueeze(-1) + q2 * bc[2].unsqueeze(-1)
        ly = q0 * mm[0].unsqueeze(-1) + q1 * mm[1].unsqueeze(-1) + q2 * mm[2].unsqueeze(-1)
        lz = q0 * nn_[0].unsqueeze(-1) + q1 * nn_[1].unsqueeze(-1) + q2 * nn_[2].unsqueeze(-1)
        # + 1e-12: a finite gradient at a masked point (q = 0; a reduction over the leading axis, as
        # linalg.vector_norm(q, dim=0), is several times slower here)
        dist = torch.sqrt(q0 * q0 + q1 * q1 + q2 * q2 + 1e-12) * mask
        return torch.cat([lx, ly, lz, dist], dim=-1)

    def _pre_activation(self, knn_type: Tensor, knn_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The parts of the first layer that do not depend on the rows' geometry: per row the static
        part plus the context-mask columns (R, hidden), per residue and frame the columns of the
        nearest anchors' masks and masked type embeddings (B, L, hidden), and the weight columns
        that multiply the geometry (hidden, 4 P), in the dtype of ``knn_mask``."""
        w = self.net.lin_dyn.weight
        dt = knn_mask.dtype
        static = self._static() + F.linear(self.ctx_mask.to(w.dtype), w.index_select(1, self.ctx_mask_cols))
        kt = self.net.knn_emb(knn_type) * knn_mask.unsqueeze(-1)
        kt = kt.reshape(knn_type.shape[0], knn_type.shape[1], -1).to(dt)
        per_res = F.linear(torch.cat([knn_mask, kt], dim=-1), w.index_select(1, self.knn_cols).to(dt))
        return static.to(dt), per_res, w.index_select(1, self.geo_cols).to(dt)

    def _static(self) -> Tensor:
        return self.net.static(self.s_res, self.s_atom, self.s_key, self.s_prev, self.s_next, self.s_stage)

    # ------------------------------------------------------------------ per-row transforms
    def _to_y(
        self, r: Tensor, th: Tensor, ph: Tensor, d: Tensor, s: int, e: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Raw (r, theta, phi) of rows s:e -> standardised (y_r, y_t, y_p) and the log |det| of that
        map plus the NeRF term -(2 log r + log sin theta) per row (B, n); -inf outside the domain.
        ``d`` (B, n) is the distance j-k, which ``pair`` rows need (:func:`pair_angle`)."""
        dt = r.dtype
        free = self.free[s:e]
        pair = self.pair[s:e]
        lr = torch.log(r)
        y_r = (lr - self.mr[s:e].to(dt)) / self.sr[s:e].to(dt)
        ladj = torch.where(free, -lr - torch.log(self.sr[s:e].to(dt)), torch.zeros_like(lr))
        a = th
        if self.has_pair:
            alpha, log_jac = pair_angle(r, th, d)
            a = torch.where(pair, alpha, th)
            ladj = ladj + torch.where(pair, log_jac, torch.zeros_like(log_jac))
        lt = torch.log(a) - torch.log(math.pi - a)
        y_t = (lt - self.mt[s:e].to(dt)) / self.st[s:e].to(dt)
        ladj = ladj + math.log(math.pi) - torch.log(a) - torch.log(math.pi - a) - torch.log(self.st[s:e].to(dt))
        dev = wrap_angle(ph - self.mu[s:e].to(dt))
        hw = self.hw[s:e].to(dt)
        circ = self.circ[s:e]
        t = torch.clamp((dev + hw) / (2.0 * hw), 1e-12, 1.0 - 1e-12)
        lp = torch.log(t) - torch.log1p(-t)
        y_b = (lp - self.mp[s:e].to(dt)) / self.sp[s:e].to(dt)
        ladj_b = -torch.log(2.0 * hw) - torch.log(t) - torch.log1p(-t) - torch.log(self.sp[s:e].to(dt))
        outside = (torch.abs(dev) >= hw) & ~circ
        ladj_b = torch.where(outside, torch.full_like(ladj_b, -math.inf), ladj_b)
        y_p = torch.where(circ, dev, y_b)
        ladj = ladj + torch.where(circ, torch.zeros_like(ladj_b), ladj_b)
        ladj = ladj - 2.0 * torch.log(torch.where(free, r, self.r0[s:e].to(dt))) - torch.log(torch.sin(th))
        return y_r, y_t, y_p, ladj

    def _from_y(
        self, y_r: Tensor, y_t: Tensor, y_p: Tensor, d: Tensor, s: int, e: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The inverse of :meth:`_to_y` (``d``: the distance j-k of each row, (B, n))."""
        dt = y_r.dtype
        r = torch.where(
            self.free[s:e],
            torch.exp(self.mr[s:e].to(dt) + self.sr[s:e].to(dt) * y_r),
            self.r0[s:e].to(dt).expand_as(y_r),
        )
        a = math.pi * torch.sigmoid(self.mt[s:e].to(dt) + self.st[s:e].to(dt) * y_t)
        th = torch.where(self.pair[s:e], pair_theta(r, a, d), a) if self.has_pair else a
        return r, th, self._phi(y_p, s, e)

    def _phi(self, y_p: Tensor, s: int, e: int) -> Tensor:
        dt = y_p.dtype
        hw = self.hw[s:e].to(dt)
        dev_b = hw * (2.0 * torch.sigmoid(self.mp[s:e].to(dt) + self.sp[s:e].to(dt) * y_p) - 1.0)
        dev = torch.where(self.circ[s:e], y_p, dev_b)
        return wrap_angle(dev + self.mu[s:e].to(dt))

    def _base(self, u_r: Tensor, u_t: Tensor, u_p: Tensor, s: int, e: int) -> Tensor:
        circ = self.circ[s:e]
        lp = torch.where(circ, torch.full_like(u_p, -math.log(2.0 * math.pi)), _normal(u_p))
        lp = torch.where(circ & (torch.abs(u_p) > math.pi), torch.full_like(u_p, -math.inf), lp)
        return lp + _normal(u_t) + torch.where(self.free[s:e], _normal(u_r), torch.zeros_like(u_r))

    # ------------------------------------------------------------------ density
    def forward(self, aa: Tensor, cg: Tensor) -> Tensor:
        return self.log_prob(aa, cg)

    @torch.jit.export
    def log_prob(self, aa: Tensor, cg: Tensor) -> Tensor:
        """log q(aa | cg) (nats) for aa (B, n_aa, 3), cg (B, n_cg, 3) nm -> (B,). The beads of aa
        are taken from cg."""
        return torch.sum(self.row_log_prob(aa, cg), dim=-1)

    @torch.jit.export
    def row_log_prob(self, aa: Tensor, cg: Tensor) -> Tensor:
        """The factors of log q, one per placed atom (B, n_rows), rows in the order of ``rows``."""
        self._check_cg(cg)
        if aa.dim() != 3 or aa.shape[1] != self.n_aa or aa.shape[2] != 3:
            raise ValueError("aa must have shape [B, n_aa, 3] with n_aa = " + str(self.n_aa))
        x = aa.index_copy(1, self.beads, cg)
        knn_pos, knn_type, knn_mask = self._knn(cg)
        e = self.n_rows
        rows = self.rows
        xi = x[:, rows[:, 0]]
        xj = x[:, rows[:, 1]]
        r = torch.linalg.norm(xi - xj, dim=-1)
        xk = x[:, rows[:, 2]]
        th = angles(xi, xj, xk)
        ph = dihedrals(xi, xj, xk, x[:, rows[:, 3]])
        y_r, y_t, y_p, ladj = self._to_y(r, th, ph, torch.linalg.norm(xj - xk, dim=-1), 0, e)
        static, per_res, w_geo = self._pre_activation(knn_type, knn_mask)
        # rows in blocks of about LOGP_BLOCK (frames x rows): the feature arrays of a block stay in
        # cache; every block sees the complete x, so blocks are independent
        step = max(1, self.logp_block // max(1, x.shape[0]))
        parts: list[Tensor] = []
        for s in range(0, e, step):
            t = min(e, s + step)
            pre = static[s:t] + per_res.index_select(1, self.row_res[s:t])
            h = self.net.trunk(self._features(x, s, t, knn_pos, knn_mask), pre, w_geo)
            circ = self.circ[s:t].unsqueeze(0).expand(x.shape[0], t - s)
            u_p, l_p = _spline(y_p[:, s:t], self.net.head_phi(h), circ, False, self.n_bins, self.spline_bound)
            prt = self.net.rt_params(h, ph[:, s:t]).reshape(h.shape[0], t - s, 2, 3 * self.n_bins)
            line = torch.zeros_like(circ).unsqueeze(-1).expand(-1, -1, 2)
            y_rt = torch.stack([y_r[:, s:t], y_t[:, s:t]], dim=-1)
            u_rt, l_rt = _spline(y_rt, prt, line, False, self.n_bins, self.spline_bound)
            l_rt = l_rt[..., 0] * self.free[s:t].to(x.dtype) + l_rt[..., 1]
            parts.append(self._base(u_rt[..., 0], u_rt[..., 1], u_p, s, t) + l_p + l_rt + ladj[:, s:t])
        return torch.cat(parts, dim=1)

    # ------------------------------------------------------------------ sampling
    @torch.jit.export
    def sample_with_noise(self, cg: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        """One sample per frame from base noise u (B, n_rows, 3) = (u_r, u_theta, u_phi) per row
        (u_phi uniform on [-pi, pi] for circular dihedrals, else standard normal)."""
        self._check_cg(cg)
        b = cg.shape[0]
        x = torch.zeros(b, self.n_aa, 3, dtype=cg.dtype, device=cg.device).index_copy(1, self.beads, cg)
        knn_pos, knn_type, knn_mask = self._knn(cg)
        static, per_res, w_geo = self._pre_activation(knn_type, knn_mask)
        logq = torch.zeros(b, dtype=cg.dtype, device=cg.device)
        for n in range(len(self.level_bounds) - 1):
            s = self.level_bounds[n]
            e = self.level_bounds[n + 1]
            pre = static[s:e] + per_res.index_select(1, self.row_res[s:e])
            h = self.net.trunk(self._features(x, s, e, knn_pos, knn_mask), pre, w_geo)
            circ = self.circ[s:e].unsqueeze(0).expand(b, e - s)
            y_p, l_p = _spline(u[:, s:e, 2], self.net.head_phi(h), circ, True, self.n_bins, self.spline_bound)
            # the dihedral itself (not its standardised value) conditions (r, theta)
            ph = self._phi(y_p, s, e)
            prt = self.net.rt_params(h, ph).reshape(b, e - s, 2, 3 * self.n_bins)
            line = torch.zeros_like(circ).unsqueeze(-1).expand(-1, -1, 2)
            y_rt, l_rt = _spline(u[:, s:e, :2], prt, line, True, self.n_bins, self.spline_bound)
            rw = self.rows[s:e]
            xj = x[:, rw[:, 1]]
            xk = x[:, rw[:, 2]]
            d = torch.linalg.norm(xj - xk, dim=-1)
            r, th, ph = self._from_y(y_rt[..., 0], y_rt[..., 1], y_p, d, s, e)
            _, _, _, ladj = self._to_y(r, th, ph, d, s, e)
            l_rt = l_rt[..., 0] * self.free[s:e].to(cg.dtype) + l_rt[..., 1]
            lq = self._base(u[:, s:e, 0], u[:, s:e, 1], u[:, s:e, 2], s, e) - l_p - l_rt + ladj
            logq = logq + torch.sum(lq, dim=-1)
            xi = nerf(xj, xk, x[:, rw[:, 3]], r, th, ph)
            x = x.index_copy(1, rw[:, 0], xi)
        return x, logq

    @torch.jit.export
    def sample_noise(self, b: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Base noise (b, n_rows, 3)."""
        g = torch.randn(b, self.n_rows, 3, dtype=dtype, device=device)
        c = (torch.rand(b, self.n_rows, dtype=dtype, device=device) * 2.0 - 1.0) * math.pi
        return torch.cat([g[..., :2], torch.where(self.circ, c, g[..., 2]).unsqueeze(-1)], dim=-1)

    @torch.jit.export
    def sample(self, cg: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """Draw n samples per frame: cg (B, n_cg, 3) nm -> aa (B*n, n_aa, 3), log_q (B*n,)."""
        self._check_cg(cg)
        rep = torch.repeat_interleave(cg, n, dim=0)
        return self.sample_with_noise(rep, self.sample_noise(rep.shape[0], cg.dtype, cg.device))

    @torch.jit.ignore
    def project(self, aa: Tensor) -> Tensor:
        """X = M x: the bead atoms of aa (B, n_aa, 3)."""
        return aa[:, self.beads]

    @torch.jit.ignore
    def metadata(self) -> dict:
        """Names of atoms, beads and residues of this chain, for a model file's metadata."""
        ch = self.chain
        return {
            "mapping": self.mapping,
            "residue_names": self.residue_names,
            "atom_names": self.atom_names,
            "elements": list(ch.elements),
            "residues": [{"name": n, "atoms": sorted(ch.residue_atoms[r].values())} for r, n in enumerate(ch.names)],
            "bead_names": self.bead_names,
            "bead_atoms": self.beads.tolist(),
            "bonds": [list(b) for b in ch.bonds],
        }


def _context_atoms(chain: Chain, tree, beads: set[int], n_ctx: int) -> np.ndarray:
    """(R, n_ctx) static context atoms of every row (-1 = none): the ``n_ctx - 20`` nearest atoms in
    the bond graph among those available (beads, atoms of earlier stages in residues owner-1 ..
    owner+1, earlier rows of the same stage and owner, for backbone rows of phase 1 the backbone
    atoms of phase 0), the anchors of residues owner-2 .. owner+2, for rows of stage 2 the first
    three side-chain heavy atoms of residues owner-1 and owner+1, and for side-chain rows the
    backbone N, C, O of residues owner-1 .. owner+1 (so a long side chain sees its own and its
    neighbours' peptide groups)."""
    if chain.parts:  # each chain's rows see their own chain (the tree lists the chains in turn)
        out, a0, r0, n0 = [], 0, 0, 0
        for part in chain.parts:
            n1 = n0 + int(np.sum((tree.owner >= r0) & (tree.owner < r0 + part.n_residues)))
            sub = Tree(
                tree.rows[n0:n1] - a0,
                tree.stage[n0:n1],
                tree.owner[n0:n1] - r0,
                tree.keys[n0:n1],
                tree.fixed[n0:n1],
                tree.branch[n0:n1],
                tree.chiral[n0:n1],
                tree.phase[n0:n1],
                tree.pair[n0:n1],
            )
            own = {b - a0 for b in beads if a0 <= b < a0 + part.n_atoms}
            ctx = _context_atoms(part, sub, own, n_ctx)
            out.append(np.where(ctx >= 0, ctx + a0, -1))
            a0, r0, n0 = a0 + part.n_atoms, r0 + part.n_residues, n1
        return np.concatenate(out)
    n_graph = n_ctx - 20
    rows, stage, owner, phase = tree.rows, tree.stage, tree.owner, tree.phase
    n_res = chain.n_residues
    stage_of = np.full(chain.n_atoms, -1, dtype=np.int64)
    stage_of[rows[:, 0]] = stage
    phase_of = np.full(chain.n_atoms, -1, dtype=np.int64)
    phase_of[rows[:, 0]] = phase
    first_heavy: dict[int, list[int]] = {}
    for n in range(rows.shape[0]):
        a = rows[n, 0]
        if stage[n] > 0 and chain.elements[a] != "H" and chain.atom_residue[a] == owner[n]:
            first_heavy.setdefault(int(owner[n]), [])
            if len(first_heavy[int(owner[n])]) < 3:
                first_heavy[int(owner[n])].append(int(a))
    out = np.full((rows.shape[0], n_ctx), -1, dtype=np.int64)
    seen_same: dict[tuple[int, int], list[int]] = {}
    for n in range(rows.shape[0]):
        a, j = int(rows[n, 0]), int(rows[n, 1])
        o, s = int(owner[n]), int(stage[n])
        same = seen_same.setdefault((o, s), [])
        # graph distances from a
        dist = {a: 0}
        queue = deque([a])
        while queue:
            u = queue.popleft()
            if dist[u] >= 6:
                continue
            for v in chain.neighbours[u]:
                if v not in dist:
                    dist[v] = dist[u] + 1
                    queue.append(v)
        cand = []
        for v, dv in dist.items():
            if v in (a, j) or abs(int(chain.atom_residue[v]) - o) > 1:
                continue
            ok = v in beads or (0 <= stage_of[v] < s) or v in same
            ok = ok or (s == 0 and phase[n] == 1 and stage_of[v] == 0 and phase_of[v] == 0)
            if ok:
                cand.append((dv, chain.elements[v] == "H", v))
        cand.sort()
        picked = [v for _, _, v in cand[:n_graph]]
        out[n, : len(picked)] = picked
        col = n_graph
        for off in (-2, -1, 0, 1, 2):
            if 0 <= o + off < n_res:
                out[n, col] = chain.anchor(o + off)
            col += 1
        if s == 2:
            for off in (-1, 1):
                for k, v in enumerate(first_heavy.get(o + off, [])):
                    out[n, col + 3 * (off > 0) + k] = v
        col += 6
        if s > 0:
            for off in (-1, 0, 1):
                for k, name in enumerate(("N", "C", "O")):
                    if 0 <= o + off < n_res and name in chain.residue_atoms[o + off]:
                        v = chain.atom(o + off, name)
                        if v != a and (v in beads or stage_of[v] == 0):
                            out[n, col + 3 * (off + 1) + k] = v
        same.append(a)
    return out


# ----------------------------------------------------------------------------- the transferable model
class ProteinBackmapper(nn.Module):
    """The transferable backmapper: shared weights plus per-row-key standardisation statistics.

    Parameters
    ----------
    mapping
        ``ca`` or ``backbone``.
    stats
        Row key -> statistics (:func:`key_statistics`); fit them with :meth:`fit_statistics`.
    hidden, n_bins, emb, n_ctx, n_knn
        Width of the conditioner, spline bins, embedding size, static context atoms per row
        (at least 24), nearest anchors per residue and their cutoff (nm).
    tree_version
        The placement tree (:func:`~openmm_backmap.models.residues.build_tree`): the current one by
        default; files written before trees had versions hold version 1.
    keys
        Row keys with an embedding of their own (default: the residue-specific keys of ``stats``);
        keys added to the statistics later share the embedding of unseen keys.
    """

    def __init__(
        self,
        mapping: str = "ca",
        stats: dict | None = None,
        hidden: int = 96,
        n_bins: int = 8,
        emb: int = 16,
        n_ctx: int = 26,
        n_knn: int = 6,
        knn_cutoff: float = 1.0,
        keys: Sequence[str] | None = None,
        tree_version: int = TREE_VERSION,
    ) -> None:
        super().__init__()
        check_tree_version(tree_version)
        if mapping not in MAPPINGS:
            raise ValueError(f"unknown protein mapping {mapping!r}; choose one of {', '.join(MAPPINGS)}")
        if n_ctx < 24:
            raise ValueError("n_ctx must be at least 24 (20 fixed slots and 4 graph neighbours)")
        self.mapping = mapping
        self.stats = dict(stats or {})
        self.config = dict(
            mapping=mapping,
            hidden=int(hidden),
            n_bins=int(n_bins),
            emb=int(emb),
            n_ctx=int(n_ctx),
            n_knn=int(n_knn),
            knn_cutoff=float(knn_cutoff),
            tree_version=int(tree_version),
        )
        # the row keys with their own embedding (fixed at construction; later keys share one)
        self.keys = list(keys) if keys is not None else sorted(k for k in self.stats if not k.startswith("*:"))
        self._key_index = {k: i for i, k in enumerate(self.keys)}
        self.net = ProteinNet(len(self.keys), n_ctx, n_knn, hidden, n_bins, emb)
        self._chains: dict[tuple[tuple[str, ...], ...], ChainBackmapper] = {}

    def lookup(self, key: str) -> dict:
        """Statistics of a row key, falling back to the residue-independent key, then to the
        cap-analog keys (:func:`~openmm_backmap.models.residues.cap_analog_keys`, each residue
        specific then independent), then to defaults."""
        for k in (key, *cap_analog_keys(key)):
            for candidate in (k, generic_key(k)):
                if candidate in self.stats:
                    return self.stats[candidate]
        return DEFAULT_STATS

    def add_keys(self, keys: Sequence[str]) -> list[str]:
        """Give row keys that have none an embedding of their own (for training to continue on
        chains whose rows a saved model never had), each starting from the shared embedding of
        unseen keys, so the model's densities are unchanged until training moves them; a ``pair``
        key of tree version 3 (``ALA:N<-1C,CA=,-1CA``) starts from the embedding of the same row
        in earlier trees (``ALA:N<-1C,CA,-1CA``) when the model has it: the row places the same
        atom from the same atoms, its second coordinate a monotone function of the old angle.
        Generic ``*:`` keys and keys that already have one are skipped; returns the keys added."""
        new = [k for k in dict.fromkeys(keys) if not k.startswith("*:") and k not in self._key_index]
        if new:
            weight = self.net.key_emb.weight.data
            unseen = len(self._key_index)
            start = [self._key_index.get(k.replace("=", ""), unseen) for k in new]
            grown = torch.cat([weight[:-1], weight[start], weight[-1:]], dim=0).clone()
            self.net.key_emb = nn.Embedding.from_pretrained(grown, freeze=False)
            self.keys.extend(new)
            self._key_index = {k: i for i, k in enumerate(self.keys)}
            self._chains.clear()
        return new

    def release_bounds(self, stats: dict) -> list[str]:
        """Replace the statistics of keys whose dihedral this model bounds to its narrow branch
        interval while freshly fitted ``stats`` do not (a row no longer classed as setting a chiral
        centre, or data reaching further than ``BRANCH_REACH``): there the model gave valid
        structures no density (log q = -inf). Their densities change; training continues from
        there. Returns the keys replaced."""

        def narrow(v: dict) -> bool:
            return not v["circ"] and v["h"] < math.pi

        released = sorted(k for k, v in self.stats.items() if narrow(v) and k in stats and not narrow(stats[k]))
        if released:
            self.stats.update({k: stats[k] for k in released})
            self._chains.clear()
        return released

    def widen(self, hidden: int, seed: int = 0) -> None:
        """Grow the conditioner to ``hidden`` units without changing any density
        (:meth:`ProteinNet.widen`), for training to continue at a larger width."""
        self.net.widen(int(hidden), generator=torch.Generator().manual_seed(seed))
        self.config["hidden"] = int(hidden)
        self._chains.clear()

    def set_tree_version(self, version: int) -> None:
        """Change the placement tree (:func:`~openmm_backmap.models.residues.build_tree`). Rows the
        new tree has and the model lacks fall back to the statistics and embedding of unseen keys
        until fitted statistics and :meth:`add_keys` give them their own (training with ``--init``)."""
        check_tree_version(version)
        if int(version) != self.config["tree_version"]:
            self.config["tree_version"] = int(version)
            self._chains.clear()

    def embedding_index(self, key: str) -> int:
        """Index of a row key's embedding: its own, else its first cap analog's
        (:func:`~openmm_backmap.models.residues.cap_analog_keys`), else the shared one of unseen keys."""
        index = self._key_index
        for k in (key, *cap_analog_keys(key)):
            if k in index:
                return index[k]
        return len(index)

    def for_sequence(self, residue_names: Sequence[str]) -> ChainBackmapper:
        """The scriptable :class:`ChainBackmapper` of a chain (residue names in order; HIS means HIE;
        no cap means a charged terminus). It shares this model's weights; chains are cached."""
        return self.for_chains([residue_names])

    def for_chains(self, sequences: Sequence[Sequence[str]]) -> ChainBackmapper:
        """The scriptable :class:`ChainBackmapper` of one chain or of a complex of several (one
        sequence of residue names per chain, in the order of their beads; see the module notes on
        complexes). It shares this model's weights; bound chains are cached."""
        key = tuple(tuple(canonical_name(n, i) for i, n in enumerate(seq)) for seq in sequences)
        if key not in self._chains:
            tables = {"embedding_index": self.embedding_index, "lookup": self.lookup}
            self._chains[key] = ChainBackmapper(
                self.net,
                build_chains(key),
                self.mapping,
                tables,
                self.config["n_knn"],
                self.config["n_ctx"],
                self.config["knn_cutoff"],
                self.config["tree_version"],
            )
        return self._chains[key]

    # ------------------------------------------------------------------ statistics
    @staticmethod
    def fit_statistics(
        examples: Sequence[tuple[Sequence[str], np.ndarray]], mapping: str, tree_version: int = TREE_VERSION
    ) -> dict:
        """Row-key statistics from examples (residue names, positions (N, n_atoms, 3) nm in chain
        order) for the trees of ``mapping`` and ``tree_version``; residue-independent ``*:`` keys
        pool every residue as a fallback."""
        pooled: dict[str, list[np.ndarray]] = {}
        branch: dict[str, bool] = {}
        for names, x in examples:
            chain = build_chain(names)
            tree = build_tree(chain, mapping, tree_version)
            r, th, ph = _raw_values(np.asarray(x), tree.rows, tree.pair)
            for n, key in enumerate(tree.keys):
                for k in (key, generic_key(key)):
                    pooled.setdefault(k, []).append(np.stack([r[:, n], th[:, n], ph[:, n]]))
                    branch[k] = bool(tree.chiral[n])
        out = {}
        for k, parts in pooled.items():
            v = np.concatenate(parts, axis=1)
            out[k] = key_statistics(v[0], v[1], v[2], branch[k])
        return out

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path, extra: dict | None = None) -> Path:
        """Write weights, configuration and statistics (format ``openmm-backmap-protein``). The file
        is written beside ``path`` and moved over it when complete, so a killed process or a full
        disk leaves any earlier file at ``path`` intact."""
        path = Path(path)
        state = {
            k: v.detach().to(torch.float32) if v.is_floating_point() else v for k, v in self.net.state_dict().items()
        }
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        record = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": self.config,
            "stats": json.dumps(self.stats),
            "keys": self.keys,
            "state_dict": state,
            "extra": extra or {},
        }
        try:
            torch.save(record, str(partial))
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ProteinBackmapper:
        """Read a file written by :meth:`save`.

        Raises
        ------
        ValueError
            When the file is not a protein backmapper or is of a newer format version.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"protein model file {path} does not exist")
        data = torch.load(str(path), map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path} is not an {FORMAT} file")
        if int(data.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(f"{path}: format version {data['format_version']} is newer than this package reads")
        # files written before trees had versions hold version 1
        config = {"tree_version": 1, **data["config"]}
        model = cls(stats=json.loads(data["stats"]), keys=data["keys"], **config)
        model.net.load_state_dict(data["state_dict"])
        model.info = data.get("extra", {})
        return model


PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "pretrained"


def load_pretrained(name: str) -> ProteinBackmapper:
    """A shipped model by name (``protein-ca``, ``protein-backbone``).

    Raises
    ------
    ValueError
        For a name with no shipped file, listing the names that exist.
    """
    path = PRETRAINED_DIR / f"{name}.pt"
    if not path.is_file():
        have = sorted(p.stem for p in PRETRAINED_DIR.glob("*.pt")) if PRETRAINED_DIR.is_dir() else []
        raise ValueError(f"no pretrained protein model {name!r}; available: {', '.join(have) or 'none'}")
    return ProteinBackmapper.load(path)


__all__ = ["CAPS", "ChainBackmapper", "ProteinBackmapper", "ProteinNet", "load_pretrained"]
