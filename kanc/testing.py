"""One equivalence helper for every kernel, layer and pass: forward and all gradients against a reference.

Used by the tests and available to users who write their own kernels or patterns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from kanc.numerics import rel_error

__all__ = ["TOLERANCES", "assert_equivalent", "rel_error", "tolerance"]

# (atol, rtol) per dtype of the compared outputs; the reference runs in fp32/fp64 math.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 1.6e-2),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return TOLERANCES.get(dtype, TOLERANCES[torch.float32])


def _seeded_randn(like: Tensor) -> Tensor:
    """A fixed N(0, 1) tensor shaped like ``like``: results never depend on the global RNG or on test order."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(like.shape, generator=gen, dtype=torch.float64).to(like.device, like.dtype)


def _clone_inputs(inputs: Sequence[Tensor]) -> list[Tensor]:
    return [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]


def assert_equivalent(
    fn: Callable[..., Tensor],
    ref: Callable[..., Tensor],
    inputs: Sequence[Tensor],
    *,
    atol: float | None = None,
    rtol: float | None = None,
    grad_out: Tensor | None = None,
    check_backward: bool = True,
) -> None:
    """Assert fn(*inputs) == ref(*inputs), and the gradients of every input that requires grad.

    NaN positions must agree (equal_nan); tolerances default to the table by output dtype.
    """
    xs, rs = _clone_inputs(inputs), _clone_inputs(inputs)
    out, expected = fn(*xs), ref(*rs)
    d_atol, d_rtol = tolerance(out.dtype)
    atol, rtol = atol if atol is not None else d_atol, rtol if rtol is not None else d_rtol
    assert out.shape == expected.shape, f"shape {tuple(out.shape)} != {tuple(expected.shape)}"
    assert out.dtype == expected.dtype, f"dtype {out.dtype} != {expected.dtype}"
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"forward: {m}")
    if not check_backward or not any(t.requires_grad for t in xs):
        return
    g = grad_out if grad_out is not None else _seeded_randn(expected)
    out.backward(g)
    expected.backward(g)
    for i, (a, e) in enumerate(zip(xs, rs)):
        if not e.requires_grad:
            continue
        assert a.grad is not None, f"input {i}: no gradient"
        scale = max(1.0, float(e.grad.detach().abs().nan_to_num(0, 0, 0).max()))
        torch.testing.assert_close(
            a.grad, e.grad, atol=atol * scale, rtol=rtol, equal_nan=True, msg=lambda m, i=i: f"grad of input {i}: {m}"
        )
