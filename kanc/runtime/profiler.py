"""``kanc.profile``: where a model's step time goes, layer by layer and kernel by kernel, against the roofline.

Phases (each over the same step, see ``steps.run_step``):

1. warm-up steps (compilation, autotuning, allocator);
2. plain timed steps: the step time, with no instrumentation;
3. hooked steps (one more first, unmeasured, for the call tree and shapes): every module's forward and
   backward between hooks (``timeline``), kanc's kernel launches recorded (``kanc.codegen.recording``) and
   charged to the module that made them;
4. on CUDA, one more pass under ``torch.profiler`` for each kernel's own GPU time;
5. memory-stall counters of kanc's kernels (``stalls``: Nsight Compute, else proton, else a note).

Hand-counted FLOPs and bytes (``counts``) turn times into rates and a distance to the device's roofline
(``devices``); ``report`` words the findings and writes the files.
"""

from __future__ import annotations

import os
import shutil
import statistics
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kanc.codegen import fallbacks
from kanc.codegen.launches import Launch, recording
from kanc.errors import KancError
from kanc.runtime import stalls as stall_tools
from kanc.runtime.counts import Counts, module_counts
from kanc.runtime.devices import DevicePeaks, device_peaks
from kanc.runtime.report import KernelRow, LayerRow, ProfileReport, find, layer_kind, rates
from kanc.runtime.steps import Inputs, input_summary, model_device, prepare_inputs, run_step, synchronize, time_steps
from kanc.runtime.timeline import OUTSIDE, Clock, ModuleCall, StepTimes, Tracer, analyse

KANC_LAYERS = {"GroupRational", "GRKANLinear", "SNNKMlp", "SNNKLinear", "SNNKFeatures"}
STALL_MODES = ("auto", "ncu", "proton", "none")


def profile(
    model: nn.Module,
    inputs: Inputs,
    *,
    train: bool = False,
    warmup: int = 3,
    iters: int = 10,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    stalls: str = "auto",
    peaks: DevicePeaks | None = None,
    name: str | None = None,
) -> ProfileReport:
    """Profile ``model(*inputs)`` (forward; with ``train`` also backward from a gradient of ones).

    Args:
        model: any nn.Module, converted by kanc or not. It is moved to ``device`` / ``dtype`` in place (as
            ``nn.Module.to`` does) and left in its original train/eval mode and with its gradients as found.
        inputs: a tensor, a tuple/list of positional inputs, or a dict of keyword inputs.
        warmup, iters: steps run before measuring (the first also checks the inputs, so at least one runs), and
            measured steps per phase.
        device: where to run (default: where the model is). dtype: cast the model and floating inputs first.
        stalls: "auto" (Nsight Compute, else proton, else none), "ncu", "proton" or "none".
        peaks: override the device's peak figures (default: the known-device table, else measured).

    Returns a :class:`ProfileReport`; ``report.write(dir)`` writes report.json, trace.json and report.html.
    """
    _check_args(warmup, iters, stalls)
    device = torch.device(device) if device is not None else model_device(model)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KancError("device cuda requested but no CUDA GPU is available (use --device cpu)")
    was_training = model.training
    saved_grads = {p: p.grad for p in model.parameters()}
    for p in saved_grads:
        p.grad = None  # steps start from no gradient; the caller's are put back after
    model.to(device=device, dtype=dtype)
    model.train(train)
    try:
        return _profile(model, inputs, train, warmup, iters, device, dtype, stalls, peaks, name)
    finally:
        model.train(was_training)
        for p, grad in saved_grads.items():
            p.grad = grad


def _check_args(warmup: int, iters: int, stalls: str) -> None:
    if iters < 1 or warmup < 0:
        raise KancError(f"need iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    if stalls not in STALL_MODES:
        raise KancError(f"stalls must be one of {', '.join(STALL_MODES)}, got {stalls!r}")


def _profile(model, inputs, train, warmup, iters, device, dtype, stall_mode, peaks, name) -> ProfileReport:
    args, kwargs = prepare_inputs(inputs, device, dtype, train)

    def step(on_backward: Callable[[], None] | None = None) -> None:
        run_step(model, args, kwargs, train, on_backward)

    _probe(step)  # the first step doubles as a check of the inputs, with a one-line error
    for _ in range(warmup - 1):
        step()
    synchronize(device)
    step_ms = time_steps(step, device, iters)
    before = fallbacks.snapshot()
    hooked = _hooked_steps(model, step, device, iters, train)
    fell_back = fallbacks.of_model(model, since=before)
    kernel_times, other_kernels = (
        _profiler_pass(step, device, hooked.step_launches) if device.type == "cuda" else ({}, [])
    )
    peaks = peaks or device_peaks(device)
    kernels = {launch.kernel for launch in hooked.step_launches}
    stall_report = _collect_stalls(stall_mode, device, sorted(kernels), model, args, kwargs, train, step)
    builder = _Builder(hooked, peaks)
    layers = builder.layer_rows()
    mark_fallbacks(layers, fell_back)
    kernel_rows = builder.kernel_rows(layers, kernel_times, stall_report)
    report = ProfileReport(
        model=_model_info(model, name),
        run=_run_info(device, dtype, train, warmup, iters, args, kwargs, hooked),
        peaks=peaks,
        step=_step_info(step_ms, hooked),
        layers=layers,
        kernels=kernel_rows,
        other_kernels=other_kernels,
        stalls=stall_report,
        findings=[],
        notes=hooked.notes + [peaks.note] if peaks.note else hooked.notes,
        trace_events=_trace_events(hooked, builder),
    )
    report.findings = find(report)
    return report


# ------------------------------------------------------------------------------------------------- timing
def _probe(step: Callable[[], None]) -> None:
    try:
        step()
    except KancError:
        raise
    except Exception as e:  # noqa: BLE001 - the model's own error, reported in one line
        raise KancError(f"the model failed on the example inputs: {type(e).__name__}: {_first_line(e)}") from e


class _Hooked:
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


def _hooked_steps(model: nn.Module, step: Callable, device: torch.device, iters: int, train: bool) -> _Hooked:
    result = _Hooked()
    try:
        _run_hooked(model, step, device, iters, result, backward_hooks=train)
    except RuntimeError as e:
        if not train:
            raise
        # Full backward hooks refuse some in-place patterns (ReLU(inplace=True) on a hooked module's output).
        result.notes.append(f"per-layer backward times unavailable (backward hooks failed: {_first_line(e)})")
        result.steps, result.launches = [], []
        _run_hooked(model, step, device, iters, result, backward_hooks=False)
    return result


def _run_hooked(model, step, device, iters, result: _Hooked, backward_hooks: bool) -> None:
    clock = Clock(device)
    result.timer = "cuda-events" if clock.cuda else "cpu-perf-counter"
    result.backward_hooks = backward_hooks
    with recording() as launches:
        tracer = Tracer(model, clock, launches, backward_hooks)
        tracer.attach()
        try:
            tracer.run(step, capture=True)  # unmeasured: the call tree and shapes (capturing costs time)
            launches.clear()
            for i in range(iters):
                marks = tracer.run(step)
                result.steps.append(analyse(marks, clock))
                if i == 0:
                    result.step_launches = list(launches)
        finally:
            tracer.detach()
    result.launches = list(launches)
    result.calls, result.names, result.modules = tracer.calls, tracer.names, tracer.modules


def _profiler_pass(
    step: Callable, device: torch.device, step_launches: list[Launch], steps: int = 3
) -> tuple[dict[int, float], list[dict[str, Any]]]:
    """GPU time of each launch of a step (index in ``step_launches`` -> ms, averaged over ``steps``), and the
    other (non-kanc) kernels' totals per step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    events = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.start)
    names = {launch.kernel for launch in step_launches}
    mine = [e for e in events if stall_tools.kernel_base_name(e.name) in names]
    expected = [launch.kernel for launch in step_launches] * steps
    per_launch: dict[int, float] = defaultdict(float)
    if [stall_tools.kernel_base_name(e.name) for e in mine] == expected:
        for i, event in enumerate(mine):
            per_launch[i % len(step_launches)] += event.time_range.elapsed_us() / 1e3 / steps
    others: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for event in events:
        if stall_tools.kernel_base_name(event.name) not in names:
            others[event.name][0] += event.time_range.elapsed_us() / 1e3 / steps
            others[event.name][1] += 1 / steps
    top = sorted(others.items(), key=lambda kv: -kv[1][0])[:15]
    return dict(per_launch), [{"name": n, "time_ms": t, "calls": c} for n, (t, c) in top]


# ------------------------------------------------------------------------------------------------- stalls
def _collect_stalls(mode, device, kernels, model, args, kwargs, train, step) -> stall_tools.StallReport:
    none = stall_tools.StallReport
    if mode == "none":
        return none(None, "stall collection switched off (stalls='none')", [])
    if device.type != "cuda":
        return none(None, "Nsight Compute and proton need a CUDA GPU; this report keeps the analytic roofline", [])
    if not kernels:
        return none(None, "no kanc kernel ran (every layer took the reference path): nothing to profile", [])
    notes = []
    if mode in ("auto", "ncu"):
        found = _ncu(model, args, kwargs, train, device, kernels)
        if found.kernels or mode == "ncu":
            return found
        notes.append(found.note)
    if mode in ("auto", "proton"):
        if stall_tools.proton_available():
            workdir = stall_tools.new_workdir()
            try:
                found = stall_tools.collect_proton(step, set(kernels), workdir)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            found.note = "; ".join([*notes, found.note])
            return found
        notes.append("Triton's proton (triton.profiler) is not importable")
    return none(None, "; ".join(notes) + "; this report keeps the analytic roofline", [])


def _ncu(model, args, kwargs, train, device, kernels) -> stall_tools.StallReport:
    if stall_tools.ncu_path() is None:
        return stall_tools.StallReport(None, "Nsight Compute (ncu) not found on PATH (or KANC_NCU)", [])
    workdir = stall_tools.new_workdir()
    try:
        try:
            files = stall_tools.write_child_inputs(model, args, kwargs, workdir)
        except Exception as e:  # noqa: BLE001 - a model that cannot be pickled cannot be handed to ncu's child
            return stall_tools.StallReport(None, f"ncu needs the model in a child process: {_first_line(e)}", [])
        spec = {**files, "device": str(device), "train": train, "warmup": 1}
        return stall_tools.collect_ncu(spec, kernels, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- rows
class _Builder:
    """Turns the hooked phase into report rows."""

    def __init__(self, hooked: _Hooked, peaks: DevicePeaks) -> None:
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
            dtype=_dtype_name(shapes.input_dtype) if shapes else None,
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
        self, layers: list[LayerRow], kernel_times: dict[int, float], stall_report: stall_tools.StallReport
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


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return str(dtype).replace("torch.", "") if dtype is not None else None


def _first_line(e: BaseException, limit: int = 200) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    line = lines[0] if lines else type(e).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------ report parts
def _model_info(model: nn.Module, name: str | None) -> dict[str, Any]:
    return {
        "name": name or type(model).__name__,
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "parameters": sum(p.numel() for p in model.parameters()),
        "kanc_layers": sum(type(m).__name__ in KANC_LAYERS for m in model.modules()),
    }


def _run_info(device, dtype, train, warmup, iters, args, kwargs, hooked: _Hooked) -> dict[str, Any]:
    import kanc

    interpreter = device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"
    timer = hooked.timer + (" (Triton interpreter)" if interpreter else "")
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - triton is optional off Linux
        triton_version = None
    return {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": _dtype_name(dtype) if dtype is not None else None,
        "train": train,
        "warmup": warmup,
        "iters": iters,
        "inputs": input_summary(args, kwargs),
        "timer": timer,
        "interpreter": interpreter,
        "backward_hooks": hooked.backward_hooks,
        "kernel_note": _kernel_note(device),
        "kanc": kanc.__version__,
        "torch": torch.__version__,
        "triton": triton_version,
    }


def _kernel_note(device: torch.device) -> str:
    """Where kanc's kernels run here (the checker's conditions, kanc.codegen.checker); each layer's own reason for a
    fallback is in its rows (``fallback``)."""
    from kanc.codegen import checker, cpu

    if not checker.kernels_enabled():
        return "kernels are switched off (KANC_KERNELS=0 or set_kernels_enabled(False))"
    if device.type == "cpu" and not checker.interpreting():
        reason = cpu.unavailable_reason()
        where = f"not available here ({reason})" if reason else "compiled for this CPU"
        return (f"on the CPU, kanc's C kernels run the group rational and the GR-KAN linear ({where}); the SNNK block "
                "has a kernel on CUDA GPUs (or on the CPU under TRITON_INTERPRET=1)")  # fmt: skip
    if not checker.triton_available():
        return "triton is not installed"
    return "the checker chose the reference where a layer's dtype or shape is not supported"


def _step_info(step_ms: list[float], hooked: _Hooked) -> dict[str, Any]:
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


def _trace_events(hooked: _Hooked, builder: _Builder) -> list[dict[str, Any]]:
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
