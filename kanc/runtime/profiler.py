"""``kanc.profile``: where a model's step time goes, layer by layer and kernel by kernel, against the roofline.

Phases (each over the same step, see ``steps.run_step``):

1. warm-up steps (compilation, autotuning, allocator);
2. plain timed steps: the step time, with no instrumentation;
3. hooked steps (one more first, unmeasured, for the call tree and shapes): every module's forward and
   backward between hooks (``timeline``), kanc's kernel launches recorded (``kanc.codegen.recording``) and
   charged to the module that made them;
4. on CUDA, one more pass under ``torch.profiler`` for each kernel's own GPU time;
5. memory-stall counters of kanc's kernels (``stalls``: Nsight Compute, else proton, else a note).

This module runs the phases; ``rows`` turns what they saw into the report's rows, with hand-counted FLOPs and
bytes (``counts``) as rates and a distance to the device's roofline (``devices``); ``findings`` words what the rows
show; ``report`` holds it all and writes the files.
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kanc.codegen import fallbacks, triton_tools
from kanc.codegen.launches import Launch, recording
from kanc.env import interpreting
from kanc.errors import KancError, first_line
from kanc.runtime import stalls as stall_tools
from kanc.runtime.devices import DevicePeaks, device_peaks
from kanc.runtime.findings import find
from kanc.runtime.report import ProfileReport
from kanc.runtime.rows import KANC_LAYERS, Hooked, RowBuilder, dtype_name, mark_fallbacks, step_info, trace_events
from kanc.runtime.steps import Inputs, input_summary, model_device, prepare_inputs, run_step, synchronize, time_steps
from kanc.runtime.timeline import Clock, Tracer, analyse

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
    builder = RowBuilder(hooked, peaks)
    layers = builder.layer_rows()
    mark_fallbacks(layers, fell_back)
    kernel_rows = builder.kernel_rows(layers, kernel_times, stall_report)
    report = ProfileReport(
        model=_model_info(model, name),
        run=_run_info(device, dtype, train, warmup, iters, args, kwargs, hooked),
        peaks=peaks,
        step=step_info(step_ms, hooked),
        layers=layers,
        kernels=kernel_rows,
        other_kernels=other_kernels,
        stalls=stall_report,
        findings=[],
        notes=hooked.notes + [peaks.note] if peaks.note else hooked.notes,
        trace_events=trace_events(hooked, builder),
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
        raise KancError(f"the model failed on the example inputs: {type(e).__name__}: {first_line(e, 200)}") from e


def _hooked_steps(model: nn.Module, step: Callable, device: torch.device, iters: int, train: bool) -> Hooked:
    result = Hooked()
    try:
        _run_hooked(model, step, device, iters, result, backward_hooks=train)
    except RuntimeError as e:
        if not train:
            raise
        # Full backward hooks refuse some in-place patterns (ReLU(inplace=True) on a hooked module's output).
        result.notes.append(f"per-layer backward times unavailable (backward hooks failed: {first_line(e, 200)})")
        result.steps, result.launches = [], []
        _run_hooked(model, step, device, iters, result, backward_hooks=False)
    return result


def _run_hooked(model, step, device, iters, result: Hooked, backward_hooks: bool) -> None:
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
            return stall_tools.StallReport(None, f"ncu needs the model in a child process: {first_line(e, 200)}", [])
        spec = {**files, "device": str(device), "train": train, "warmup": 1}
        return stall_tools.collect_ncu(spec, kernels, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# ------------------------------------------------------------------------------------------ report parts
def _model_info(model: nn.Module, name: str | None) -> dict[str, Any]:
    return {
        "name": name or type(model).__name__,
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "parameters": sum(p.numel() for p in model.parameters()),
        "kanc_layers": sum(type(m).__name__ in KANC_LAYERS for m in model.modules()),
    }


def _run_info(device, dtype, train, warmup, iters, args, kwargs, hooked: Hooked) -> dict[str, Any]:
    import kanc

    interpreter = device.type == "cpu" and interpreting()
    timer = hooked.timer + (" (Triton interpreter)" if interpreter else "")
    return {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": dtype_name(dtype) if dtype is not None else None,
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
        "triton": triton_tools.triton_version(),
    }


def _kernel_note(device: torch.device) -> str:
    """Where kanc's kernels run here (the checker's conditions, kanc.codegen.checker); each layer's own reason for a
    fallback is in its rows (``fallback``)."""
    from kanc.codegen import checker, cpu

    if not checker.kernels_enabled():
        return "kernels are switched off (KANC_KERNELS=0 or set_kernels_enabled(False))"
    if device.type == "cpu" and not interpreting():
        reason = cpu.unavailable_reason()
        where = f"not available here ({reason})" if reason else "compiled for this CPU"
        return (f"on the CPU, kanc's C kernels run the group rational and the GR-KAN linear ({where}); the SNNK block "
                "has a kernel on CUDA GPUs (or on the CPU under TRITON_INTERPRET=1)")  # fmt: skip
    if not checker.triton_available():
        return "triton is not installed"
    return "the checker chose the reference where a layer's dtype or shape is not supported"
