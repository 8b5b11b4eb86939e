"""Text kanc writes for people and tools: the table layout of every report it prints (conversion, profile, tune,
inspect), lists of names, and JSON-safe values."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any


def table(rows: Sequence[Sequence[Any]], header: Sequence[Any]) -> list[str]:
    """``header`` and ``rows`` as left-aligned columns two spaces apart, one string a line, no trailing blanks."""
    lines = [header, *rows]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return ["  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip() for line in lines]


def ellipsize(text: str, width: int, keep: str = "end") -> str:
    """``text`` cut to ``width`` characters with ``...`` where it was cut: ``keep="end"`` keeps the tail (a module
    path's last parts), ``keep="start"`` the head (a message)."""
    if len(text) <= width:
        return text
    return "..." + text[-(width - 3) :] if keep == "end" else text[: width - 3] + "..."


def first_names(names: Sequence[str], shown: int = 4) -> str:
    """The first ``shown`` names joined by commas, then how many more there are: ``"a, b, c, d (+3 more)"``."""
    more = f" (+{len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def json_safe(value: Any, nonfinite: Callable[[float], Any] = lambda v: None) -> Any:
    """``value`` as strict JSON data: dict keys strings, tuples and sets lists, dtypes their names ("float32"), other
    objects their str; NaN and inf (which JSON has no numbers for) become ``nonfinite(v)``, null by default."""
    if isinstance(value, float):
        return value if math.isfinite(value) else nonfinite(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v, nonfinite) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v, nonfinite) for v in value]
    if isinstance(value, str | int | bool) or value is None:
        return value
    return _dtype_name(value) or str(value)


def _dtype_name(value: Any) -> str | None:
    import torch  # text tables need no torch; only a dtype does

    return str(value).replace("torch.", "") if isinstance(value, torch.dtype) else None
