"""The profile's terminal summary (``str(report)``, ``kanc profile``'s output): the slowest layers with their
rates, then the top findings."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kanc.text import ellipsize
from kanc.text import table as text_table

if TYPE_CHECKING:  # types only: report.py renders with this module
    from kanc.runtime.report import ProfileReport


def _fmt(value: float | None, spec: str = ".3g", scale: float = 1.0, suffix: str = "") -> str:
    return "-" if value is None else f"{value * scale:{spec}}{suffix}"


def table(report: ProfileReport, rows: int = 15) -> str:
    """The top ``rows`` layers by time, then the top findings."""
    head = ("layer", "dir", "path", "ms", "share", "GB/s", "TFLOP/s", "%peak", "bound", "x roof", "atomics")
    ranked = sorted(report.layers, key=lambda r: -r.time_ms)[:rows]
    body = []
    for row in ranked:
        r = row.rates
        frac = r.bandwidth_fraction if r.bound == "memory" else r.compute_fraction
        body.append(
            (
                ellipsize(f"{row.label} ({row.type})" if row.type and row.name else row.label, 48),
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
    lines = [_title(report), *text_table(body, head)]
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
