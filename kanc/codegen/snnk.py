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

Dispatch: :func:`snnk_block` asks the checker per call; on the kernel path eager code runs the kernels through a plain
autograd.Function (no custom-op dispatch: ``autograd.eager``), and torch.compile, torch.export or a dispatch mode see
the custom op ``kanc::snnk_block`` (backward ``kanc::snnk_block_backward``). The fused kernels keep the m-wide
features on chip in both directions (``kanc.codegen.kernels.snnk``: the backward recomputes them from x, for dx and
for dW, instead of storing them), at any m (the features are tiled). The kernel path needs a projection that takes no
gradient (a fixed buffer in the layers).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from kanc.codegen import fallbacks
from kanc.codegen.autograd import (
    eager,
    function_apply,
    reference_vjp,
    register_reference_double_backward,
    triton_kernels,
    vjp_with_graph,
)
from kanc.codegen.checker import kernel_route

OP = "kanc::snnk_block"

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
    """The SNNK block with the fused kernel where the checker allows, else the reference."""
    check_block_args(x, projection, weight, bias, kind)
    backend, reason = _route(x, projection, weight, bias)
    if backend is not None and projection.requires_grad:
        backend, reason = None, "projection requires grad"
    if backend is not None:
        floor, input_scale = float(floor), float(input_scale)
        if eager(x, projection, weight, bias):
            return _apply_snnk_block(x, projection, weight, bias, kind, floor, input_scale)
        return torch.ops.kanc.snnk_block(x, projection, weight, bias, kind, floor, input_scale)
    fallbacks.count(OP, weight, reason)
    return snnk_block_ref(x, projection, weight, bias, kind, floor, input_scale)


def check_block_args(x: Tensor, projection: Tensor, weight: Tensor, bias: Tensor | None, kind: str) -> None:
    """Validate the block's shapes (as ``snnk_block_ref`` does) and the bias."""
    check_snnk_args(x, projection, kind)
    width = snnk_width(projection.shape[0], kind)
    if weight.dim() != 2 or weight.shape[1] != width:
        raise ValueError(f"weight must be (out_features, {width}) for kind {kind!r}, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")


def _route(*tensors: Tensor | None) -> tuple[str | None, str | None]:
    return kernel_route(*tensors)


def _kernel_ok(*tensors: Tensor | None) -> bool:
    return _route(*tensors)[0] is not None


@torch.library.custom_op("kanc::snnk_block", mutates_args=())
def _snnk_block_op(
    x: Tensor, projection: Tensor, weight: Tensor, bias: Tensor | None, kind: str, floor: float, input_scale: float
) -> Tensor:
    backend, reason = _route(x, projection, weight, bias)
    if backend is not None:
        from kanc.codegen.kernels.snnk import snnk_forward

        return snnk_forward(x, projection, weight, bias, kind, floor, input_scale)
    fallbacks.count(OP, weight, reason)
    return snnk_block_ref(x, projection, weight, bias, kind, floor, input_scale).contiguous()


@_snnk_block_op.register_fake
def _(x, projection, weight, bias, kind, floor, input_scale):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("kanc::snnk_block_backward", mutates_args=())
def _snnk_block_backward_op(
    grad: Tensor,
    x: Tensor,
    projection: Tensor,
    weight: Tensor,
    has_bias: bool,
    input_grad: bool,
    weight_grad: bool,
    kind: str,
    floor: float,
    input_scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dW, db): dx empty unless ``input_grad``, dW unless ``weight_grad``, db unless ``has_bias``; the projection
    takes no gradient."""
    if _kernel_ok(grad, x, projection, weight):
        from kanc.codegen.kernels.snnk import snnk_backward

        return snnk_backward(grad, x, projection, weight, has_bias, input_grad, weight_grad, kind, floor, input_scale)
    fn = lambda x, w, *b: snnk_block_ref(x, projection, w, b[0] if b else None, kind, floor, input_scale)
    bias = [weight.new_zeros(weight.shape[0])] if has_bias else []
    dx, dw, *db = reference_vjp(fn, grad, x, weight, *bias)
    empty_x, empty_w = x.new_empty(0), weight.new_empty(0)
    return dx if input_grad else empty_x, dw if weight_grad else empty_w, db[0] if has_bias else empty_w


@_snnk_block_backward_op.register_fake
def _(grad, x, projection, weight, has_bias, input_grad, weight_grad, kind, floor, input_scale):
    dx = x.new_empty(x.shape if input_grad else (0,))
    dw = weight.new_empty(weight.shape if weight_grad else (0,))
    return dx, dw, weight.new_empty(weight.shape[0] if has_bias else 0)


def _setup_context(ctx, inputs, output) -> None:
    x, projection, weight, bias, ctx.kind, ctx.floor, ctx.input_scale = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, projection, weight)


def _backward(ctx, grad: Tensor, backward: Callable | None = None):
    """The block's gradients by ``backward`` (the op ``kanc::snnk_block_backward`` unless given: the eager path passes
    the launcher)."""
    x, projection, weight = ctx.saved_tensors
    if ctx.needs_input_grad[1]:
        raise RuntimeError("kanc::snnk_block does not differentiate the projection; call snnk_block_ref for that")
    input_grad, weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    dx, dw, db = (backward or torch.ops.kanc.snnk_block_backward)(
        grad, x, projection, weight, ctx.has_bias, input_grad, weight_grad, ctx.kind, ctx.floor, ctx.input_scale
    )
    dx, dw = dx if input_grad else None, dw if weight_grad else None
    return dx, None, dw, db if ctx.has_bias else None, None, None, None


_snnk_block_op.register_autograd(_backward, setup_context=_setup_context)


class _SNNKBlock(torch.autograd.Function):
    """The eager path: the fused kernels without the custom op's dispatch (``autograd.eager``); backward through the
    op when a graph of the gradient is wanted (double backward)."""

    @staticmethod
    def forward(ctx, x, projection, weight, bias, kind: str, floor: float, input_scale: float) -> Tensor:
        _setup_context(ctx, (x, projection, weight, bias, kind, floor, input_scale), None)
        return triton_kernels("snnk").snnk_forward(x, projection, weight, bias, kind, floor, input_scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if torch.is_grad_enabled():
            return _backward(ctx, grad)
        return _backward(ctx, grad, triton_kernels("snnk").snnk_backward)


_apply_snnk_block = function_apply(_SNNKBlock)


def _first_order(grad, x, projection, weight, has_bias, input_grad, weight_grad, kind, floor, input_scale):
    """The backward op's outputs by differentiable reference ops (db is the row sum of grad)."""
    fn = lambda x, w: snnk_block_ref(x, projection, w, None, kind, floor, input_scale)
    dx, dw = vjp_with_graph(fn, grad, x, weight)
    db = grad.reshape(-1, weight.shape[0]).sum(0) if has_bias else None
    return dx if input_grad else None, dw if weight_grad else None, db


register_reference_double_backward(_snnk_block_backward_op, _first_order)
