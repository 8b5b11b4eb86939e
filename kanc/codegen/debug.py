"""``KANC_DEBUG`` levels for codegen (style item 8): at 3, each kernel's Triton source and chosen configs on stderr.

Levels 1 and 2 belong to the passes (hit counts, graphs); codegen prints nothing below 3. Each kernel's source is
printed once per process, each (kernel, key, config) choice once, so a training loop does not flood the log.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

from kanc.codegen.env import getenv

_seen: set[Any] = set()


def debug_level() -> int:
    """``KANC_DEBUG`` as an int (0 when unset or not a number)."""
    try:
        return int(getenv("KANC_DEBUG", "0"))
    except ValueError:
        return 0


def kernel_source(kernel: Any) -> str:
    """The Python/Triton source of a ``@triton.jit`` function (its ``src``), or of any function."""
    src = getattr(kernel, "src", None)
    return src if isinstance(src, str) else inspect.getsource(getattr(kernel, "fn", kernel))


def log_launch(kernel: Any, key: tuple, config: dict[str, Any], constants: dict[str, Any] | None = None) -> None:
    """At KANC_DEBUG >= 3: the kernel's source (first time) and the config chosen for ``key`` (first time)."""
    if debug_level() < 3:
        return
    name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", str(kernel))
    if name not in _seen:
        _seen.add(name)
        print(f"[kanc codegen] source of {name}:\n{kernel_source(kernel)}", file=sys.stderr)
    entry = (name, tuple(key), tuple(sorted(config.items())), tuple(sorted((constants or {}).items())))
    if entry not in _seen:
        _seen.add(entry)
        extra = f" constexprs={constants}" if constants else ""
        print(f"[kanc codegen] {name} key={key} config={config}{extra}", file=sys.stderr)
