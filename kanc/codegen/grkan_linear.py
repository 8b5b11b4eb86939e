"""Fused GR-KAN linear layer y = F(x) W^T + b: the reference definition, the custom op and its dispatch.

``grkan_linear_ref`` is the living definition (the group rational of ``kanc.codegen.rational`` followed by
``torch.nn.functional.linear``). :func:`grkan_linear` asks the checker per call; on the kernel path it calls the
custom op ``kanc::grkan_linear`` (backward: ``kanc::grkan_linear_backward``), whose kernels evaluate F in the matmul's
prologue so that F(x) never goes to memory (``kanc.codegen.kernels.grkan_linear``).

Under autocast the kernel path casts x, W and b to the autocast dtype (as ``F.linear`` would) and keeps the rational
coefficients in their own dtype (fp32 math in registers either way).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kanc.codegen.autograd import reference_vjp, register_reference_double_backward, vjp_with_graph
from kanc.codegen.checker import use_kernel
from kanc.codegen.rational import check_rational_args, rational_ref


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
    """y = F(x) W^T + b with the fused kernel where the checker allows, else the reference."""
    check_linear_args(x, numerator, denominator, weight, bias)
    if use_kernel(x, numerator, denominator, weight, bias):
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        if weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype):
            return torch.ops.kanc.grkan_linear(x, numerator, denominator, weight, bias)
    return grkan_linear_ref(x, numerator, denominator, weight, bias)


@torch.library.custom_op("kanc::grkan_linear", mutates_args=())
def _grkan_linear_op(x: Tensor, numerator: Tensor, denominator: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if use_kernel(x, numerator, denominator, weight, bias):
        from kanc.codegen.kernels.grkan_linear import grkan_linear_forward

        return grkan_linear_forward(x, numerator, denominator, weight, bias)
    return grkan_linear_ref(x, numerator, denominator, weight, bias).contiguous()


@_grkan_linear_op.register_fake
def _(x: Tensor, numerator: Tensor, denominator: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("kanc::grkan_linear_backward", mutates_args=())
def _grkan_linear_backward_op(
    grad: Tensor, x: Tensor, numerator: Tensor, denominator: Tensor, weight: Tensor, has_bias: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, d numerator, d denominator, dW, db); db is empty when the layer has no bias."""
    if use_kernel(grad, x, numerator, denominator, weight):
        from kanc.codegen.kernels.grkan_linear import grkan_linear_backward

        return grkan_linear_backward(grad, x, numerator, denominator, weight, has_bias)
    if has_bias:
        bias = weight.new_zeros(weight.shape[0])
        return reference_vjp(grkan_linear_ref, grad, x, numerator, denominator, weight, bias)
    return *reference_vjp(grkan_linear_ref, grad, x, numerator, denominator, weight), weight.new_empty(0)


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
