"""Bijections: monotone rational-quadratic splines and conditional coupling layers.

Every transform returns its output together with the log-absolute-determinant of its Jacobian
(``call_and_ladj``) so no layer computes a quantity twice. Direction convention: ``forward`` maps
data-side variables to base-side variables (density evaluation), ``inverse`` maps base to data
(sampling); the ladj of ``inverse`` is that of the inverse map, so ``forward`` and ``inverse`` log-dets
cancel on a round trip.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from openmm_backmap.flows.nn import MLP

# log(e - 1) = 0.5413...: softplus of it is 1, so a zero-initialised network gives unit slopes
_SOFTPLUS_ONE = math.log(math.e - 1.0)


def rq_spline(
    x: Tensor,
    wh: Tensor,
    d: Tensor,
    left: Tensor,
    right: Tensor,
    inverse: bool,
    min_bin: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    """Monotone rational-quadratic spline on [left, right] (Durkan et al. 2019), identity outside.

    Parameters
    ----------
    x
        (..., m) inputs.
    wh
        (..., m, 2, K) unnormalised bin widths ([..., 0, :]) and heights ([..., 1, :]),
        softmax-normalised here.
    d
        (..., m, K + 1) positive knot derivatives (boundary derivatives included).
    left, right
        (m,) interval ends; the spline maps [left, right] onto itself.
    inverse
        Evaluate the inverse spline.

    Returns
    -------
    y, ladj
        Outputs (..., m) and elementwise log |dy/dx| (..., m) (of the inverse when ``inverse``).
    """
    n_bins = wh.shape[-1]
    span = (right - left).unsqueeze(-1).unsqueeze(-1)
    bins = min_bin + (1.0 - min_bin * n_bins) * F.softmax(wh, dim=-1)
    # knots (..., m, 2, K + 1): x knots in [..., 0, :], y knots in [..., 1, :]; knot j is the sum of
    # bins i < j, written as a product with a constant 0/1 matrix rather than pad(cumsum): compiled
    # (AOTInductor) it becomes generated code, where cumsum stays a library call
    below = torch.triu(torch.ones(n_bins, n_bins + 1, dtype=bins.dtype, device=bins.device), diagonal=1)
    knots_xy = torch.matmul(bins, below) * span + left.unsqueeze(-1).unsqueeze(-1)
    cw = knots_xy[..., 0, :]
    ch = knots_xy[..., 1, :]

    inside = (x >= left) & (x <= right)
    xc = torch.minimum(torch.maximum(x, left), right)
    knots = ch if inverse else cw
    idx = torch.sum((xc.unsqueeze(-1) >= knots[..., 1:n_bins]).to(torch.long), dim=-1, keepdim=True)

    # the bin's left and right knots (x and y in one gather) and slopes for every input
    pick = torch.cat([idx, idx + 1], dim=-1)  # (..., m, 2)
    ends = torch.gather(knots_xy, -1, pick.unsqueeze(-2).expand(knots_xy.shape[:-1] + (2,)))  # (..., m, 2, 2)
    slopes = torch.gather(d, -1, pick)
    x_k, x_k1 = ends[..., 0, 0], ends[..., 0, 1]
    y_k, y_k1 = ends[..., 1, 0], ends[..., 1, 1]
    d_k, d_k1 = slopes[..., 0], slopes[..., 1]
    wk = x_k1 - x_k
    hk = y_k1 - y_k
    s = hk / wk

    if inverse:
        dy = xc - y_k
        t = d_k1 + d_k - 2.0 * s
        a = hk * (s - d_k) + dy * t
        b = hk * d_k - dy * t
        c = -s * dy
        disc = torch.clamp(b * b - 4.0 * a * c, min=0.0)
        xi = (2.0 * c) / (-b - torch.sqrt(disc))
        xi = torch.clamp(xi, 0.0, 1.0)
        y_in = xi * wk + x_k
    else:
        xi = (xc - x_k) / wk
        xi = torch.clamp(xi, 0.0, 1.0)
        num = hk * (s * xi * xi + d_k * xi * (1.0 - xi))
        den0 = s + (d_k1 + d_k - 2.0 * s) * xi * (1.0 - xi)
        y_in = y_k + num / den0
    om = 1.0 - xi
    den = s + (d_k1 + d_k - 2.0 * s) * xi * om
    dnum = s * s * (d_k1 * xi * xi + 2.0 * s * xi * om + d_k * om * om)
    ladj_in = torch.log(dnum) - 2.0 * torch.log(den)
    if inverse:
        ladj_in = -ladj_in
    y = torch.where(inside, y_in, x)
    ladj = torch.where(inside, ladj_in, torch.zeros_like(ladj_in))
    return y, ladj


class CouplingLayer(nn.Module):
    """Conditional coupling layer with rational-quadratic splines.

    The variables ``tr_idx`` are transformed by splines whose parameters an MLP computes from the
    variables ``id_idx`` (kept unchanged) and a context vector. Line variables use a spline on
    [-bound, bound] with identity tails; circular variables (angles on [-pi, pi)) use a circular
    spline on [-pi, pi] whose two boundary slopes are equal, so the density is smooth on the circle.

    The conditioner sees line variables as values (clamped to +-3 bound) and circular ones as
    (cos, sin).
    """

    def __init__(
        self,
        circular: Tensor,
        tr_idx: Tensor,
        context_dim: int,
        n_bins: int = 8,
        hidden: int = 128,
        n_hidden: int = 2,
        bound: float = 5.0,
    ) -> None:
        super().__init__()
        circular = torch.as_tensor(circular, dtype=torch.bool)
        dim = int(circular.numel())
        tr = torch.as_tensor(tr_idx, dtype=torch.long)
        mask = torch.zeros(dim, dtype=torch.bool)
        mask[tr] = True
        idn = torch.arange(dim)[~mask]
        self.register_buffer("tr_idx", tr)
        self.register_buffer("id_idx", idn)
        id_circ = circular[idn]
        self.register_buffer("id_line", idn[~id_circ])
        self.register_buffer("id_circ", idn[id_circ])
        tr_circ = circular[tr]
        self.register_buffer("tr_circ", tr_circ)
        self.register_buffer("left", torch.where(tr_circ, -math.pi, -bound).to(torch.get_default_dtype()))
        self.register_buffer("right", torch.where(tr_circ, math.pi, bound).to(torch.get_default_dtype()))
        self.n_bins = int(n_bins)
        k = int(n_bins)
        # knot j takes derivative output knot_map[j]: the boundary output (k - 1) at both ends
        self.register_buffer(
            "knot_map", torch.as_tensor([k - 1] + list(range(k - 1)) + [k - 1], dtype=torch.long), persistent=False
        )
        last = torch.zeros(tr.numel(), k, dtype=torch.bool)
        last[:, k - 1] = ~tr_circ
        self.register_buffer("edge_is_one", last, persistent=False)
        self.n_tr = int(tr.numel())
        self.bound = float(bound)
        n_in = int(self.id_line.numel()) + 2 * int(self.id_circ.numel()) + int(context_dim)
        self.net = MLP(max(n_in, 1), self.n_tr * 3 * self.n_bins, hidden, n_hidden)
        self.has_input = n_in > 0

    def _params(self, z: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        line = torch.clamp(z[:, self.id_line], -3.0 * self.bound, 3.0 * self.bound)
        circ = z[:, self.id_circ]
        feats = torch.cat([line, torch.cos(circ), torch.sin(circ), context], dim=-1)
        if not self.has_input:
            feats = torch.ones(z.shape[0], 1, dtype=z.dtype, device=z.device)
        p = self.net(feats).reshape(z.shape[0], self.n_tr, 3, self.n_bins)
        wh = p[:, :, :2, :]
        # K derivative outputs: K - 1 inner knots, then the boundary slope (used by circular
        # splines at both ends; line splines have slope 1 there, matching their identity tails)
        dd = F.softplus(p[:, :, 2, :] + 0.5413248546129181) + 1e-3
        dd = torch.where(self.edge_is_one, torch.ones_like(dd), dd)
        d = dd.index_select(-1, self.knot_map)
        return wh, d

    def call_and_ladj(self, z: Tensor, context: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        wh, d = self._params(z, context)
        left = self.left.to(z.dtype)
        right = self.right.to(z.dtype)
        y, ladj = rq_spline(z[:, self.tr_idx], wh, d, left, right, inverse)
        out = z.index_copy(1, self.tr_idx, y)
        return out, torch.sum(ladj, dim=-1)

    def forward(self, z: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        return self.call_and_ladj(z, context, False)


class CouplingFlow(nn.Module):
    """A stack of :class:`CouplingLayer` with alternating halves of fixed random permutations.

    ``forward(z, c) -> (u, ladj)`` maps data-side to base-side variables; ``inverse(u, c) -> (z,
    ladj)`` samples. With ``context_dim = 0`` pass a (B, 0) context: the flow is unconditional.
    """

    def __init__(
        self,
        circular: Tensor,
        context_dim: int,
        n_layers: int = 6,
        n_bins: int = 8,
        hidden: int = 128,
        n_hidden: int = 2,
        bound: float = 5.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        circular = torch.as_tensor(circular, dtype=torch.bool)
        dim = int(circular.numel())
        rng = np.random.default_rng(seed)
        layers = []
        perm = rng.permutation(dim)
        for n in range(n_layers):
            if n % 2 == 0:
                perm = rng.permutation(dim)
                half = perm[: (dim + 1) // 2]
            else:
                half = perm[(dim + 1) // 2 :]
            if dim == 1:
                half = np.array([0])
            layers.append(
                CouplingLayer(circular, torch.as_tensor(np.sort(half)), context_dim, n_bins, hidden, n_hidden, bound)
            )
        self.layers = nn.ModuleList(layers)
        self.dim = dim

    def forward(self, z: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        ladj = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        for layer in self.layers:
            z, step = layer.call_and_ladj(z, context, False)
            ladj = ladj + step
        return z, ladj

    @torch.jit.export
    def inverse(self, u: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        ladj = torch.zeros(u.shape[0], dtype=u.dtype, device=u.device)
        for layer in self.layers[::-1]:
            u, step = layer.call_and_ladj(u, context, True)
            ladj = ladj + step
        return u, ladj
