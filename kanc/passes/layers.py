"""Small wrappers the rewrites need around kanc.nn layers (the layer math itself lives in kanc.nn)."""

from __future__ import annotations

from torch import Tensor, nn


class ChannelsLast(nn.Module):
    """Runs a channels-last layer on a channels-first tensor: (B, C, H, W) -> layer over C -> (B, C', H, W).

    Used where a pointwise (1x1) Conv2d MLP becomes a GR-KAN or SNNK layer, which act on the last dimension.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x.movedim(1, -1)).movedim(-1, 1)
