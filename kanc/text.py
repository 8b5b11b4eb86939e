"""Plain-text layout shared by every report kanc prints (conversion, profile, tune, inspect)."""

from __future__ import annotations

from collections.abc import Sequence
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
