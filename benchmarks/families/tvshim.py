"""Import torchvision's pure-Python model code beside a torch whose build its C extension does not match.

The registry's torchvision wheel is a CUDA build: beside the CPU torch its ``_C`` extension does not load, which
torchvision tolerates (``extension._has_ops()`` is False), but ``torchvision/_meta_registrations.py`` then
registers fake kernels for ``torchvision::nms`` / ``qnms`` unconditionally and the import dies with "operator
torchvision::nms does not exist". timm and open_clip import torchvision, so they die too; so does every
transformers model class, since transformers imports torchvision whenever it is installed.

Two parts, for benchmarks and tests only (kanc itself never imports torchvision):

- ``python benchmarks/families/tvshim.py --relocate`` (run by the Makefile after installing the "zoo" extra): if
  ``import torchvision`` fails in a fresh interpreter, the wheel is moved out of site-packages into
  ``<venv>/zoo-torchvision`` (same version, ``--no-deps``, so torch is never replaced), where nothing but this
  shim looks: transformers and the rest of the venv behave as if torchvision were not installed.
- ``import_torchvision()`` puts that folder on ``sys.path`` if torchvision is not importable otherwise, and imports
  it with ``torch.library.register_fake`` skipping registrations for torchvision operators that do not exist
  (only those; every other call goes through), then restores the real function. The models, transforms and
  ``torchvision.ops.misc`` work; the C++ ops (nms, roi_align, ...) raise if called, as torchvision's own
  ``_assert_has_ops`` says. With a torchvision whose extension loads, nothing is skipped or moved.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

SIDE_DIR = Path(sys.prefix) / "zoo-torchvision"
SKIPPED: list[str] = []  # the fake-kernel registrations the shim left out (for the JSON's record)


def _op_exists(qualname: str) -> bool:
    import torch

    namespace, _, name = qualname.partition("::")
    try:
        getattr(getattr(torch.ops, namespace), name.split(".")[0])
    except (AttributeError, RuntimeError):
        return False
    return True


@contextlib.contextmanager
def _skip_missing_torchvision_fakes() -> Iterator[None]:
    import torch

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
    if importlib.util.find_spec("torchvision") is None and SIDE_DIR.is_dir():
        sys.path.append(str(SIDE_DIR))  # last: it holds torchvision only
    with _skip_missing_torchvision_fakes():
        return importlib.import_module("torchvision")


def _imports_cleanly() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
    return probe.returncode == 0


def relocate() -> str:
    """Move a torchvision whose plain import fails out of site-packages (see the module docstring)."""
    try:
        version = importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        return "torchvision is not installed in site-packages: nothing to move"
    if _imports_cleanly():
        return f"torchvision {version} imports cleanly: left in place"
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(
        [*pip, "install", "--no-deps", "--upgrade", "--target", str(SIDE_DIR), f"torchvision=={version}"], check=True
    )
    subprocess.run([*pip, "uninstall", "-y", "torchvision"], check=True)
    return f"torchvision {version} moved to {SIDE_DIR} (its import needs benchmarks/families/tvshim.py)"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="torchvision beside a CPU torch, for kanc's coverage harness")
    parser.add_argument("--relocate", action="store_true", help="move a torchvision that fails to import aside")
    if parser.parse_args().relocate:
        print(relocate())
