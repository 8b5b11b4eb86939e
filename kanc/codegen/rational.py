"""Group-rational activation: the reference definition and its dispatching entry point.

F_g(x) = P_g(x) / Q_g(x) over the last dimension, split into G contiguous groups:
    P_g(x) = a_g0 + a_g1 x + ... + a_gm x^m
    Q_g(x) = 1 + |b_g1| |x| + ... + |b_gn| |x|^n        (>= 1: no poles)
Gradient convention: d|b|/db = +1 at b = 0 (``abs_grad_sign``; KAT's kernels do the same), never sign(0) = 0, so an
identity-initialised rational (b = 0) can start to learn its denominator. The reference and every kernel agree.
``numerator`` is (G, m+1) and ``denominator`` is (G, n). Math runs in fp32 (x^5 overflows fp16
past |x| = 9.19; fp64 inputs stay fp64) and the result is stored in the input's dtype.

Dispatch: :func:`group_rational` asks the checker once per call. On the kernel path, eager code runs the kernels
through a plain autograd.Function (no custom-op dispatch: ``autograd.eager``); under torch.compile, torch.export or
a dispatch mode it calls the custom op ``kanc::group_rational`` (fake and autograd registered, so torch.compile and
torch.export see one op), whose backward is the op ``kanc::group_rational_backward``. Kernels: Triton's in
``kanc.codegen.kernels.rational``, imported only when one runs (``import kanc`` never imports triton), and the C
kernels of ``kanc.codegen.cpu`` for CPU tensors. A call the reference runs is counted (``kanc.codegen.fallbacks``).
"""

from __future__ import annotations

from types import ModuleType

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

OP = "kanc::group_rational"


def check_rational_args(x: Tensor, numerator: Tensor, denominator: Tensor) -> int:
    """Validate shapes; return the group count G."""
    if numerator.dim() != 2 or denominator.dim() != 2:
        raise ValueError(
            f"numerator and denominator must be 2-D (groups, degree), got {tuple(numerator.shape)} "
            f"and {tuple(denominator.shape)}"
        )
    groups = denominator.shape[0]
    if numerator.shape[0] != groups:
        raise ValueError(f"numerator has {numerator.shape[0]} groups but denominator has {groups}")
    channels = x.shape[-1] if x.dim() > 0 else 0
    if x.dim() == 0 or channels % groups != 0:
        raise ValueError(f"last dimension ({channels}) must be divisible by the number of groups ({groups})")
    return groups


def abs_grad_sign(b: Tensor) -> Tensor:
    """The sign kanc takes for d|b|/db: -1 where b < 0, else +1 (b = 0 included). A constant for autograd."""
    return torch.where(b < 0, -1.0, 1.0).to(b.dtype)


def rational_ref(x: Tensor, numerator: Tensor, denominator: Tensor) -> Tensor:
    """Pure-PyTorch group rational (the living definition every kernel is checked against).

    Differentiable in x, numerator and denominator through autograd.
    """
    groups = check_rational_args(x, numerator, denominator)
    shape = x.shape
    math_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(math_dtype).reshape(*shape[:-1], groups, shape[-1] // groups)
    a = numerator.to(math_dtype).unsqueeze(-1)  # (G, m+1, 1): a[:, k] broadcasts over (..., G, C/G)
    den = denominator.to(math_dtype)
    b = (den * abs_grad_sign(den)).unsqueeze(-1)  # |b| with d|b|/db = +1 at b = 0
    p = a[:, -1]
    for k in range(a.shape[1] - 2, -1, -1):
        p = p * xf + a[:, k]
    ax = xf.abs()
    q = torch.ones_like(xf)
    if b.shape[1] > 0:
        q = b[:, -1] * ax
        for k in range(b.shape[1] - 2, -1, -1):
            q = (q + b[:, k]) * ax
        q = q + 1.0
    return (p / q).reshape(shape).to(x.dtype)


def group_rational(x: Tensor, numerator: Tensor, denominator: Tensor) -> Tensor:
    """F(x) with the best available implementation: a kernel (Triton, or kanc's C kernel on the CPU) where the checker
    allows, else the reference (a fallback counted for the layer, see ``kanc.codegen.fallbacks``)."""
    check_rational_args(x, numerator, denominator)
    backend, reason = kernel_route(x, numerator, denominator, cpu=True)
    if backend is None:
        fallbacks.count(OP, denominator, reason)
        return rational_ref(x, numerator, denominator)
    return rational_on(backend, x, numerator, denominator)


def rational_on(backend: str, x: Tensor, numerator: Tensor, denominator: Tensor) -> Tensor:
    """F(x) by ``backend``'s kernels, already chosen by the checker: through the autograd.Function in eager code,
    through the custom op where a tracer must see one op."""
    if eager(x, numerator, denominator):
        return _apply_group_rational(x, numerator, denominator, backend)
    return torch.ops.kanc.group_rational(x, numerator, denominator)


def kernels(backend: str) -> ModuleType:
    """The module holding ``backend``'s launchers ``rational_forward`` and ``rational_backward``: the C kernels of
    ``kanc.codegen.cpu`` for "cpu", ``kanc.codegen.kernels.rational`` (imports triton) for "triton"."""
    return cpu_kernels if backend == CPU else triton_kernels("rational")


class _GroupRational(torch.autograd.Function):
    """The eager path: the kernels without the custom op's dispatch (``autograd.eager``); backward through the op
    when a graph of the gradient is wanted (double backward)."""

    @staticmethod
    def forward(ctx, x: Tensor, numerator: Tensor, denominator: Tensor, backend: str) -> Tensor:
        ctx.kernels = launchers = kernels(backend)
        ctx.save_for_backward(x, numerator, denominator)
        return launchers.rational_forward(x, numerator, denominator)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if torch.is_grad_enabled():
            return *torch.ops.kanc.group_rational_backward(grad, *ctx.saved_tensors), None
        return *ctx.kernels.rational_backward(grad, *ctx.saved_tensors), None


_apply_group_rational = function_apply(_GroupRational)


@torch.library.custom_op("kanc::group_rational", mutates_args=())
def _group_rational_op(x: Tensor, numerator: Tensor, denominator: Tensor) -> Tensor:
    backend, reason = kernel_route(x, numerator, denominator, cpu=True)
    if backend is None:
        fallbacks.count(OP, denominator, reason)
        return rational_ref(x, numerator, denominator).contiguous()
    return kernels(backend).rational_forward(x, numerator, denominator)


@_group_rational_op.register_fake
def _(x: Tensor, numerator: Tensor, denominator: Tensor) -> Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("kanc::group_rational_backward", mutates_args=())
def _group_rational_backward_op(
    grad: Tensor, x: Tensor, numerator: Tensor, denominator: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    backend, _ = kernel_route(grad, x, numerator, denominator, cpu=True)
    if backend is None:  # counted in the forward
        return reference_vjp(rational_ref, grad, x, numerator, denominator)
    return kernels(backend).rational_backward(grad, x, numerator, denominator)


@_group_rational_backward_op.register_fake
def _(grad: Tensor, x: Tensor, numerator: Tensor, denominator: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return x.new_empty(x.shape), numerator.new_empty(numerator.shape), denominator.new_empty(denominator.shape)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return torch.ops.kanc.group_rational_backward(grad, *ctx.saved_tensors)


_group_rational_op.register_autograd(_backward, setup_context=_setup_context)
register_reference_double_backward(
    _group_rational_backward_op, lambda grad, x, num, den: vjp_with_graph(rational_ref, grad, x, num, den)
)
