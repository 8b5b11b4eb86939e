"""Convert the digits ViT's MLP blocks to GR-KAN or SNNK, preserving the function (kanc.compile when available).

``convert`` calls ``kanc.compile(model, target=...)`` when kanc.api exists; otherwise it swaps each ``Mlp`` with the
same rewrite done by hand: GR-KAN keeps W1, W2 and fits F2 to GELU (F1 = identity); SNNK fits its readout by ridge
least squares against the block on its real inputs (calibration), as ``SNNKMlp.from_mlp(init="preserve")`` does.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor, nn

from kanc.nn import GRKANMlp, Mlp, SNNKMlp


def convert(model: nn.Module, target: str, calibration: Tensor | None = None, snnk_features: int = 256) -> nn.Module:
    """Return ``model`` with every Mlp block rewritten to ``target`` ("grkan" or "snnk"), in place."""
    if importlib.util.find_spec("kanc.api") is not None:
        import kanc

        return kanc.compile(model, target=target)
    inputs = _block_inputs(model, calibration) if calibration is not None else {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Mlp):
                key = f"{name}.{child_name}" if name else child_name
                new = _grkan(child) if target == "grkan" else _snnk(child, inputs.get(key), snnk_features)
                setattr(module, child_name, new)
    return model


@torch.no_grad()
def _grkan(mlp: Mlp) -> GRKANMlp:
    h, d = mlp.fc1.weight.shape
    new = GRKANMlp(d, h, mlp.fc2.out_features, groups=8, act_init="gelu", init="default")
    for src, dst in ((mlp.fc1, new.fc1), (mlp.fc2, new.fc2)):
        dst.weight.copy_(src.weight)
        dst.bias.copy_(src.bias)
    return new


def _snnk(mlp: Mlp, calibration: Tensor | None, features: int) -> SNNKMlp:
    w1, b1, w2, b2 = mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias
    return SNNKMlp.from_mlp(w1, b1, w2, b2, "gelu", features, kind="relu", init="preserve", calibration=calibration)


@torch.no_grad()
def _block_inputs(model: nn.Module, images: Tensor) -> dict[str, Tensor]:
    """The inputs each Mlp block sees on ``images`` (flattened to rows), for SNNK's calibrated fit."""
    seen: dict[str, Tensor] = {}
    hooks = [
        m.register_forward_hook(
            lambda mod, args, out, key=name: seen.__setitem__(key, args[0].reshape(-1, args[0].shape[-1]))
        )
        for name, m in model.named_modules()
        if isinstance(m, Mlp)
    ]
    try:
        model.eval()(images)
    finally:
        for hook in hooks:
            hook.remove()
    return {k: v.double() for k, v in seen.items()}
