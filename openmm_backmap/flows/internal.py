"""The fixed bijection between Cartesian coordinates and standardised internal coordinates.

:class:`ICLayer` turns positions into one flat vector per configuration: free bond lengths (bonds
held by constraints are left out), bond angles, dihedrals, and with no anchors the three root
coordinates of the frame atoms. Each is shifted and scaled by statistics fitted on data; dihedrals
are first rotated by their circular mean and wrapped to [-pi, pi). Dihedrals that spread widely
(rotors) are *circular* variables and keep scale 1, so a circular spline can act on them; narrow
ones are scaled like line variables.

Lengths enter as log r and angles as logit(theta / pi) (exact bijections onto the real line), so
samples stay in the domain. ``forward`` returns the log |det| of Cartesian -> standardised
coordinates on the manifold of constrained bond lengths (the Cartesian measure of a placed atom
is r^2 sin(theta) dr dtheta dphi; for a constrained bond the surface measure
r^2 sin(theta) dtheta dphi), ``inverse`` its negative.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from openmm_backmap.geometry import InternalCoordinates, ZMatrix, wrap_angle

# a dihedral whose wrapped deviations from its circular mean have a standard deviation above this
# (rad), or that reach beyond +-CIRCULAR_REACH, is modelled as a circular variable
CIRCULAR_STD = 0.7
CIRCULAR_REACH = 2.6


class ICLayer(nn.Module):
    """Cartesian (B, n_atoms, 3) nm <-> standardised internal coordinates (B, dim)."""

    def __init__(self, zmatrix: ZMatrix) -> None:
        super().__init__()
        self.ic = InternalCoordinates(zmatrix)
        n_rows = zmatrix.n_rows
        free = np.flatnonzero(~zmatrix.fixed_bond)
        self.register_buffer("free_bond", torch.as_tensor(free, dtype=torch.long))
        self.register_buffer("fixed_length", torch.as_tensor(zmatrix.fixed_length, dtype=torch.get_default_dtype()))
        self.register_buffer("fixed_mask", torch.as_tensor(zmatrix.fixed_bond, dtype=torch.bool))
        self.n_rows = int(n_rows)
        self.n_free = int(free.size)
        self.has_root = bool(zmatrix.root.size > 0)
        self.dim = self.n_free + 2 * self.n_rows + (3 if self.has_root else 0)
        self.dih_start = self.n_free + self.n_rows
        # 0: length (log), 1: angle in (0, pi) (logit of theta / pi), 2: dihedral (wrapped)
        kind = [0] * self.n_free + [1] * self.n_rows + [2] * self.n_rows
        if self.has_root:
            kind += [0, 0, 1]
        self.register_buffer("kind", torch.as_tensor(kind, dtype=torch.long))
        self.register_buffer("shift", torch.zeros(self.dim))
        self.register_buffer("scale", torch.ones(self.dim))
        self.register_buffer("circular", torch.zeros(self.dim, dtype=torch.bool))

    # ------------------------------------------------------------------ statistics
    @torch.jit.ignore
    def fit(self, x: Tensor) -> None:
        """Fit shifts, scales and the circular flags on data positions (N, n_atoms, 3) nm."""
        with torch.no_grad():
            v = self._raw(x.to(self.shift.dtype))
            d0, d1 = self.dih_start, self.dih_start + self.n_rows
            mean = v.mean(0)
            std = v.std(0)
            phi = v[:, d0:d1]
            mu = torch.atan2(torch.sin(phi).mean(0), torch.cos(phi).mean(0))
            dev = wrap_angle(phi - mu)
            dstd = torch.sqrt((dev * dev).mean(0))
            reach = dev.abs().max(0).values
            circ = (dstd > CIRCULAR_STD) | (reach > CIRCULAR_REACH)
            mean[d0:d1] = mu
            std[d0:d1] = torch.where(circ, torch.ones_like(dstd), dstd)
            self.shift.copy_(mean)
            self.scale.copy_(torch.clamp(std, min=1e-4))
            flags = torch.zeros(self.dim, dtype=torch.bool)
            flags[d0:d1] = circ
            self.circular.copy_(flags)

    def _raw(self, x: Tensor) -> Tensor:
        r, theta, phi, root = self.ic.to_internal(x)
        parts = [r[:, self.free_bond], theta, phi]
        if self.has_root:
            parts.append(root)
        return self._unbound(torch.cat(parts, dim=-1))[0]

    def _unbound(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """Lengths -> log, angles -> logit(theta / pi): exact bijections onto the real line, so a
        sample can never leave (0, inf) or (0, pi). Returns values and the summed log |det|."""
        length = self.kind == 0
        angle = self.kind == 1
        safe = torch.where(self.kind == 2, torch.ones_like(v), v)
        log_v = torch.log(safe)
        log_rest = torch.log(torch.where(angle, math.pi - safe, torch.ones_like(safe)))
        u = torch.where(length, log_v, torch.where(angle, log_v - log_rest, v))
        ladj = torch.where(
            length, -log_v, torch.where(angle, math.log(math.pi) - log_v - log_rest, torch.zeros_like(v))
        )
        return u, torch.sum(ladj, dim=-1)

    def _bound(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Inverse of :meth:`_unbound`, with the log |det| of this direction."""
        length = self.kind == 0
        angle = self.kind == 1
        safe = torch.where(self.kind == 2, torch.zeros_like(u), u)
        v = torch.where(length, torch.exp(safe), torch.where(angle, math.pi * torch.sigmoid(safe), u))
        lsig = F.logsigmoid(safe) + F.logsigmoid(-safe) + math.log(math.pi)
        ladj = torch.where(length, safe, torch.where(angle, lsig, torch.zeros_like(u)))
        return v, torch.sum(ladj, dim=-1)

    # ------------------------------------------------------------------ transforms
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Cartesian -> standardised (B, dim) and log |det| (B,)."""
        r, theta, phi, root = self.ic.to_internal(x)
        parts = [r[:, self.free_bond], theta, phi]
        if self.has_root:
            parts.append(root)
        v, ladj_unbound = self._unbound(torch.cat(parts, dim=-1))
        d0, d1 = self.dih_start, self.dih_start + self.n_rows
        shift = self.shift.to(x.dtype)
        scale = self.scale.to(x.dtype)
        v = torch.cat([v[:, :d0] - shift[:d0], wrap_angle(v[:, d0:d1] - shift[d0:d1]), v[:, d1:] - shift[d1:]], dim=-1)
        z = v / scale
        r_used = torch.where(self.fixed_mask, self.fixed_length.to(x.dtype), r)
        ladj = -self.ic.log_jacobian(r_used, theta, root) + ladj_unbound - torch.sum(torch.log(scale))
        return z, ladj

    @torch.jit.export
    def inverse(self, z: Tensor, anchor_xyz: Tensor) -> tuple[Tensor, Tensor]:
        """Standardised (B, dim) -> Cartesian (B, n_atoms, 3) and log |det| (B,)."""
        scale = self.scale.to(z.dtype)
        shift = self.shift.to(z.dtype)
        v, ladj_bound = self._bound(z * scale + shift)
        d0, d1 = self.dih_start, self.dih_start + self.n_rows
        r = self.fixed_length.to(z.dtype).unsqueeze(0).repeat(z.shape[0], 1)
        r = r.index_copy(1, self.free_bond, v[:, : self.n_free])
        theta = v[:, self.n_free : d0]
        phi = wrap_angle(v[:, d0:d1])
        if self.has_root:
            root = v[:, d1:]
        else:
            root = torch.zeros(z.shape[0], 3, dtype=z.dtype, device=z.device)
        x = self.ic.to_cartesian(anchor_xyz, r, theta, phi, root)
        ladj = self.ic.log_jacobian(r, theta, root) + ladj_bound + torch.sum(torch.log(scale))
        return x, ladj

    @torch.jit.export
    def features(self, z: Tensor) -> Tensor:
        """Conditioning features of standardised coordinates: line values clamped, dihedrals as
        (cos, sin) of their deviation from the mean."""
        d0, d1 = self.dih_start, self.dih_start + self.n_rows
        dev = z[:, d0:d1] * self.scale[d0:d1].to(z.dtype)
        line = torch.clamp(torch.cat([z[:, :d0], z[:, d1:]], dim=-1), -10.0, 10.0)
        return torch.cat([line, torch.cos(dev), torch.sin(dev)], dim=-1)

    @property
    def n_features(self) -> int:
        return self.dim + self.n_rows
