"""The profile report: rows per layer and per kernel, rates against the device's roofline, findings in words,
and its three files (report.json, trace.json, report.html) plus a short terminal table."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kanc.runtime.counts import Counts
from kanc.runtime.devices import DevicePeaks
from kanc.runtime.stalls import StallReport

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
        data = asdict(self)
        data.update(data.pop("rates"))
        return data


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
        data = asdict(self)
        data.update(data.pop("rates"))
        return data


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
        return _clean(
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
        from kanc.runtime.html import render

        return render(self)

    def table(self, rows: int = 15) -> str:
        return terminal_table(self, rows)

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
            "trace.json": lambda: json.dumps(_clean(self.trace())),
            "report.html": self.html,
        }
        texts = {name: make() for name, make in payloads.items()}  # render everything before touching the disk

        def fill(tmp: Path) -> None:
            for name, text in texts.items():
                (tmp / name).write_text(text, encoding="utf-8")

        return write_dir(directory, fill, replaceable=is_report_dir, force=force, inputs=protect)


def is_report_dir(directory: Path) -> bool:
    """A folder holding an earlier kanc report and nothing else (``--force`` may replace it)."""
    entries = {p.name for p in directory.iterdir()}
    return entries <= set(REPORT_FILES) and _is_kanc_report(directory / "report.json")


def _is_kanc_report(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("schema") == SCHEMA_NAME
    except (OSError, ValueError, AttributeError):
        return False


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become null, tuples lists, dtypes strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    return str(value)


# ---------------------------------------------------------------------------------------------- findings
def find(report: ProfileReport) -> list[Finding]:
    """Findings in words, most costly first (``saving_ms``: time above the roofline, or time on the reference)."""
    findings = _roofline_findings(report) + _reference_findings(report) + _share_findings(report)
    findings.sort(key=lambda f: -(f.saving_ms or 0.0))
    return findings + _note_findings(report)


def _roofline_findings(report: ProfileReport) -> list[Finding]:
    stalls = {k["kernel"]: k for k in (row.stalls for row in report.kernels) if k}
    found = (
        roofline_finding(row, report.peaks.memory, [stalls[k] for k in row.kernels if k in stalls])
        for row in report.layers
    )
    return [f for f in found if f is not None]


def roofline_finding(row: LayerRow, memory: str, stalls: list[dict[str, Any]]) -> Finding | None:
    """Where one measured layer stands against its roofline and the likely cause, in words (None without a roof).

    A decision on figures already measured (``row.rates`` from ``rates``, launch facts, stall counters), so it can
    be tested on fixed figures; ``memory`` names what the bandwidth peak is of ("HBM3", "DRAM (measured copy)").
    """
    r = row.rates
    if r.bound is None or r.roofline_ms is None or row.time_ms <= 0:
        return None
    if r.bound == "memory":
        where = f"at {percent(r.bandwidth_fraction)} of {memory} bandwidth"
    else:
        where = f"at {percent(r.compute_fraction)} of the {r.compute_peak} peak"
    text = f"{row.label}: {row.kind or row.type} {row.direction} {where}: {_cause(row, stalls)}"
    return Finding(text, row.label, "roofline", max(row.time_ms - r.roofline_ms, 0.0))


def percent(fraction: float | None) -> str:
    """31%, 4.2%, 0.05%: two significant digits below 10%."""
    if fraction is None:
        return "-"
    value = fraction * 100
    return f"{value:.0f}%" if value >= 10 else f"{value:.2g}%"


def _cause(row: LayerRow, stalls: list[dict[str, Any]]) -> str:
    """The most likely reason a layer is below its roof, from the launch facts and the stall counters."""
    reasons = []
    if row.elements and row.atomics >= MIN_ATOMICS and row.atomics / row.elements >= ATOMICS_PER_ELEMENT:
        reasons.append(f"atomics dominate ({row.atomics:,} atomic adds, {row.atomics / row.elements:.2g} per element)")
    for s in stalls:
        ls, lg, occ = s.get("long_scoreboard_fraction"), s.get("lg_throttle_fraction"), s.get("achieved_occupancy_pct")
        if ls is not None and ls >= 0.4:
            reasons.append(f"{s['kernel']} waits on global memory ({ls:.0%} of stall samples long-scoreboard)")
        if lg is not None and lg >= 0.2:
            reasons.append(f"{s['kernel']} fills the load/store queue ({lg:.0%} LG-throttle): issue fewer, wider loads")
        if occ is not None and occ < 30:
            reasons.append(f"{s['kernel']} reaches {occ:.0f}% occupancy")
    if row.path == "reference":
        reasons.append("ran on the PyTorch reference (no kanc kernel)")
    distance = 1 / row.rates.roofline_fraction if row.rates.roofline_fraction else None
    if not reasons and distance is not None:
        reasons.append(f"{distance:.1f}x from its roofline" if distance >= 1.05 else "at its roofline")
    return "; ".join(reasons)


def _reference_findings(report: ProfileReport) -> list[Finding]:
    """One finding per reason the reference ran (a model with no kernel on this device gets one line, not one per
    layer), naming the layers."""
    groups: dict[str, list[LayerRow]] = {}
    for row in report.layers:
        if row.path == "reference":
            groups.setdefault(row.fallback or report.run.get("kernel_note", ""), []).append(row)
    out = []
    for why, rows in groups.items():
        names = list(dict.fromkeys(row.label for row in rows))
        share = sum(row.share for row in rows)
        text = f"{len(names)} kanc layer(s) ran on the PyTorch reference, no kanc kernel ({share:.0%} of step time)"
        subject = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        out.append(Finding(text + (f": {why}" if why else ""), subject, "reference", sum(r.time_ms for r in rows)))
    return out


def _share_findings(report: ProfileReport) -> list[Finding]:
    ranked = sorted((row for row in report.layers if row.name and row.time_ms > 0), key=lambda r: -r.time_ms)
    out = []
    for row in ranked[:2]:
        kind = row.kind or row.type
        text = f"{row.label} ({kind} {row.direction}) takes {row.share:.0%} of step time ({row.time_ms:.3g} ms)"
        out.append(Finding(text, row.label, "share", None))
    return out


def _note_findings(report: ProfileReport) -> list[Finding]:
    out = []
    if report.run.get("interpreter"):
        out.append(Finding("times are Triton-interpreter times on the CPU, not GPU figures", "run", "note"))
    if not report.stalls.kernels:
        out.append(Finding(f"no memory-stall counters: {report.stalls.note}", "stalls", "note"))
    overhead = report.step.get("hook_overhead")
    if overhead is not None and overhead > 0.25:
        out.append(Finding(f"per-layer times carry {overhead:.0%} hook overhead over the plain step", "run", "note"))
    return out


# ------------------------------------------------------------------------------------------ terminal table
def _fmt(value: float | None, spec: str = ".3g", scale: float = 1.0, suffix: str = "") -> str:
    return "-" if value is None else f"{value * scale:{spec}}{suffix}"


def terminal_table(report: ProfileReport, rows: int = 15) -> str:
    """The top ``rows`` layers by time, then the top findings."""
    head = ("layer", "dir", "path", "ms", "share", "GB/s", "TFLOP/s", "%peak", "bound", "x roof", "atomics")
    ranked = sorted(report.layers, key=lambda r: -r.time_ms)[:rows]
    body = []
    for row in ranked:
        r = row.rates
        frac = r.bandwidth_fraction if r.bound == "memory" else r.compute_fraction
        body.append(
            (
                _ellipsize(f"{row.label} ({row.type})" if row.type and row.name else row.label, 48),
                row.dir,
                row.path,
                _fmt(row.time_ms, ".4g"),
                _fmt(row.share, ".0%"),
                _fmt(r.achieved_gbps, ".4g"),
                _fmt(r.achieved_tflops, ".3g"),
                _fmt(frac, ".0%"),
                r.bound or "-",
                _fmt(1 / r.roofline_fraction if r.roofline_fraction else None, ".1f"),
                f"{row.atomics:,}" if row.atomics else "-",
            )
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = [_title(report)]
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in (head, *body)]
    top = [f for f in report.findings if f.kind != "note"][:3] + [f for f in report.findings if f.kind == "note"]
    lines += [f"- {f.text}" for f in top]
    return "\n".join(lines)


def _title(report: ProfileReport) -> str:
    run, step = report.run, report.step
    mode = "train step" if run.get("train") else "forward"
    return (
        f"kanc profile: {report.model.get('name')} {mode} on {run.get('device_name')} ({run.get('timer')}), "
        f"{step.get('time_ms', 0):.4g} ms per step (median of {run.get('iters')})"
    )


def _ellipsize(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3) :]
