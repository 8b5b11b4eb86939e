"""What the rest of kanc asks of triton itself (its version, its proton profiler), asked here: only kanc.codegen
imports triton, and only when asked, so ``import kanc`` works without it."""

from __future__ import annotations

from types import ModuleType


def triton_version() -> str | None:
    """The installed triton's version, or None where it does not import (it is optional off Linux)."""
    try:
        import triton
    except Exception:  # noqa: BLE001 - any import failure means no triton here
        return None
    return triton.__version__


def proton() -> ModuleType | None:
    """Triton's profiler module (``triton.profiler``, "proton"), or None where it does not import."""
    try:
        import triton.profiler as proton_module
    except Exception:  # noqa: BLE001 - any import failure means no proton
        return None
    return proton_module
