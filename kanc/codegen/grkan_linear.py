"""Fused GR-KAN linear layer y = F(x) W^T + b: the reference definition, the custom op and its dispatch.

``grkan_linear_ref`` is the living definition (the group rational of ``kanc.codegen.rational`` followed by
``torch.nn.functional.linear``). :func:`grkan_linear` asks the checker once per call. On CUDA (or under the Triton
interpreter) it runs the fused kernels, which evaluate F in the matmul's prologue so that F(x) never goes to memory
(``kanc.codegen.kernels.grkan_linear``): eager code through a plain autograd.Function, traced code through the custom
op ``kanc::grkan_linear`` (backward: ``kanc::grkan_linear_backward``). On the CPU it is F(x) by the C kernel
(``kanc::group_rational``) followed by torch's matmul: the rational is where the reference loses time, and the BLAS
matmul is already at the roof. A call the reference runs is counted (``kanc.codegen.fallbacks``).

Under autocast the kernel path casts x, W and b to the autocast dtype (as ``F.linear`` would) and keeps the rational
coefficients in their own dtype (fp32 math in registers either way).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kanc.codegen import cpu as cpu_kernels
from kanc.codegen import fallbacks
from kanc.codegen.autograd import (
    eager,
    function_apply,
    reference_vjp,
    register_reference_double_backward,
    triton_kernels,
    vjp_with_graph,
)
from kanc.codegen.checker import CPU, kernel_route
from kanc.codegen.rational import check_rational_args, rational_on, rational_ref

OP = "kanc::grkan_linear"


def check_linear_args(x: Tensor, numerator: Tensor, denominator: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """Validate shapes (rational as in ``check_rational_args``; weight (N, K) with K = x.shape[-1]; bias (N,))."""
    check_rational_args(x, numerator, denominator)
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be (out_features, {x.shape[-1]}), got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")


def grkan_linear_ref(
    x: Tensor, numerator: Tensor, denominator: Tensor, weight: Tensor, bias: Tensor | None = None
) -> Tensor:
    """Pure-PyTorch GR-KAN linear: linear(F(x), weight, bias) (differentiable in every input)."""
    return torch.nn.functional.linear(rational_ref(x, numerator, denominator), weight, bias)


def grkan_linear(x: Tensor, numerator: Tensor, denominator: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """y = F(x) W^T + b with the fused kernel where the checker allows (on the CPU: the C rational, then torch's
    matmul), else the reference (a fallback counted for the layer)."""
    check_linear_args(x, numerator, denominator, weight, bias)
    backend, reason = kernel_route(x, numerator, denominator, weight, bias, cpu=True)
    if backend == CPU:  # F(x) in one pass, then torch's BLAS; autograd keeps F(x) for dW as F.linear does
        return torch.nn.functional.linear(rational_on(CPU, x, numerator, denominator), weight, bias)
    if backend is not None:
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        if weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype):
            if eager(x, numerator, denominator, weight, bias):
                return _apply_grkan_linear(x, numerator, denominator, weight, bias)
            return torch.ops.kanc.grkan_linear(x, numerator, denominator, weight, bias)
        reason = "mixed dtypes"
    fallbacks.count(OP, weight, reason)
    return grkan_linear_ref(x, numerator, denominator, weight, bias)


class _GRKANLinear(torch.autograd.Function):
    """The eager Triton path without the custom op's dispatch (see ``autograd.eager``)."""

    @staticmethod
    def forward(ctx, x: Tensor, numerator: Tensor, denominator: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, numerator, denominator, weight)
        return triton_kernels("grkan_linear").grkan_linear_forward(x, numerator, denominator, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if torch.is_grad_enabled():  # a graph of the gradient: the differentiable backward op
            return _backward(ctx, grad)
        kernels = triton_kernels("grkan_linear")
        dx, dnum, dden, dw, db = kernels.grkan_linear_backward(grad, *ctx.saved_tensors, ctx.has_bias)
        return dx, dnum, dden, dw, db if ctx.has_bias else None


_apply_grkan_linear = function_apply(_GRKANLinear)


@torch.library.custom_op("kanc::grkan_linear", mutates_args=())
def _grkan_linear_op(x: Tensor, numerator: Tensor, denominator: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    backend, reason = _op_route(x, numerator, denominator, weight, bias)
    if backend == CPU:
        return torch.nn.functional.linear(cpu_kernels.rational_forward(x, numerator, denominator), weight, bias)
    if backend is not None:
        return triton_kernels("grkan_linear").grkan_linear_forward(x, numerator, denominator, weight, bias)
    fallbacks.count(OP, weight, reason)
    return grkan_linear_ref(x, numerator, denominator, weight, bias).contiguous()


def _op_route(
    x: Tensor, numerator: Tensor, denominator: Tensor, weight: Tensor, bias: Tensor | None, grad: Tensor | None = None
) -> tuple[str | None, str | None]:
    """The route of a call of the op itself (traced graphs): the kernels also need x, weight and bias in one dtype."""
    backend, reason = kernel_route(grad, x, numerator, denominator, weight, bias, cpu=True)
    if backend is not None and (weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype)):
        return None, "mixed dtypes"
    return backend, reason


@_grkan_linear_op.register_fake
def _(x: Tensor, numerator: Tensor, denominator: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("kanc::grkan_linear_backward", mutates_args=())
def _grkan_linear_backward_op(
    grad: Tensor, x: Tensor, numerator: Tensor, denominator: Tensor, weight: Tensor, has_bias: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, d numerator, d denominator, dW, db); db is empty when the layer has no bias."""
    backend, _ = _op_route(x, numerator, denominator, weight, None, grad)
    if backend == CPU:
        return _cpu_backward(grad, x, numerator, denominator, weight, has_bias)
    if backend is not None:
        kernels = triton_kernels("grkan_linear")
        return kernels.grkan_linear_backward(grad, x, numerator, denominator, weight, has_bias)
    if has_bias:  # the reference (counted in the forward)
        bias = weight.new_zeros(weight.shape[0])
        return reference_vjp(grkan_linear_ref, grad, x, numerator, denominator, weight, bias)
    return *reference_vjp(grkan_linear_ref, grad, x, numerator, denominator, weight), weight.new_empty(0)


def _cpu_backward(grad: Tensor, x: Tensor, numerator: Tensor, denominator: Tensor, weight: Tensor, has_bias: bool):
    """The backward op on the CPU: F(x) recomputed by the C kernel, the matmuls by torch, then the C backward."""
    out_features, in_features = weight.shape
    f = cpu_kernels.rational_forward(x, numerator, denominator).reshape(-1, in_features)
    g = grad.reshape(-1, out_features).to(weight.dtype)
    df = (g @ weight).reshape(x.shape)
    dx, dnum, dden = cpu_kernels.rational_backward(df, x, numerator, denominator)
    db = g.sum(0) if has_bias else weight.new_empty(0)
    return dx, dnum, dden, g.T @ f, db


@_grkan_linear_backward_op.register_fake
def _(grad: Tensor, x: Tensor, numerator: Tensor, denominator: Tensor, weight: Tensor, has_bias: bool):
    db = weight.new_empty(weight.shape[0] if has_bias else 0)
    return x.new_empty(x.shape), numerator.new_empty(numerator.shape), denominator.new_empty(denominator.shape), \
        weight.new_empty(weight.shape), db  # fmt: skip


def _setup_context(ctx, inputs, output) -> None:
    x, numerator, denominator, weight, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, numerator, denominator, weight)


def _backward(ctx, grad: Tensor):
    dx, dnum, dden, dw, db = torch.ops.kanc.grkan_linear_backward(grad, *ctx.saved_tensors, ctx.has_bias)
    return dx, dnum, dden, dw, db if ctx.has_bias else None


_grkan_linear_op.register_autograd(_backward, setup_context=_setup_context)


def _first_order(grad: Tensor, x: Tensor, numerator: Tensor, denominator: Tensor, weight: Tensor, has_bias: bool):
    """The backward op's outputs by differentiable reference ops (the bias gradient is the row sum of grad)."""
    grads = vjp_with_graph(grkan_linear_ref, grad, x, numerator, denominator, weight)
    return *grads, grad.reshape(-1, weight.shape[0]).sum(0) if has_bias else None


register_reference_double_backward(_grkan_linear_backward_op, _first_order)
