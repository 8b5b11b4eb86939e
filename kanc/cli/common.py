"""What the commands share: parsing an input shape, random example inputs, loading the model file."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kanc.errors import KancError


def parse_shape(text: str) -> tuple[int, ...]:
    """``"8,197,768"`` (or ``"8x197x768"``) -> (8, 197, 768); a one-line error otherwise."""
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise KancError(f"bad --input-shape {text!r}: expected integers like 8,197,768") from None
    if not shape or any(d <= 0 for d in shape):
        raise KancError(f"bad --input-shape {text!r}: dimensions must be positive integers")
    return shape


def random_inputs(shapes: Sequence[str], dtype: str, vocab: int) -> tuple[Any, ...]:
    """Seeded example inputs, one per ``--input-shape``: floats N(0, 1), or token ids below ``vocab`` ("long")."""
    import torch

    gen = torch.Generator().manual_seed(0)
    if dtype == "long":
        return tuple(torch.randint(0, vocab, parse_shape(s), generator=gen) for s in shapes)
    return tuple(torch.randn(parse_shape(s), generator=gen) for s in shapes)


def load_module(path: Path, trust_pickle: bool, arch: str | None, arch_kwargs: str | None) -> Any:
    """The model at ``path`` (kanc.api.load: it also rebuilds models kanc converted)."""
    if not path.exists():
        raise KancError(f"model file not found: {path}")
    from kanc.api import load

    return load(str(path), trust_pickle=trust_pickle, arch=arch, arch_kwargs=arch_kwargs)


def read_inputs(path: Path, what: str = "inputs") -> Any:
    """Model inputs ``torch.save``d at ``path`` (a tensor, a tuple/list or a dict holding tensors), read safely."""
    import torch

    if not path.is_file():
        raise KancError(f"{what} file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one line for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KancError(f"cannot read {what} from {path} (expected torch.save of tensors): {first}") from None
    if not _has_tensor(obj):
        raise KancError(f"{path} holds no tensor: save a tensor, a tuple of tensors or a dict of tensors")
    return obj


def _has_tensor(obj: Any) -> bool:
    import torch

    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, dict):
        return any(_has_tensor(v) for v in obj.values())
    if isinstance(obj, tuple | list):
        return any(_has_tensor(v) for v in obj)
    return False
