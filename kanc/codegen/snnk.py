"""SNNK random-feature block: the reference definition and its dispatching entry point.

An SNNK block (Scalable Neural Network Kernels, arXiv 2310.13225) replaces an MLP by a fixed random
feature map followed by one trainable linear layer:

    Phi(x) = m^-1/2 g(G x)          G: (m, d) fixed projection ("projection")
    y      = Phi(x) W^T + b          W: (d_out, width) trainable ("weight")

Inputs are scaled by ``input_scale`` s first (Phi(s x)): the kernel bandwidth, 1 by default.
Feature kinds g and their width:
- "relu": max(Gx, floor)                          width m  (arc-cosine kernel for floor = 0)
- "exp":  exp(Gx - |x|^2 / 2)                     width m  (positive random features: with
          Psi_j(w) = m^-1/2 exp(g_j.w - |w|^2/2 + b), E[Phi(x).Psi(w)] = exp(w.x + b) exactly)
- "cos":  [cos(Gx); sin(Gx)]                      width 2m (random Fourier features, the complex
          exp(i Gx) stored as 2m reals; E[Phi(x).Phi(y)] = exp(-|x - y|^2 / 2)). The unbiased URF
          for cos(w.x) would also multiply by exp(|x|^2 / 2), which overflows fp32 once |x|^2 > 176;
          kanc keeps the bounded map and fits the readout ("preserve") instead.
Math runs in fp32 (fp64 inputs stay fp64) and the result is stored in the input's dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SNNK_KINDS = ("relu", "exp", "cos")


def snnk_width(num_features: int, kind: str) -> int:
    """Feature width of Phi: 2m for "cos" (cos and sin halves), m otherwise."""
    check_kind(kind)
    return 2 * num_features if kind == "cos" else num_features


def check_kind(kind: str) -> None:
    if kind not in SNNK_KINDS:
        raise ValueError(f"unknown SNNK kind {kind!r}; known: {', '.join(SNNK_KINDS)}")


def _math_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_snnk_args(x: Tensor, projection: Tensor, kind: str) -> None:
    """Validate shapes and kind."""
    check_kind(kind)
    if projection.dim() != 2:
        raise ValueError(f"projection must be 2-D (num_features, in_features), got {tuple(projection.shape)}")
    if x.dim() == 0 or x.shape[-1] != projection.shape[1]:
        raise ValueError(f"last dimension of x {tuple(x.shape)} != in_features {projection.shape[1]}")


def snnk_features_ref(x: Tensor, projection: Tensor, kind: str, floor: float = 0.0, input_scale: float = 1.0) -> Tensor:
    """Phi(s x) over the last dimension: (..., d) -> (..., width), width = m, or 2m for "cos".

    ``floor`` is the ReLU floor c of max(Gx, c) (ignored by the other kinds); ``input_scale`` s sets the kernel's
    bandwidth (exp: E[Phi(x).Phi'(w)] = exp(w.x) needs the weight tower at w / s). Differentiable in x.
    """
    check_snnk_args(x, projection, kind)
    dtype = _math_dtype(x)
    xf = x.to(dtype) * input_scale
    z = xf @ projection.to(dtype).T
    scale = 1.0 / math.sqrt(projection.shape[0])
    if kind == "relu":
        phi = z.clamp_min(floor)
    elif kind == "exp":
        phi = torch.exp(z - 0.5 * xf.square().sum(-1, keepdim=True))
    else:
        phi = torch.cat([torch.cos(z), torch.sin(z)], dim=-1)
    return (phi * scale).to(x.dtype)


def snnk_block_ref(
    x: Tensor,
    projection: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    kind: str,
    floor: float = 0.0,
    input_scale: float = 1.0,
) -> Tensor:
    """linear(Phi(x), weight, bias): the bundled SNNK block, in fp32 math, stored in x's dtype."""
    check_snnk_args(x, projection, kind)
    width = snnk_width(projection.shape[0], kind)
    if weight.dim() != 2 or weight.shape[1] != width:
        raise ValueError(f"weight must be (out_features, {width}) for kind {kind!r}, got {tuple(weight.shape)}")
    dtype = _math_dtype(x)
    phi = snnk_features_ref(x.to(dtype), projection, kind, floor, input_scale)
    b = bias.to(dtype) if bias is not None else None
    return torch.nn.functional.linear(phi, weight.to(dtype), b).to(x.dtype)


def snnk_block(
    x: Tensor,
    projection: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    kind: str,
    floor: float = 0.0,
    input_scale: float = 1.0,
) -> Tensor:
    """The SNNK block with the best available implementation (currently the reference)."""
    return snnk_block_ref(x, projection, weight, bias, kind, floor, input_scale)
