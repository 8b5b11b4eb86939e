"""kanc's CPU kernels: the group rational forward and backward in C (``rational.c``), one pass over memory each.

``rational_ref`` stays the definition; these compute the same math in fp32 (the same order of operations, no FMA
contraction: the forward matches it to the last bit in fp32) with I/O in fp32, fp16 or bf16, OpenMP threads over
rows (``torch.get_num_threads()`` of them) and per-group accumulators for the coefficient gradients, summed in an
order that does not depend on the thread count. fp64 stays on the reference.

The library is compiled at first use and cached on disk (``build``); :func:`unavailable_reason` says why it cannot
run here (no compiler, a failed build), in which case the checker sends every call to the reference and the
fallback is counted and reported like any other.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

from kanc.codegen import launches
from kanc.codegen.cpu.build import BuildError, Library, build_and_load

OP = "kanc::group_rational"
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_UNSET = object()
_state: object = _UNSET  # a Library once loaded, else the reason (str) it could not be
_lock = threading.Lock()


def unavailable_reason() -> str | None:
    """None when the C kernels are loaded (building them on the first call), else why they cannot run."""
    state = _state
    if state is _UNSET:
        state = _load()
    return None if isinstance(state, Library) else state


def library() -> Library:
    """The loaded library (building it on the first call); RuntimeError when it cannot be."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    return _state  # type: ignore[return-value]


def _load() -> object:
    global _state
    with _lock:
        if _state is _UNSET:
            from kanc.codegen.tuning import cache_dir

            try:
                _state = build_and_load(cache_dir())
            except BuildError as e:
                _state = f"cpu kernel unavailable: {e}"
        return _state


def reset() -> None:
    """Forget the loaded library, so the next call builds or loads again (tests)."""
    global _state
    with _lock:
        _state = _UNSET


def rational_forward(x: Tensor, numerator: Tensor, denominator: Tensor) -> Tensor:
    """y = F(x) in x's dtype, x on the CPU in fp32/fp16/bf16 (the checker's conditions)."""
    lib = library().handle
    channels, groups = x.shape[-1], denominator.shape[0]
    x2, num, den = _rows(x, channels), _coefficients(numerator), _coefficients(denominator)
    y = torch.empty(x.shape, dtype=x.dtype)
    threads = torch.get_num_threads()
    status = lib.kanc_rational_forward(
        x2.data_ptr(), y.data_ptr(), x2.shape[0], channels, channels // groups, x2.stride(0),
        num.data_ptr(), den.data_ptr(), num.shape[1], den.shape[1], _DTYPE_CODES[x.dtype], threads,
    )  # fmt: skip
    _check(status, "forward")
    if launches.is_recording():
        _record("kanc_rational_forward", x, num, den, threads, "forward")
    return y


def rational_backward(grad: Tensor, x: Tensor, numerator: Tensor, denominator: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(dx in x's dtype, d numerator, d denominator in the coefficients' dtypes)."""
    lib = library().handle
    channels, groups = x.shape[-1], denominator.shape[0]
    x2, num, den = _rows(x, channels), _coefficients(numerator), _coefficients(denominator)
    dy2 = _rows(grad if grad.dtype == x.dtype else grad.to(x.dtype), channels)
    dx = torch.empty(x.shape, dtype=x.dtype)
    dnum = torch.empty(num.shape, dtype=torch.float32)
    dden = torch.empty(den.shape, dtype=torch.float32)
    threads = torch.get_num_threads()
    status = lib.kanc_rational_backward(
        x2.data_ptr(), dy2.data_ptr(), dx.data_ptr(), x2.shape[0], channels, channels // groups, x2.stride(0),
        dy2.stride(0), num.data_ptr(), den.data_ptr(), num.shape[1], den.shape[1], _DTYPE_CODES[x.dtype],
        dnum.data_ptr(), dden.data_ptr(), threads,
    )  # fmt: skip
    _check(status, "backward")
    if launches.is_recording():
        _record("kanc_rational_backward", x, num, den, threads, "backward")
    return dx, _as(dnum, numerator.dtype), _as(dden, denominator.dtype)


def _rows(t: Tensor, width: int) -> Tensor:
    """(..., width) as (rows, width) with unit column stride (a copy only when the layout needs one)."""
    t2 = t.reshape(-1, width)
    return t2 if t2.stride(1) == 1 or width == 1 else t2.contiguous()


def _coefficients(t: Tensor) -> Tensor:
    """fp32, contiguous (an expanded shared numerator becomes G rows)."""
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _check(status: int, what: str) -> None:
    if status != 0:
        meaning = {1: "out of memory", 2: "bad arguments", 3: "bad dtype"}.get(status, f"status {status}")
        raise RuntimeError(f"kanc's CPU rational {what} failed: {meaning}")


def _record(kernel: str, x: Tensor, num: Tensor, den: Tensor, threads: int, direction: str) -> None:
    config = {"threads": threads, "flags": " ".join(library().flags)}
    shapes = (tuple(x.shape), tuple(num.shape), tuple(den.shape))
    launch = launches.Launch(OP, kernel, (threads,), config, 0, shapes, str(x.dtype).removeprefix("torch."))
    launch.extra.update(direction=direction, backend="cpu")
    launches.record(launch)
