"""Kernel-to-reference fallbacks, counted per layer: which layer, which op, and why. Nothing falls back silently.

Each op asks the checker once per call (``checker.kernel_route``); when the reference runs, the op calls
:func:`count` with the op's name, the reason and the tensor that identifies the layer, its *owner* (the rational's
``denominator``, the linear's or SNNK readout's ``weight``: parameters, so they live as long as the layer and keep
their identity through ``.to()``). Counting is one dict lookup and one increment under a lock.

Readers: ``kanc.report(model)`` and ``kanc.profile`` map the owners to module names (:func:`of_model`); with
``KANC_DEBUG=1`` each fallback is also said on stderr the first time it happens, once per layer and reason, or once
per process for reasons that hold for every call (:data:`GLOBAL_REASONS`: no kernel on this device, kernels
switched off, no C compiler, ...) so that a model with no kernel at all prints one line, not one per layer.

Calls made while torch.compile traces are not counted (tracing runs each call once, not per step); ops inside a
compiled graph count by the tensors the graph passes, which may not be the model's parameters, so per-layer counts
are for eager execution.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from kanc.codegen.debug import debug_level

# Reasons that come from the environment, not from the layer: said once per process under KANC_DEBUG=1 (so are the
# C build's, "cpu kernel unavailable: ...").
GLOBAL_REASONS = frozenset({"kernels disabled", "onnx export", "triton not installed", "no cpu kernel for this op"})
CPU_BUILD_PREFIX = "cpu kernel unavailable"
# What a reason means, for reports.
REASON_TEXT = {
    "kernels disabled": "kernels switched off (KANC_KERNELS=0 or kanc.codegen.set_kernels_enabled(False))",
    "onnx export": "ONNX export (the exporter must see standard ops)",
    "triton not installed": "triton is not installed",
    "no cpu kernel for this op": "no CPU kernel for this op (its kernel runs on CUDA, or under TRITON_INTERPRET=1)",
    "device": "inputs not on one supported device",
    "dtype": "dtype not supported by the kernels (fp32, fp16, bf16)",
    "empty tensor": "empty input",
    "shape limit": "shape beyond the kernel's limit",
    "mixed dtypes": "input, weight and bias dtypes differ",
    "projection requires grad": "the projection takes a gradient (the kernel keeps it fixed)",
}


@dataclass(frozen=True)
class Fallback:
    """One layer's calls of one op that ran the reference for one reason."""

    layer: str  # module name in the model ("" for the model itself)
    type: str  # the module's class name
    op: str
    reason: str
    calls: int

    @property
    def text(self) -> str:
        """The reason in words."""
        return REASON_TEXT.get(self.reason, self.reason)


class _Entry:
    __slots__ = ("ref", "counts")

    def __init__(self, ref: weakref.ref, counts: dict[tuple[str, str], int]) -> None:
        self.ref, self.counts = ref, counts


_lock = threading.Lock()
_entries: dict[int, _Entry] = {}  # id(owner) -> its counts; the weakref checks the id was not reused
_said: set[tuple] = set()


def count(op: str, owner: Tensor, reason: str) -> None:
    """One call of ``op`` for the layer owning ``owner`` ran the reference because of ``reason``."""
    if torch.compiler.is_compiling():
        return
    key = id(owner)
    with _lock:
        entry = _entries.get(key)
        if entry is None or entry.ref() is not owner:
            entry = _entries[key] = _Entry(weakref.ref(owner, partial(_forget, key)), {})
        calls = entry.counts.get((op, reason), 0)
        entry.counts[(op, reason)] = calls + 1
    if calls == 0 and debug_level() >= 1:
        _say(op, owner, reason)


def _forget(key: int, ref: weakref.ref) -> None:
    """The owner died: drop its counts (no lock: this may run from the garbage collector inside ``count``)."""
    entry = _entries.get(key)
    if entry is not None and entry.ref is ref:
        _entries.pop(key, None)


def snapshot() -> dict[int, dict[tuple[str, str], int]]:
    """The counts now, by owner id (for a later :func:`of_model` ``since=``)."""
    with _lock:
        return {key: dict(entry.counts) for key, entry in _entries.items()}


def reset() -> None:
    """Forget every count (tests)."""
    with _lock:
        _entries.clear()
        _said.clear()


def of_model(model: nn.Module, since: dict[int, dict[tuple[str, str], int]] | None = None) -> list[Fallback]:
    """The fallbacks of ``model``'s layers, counted since the ``since`` snapshot (else since each layer was built),
    in module order. A count is charged to the innermost kanc module holding its owner tensor (an SNNK block's
    readout weight lives in its ``linear`` child: the block is the layer), else to the owner's module."""
    modules = dict(model.named_modules())
    totals: dict[tuple[str, str, str], int] = {}
    seen: set[int] = set()
    for name, module in modules.items():
        for tensor in _owned(module):
            entry = _entries.get(id(tensor))
            if id(tensor) in seen or entry is None or entry.ref() is not tensor:
                continue
            seen.add(id(tensor))
            before = (since or {}).get(id(tensor), {})
            layer = _kanc_layer(name, modules)
            for (op, reason), calls in sorted(dict(entry.counts).items()):
                new = calls - before.get((op, reason), 0)
                if new > 0:
                    totals[(layer, op, reason)] = totals.get((layer, op, reason), 0) + new
    order = {name: i for i, name in enumerate(modules)}
    rows = sorted(totals.items(), key=lambda kv: (order[kv[0][0]], kv[0][1], kv[0][2]))
    return [Fallback(layer, type(modules[layer]).__name__, op, reason, calls) for (layer, op, reason), calls in rows]


def _kanc_layer(name: str, modules: dict[str, nn.Module]) -> str:
    """``name`` or its nearest ancestor whose class is one of kanc's, else ``name``."""
    parts = name.split(".") if name else []
    for end in range(len(parts), -1, -1):
        candidate = ".".join(parts[:end])
        if type(modules.get(candidate)).__module__.startswith("kanc."):
            return candidate
    return name


def _owned(module: nn.Module) -> Iterable[Tensor]:
    yield from module.parameters(recurse=False)
    yield from module.buffers(recurse=False)


def summary(rows: list[Fallback], per_layer: int = 3) -> list[str]:
    """Lines for a report: one per layer, or one per (op, reason) when more than ``per_layer`` layers share it
    (a model with no kernel for its device says so once)."""
    groups: dict[tuple[str, str], list[Fallback]] = defaultdict(list)
    for row in rows:
        groups[(row.op, row.reason)].append(row)
    lines = []
    for (op, reason), group in groups.items():
        calls = sum(r.calls for r in group)
        text = REASON_TEXT.get(reason, reason)
        if len(group) > per_layer:
            names = ", ".join(r.layer or "(model)" for r in group[:2])
            lines.append(
                f"{len(group)} layers ({names}, ...): {op} ran the PyTorch reference ({calls:,} calls): {text}"
            )
        else:
            lines += [
                f"{r.layer or '(model)'}: {op} ran the PyTorch reference ({r.calls:,} calls): {text}" for r in group
            ]
    return lines


# ---------------------------------------------------------------------------------------------- KANC_DEBUG=1
def _say(op: str, owner: Tensor, reason: str) -> None:
    """Print the first fallback of a layer (or of the process, for a global reason) on stderr."""
    text = REASON_TEXT.get(reason, reason)
    if reason in GLOBAL_REASONS or reason.startswith(CPU_BUILD_PREFIX):
        key: tuple = (op, reason)
        line = f"[kanc] {op} runs the PyTorch reference in every layer: {text}"
    else:
        key = (id(owner), op, reason)
        line = f"[kanc] {_layer_name(owner)}: {op} runs the PyTorch reference: {text}"
    if key not in _said:
        _said.add(key)
        print(line, file=sys.stderr)


def _layer_name(owner: Tensor) -> str:
    """The module owning ``owner``, named from the outermost module on the call stack (debug only: walks frames)."""
    modules: list[nn.Module] = []
    frame = sys._getframe(1)
    while frame is not None:
        obj = frame.f_locals.get("self")
        if isinstance(obj, nn.Module) and not any(obj is m for m in modules):
            modules.append(obj)
        frame = frame.f_back
    layer = next((m for m in modules if any(t is owner for t in _owned(m))), None)
    if layer is None:
        return f"a call with a {tuple(owner.shape)} {owner.dtype} owner tensor"
    name = next((n for n, m in modules[-1].named_modules() if m is layer), None)
    return f"{name or '(model)'} ({type(layer).__name__})" if name is not None else type(layer).__name__
