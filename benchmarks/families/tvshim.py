"""Import torchvision's pure-Python model code beside a torch whose build its C extension does not match.

The registry's torchvision wheel is a CUDA build: beside the CPU torch its ``_C`` extension does not load, which
torchvision tolerates (``extension._has_ops()`` is False), but ``torchvision/_meta_registrations.py`` then
registers fake kernels for ``torchvision::nms`` / ``qnms`` unconditionally and the import dies with "operator
torchvision::nms does not exist". timm imports torchvision, so timm dies too.

``import_torchvision()`` imports it with ``torch.library.register_fake`` skipping registrations for torchvision
operators that do not exist (only those; every other call goes through), then restores the real function. The
models, transforms and ``torchvision.ops.misc`` work; the C++ ops (nms, roi_align, ...) raise if called, as
torchvision's own ``_assert_has_ops`` says. With a torchvision whose extension loads, nothing is skipped.
For benchmarks and tests only: kanc itself never imports torchvision.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator
from types import ModuleType

import torch

SKIPPED: list[str] = []  # the fake-kernel registrations the shim left out (for the JSON's record)


def _op_exists(qualname: str) -> bool:
    namespace, _, name = qualname.partition("::")
    try:
        getattr(getattr(torch.ops, namespace), name.split(".")[0])
    except (AttributeError, RuntimeError):
        return False
    return True


@contextlib.contextmanager
def _skip_missing_torchvision_fakes() -> Iterator[None]:
    real = torch.library.register_fake

    def register_fake(op, func=None, /, **kwargs):
        if isinstance(op, str) and op.startswith("torchvision::") and not _op_exists(op):
            SKIPPED.append(op)
            return func if func is not None else (lambda fn: fn)
        return real(op, func, **kwargs)

    torch.library.register_fake = register_fake
    try:
        yield
    finally:
        torch.library.register_fake = real


def import_torchvision() -> ModuleType:
    """torchvision, imported through the shim the first time (ImportError if it is not installed)."""
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    with _skip_missing_torchvision_fakes():
        return importlib.import_module("torchvision")
