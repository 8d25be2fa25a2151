"""Base densities."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class MixedBase(nn.Module):
    """Independent standard normals on the line variables, uniforms on [-pi, pi) on circular ones.

    ``log_prob(u)`` sums over the last axis (nats); ``sample(n)`` draws (n, dim).
    """

    def __init__(self, circular: Tensor) -> None:
        super().__init__()
        circ = torch.as_tensor(circular, dtype=torch.bool)
        self.register_buffer("circular", circ)
        self.dim = int(circ.numel())
        self.n_circular = int(circ.sum())

    def log_prob(self, u: Tensor) -> Tensor:
        normal = -0.5 * u * u - 0.5 * math.log(2.0 * math.pi)
        uniform = torch.full_like(u, -math.log(2.0 * math.pi))
        # a circular coordinate outside [-pi, pi] has zero density
        outside = (u < -math.pi) | (u > math.pi)
        uniform = torch.where(outside, torch.full_like(u, -math.inf), uniform)
        return torch.sum(torch.where(self.circular, uniform, normal), dim=-1)

    def sample(self, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        g = torch.randn(n, self.dim, dtype=dtype, device=device)
        c = (torch.rand(n, self.dim, dtype=dtype, device=device) * 2.0 - 1.0) * math.pi
        return torch.where(self.circular, c, g)
