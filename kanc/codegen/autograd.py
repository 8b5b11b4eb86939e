"""Autograd plumbing shared by kanc's custom ops: reference gradients, and double backward through the reference.

A custom op's backward is itself an op (``kanc::*_backward``) that launches kernels. Its own derivative (needed for
gradient penalties, and checked by ``torch.library.opcheck``) comes from the reference, the living definition: the
first-order vector-Jacobian product of the ``*_ref`` function is rebuilt with ``create_graph=True`` and differentiated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def reference_vjp(fn: Callable[..., Tensor], grad: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
    """Gradients of ``fn(*inputs)`` against ``grad`` by autograd on the reference (an op's fallback backward).

    Gradients come back contiguous (as the fake implementations promise) and zero for inputs that do not reach
    the output.
    """
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in inputs]
        grads = torch.autograd.grad(fn(*leaves), leaves, grad, allow_unused=True)
    return tuple(torch.zeros_like(t) if g is None else g.contiguous() for g, t in zip(grads, leaves))


def register_reference_double_backward(
    backward_op: torch.library.CustomOpDef, first_order: Callable[..., Sequence[Tensor | None]]
) -> None:
    """Make ``backward_op`` differentiable: ``first_order(*inputs)`` must return the op's outputs with torch ops
    that autograd can differentiate (None for outputs the call does not produce)."""

    def setup_context(ctx, inputs, output) -> None:
        ctx.is_tensor = [isinstance(t, Tensor) for t in inputs]
        ctx.constants = [None if isinstance(t, Tensor) else t for t in inputs]
        ctx.save_for_backward(*[t for t in inputs if isinstance(t, Tensor)])

    def backward(ctx, *cotangents):
        saved = iter(ctx.saved_tensors)
        args = [next(saved).detach().requires_grad_() if is_t else c for is_t, c in zip(ctx.is_tensor, ctx.constants)]
        leaves = [a for a, is_t in zip(args, ctx.is_tensor) if is_t]
        with torch.enable_grad():
            outputs = first_order(*args)
            pairs = [(o, c) for o, c in zip(outputs, cotangents) if o is not None and c is not None and o.requires_grad]
            grads = iter(
                torch.autograd.grad([o for o, _ in pairs], leaves, [c for _, c in pairs], allow_unused=True)
                if pairs
                else [None] * len(leaves)
            )
        return tuple(next(grads) if is_t else None for is_t in ctx.is_tensor)

    backward_op.register_autograd(backward, setup_context=setup_context)


def vjp_with_graph(fn: Callable[..., Tensor], grad: Tensor, *inputs: Tensor) -> tuple[Tensor | None, ...]:
    """First-order gradients of ``fn(*inputs)`` against ``grad`` that autograd can differentiate again."""
    return torch.autograd.grad(fn(*inputs), inputs, grad, create_graph=True, allow_unused=True)
