"""Per-call choice between a Triton kernel and the pure-PyTorch reference (style item 5).

Nothing here imports triton at module import time; ``triton_available`` only asks whether it could be found.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_enabled_override: bool | None = None


def set_kernels_enabled(enabled: bool) -> None:
    """Globally allow (True) or forbid (False) kernels; overrides the ``KANC_KERNELS`` environment variable."""
    global _enabled_override
    _enabled_override = bool(enabled)


def kernels_enabled() -> bool:
    """Whether the global switch allows kernels (``set_kernels_enabled`` first, then ``KANC_KERNELS != "0"``)."""
    if _enabled_override is not None:
        return _enabled_override
    return os.environ.get("KANC_KERNELS", "1") != "0"


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
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    """Whether triton can be imported, without importing it."""
    return importlib.util.find_spec("triton") is not None


def use_kernel(*tensors: Tensor | None, limits: Mapping[str, tuple[int, int]] | None = None) -> bool:
    """Kernel or reference for one call: True only when every condition for the Triton path holds.

    Conditions: switch on, not inside ONNX export (the exporter must see standard ops), triton present,
    all tensors on one CUDA device (or CPU under the interpreter), dtype in fp32/fp16/bf16, non-empty, and every
    shape limit ``{name: (value, maximum)}`` met (e.g. SNNK features that must fit on chip). ``None`` entries
    (an absent bias) are skipped.
    """
    return fallback_reason(*tensors, limits=limits) is None


def fallback_reason(*tensors: Tensor | None, limits: Mapping[str, tuple[int, int]] | None = None) -> str | None:
    """Why this call runs the reference (a short phrase), or None when the kernel can run it."""
    if not kernels_enabled():
        return "kernels disabled"
    if torch.onnx.is_in_onnx_export():
        return "onnx export"
    if not triton_available():
        return "triton not installed"
    present = [t for t in tensors if t is not None]
    devices = {(t.device.type, t.device.index) for t in present}
    kinds = {kind for kind, _ in devices}
    if not (kinds == {"cuda"} and len(devices) == 1) and not (kinds == {"cpu"} and interpreting()):
        return "device"
    if not all(t.dtype in KERNEL_DTYPES for t in present):
        return "dtype"
    if not all(t.numel() > 0 for t in present):
        return "empty tensor"
    for value, maximum in (limits or {}).values():
        if value > maximum:
            return "shape limit"
    return None
