"""Small wrappers the rewrites need around kanc.nn layers (the layer math itself lives in kanc.nn)."""

from __future__ import annotations

import torch
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


DTYPE_READS = ("dtype", "device", "is_cuda")  # what KeepsDtype answers as the layer it stands for did


class KeepsDtype(nn.Module):
    """Stands where a linear layer was, for code that reads only its weight's dtype or device: T5's feed-forward
    casts to ``wo.weight.dtype`` before calling ``wo``; open_clip's ``get_cast_dtype`` reads ``mlp.c_fc.weight``.

    Runs ``layer`` (the SNNKMlp at fc1, an identity at fc2, whose work moved into that SNNKMlp) and keeps an empty
    ``weight`` of the old dtype and device: a buffer outside the state_dict, which follows the model's ``.to()``.
    """

    def __init__(self, layer: nn.Module, like: Tensor) -> None:
        super().__init__()
        self.layer = layer
        self.register_buffer("weight", torch.empty(0, dtype=like.dtype, device=like.device), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)
