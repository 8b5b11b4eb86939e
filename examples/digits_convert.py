"""Convert the digits ViT's MLP blocks to GR-KAN or SNNK with ``kanc.compile``, preserving the function.

GR-KAN keeps W1, W2 with the identity rational before fc1 and a rational fitted to GELU before fc2, refined on the
pre-activations each block sees on the calibration images. SNNK fits each block's readout by ridge least squares
against the original block on the rows that block sees (``init="preserve"``).
"""

from __future__ import annotations

from torch import Tensor, nn

import kanc


def convert(model: nn.Module, target: str, calibration: Tensor | None = None, snnk_features: int = 256) -> nn.Module:
    """Return ``model`` with every MLP block rewritten to ``target`` ("grkan" or "snnk"), in place."""
    options = {"num_features": snnk_features} if target == "snnk" else {}
    return kanc.compile(model, target=target, inplace=True, calibration=calibration, **options)
