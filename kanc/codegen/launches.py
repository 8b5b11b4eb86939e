"""What the launchers actually launched: kernel name, grid, config and atomics, recorded on request.

Every launcher calls :func:`record` with the facts only it knows (the config it picked, the grid, how many
atomic adds the launch issues). Nothing is kept unless a caller is listening:

    with kanc.codegen.recording() as launches:
        model(x).sum().backward()
    for launch in launches: print(launch.kernel, launch.grid, launch.atomics)

The profiler (``kanc.runtime``) uses this to put real launch facts beside measured times; a call that took
the reference path records nothing, which is how a report tells "kernel" from "reference".

Recordings are process-wide: a recording hears launches from every thread, because autograd runs the
backward of CUDA tensors on its own worker threads (a per-thread recording would miss every backward kernel).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

_lock = threading.Lock()
_listeners: list[list[Launch]] = []


@dataclass(frozen=True)
class Launch:
    """One kernel launch.

    op: the custom op it serves ("kanc::group_rational", ...); kernel: the ``@triton.jit`` function's name;
    grid: programs per axis; config: the launch config (block sizes, num_warps, ...); atomics: atomic
    read-modify-write instructions the launch issues in total (each on one address); shapes and dtype: of
    the op's main operands; extra: anything else a profiler may want (``{"direction": "backward"}``).
    """

    op: str
    kernel: str
    grid: tuple[int, ...]
    config: dict[str, Any]
    atomics: int = 0
    shapes: tuple[tuple[int, ...], ...] = ()
    dtype: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def programs(self) -> int:
        return math.prod(self.grid)


def is_recording() -> bool:
    """Whether any caller listens (launchers may skip building a Launch when not)."""
    return bool(_listeners)


def record(launch: Launch) -> None:
    """Append ``launch`` to every active :func:`recording` (a no-op when none is active)."""
    if not _listeners:
        return
    with _lock:
        for sink in _listeners:
            sink.append(launch)


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Collect the launches made inside the block (nested recordings each see all of them)."""
    sink: list[Launch] = []
    with _lock:
        _listeners.append(sink)
    try:
        yield sink
    finally:
        with _lock:  # by identity: two recordings holding equal lists are still different recordings
            del _listeners[next(i for i, s in enumerate(_listeners) if s is sink)]
