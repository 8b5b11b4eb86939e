"""Autograd plumbing shared by kanc's custom ops: the eager path, reference gradients, double backward through the
reference.

Eager calls skip the custom op: its dispatch (the dispatcher, torch.library's autograd wrapper, dynamo's disable
guard around the implementation) costs more host time than the launch it wraps. :func:`eager` says when a plain
``torch.autograd.Function`` may run the kernels instead: no torch.compile / torch.export tracing, no dispatch mode
(fake tensors, make_fx), no functorch transform, plain tensors. Everywhere else the custom op runs, so that traced
graphs hold one op.

A custom op's backward is itself an op (``kanc::*_backward``) that launches kernels. Its own derivative (needed for
gradient penalties, and checked by ``torch.library.opcheck``) comes from the reference, the living definition: the
first-order vector-Jacobian product of the ``*_ref`` function is rebuilt with ``create_graph=True`` and differentiated.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from types import ModuleType

import torch
from torch import Tensor
from torch._C._functorch import peek_interpreter_stack
from torch.utils._python_dispatch import _get_current_dispatch_mode

Parameter = torch.nn.Parameter
_kernel_modules: dict[str, ModuleType] = {}


def eager(*tensors: Tensor | None) -> bool:
    """Whether this call runs plain eager PyTorch, where kanc's autograd.Functions may launch kernels directly."""
    if (
        torch.compiler.is_compiling()
        or _get_current_dispatch_mode() is not None
        or peek_interpreter_stack() is not None
    ):
        return False
    for t in tensors:
        if t is not None and type(t) is not Tensor and type(t) is not Parameter:
            return False
    return True


def function_apply(function: type[torch.autograd.Function]) -> Callable[..., Tensor]:
    """``function.apply`` without its Python layer (an old-style Function: ``forward(ctx, ...)``).

    ``Function.apply`` binds default arguments with ``inspect.signature`` (new-style Functions) and unwraps dead
    functorch wrappers with a pytree walk on every call before it calls the C ``apply``; :func:`eager` has already
    ruled out functorch, so kanc's eager path calls the C ``apply`` directly.
    """
    return super(torch.autograd.Function, function).apply


def triton_kernels(name: str) -> ModuleType:
    """``kanc.codegen.kernels.<name>``, imported on first use (it imports triton)."""
    module = _kernel_modules.get(name)
    if module is None:
        module = _kernel_modules[name] = importlib.import_module(f"kanc.codegen.kernels.{name}")
    return module


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
