"""Findings in words: where each measured layer stands against its roofline and the likely cause, which layers ran
on the PyTorch reference and why, the layers that take the most time, and notes on how far to trust the figures."""

from __future__ import annotations

from typing import Any

from kanc.runtime.report import ATOMICS_PER_ELEMENT, MIN_ATOMICS, Finding, LayerRow, ProfileReport


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
