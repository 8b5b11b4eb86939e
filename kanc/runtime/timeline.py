"""Per-module time from forward and backward hooks: a timeline of marks, cut into intervals, each interval
charged to the innermost module open at the time (its exclusive time).

Every module gets four hooks (forward pre/post, full backward pre/post). Each hook stamps the clock (CPU:
``time.perf_counter``; CUDA: a recorded ``torch.cuda.Event``, so times are on the GPU's own timeline) and notes
how many kernel launches had been recorded so far, which charges each launch to the module that made it.

Backward hooks bracket a module's backward only when its input needs a gradient; a module whose inputs need none
(the first layer on token ids) closes at once, and the autograd work that follows with no module open (its weight
gradient) is charged to it.
"""

from __future__ import annotations

import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kanc.runtime.counts import CallShapes

OUTSIDE = -1  # "module" index of time spent outside every module (loss, autograd set-up)


def first_tensor(value: Any, floating: bool = False) -> Tensor | None:
    """The first tensor in a (possibly nested) output: tensor, tuple/list, dict (HF ModelOutput), dataclass."""
    if isinstance(value, Tensor):
        return value if not floating or value.is_floating_point() else None
    if isinstance(value, dict):
        value = list(value.values())
    elif hasattr(value, "__dataclass_fields__"):
        value = [getattr(value, f) for f in value.__dataclass_fields__]
    if isinstance(value, (list, tuple)):
        for item in value:
            found = first_tensor(item, floating)
            if found is not None:
                return found
    return None


class Clock:
    """Timestamps on the CPU (perf_counter) or on a CUDA stream (events), resolved to ms after a step."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def stamp(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def resolve(self, stamps: list[Any]) -> list[float]:
        """Milliseconds of each stamp after the first."""
        if not stamps:
            return []
        if self.cuda:
            torch.cuda.synchronize()
            return [stamps[0].elapsed_time(s) for s in stamps]
        return [(s - stamps[0]) * 1e3 for s in stamps]


@dataclass
class Mark:
    kind: str  # "step>", "f>", "f<", "bwd>", "b>", "b<", "step<"
    module: int
    stamp: Any
    launches: int
    early: bool = False  # a "b<" that fired before any input gradient existed


@dataclass
class ModuleCall:
    """One forward call of a module: its shapes and the direct children that ran inside it."""

    module: int
    shapes: CallShapes | None = None
    children: set[str] = field(default_factory=set)


@dataclass
class StepTimes:
    """One step, analysed: exclusive ms and launch indices per (module, direction), and the open/close spans."""

    total_ms: float
    exclusive_ms: dict[tuple[int, str], float]
    launches: dict[tuple[int, str], list[int]]
    spans: list[tuple[int, str, float, float]]  # (module, direction, start ms, end ms) for the trace
    backward_start_ms: float | None


class Tracer:
    """Hooks on every module of ``model``; ``step()`` runs one measured step and returns its marks."""

    def __init__(self, model: nn.Module, clock: Clock, launches: list, backward_hooks: bool = True) -> None:
        self.names = [name for name, _ in model.named_modules()]
        self.modules = [module for _, module in model.named_modules()]
        self.clock, self.launches, self.backward_hooks = clock, launches, backward_hooks
        self.marks: list[Mark] = []
        self.calls: list[ModuleCall] = []
        self.capture = False
        self._open_calls: list[ModuleCall] = []
        self._handles: list[Any] = []

    # -- hooks
    def attach(self) -> None:
        for index, module in enumerate(self.modules):
            self._handles.append(module.register_forward_pre_hook(self._pre(index)))
            self._handles.append(module.register_forward_hook(self._post(index), with_kwargs=True))
            if self.backward_hooks:
                self._handles.append(module.register_full_backward_pre_hook(self._bpre(index)))
                self._handles.append(module.register_full_backward_hook(self._bpost(index)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def mark(self, kind: str, module: int = OUTSIDE, early: bool = False) -> None:
        self.marks.append(Mark(kind, module, self.clock.stamp(), len(self.launches), early))

    def _pre(self, index: int) -> Callable:
        def hook(module: nn.Module, args: Any) -> None:
            if self.capture:
                if self._open_calls:
                    parent = self._open_calls[-1]
                    self._record_child(parent, index)
                self._open_calls.append(ModuleCall(index))
            self.mark("f>", index)

        return hook

    def _post(self, index: int) -> Callable:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            self.mark("f<", index)
            if self.capture and self._open_calls and self._open_calls[-1].module == index:
                call = self._open_calls.pop()
                call.shapes = _call_shapes(args, kwargs, output, call.children)
                self.calls.append(call)

        return hook

    def _bpre(self, index: int) -> Callable:
        def hook(module: nn.Module, grad_output: Any) -> None:
            self.mark("b>", index)

        return hook

    def _bpost(self, index: int) -> Callable:
        def hook(module: nn.Module, grad_input: Any, grad_output: Any) -> None:
            self.mark("b<", index, early=all(g is None for g in grad_input))

        return hook

    def _record_child(self, parent: ModuleCall, child: int) -> None:
        prefix = self.names[parent.module]
        name = self.names[child]
        relative = name[len(prefix) + 1 :] if prefix else name
        parent.children.add(relative.split(".")[0])

    # -- steps
    def run(self, step: Callable[[Callable[[], None]], None], capture: bool = False) -> list[Mark]:
        """Run ``step(mark_backward)`` between a start and an end mark; returns this step's marks."""
        self.marks, self.capture, self._open_calls = [], capture, []
        if capture:
            self.calls = []
        self.mark("step>")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            warnings.filterwarnings("ignore", message="For backward hooks to be called")
            step(lambda: self.mark("bwd>"))
        self.mark("step<")
        self.capture = False
        return self.marks


def analyse(marks: list[Mark], clock: Clock) -> StepTimes:
    """Cut one step's marks into intervals and charge each to the innermost open module of its direction."""
    times = clock.resolve([m.stamp for m in marks])
    exclusive: dict[tuple[int, str], float] = defaultdict(float)
    launches: dict[tuple[int, str], list[int]] = defaultdict(list)
    spans: list[tuple[int, str, float, float]] = []
    stacks: dict[str, list[tuple[int, float]]] = {"forward": [], "backward": []}
    direction, pending, backward_start = "forward", OUTSIDE, None
    for i, mark in enumerate(marks):
        if mark.kind == "bwd>":
            direction, backward_start = "backward", times[i]
        elif mark.kind in ("f>", "b>"):
            stacks[direction].append((mark.module, times[i]))
        elif mark.kind in ("f<", "b<"):
            opened = _pop(stacks[direction], mark.module)
            if opened is not None:
                spans.append((mark.module, direction, opened, times[i]))
            if mark.early:
                pending = mark.module
        if i + 1 == len(marks):
            break
        stack = stacks[direction]
        owner = stack[-1][0] if stack else (pending if direction == "backward" else OUTSIDE)
        exclusive[(owner, direction)] += times[i + 1] - times[i]
        launches[(owner, direction)].extend(range(mark.launches, marks[i + 1].launches))
    return StepTimes(times[-1] - times[0], dict(exclusive), dict(launches), spans, backward_start)


def _pop(stack: list[tuple[int, float]], module: int) -> float | None:
    for j in range(len(stack) - 1, -1, -1):
        if stack[j][0] == module:
            opened = stack[j][1]
            del stack[j:]
            return opened
    return None


def _call_shapes(args: Any, kwargs: Any, output: Any, children: set[str]) -> CallShapes:
    x = first_tensor(args)
    if x is None:
        x = first_tensor(kwargs)
    y = first_tensor(output)
    return CallShapes(
        tuple(x.shape) if x is not None else None,
        x.dtype if x is not None else None,
        tuple(y.shape) if y is not None else None,
        y.dtype if y is not None else None,
        bool(x is not None and x.requires_grad),
        frozenset(children),
    )
