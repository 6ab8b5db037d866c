"""NICE's coupling function (Dinh et al. 2014, arXiv:1410.8516)."""

from __future__ import annotations

from torch import Tensor, nn


class MLP(nn.Module):
    """NICE's coupling function m (Dinh et al. 2014, arXiv:1410.8516, section 5.1): `num_layers`
    hidden ReLU layers of `hidden` units; the output layer starts at zero, so every coupling
    starts as the identity. Takes and returns ``(B, features)``."""

    def __init__(
        self, in_features: int, out_features: int, hidden: int = 1000, num_layers: int = 5
    ):
        super().__init__()
        if hidden < 1 or num_layers < 1:
            raise ValueError(f"need hidden >= 1 and num_layers >= 1, got {hidden}, {num_layers}")
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        out = nn.Linear(width, out_features)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(*layers, out)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
