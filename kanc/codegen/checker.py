"""Per-call choice between a kernel and the pure-PyTorch reference (style item 5).

Two kernel backends: "triton" (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``) and "cpu" (kanc's compiled
C kernels, ``kanc.codegen.cpu``, for the ops that have one). :func:`kernel_route` answers per call; the ops call it
once per call (it is on the hot path: no allocation, no import, no filesystem access once warm).

Nothing here imports triton at module import time; ``triton_available`` only asks whether it could be found.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

from kanc.codegen import cpu as cpu_kernels
from kanc.codegen.env import getenv

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON, CPU = "triton", "cpu"
_enabled_override: bool | None = None


def set_kernels_enabled(enabled: bool) -> None:
    """Globally allow (True) or forbid (False) kernels; overrides the ``KANC_KERNELS`` environment variable."""
    global _enabled_override
    _enabled_override = bool(enabled)


def kernels_enabled() -> bool:
    """Whether the global switch allows kernels (``set_kernels_enabled`` first, then ``KANC_KERNELS != "0"``)."""
    if _enabled_override is not None:
        return _enabled_override
    return getenv("KANC_KERNELS", "1") != "0"


@contextlib.contextmanager
def kernels_disabled() -> Iterator[None]:
    """Context manager running its body on the references only, restoring the previous switch after."""
    global _enabled_override
    previous = _enabled_override
    _enabled_override = False
    try:
        yield
    finally:
        _enabled_override = previous


def interpreting() -> bool:
    """Whether Triton's CPU interpreter is requested (``TRITON_INTERPRET=1``)."""
    return getenv("TRITON_INTERPRET", "0") == "1"


_triton_found: bool | None = None
_onnx_flags: tuple | None = None


def triton_available() -> bool:
    """Whether triton can be imported, without importing it (asked once per process)."""
    global _triton_found
    if _triton_found is None:
        _triton_found = importlib.util.find_spec("triton") is not None
    return _triton_found


def in_onnx_export() -> bool:
    """``torch.onnx.is_in_onnx_export()`` without its two imports per call (this is asked on every kernel call)."""
    global _onnx_flags
    if torch.compiler.is_compiling():
        return torch.onnx.is_in_onnx_export()  # what dynamo knows how to trace
    if _onnx_flags is None:
        try:
            from torch.onnx._internal.exporter import _flags
            from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
        except ImportError:  # another torch layout: the public function, slower but the same answer
            _onnx_flags = ()
        else:
            _onnx_flags = (GLOBALS, _flags)
    if not _onnx_flags:
        return torch.onnx.is_in_onnx_export()
    return _onnx_flags[0].in_onnx_export or _onnx_flags[1]._is_onnx_exporting


def use_kernel(*tensors: Tensor | None, limits: Mapping[str, tuple[int, int]] | None = None) -> bool:
    """Whether the Triton path can run this call (see :func:`kernel_route`; the C kernels are not asked)."""
    return kernel_route(*tensors, limits=limits)[0] is not None


def fallback_reason(*tensors: Tensor | None, limits: Mapping[str, tuple[int, int]] | None = None) -> str | None:
    """Why this call runs the reference (a short phrase), or None when the Triton path can run it."""
    return kernel_route(*tensors, limits=limits)[1]


def kernel_route(
    *tensors: Tensor | None, limits: Mapping[str, tuple[int, int]] | None = None, cpu: bool = False
) -> tuple[str | None, str | None]:
    """(backend, None) when a kernel can run this call, else (None, the reason the reference runs it).

    Conditions: switch on, not inside ONNX export (the exporter must see standard ops), all tensors on one device,
    dtype fp32/fp16/bf16, non-empty, every shape limit ``{name: (value, maximum)}`` met (e.g. SNNK features that
    must fit on chip); then the backend: "triton" on CUDA, or on the CPU under ``TRITON_INTERPRET=1`` (triton
    installed); "cpu" on the CPU otherwise when the op has a C kernel (``cpu=True``) and it could be built.
    ``None`` entries (an absent bias) are skipped. Reasons: "kernels disabled", "onnx export", "device",
    "dtype", "empty tensor", "shape limit", "triton not installed", "no cpu kernel for this op", and the C build's.
    """
    if not kernels_enabled():
        return None, "kernels disabled"
    if in_onnx_export():
        return None, "onnx export"
    cuda_index = None  # the CUDA device of the first tensor, or -1 for a CPU one
    for t in tensors:
        if t is None:
            continue
        index = t.get_device() if t.is_cuda else (-1 if t.is_cpu else -2)
        if cuda_index is None:
            cuda_index = index
        elif index != cuda_index:
            return None, "device"
        if t.dtype not in KERNEL_DTYPES:
            return None, "dtype"
        if t.numel() == 0:
            return None, "empty tensor"
    if limits:
        for value, maximum in limits.values():
            if value > maximum:
                return None, "shape limit"
    return _backend(-1 if cuda_index is None else cuda_index, cpu)


def _backend(cuda_index: int, cpu: bool) -> tuple[str | None, str | None]:
    """The backend for tensors on CUDA device ``cuda_index`` (>= 0), the CPU (-1), or elsewhere (-2: meta, ...)."""
    if cuda_index >= 0 or (cuda_index == -1 and interpreting()):
        return (TRITON, None) if triton_available() else (None, "triton not installed")
    if cuda_index != -1:
        return None, "device"
    if not cpu:
        return None, "no cpu kernel for this op"
    reason = cpu_kernels.unavailable_reason()
    return (CPU, None) if reason is None else (None, reason)
