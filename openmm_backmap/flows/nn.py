"""Networks that parameterise transforms."""

from __future__ import annotations

from torch import Tensor, nn


class MLP(nn.Module):
    """A multilayer perceptron with SiLU activations and a zero-initialised output layer.

    Zero output weights make every transform it parameterises start as the identity (or as the
    spline with equal bins and unit slopes), which keeps the first steps of training stable.
    """

    def __init__(self, n_in: int, n_out: int, hidden: int = 128, n_hidden: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_in
        for _ in range(n_hidden):
            layers.append(nn.Linear(width, hidden))
            layers.append(nn.SiLU())
            width = hidden
        last = nn.Linear(width, n_out)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
