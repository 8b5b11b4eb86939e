"""The report's rows, built from what the profiler's hooked steps saw: one row per module and direction
(``LayerRow``), one per kernel per layer (``KernelRow``), the step's time figures and the Chrome trace events.

``kanc.runtime.profiler`` runs the steps and fills a :class:`Hooked`; :class:`RowBuilder` turns it into rows, with
hand-counted FLOPs and bytes (``counts``) and rates against the device's roofline (``report.rates``).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

import torch
from torch import nn

from kanc.codegen import fallbacks
from kanc.codegen.launches import Launch
from kanc.runtime.counts import Counts, module_counts
from kanc.runtime.devices import DevicePeaks
from kanc.runtime.report import KernelRow, LayerRow, layer_kind, rates
from kanc.runtime.stalls import StallReport
from kanc.runtime.timeline import OUTSIDE, ModuleCall, StepTimes

KANC_LAYERS = {"GroupRational", "GRKANLinear", "SNNKMlp", "SNNKLinear", "SNNKFeatures"}


class Hooked:
    """Results of the hooked phase: analysed steps, launches, the first step's module calls."""

    def __init__(self) -> None:
        self.steps: list[StepTimes] = []
        self.launches: list[Launch] = []
        self.step_launches: list[Launch] = []  # the first measured step's launches, in order
        self.calls: list[ModuleCall] = []
        self.names: list[str] = []
        self.modules: list[nn.Module] = []
        self.notes: list[str] = []
        self.backward_hooks = True
        self.timer = ""


class RowBuilder:
    """Turns the hooked phase into report rows."""

    def __init__(self, hooked: Hooked, peaks: DevicePeaks) -> None:
        self.hooked, self.peaks = hooked, peaks
        self.total_ms = statistics.fmean(s.total_ms for s in hooked.steps)
        self.time: dict[tuple[int, str], float] = defaultdict(float)
        for s in hooked.steps:
            for key, ms in s.exclusive_ms.items():
                self.time[key] += ms / len(hooked.steps)
        first = hooked.steps[0]
        # the first measured step's launches are the first of the recording: index i is step launch i
        self.launch_owner = {i: key for key, indices in first.launches.items() for i in indices}
        self.calls: dict[int, list[ModuleCall]] = defaultdict(list)
        for call in hooked.calls:
            self.calls[call.module].append(call)

    def name(self, module: int) -> str:
        return "(outside modules)" if module == OUTSIDE else self.hooked.names[module]

    def launches_of(self, key: tuple[int, str]) -> list[Launch]:
        return [self.hooked.launches[i] for i in self.hooked.steps[0].launches.get(key, [])]

    def layer_rows(self) -> list[LayerRow]:
        rows = []
        for key in self._ordered_keys():
            module, direction = key
            row = self._layer_row(module, direction)
            if row is not None:
                rows.append(row)
        return rows

    def _ordered_keys(self) -> list[tuple[int, str]]:
        directions = ("forward", "backward")
        keys = set(self.time) | {(call.module, "forward") for call in self.hooked.calls}
        if self.hooked.backward_hooks and any(d == "backward" for _, d in self.time):
            keys |= {(call.module, "backward") for call in self.hooked.calls}
        return sorted(keys, key=lambda k: (directions.index(k[1]), k[0]))

    def _layer_row(self, module: int, direction: str) -> LayerRow | None:
        ms = self.time.get((module, direction), 0.0)
        calls = self.calls.get(module, [])
        launches = self.launches_of((module, direction))
        if module == OUTSIDE:
            if ms <= 0:
                return None
            split = direction == "forward" or self.hooked.backward_hooks
            label = "(outside modules)" if split else "(backward, not split by layer)"
            return LayerRow(label, "", direction, 0, ms, ms / self.total_ms, "none")
        mod = self.hooked.modules[module]
        counts, note = self._counts(mod, calls, direction)
        shapes = calls[0].shapes if calls and calls[0].shapes else None
        if ms <= 0 and not launches and (counts is None or counts.flops == 0 and counts.bytes == 0):
            return None  # a container with nothing of its own
        children = set().union(*(c.children for c in calls)) if calls else set()
        row = LayerRow(
            name=self.hooked.names[module],
            type=type(mod).__name__,
            direction=direction,
            calls=len(calls),
            time_ms=ms,
            share=ms / self.total_ms if self.total_ms else 0.0,
            path=_path(type(mod), bool(launches), children),
            kind=layer_kind(type(mod)),
            kernels=sorted({launch.kernel for launch in launches}),
            launches=len(launches),
            atomics=sum(launch.atomics for launch in launches),
            elements=sum(_numel(c.shapes.input_shape) for c in calls if c.shapes) or None,
            flops=counts.flops if counts else None,
            bytes=counts.bytes if counts else None,
            matmul_flops=counts.matmul_flops if counts else None,
            count_note=note,
            input_shape=list(shapes.input_shape) if shapes and shapes.input_shape else None,
            output_shape=list(shapes.output_shape) if shapes and shapes.output_shape else None,
            dtype=dtype_name(shapes.input_dtype) if shapes else None,
        )
        row.rates = rates(counts, ms if ms > 0 else None, self.peaks, shapes.input_dtype if shapes else None)
        return row

    def _counts(self, mod: nn.Module, calls: list[ModuleCall], direction: str) -> tuple[Counts | None, str]:
        total: Counts | None = None
        for call in calls:
            if call.shapes is None:
                continue
            c = module_counts(mod, call.shapes, direction)
            if c is None:
                return None, "not counted (kanc has no FLOP/byte count for this module type)"
            total = c if total is None else total + c
        return total, total.note if total else ""

    def kernel_rows(
        self, layers: list[LayerRow], kernel_times: dict[int, float], stall_report: StallReport
    ) -> list[KernelRow]:
        by_layer = {(row.name, row.direction): row for row in layers}
        stalls = {k.kernel: k.to_json() for k in stall_report.kernels}
        groups: dict[tuple[int, str, str], list[int]] = defaultdict(list)
        for i, _ in enumerate(self.hooked.step_launches):
            owner = self.launch_owner.get(i, (OUTSIDE, "forward"))
            groups[(*owner, self.hooked.step_launches[i].kernel)].append(i)
        rows = []
        for (module, direction, kernel), indices in groups.items():
            layer = by_layer.get((self.name(module), direction))
            rows.append(self._kernel_row(module, direction, kernel, indices, layer, kernel_times, stalls))
        return rows

    def _kernel_row(self, module, direction, kernel, indices, layer, kernel_times, stalls) -> KernelRow:
        launches = [self.hooked.step_launches[i] for i in indices]
        first = launches[0]
        time_ms, source = self._kernel_time(module, indices, layer, kernel_times)
        sole = layer is not None and layer.kernels == [kernel]
        counts = (
            Counts(layer.flops, layer.bytes, layer.matmul_flops or 0.0) if sole and layer.flops is not None else None
        )
        row = KernelRow(
            kernel=kernel,
            op=first.op,
            layer=self.name(module),
            direction=direction,
            launches=len(launches),
            programs=sum(launch.programs for launch in launches),
            atomics=sum(launch.atomics for launch in launches),
            grid=list(first.grid),
            config=dict(first.config),
            shapes=[list(s) for s in first.shapes],
            dtype=first.dtype,
            time_ms=time_ms,
            time_source=source,
            share=time_ms / self.total_ms if time_ms is not None and self.total_ms else None,
            flops=counts.flops if counts else None,
            bytes=counts.bytes if counts else None,
            stalls=stalls.get(kernel),
            placement=first.extra.get("placement"),
        )
        dtype = getattr(torch, first.dtype.replace("torch.", ""), None) if first.dtype else None
        row.rates = rates(counts, time_ms, self.peaks, dtype if isinstance(dtype, torch.dtype) else None)
        return row

    def _kernel_time(self, module, indices, layer, kernel_times) -> tuple[float | None, str]:
        if kernel_times:
            times = [kernel_times[i] for i in indices if i in kernel_times]
            return (sum(times), "cuda (torch.profiler)") if times else (None, "unmatched")
        if layer is None or layer.launches == 0:
            return None, "none"
        # CPU: the interpreter runs a launch's programs one after another, so the layer's time splits by programs.
        mine = sum(self.hooked.step_launches[i].programs for i in indices)
        layer_launches = self.launches_of((module, layer.direction))
        total = sum(launch.programs for launch in layer_launches) or 1
        return layer.time_ms * mine / total, "layer time split by programs (CPU)"


def mark_fallbacks(layers: list[LayerRow], rows: list[fallbacks.Fallback]) -> None:
    """Put on each layer's rows why its calls ran the reference (the checker's reasons, counted per layer during the
    hooked steps), e.g. "kanc::snnk_block: no CPU kernel for this op (...)"."""
    why: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        why[row.layer].add(f"{row.op}: {row.text}")
    for layer in layers:
        if layer.name in why and layer.name:
            layer.fallback = "; ".join(sorted(why[layer.name]))


def _path(module_type: type, launched: bool, children: set[str]) -> str:
    if launched:
        return "kernel"
    names = {base.__name__ for base in module_type.__mro__}
    kanc_layer = names & KANC_LAYERS
    if kanc_layer and not (kanc_layer == {"GRKANLinear"} and "rational" in children):
        return "reference"
    return "torch"


def _numel(shape: tuple[int, ...] | None) -> int:
    n = 1
    for d in shape or (0,):
        n *= d
    return n


def dtype_name(dtype: torch.dtype | None) -> str | None:
    return str(dtype).replace("torch.", "") if dtype is not None else None


def step_info(step_ms: list[float], hooked: Hooked) -> dict[str, Any]:
    q = statistics.quantiles(step_ms, n=5) if len(step_ms) > 1 else [step_ms[0]] * 4
    hooked_ms = statistics.fmean(s.total_ms for s in hooked.steps)
    median = statistics.median(step_ms)
    return {
        "time_ms": median,
        "quantiles_ms": {"p20": q[0], "p50": median, "p80": q[3]},
        "min_ms": min(step_ms),
        "hooked_time_ms": hooked_ms,
        "hook_overhead": hooked_ms / median - 1 if median > 0 else None,
    }


def trace_events(hooked: Hooked, builder: RowBuilder) -> list[dict[str, Any]]:
    """Chrome trace events: one track per direction, the measured steps laid end to end (microseconds)."""
    tids = {"step": 0, "forward": 1, "backward": 2}
    events: list[dict[str, Any]] = [{"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "kanc profile"}}]
    events += [{"name": "thread_name", "ph": "M", "pid": 1, "tid": t, "args": {"name": n}} for n, t in tids.items()]
    offset = 0.0
    for k, s in enumerate(hooked.steps):
        events.append({"name": f"step {k}", "ph": "X", "pid": 1, "tid": 0, "ts": offset * 1e3, "dur": s.total_ms * 1e3})
        for module, direction, start, end in s.spans:
            mod = hooked.modules[module]
            events.append(
                {
                    "name": builder.name(module) or "(model)",
                    "cat": direction,
                    "ph": "X",
                    "pid": 1,
                    "tid": tids[direction],
                    "ts": (offset + start) * 1e3,
                    "dur": (end - start) * 1e3,
                    "args": {"type": type(mod).__name__},
                }
            )
        offset += s.total_ms * 1.05
    return events
