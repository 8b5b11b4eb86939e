"""The profile report's data: rows per layer and per kernel, rates against the device's roofline, findings, and
its three files (report.json, trace.json, report.html).

Who fills it: ``profiler`` runs the steps, ``rows`` builds the rows, ``findings`` words them. Who renders it:
``summary`` (the terminal table, ``str(report)``) and ``page`` (report.html); neither imports this module at run time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kanc.runtime import page, summary
from kanc.runtime.counts import Counts
from kanc.runtime.devices import DevicePeaks
from kanc.runtime.stalls import StallReport
from kanc.text import json_safe

SCHEMA_NAME = "kanc.profile"
SCHEMA_VERSION = 1
REPORT_FILES = ("report.json", "trace.json", "report.html")
# Short names of layer types, for findings.
LAYER_KINDS = {
    "GroupRational": "rational",
    "GRKANLinear": "GR-KAN linear",
    "SNNKMlp": "SNNK block",
    "SNNKLinear": "SNNK linear",
    "SNNKFeatures": "SNNK features",
    "Linear": "linear",
}


def layer_kind(module_type: type) -> str:
    """The short name of a layer type, from the type or its nearest base in LAYER_KINDS."""
    for base in module_type.__mro__:
        if base.__name__ in LAYER_KINDS:
            return LAYER_KINDS[base.__name__]
    return module_type.__name__


# Atomics are named the likely cause of a slow layer when there is one atomic add per 100 elements or more, and
# enough of them to matter (KAT's Triton backward: 10 per element; a per-program reduction: ~1e-4 per element).
ATOMICS_PER_ELEMENT = 0.01
MIN_ATOMICS = 100_000


@dataclass
class Rates:
    """A measured time against hand-counted work and the device's peaks."""

    achieved_gbps: float | None = None
    achieved_tflops: float | None = None
    intensity: float | None = None
    bandwidth_fraction: float | None = None
    compute_fraction: float | None = None
    compute_peak: str | None = None
    bound: str | None = None
    roofline_ms: float | None = None
    roofline_fraction: float | None = None


def rates(counts: Counts | None, time_ms: float | None, peaks: DevicePeaks, dtype: torch.dtype | None) -> Rates:
    """Achieved GB/s and TFLOP/s, the fraction of each peak, the roofline bound and how far the time is from it.

    The roofline time is max(bytes / bandwidth, matmul FLOPs / matmul peak + vector FLOPs / vector peak): memory-
    bound when the first term is the larger. ``roofline_fraction`` = roofline time / measured time (1 = at the roof).
    """
    if counts is None or time_ms is None or time_ms <= 0 or (counts.flops == 0 and counts.bytes == 0):
        return Rates()
    seconds = time_ms * 1e-3
    mm_peak, mm_label = peaks.matmul_peak(dtype or torch.float32)
    vec_peak, vec_label = peaks.vector_peak(dtype or torch.float32)
    compute_s = counts.matmul_flops / (mm_peak * 1e12) + counts.vector_flops / (vec_peak * 1e12)
    memory_s = counts.bytes / (peaks.memory_gbps * 1e9)
    roof_s = max(compute_s, memory_s)
    label = mm_label if counts.matmul_flops >= counts.vector_flops else vec_label
    effective_peak = counts.flops / compute_s / 1e12 if compute_s > 0 else None
    achieved_tflops = counts.flops / seconds / 1e12
    achieved_gbps = counts.bytes / seconds / 1e9
    return Rates(
        achieved_gbps=achieved_gbps,
        achieved_tflops=achieved_tflops,
        intensity=counts.intensity,
        bandwidth_fraction=achieved_gbps / peaks.memory_gbps,
        compute_fraction=achieved_tflops / effective_peak if effective_peak else None,
        compute_peak=label,
        bound="memory" if memory_s >= compute_s else "compute",
        roofline_ms=roof_s * 1e3,
        roofline_fraction=roof_s / seconds,
    )


DIRECTION_SHORT = {"forward": "fwd", "backward": "bwd"}


@dataclass
class LayerRow:
    """One module in one direction: its exclusive time (children that ran are rows of their own)."""

    name: str
    type: str
    direction: str
    calls: int
    time_ms: float
    share: float
    path: str  # "kernel", "reference" (a kanc layer that ran without a kernel), "torch", "none"
    kind: str = ""  # "rational", "GR-KAN linear", ... (LAYER_KINDS of the type or its nearest base), else the type
    kernels: list[str] = field(default_factory=list)
    launches: int = 0
    atomics: int = 0
    elements: int | None = None
    flops: float | None = None
    bytes: float | None = None
    matmul_flops: float | None = None
    count_note: str = ""
    input_shape: list[int] | None = None
    output_shape: list[int] | None = None
    dtype: str | None = None
    fallback: str | None = None  # why this kanc layer's calls ran the PyTorch reference (None: they did not)
    rates: Rates = field(default_factory=Rates)

    @property
    def label(self) -> str:
        return self.name or "(model)"

    @property
    def dir(self) -> str:
        """ "fwd" or "bwd", for tables."""
        return DIRECTION_SHORT.get(self.direction, self.direction)

    def to_json(self) -> dict[str, Any]:
        return _row_json(self)


@dataclass
class KernelRow:
    """One Triton kernel as launched by one layer in one direction (per step)."""

    kernel: str
    op: str
    layer: str
    direction: str
    launches: int
    programs: int
    atomics: int
    grid: list[int]
    config: dict[str, Any]
    shapes: list[list[int]]
    dtype: str
    time_ms: float | None
    time_source: str
    share: float | None
    flops: float | None = None
    bytes: float | None = None
    rates: Rates = field(default_factory=Rates)
    stalls: dict[str, Any] | None = None
    placement: str | None = None  # where a GR-KAN block's rational ran ("prologue" / "epilogue"), from the launch

    def to_json(self) -> dict[str, Any]:
        return _row_json(self)


@dataclass
class Finding:
    text: str
    subject: str
    kind: str  # "roofline", "reference", "share", "stalls", "note"
    saving_ms: float | None = None


@dataclass
class ProfileReport:
    """What ``kanc.profile`` measured. ``str(report)`` is the terminal table; ``write(dir)`` the three files."""

    model: dict[str, Any]
    run: dict[str, Any]
    peaks: DevicePeaks
    step: dict[str, Any]
    layers: list[LayerRow]
    kernels: list[KernelRow]
    other_kernels: list[dict[str, Any]]
    stalls: StallReport
    findings: list[Finding]
    notes: list[str]
    trace_events: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The report.json document (see report.schema.json, ``version`` = SCHEMA_VERSION)."""
        return json_safe(
            {
                "schema": SCHEMA_NAME,
                "version": SCHEMA_VERSION,
                "model": self.model,
                "run": self.run,
                "peaks": self.peaks.to_json(),
                "step": self.step,
                "layers": [row.to_json() for row in self.layers],
                "kernels": [row.to_json() for row in self.kernels],
                "other_kernels": self.other_kernels,
                "stalls": self.stalls.to_json(),
                "findings": [asdict(f) for f in self.findings],
                "notes": self.notes,
            }
        )

    def trace(self) -> dict[str, Any]:
        """Chrome / Perfetto trace (open trace.json in ui.perfetto.dev or chrome://tracing)."""
        return {
            "traceEvents": self.trace_events,
            "displayTimeUnit": "ms",
            "otherData": {"generator": "kanc profile", "timer": self.run.get("timer")},
        }

    def html(self) -> str:
        """The report.html page (``page.render``)."""
        return page.render(self)

    def table(self, rows: int = 15) -> str:
        """The terminal summary: the top ``rows`` layers by time, then the top findings (``summary.table``)."""
        return summary.table(self, rows)

    def __str__(self) -> str:
        return self.table()

    def write(
        self, directory: str | os.PathLike, *, force: bool = False, protect: Iterable[str | os.PathLike] = ()
    ) -> Path:
        """Write report.json, trace.json and report.html into ``directory`` through kanc.writing: the files appear
        together or not at all. An existing directory is replaced only with ``force``, and only when it is empty or
        holds an earlier kanc report; ``protect``: paths it must never touch (the model file)."""
        from kanc.writing import write_dir

        payloads: dict[str, Callable[[], str]] = {
            "report.json": lambda: json.dumps(self.to_json(), indent=1),
            "trace.json": lambda: json.dumps(json_safe(self.trace())),
            "report.html": self.html,
        }
        texts = {name: make() for name, make in payloads.items()}  # render everything before touching the disk

        def fill(tmp: Path) -> None:
            for name, text in texts.items():
                (tmp / name).write_text(text, encoding="utf-8")

        return write_dir(directory, fill, replaceable=is_report_dir, force=force, inputs=protect)


def _row_json(row: LayerRow | KernelRow) -> dict[str, Any]:
    """A row as one flat JSON object: its fields with its rates' fields beside them."""
    data = asdict(row)
    data.update(data.pop("rates"))
    return data


def is_report_dir(directory: Path) -> bool:
    """A folder holding an earlier kanc report and nothing else (``--force`` may replace it)."""
    entries = {p.name for p in directory.iterdir()}
    return entries <= set(REPORT_FILES) and _is_kanc_report(directory / "report.json")


def _is_kanc_report(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("schema") == SCHEMA_NAME
    except (OSError, ValueError, AttributeError):
        return False
