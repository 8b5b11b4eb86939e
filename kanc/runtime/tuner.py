"""``kanc.tune``: autotune every kanc kernel at the shapes a model meets, write the per-device config cache the
kernels read (``kanc.codegen.tuning``), and measure the step before and after.

"Before" runs with timing off (``KANC_AUTOTUNE=0`` semantics): the configs cached so far, the launcher's default
on a miss. Then one step (forward, and backward with ``train``) under ``autotuning("force")`` re-times every
candidate config of every kernel launched and saves the winners. "After" reloads the cache from disk, as a new
process would, and runs with timing off again, so it measures exactly what later runs will get.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from kanc.codegen import tuning
from kanc.codegen.launches import Launch, recording
from kanc.errors import KancError
from kanc.runtime.steps import Inputs, model_device, prepare_inputs, run_step, synchronize, time_steps
from kanc.text import json_safe, table


@dataclass
class TunedEntry:
    """One cache entry written by the tuning run: a kernel at one shape key."""

    kernel: str
    key: str
    config: dict[str, Any]
    previous: dict[str, Any] | None
    timings_ms: list[float]

    @property
    def changed(self) -> bool:
        return self.previous != self.config


@dataclass
class TuneReport:
    """Before/after step times, the configs chosen, and where they were written."""

    device_name: str
    cache_path: str
    train: bool
    before_ms: list[float]
    after_ms: list[float]
    entries: list[TunedEntry]
    configs_before: dict[str, list[dict[str, Any]]]
    configs_after: dict[str, list[dict[str, Any]]]
    notes: list[str] = field(default_factory=list)

    @property
    def before(self) -> float:
        return statistics.median(self.before_ms)

    @property
    def after(self) -> float:
        return statistics.median(self.after_ms) if self.after_ms else float("nan")

    @property
    def speedup(self) -> float:
        return self.before / self.after if self.after_ms and self.after > 0 else float("nan")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(before_median_ms=self.before, after_median_ms=self.after if self.after_ms else None)
        data["speedup"] = self.speedup if self.after_ms else None
        return json_safe(data)  # failed configs time as inf: null in JSON

    def table(self) -> str:
        lines = [f"kanc tune on {self.device_name}: cache {self.cache_path}"]
        if not self.entries:
            return "\n".join([*lines, *self.notes])
        head = ("kernel", "key", "config", "was", "best ms", "worst ms")
        body = [_entry_row(e) for e in self.entries]
        lines += table(body, head)
        mode = "train step" if self.train else "forward"
        lines.append(f"{mode}: {self.before:.4g} ms before, {self.after:.4g} ms after ({self.speedup:.2f}x)")
        return "\n".join([*lines, *self.notes])

    def __str__(self) -> str:
        return self.table()


def _entry_row(e: TunedEntry) -> tuple[str, ...]:
    was = _config(e.previous) if e.previous else "(default)"
    return (
        e.kernel,
        e.key,
        _config(e.config),
        was,
        _ms(min(e.timings_ms, default=None)),
        _ms(_finite_max(e.timings_ms)),
    )


def _config(config: dict[str, Any] | None) -> str:
    return ",".join(f"{k}={v}" for k, v in (config or {}).items())


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _finite_max(values: list[float]) -> float | None:
    finite = [v for v in values if v != float("inf")]
    return max(finite) if finite else None


def tune(
    model: nn.Module,
    inputs: Inputs,
    *,
    train: bool = True,
    warmup: int = 2,
    iters: int = 10,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> TuneReport:
    """Tune every kanc kernel ``model(*inputs)`` launches (forward, and backward with ``train``) and report.

    The model is moved to ``device``/``dtype`` in place; its train/eval mode and gradients are restored after.
    A model that launches no kanc kernel on this device gives a report with no entries and a note (nothing is
    written).
    """
    if iters < 1 or warmup < 0:
        raise KancError(f"need iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    device = torch.device(device) if device is not None else model_device(model)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KancError("device cuda requested but no CUDA GPU is available (use --device cpu)")
    was_training, saved = model.training, {p: p.grad for p in model.parameters()}
    for p in saved:
        p.grad = None  # steps start from no gradient; the caller's are put back after
    model.to(device=device, dtype=dtype)
    model.train(train)
    try:
        return _tune(model, inputs, train, warmup, iters, device, dtype)
    finally:
        model.train(was_training)
        for p, grad in saved.items():
            p.grad = grad


def _tune(model, inputs, train, warmup, iters, device, dtype) -> TuneReport:
    args, kwargs = prepare_inputs(inputs, device, dtype, train)

    def step() -> None:
        run_step(model, args, kwargs, train)

    path = tuning.cache_path(device)
    before_ms, configs_before = _measure(step, device, warmup, iters)
    live = tuning.get_cache(device).entries
    snapshot = copy.deepcopy(live)
    before_ids = {(kernel, key): id(entry) for kernel, keys in live.items() for key, entry in keys.items()}
    with tuning.autotuning("force"), recording() as launches:
        step()
        synchronize(device)
    # force mode writes a fresh record for every key it meets: those are the entries this run tuned
    written = {(kernel, key) for kernel, keys in tuning.get_cache(device).entries.items()
               for key, entry in keys.items() if before_ids.get((kernel, key)) != id(entry)}  # fmt: skip
    report = TuneReport(tuning.device_name(device), str(path), train, before_ms, [], [], configs_before, {})
    if not any(launch.extra.get("backend") != "cpu" for launch in launches):  # the C kernels take no config
        report.notes.append(f"no tunable kanc kernel ran on {device.type}: nothing to tune ({_why(device)})")
        return report
    tuning.clear_memory_caches()  # read the cache back from disk, as the next process will
    report.after_ms, report.configs_after = _measure(step, device, warmup, iters)
    report.entries = _entries(snapshot, tuning.get_cache(device).entries, written)
    if not report.entries:
        report.notes.append("the kernels launched took no tunable config (no candidates were timed)")
    return report


def _measure(step, device, warmup: int, iters: int) -> tuple[list[float], dict[str, list[dict[str, Any]]]]:
    """Step times with timing off, and the distinct configs each kernel launched with."""
    with tuning.autotuning("0"):
        for _ in range(warmup):
            step()
        synchronize(device)
        with recording() as launches:
            step()
        times = time_steps(step, device, iters)
    return times, _configs(launches)


def _configs(launches: list[Launch]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for launch in launches:
        seen = out.setdefault(launch.kernel, [])
        if launch.config not in seen:
            seen.append(dict(launch.config))
    return out


def _entries(before: dict, after: dict, written: set[tuple[str, str]]) -> list[TunedEntry]:
    """The cache entries the tuning run wrote, as read back from disk, beside the config cached before."""
    out = []
    for kernel, key in sorted(written):
        entry = after.get(kernel, {}).get(key)
        if entry is None:
            continue
        old = before.get(kernel, {}).get(key)
        timings = [float(t) for t in entry.get("timings_ms", [])]
        out.append(TunedEntry(kernel, key, dict(entry["config"]), dict(old["config"]) if old else None, timings))
    return out


def _why(device: torch.device) -> str:
    from kanc.codegen import checker

    if not checker.kernels_enabled():
        return "kernels are switched off"
    if device.type == "cpu" and not checker.interpreting():
        return ("kanc's Triton kernels run on CUDA GPUs, or on the CPU under TRITON_INTERPRET=1; its CPU kernels "
                "have no configs")  # fmt: skip
    return "every layer took the reference path"
