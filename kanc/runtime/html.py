"""report.html: one self-contained page (no scripts, no network): the findings, an SVG roofline, an SVG bar
chart of time per layer, and the tables."""

from __future__ import annotations

import math
from html import escape
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from kanc.runtime.report import LayerRow, ProfileReport

COLORS = {"forward": "#2b6cb0", "backward": "#dd6b20"}
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#1a202c;
 max-width:1200px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #e2e8f0}
.meta{color:#4a5568} table{border-collapse:collapse;font-size:12px;margin:6px 0}
th,td{border:1px solid #e2e8f0;padding:3px 6px;text-align:right;white-space:nowrap}
th{background:#f7fafc} td.l,th.l{text-align:left} .ref{color:#c53030} .kern{color:#2f855a}
ol.findings li{margin:3px 0} .note{color:#718096} svg text{font:11px system-ui,Helvetica,Arial,sans-serif}
.charts{display:flex;flex-wrap:wrap;gap:24px}
"""


_SHORT = {"forward": "fwd", "backward": "bwd"}


def render(report: ProfileReport) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>kanc profile: {escape(str(report.model.get('name')))}</title>",
        f"<style>{_CSS}</style></head><body>",
        _header(report),
        _findings(report),
        '<div class="charts">',
        f"<div><h2>Roofline</h2>{roofline_svg(report)}</div>",
        f"<div><h2>Time per layer</h2>{bars_svg(report)}</div>",
        "</div>",
        _layer_table(report),
        _kernel_table(report),
        _stalls(report),
        _other_kernels(report),
        _notes(report),
        "</body></html>",
    ]
    return "\n".join(parts)


def _header(report: ProfileReport) -> str:
    run, step, peaks = report.run, report.step, report.peaks
    mode = "forward + backward" if run.get("train") else "forward"
    inputs = ", ".join(f"{i['name']}: {i['dtype']}{tuple(i['shape'])}" for i in run.get("inputs", []))
    matmul = ", ".join(f"{k} {v:.4g}" for k, v in peaks.matmul_tflops.items()) or "-"
    vector = ", ".join(f"{k} {v:.4g}" for k, v in peaks.vector_tflops.items())
    return (
        f"<h1>kanc profile: {escape(str(report.model.get('name')))}</h1>"
        f'<p class="meta">{escape(mode)} on <b>{escape(str(run.get("device_name")))}</b>, timer '
        f"{escape(str(run.get('timer')))}; inputs {escape(inputs)}; {run.get('iters')} measured steps after "
        f"{run.get('warmup')} warm-up.<br>Step time <b>{step.get('time_ms', 0):.4g} ms</b> (median; p20 "
        f"{step['quantiles_ms']['p20']:.4g}, p80 {step['quantiles_ms']['p80']:.4g}); with per-layer hooks "
        f"{step.get('hooked_time_ms', 0):.4g} ms.<br>Peaks ({escape(peaks.source)}): {escape(peaks.memory)} "
        f"{peaks.memory_gbps:.4g} GB/s; vector TFLOP/s {escape(vector)}; matmul TFLOP/s {escape(matmul)}.</p>"
    )


def _findings(report: ProfileReport) -> str:
    items = "".join(f"<li>{escape(f.text)}</li>" for f in report.findings[:8])
    return f'<h2>Top findings</h2><ol class="findings">{items or "<li>nothing to report</li>"}</ol>'


# ---------------------------------------------------------------------------------------------------- SVG
def _log_range(values: list[float], pad: float = 2.0) -> tuple[float, float]:
    lo, hi = min(values) / pad, max(values) * pad
    return 10 ** math.floor(math.log10(lo)), 10 ** math.ceil(math.log10(hi))


def roofline_svg(report: ProfileReport, width: int = 560, height: int = 380) -> str:
    """Achieved TFLOP/s against arithmetic intensity (log-log), under the memory roof and the compute roofs."""
    peaks = report.peaks
    points = [r for r in report.layers if r.rates.intensity and r.rates.achieved_tflops]
    dtype = _report_dtype(report)
    vec, vec_label = peaks.vector_peak(dtype)
    mm, mm_label = peaks.matmul_peak(dtype)
    roofs = {f"{vec_label} vector": vec}
    if mm != vec:
        roofs[mm_label] = mm
    bw = peaks.memory_gbps / 1e3  # TFLOP/s per FLOP/B
    ridges = [peak / bw for peak in roofs.values()]
    xs = [r.rates.intensity for r in points] + ridges
    ys = [r.rates.achieved_tflops for r in points] + list(roofs.values())
    x0, x1 = _log_range(xs)
    y0, y1 = _log_range(ys + [bw * x0])
    left, right, top, bottom = 60, 20, 20, 45
    pw, ph = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + pw * (math.log10(x) - math.log10(x0)) / (math.log10(x1) - math.log10(x0))

    def sy(y: float) -> float:
        return top + ph * (1 - (math.log10(y) - math.log10(y0)) / (math.log10(y1) - math.log10(y0)))

    out = [
        f'<svg id="roofline" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="roofline plot">',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fff" stroke="#a0aec0"/>',
    ]
    out += _log_ticks(
        x0,
        x1,
        lambda v: f'x="{sx(v):.1f}" y="{height - bottom + 14}" text-anchor="middle"',
        sx,
        True,
        top,
        height - bottom,
    )
    out += _log_ticks(
        y0, y1, lambda v: f'x="{left - 6}" y="{sy(v) + 4:.1f}" text-anchor="end"', sy, False, left, width - right
    )
    for label, peak in roofs.items():
        ridge = peak / bw
        start = max(x0, y0 / bw)  # where the memory roof enters the plot
        d = f"M{sx(start):.1f},{sy(bw * start):.1f} L{sx(ridge):.1f},{sy(peak):.1f} L{sx(x1):.1f},{sy(peak):.1f}"
        out.append(f'<path class="roof" d="{d}" fill="none" stroke="#4a5568" stroke-width="1.5"/>')
        out.append(
            f'<text x="{sx(x1) - 4:.1f}" y="{sy(peak) - 5:.1f}" text-anchor="end">{escape(label)} '
            f"{peak:.3g} TFLOP/s</text>"
        )
    out.append(
        f'<text x="{left + 6}" y="{top + 14}" fill="#4a5568">{escape(peaks.memory)} {peaks.memory_gbps:.4g} GB/s</text>'
    )
    labelled = {id(r) for r in sorted(points, key=lambda r: -r.time_ms)[:5]}
    for r in points:
        cx, cy = sx(r.rates.intensity), sy(max(r.rates.achieved_tflops, y0))
        radius = 3 + 6 * math.sqrt(max(r.share, 0.0))
        tip = (
            f"{r.label} {r.direction}: {r.rates.achieved_tflops:.3g} TFLOP/s, {r.rates.achieved_gbps:.3g} GB/s, "
            f"{r.time_ms:.3g} ms"
        )
        out.append(
            f'<circle class="point" cx="{cx:.1f}" cy="{cy:.1f}" r="{radius:.1f}" fill="{COLORS[r.direction]}" '
            f'fill-opacity="0.75"><title>{escape(tip)}</title></circle>'
        )
        if id(r) in labelled:
            out.append(f'<text x="{cx + radius + 2:.1f}" y="{cy + 3:.1f}">{escape(_short(r.label))}</text>')
    out.append(
        f'<text x="{left + pw / 2:.0f}" y="{height - 8}" text-anchor="middle">arithmetic intensity '
        "(FLOP/byte, hand-counted)</text>"
    )
    out.append(
        f'<text transform="translate(14,{top + ph / 2:.0f}) rotate(-90)" text-anchor="middle">achieved TFLOP/s</text>'
    )
    out.append(_legend(left + pw - 150, top + ph - 40))
    out.append("</svg>")
    return "".join(out)


def _log_ticks(lo: float, hi: float, place, scale, vertical: bool, a: float, b: float) -> list[str]:
    out = []
    exponent = math.floor(math.log10(lo))
    while 10**exponent <= hi * 1.0001:
        v = 10.0**exponent
        pos = scale(v)
        line = (
            f'x1="{pos:.1f}" x2="{pos:.1f}" y1="{a}" y2="{b}"'
            if vertical
            else f'x1="{a}" x2="{b}" y1="{pos:.1f}" y2="{pos:.1f}"'
        )
        out.append(f'<line class="grid" {line} stroke="#edf2f7"/>')
        out.append(f"<text {place(v)}>{_tick_label(v)}</text>")
        exponent += 1
    return out


def _tick_label(v: float) -> str:
    return f"{v:g}" if 1e-3 <= v <= 1e4 else f"1e{int(round(math.log10(v)))}"


def _legend(x: float, y: float) -> str:
    items = []
    for i, (label, color) in enumerate(COLORS.items()):
        items.append(
            f'<circle cx="{x + 8}" cy="{y + 8 + 16 * i}" r="5" fill="{color}"/>'
            f'<text x="{x + 18}" y="{y + 12 + 16 * i}">{label}</text>'
        )
    return "".join(items)


def bars_svg(report: ProfileReport, top_n: int = 20, width: int = 560) -> str:
    """Horizontal bars: time per layer (forward and backward stacked), the top ``top_n`` layers by total time."""
    totals: dict[str, dict[str, float]] = {}
    for r in report.layers:
        totals.setdefault(r.label, {"forward": 0.0, "backward": 0.0})[r.direction] += r.time_ms
    ranked = sorted(totals.items(), key=lambda kv: -sum(kv[1].values()))[:top_n]
    longest = max((sum(v.values()) for _, v in ranked), default=1.0) or 1.0
    row_h, left, right, top = 18, 190, 70, 10
    height = top + row_h * max(len(ranked), 1) + 44  # room for the legend
    scale = (width - left - right) / longest
    out = [
        f'<svg id="layer-times" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="time per layer">'
    ]
    for i, (label, parts) in enumerate(ranked):
        y, x = top + i * row_h, float(left)
        out.append(f'<text x="{left - 6}" y="{y + 12}" text-anchor="end">{escape(_short(label, 30))}</text>')
        for direction, ms in parts.items():
            if ms <= 0:
                continue
            w = max(ms * scale, 0.5)
            out.append(
                f'<rect class="bar" x="{x:.1f}" y="{y + 2}" width="{w:.1f}" height="{row_h - 4}" '
                f'fill="{COLORS[direction]}"><title>{escape(label)} {direction}: {ms:.4g} ms</title>'
                "</rect>"
            )
            x += w
        out.append(f'<text x="{x + 4:.1f}" y="{y + 12}">{sum(parts.values()):.3g} ms</text>')
    out.append(_legend(left, top + row_h * len(ranked) + 4))
    out.append("</svg>")
    return "".join(out)


# --------------------------------------------------------------------------------------------------- tables
def _cell(value: Any, spec: str = ".3g", scale: float = 1.0) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)):
        return f"{value * scale:{spec}}"
    return escape(str(value))


def _layer_table(report: ProfileReport) -> str:
    head = [
        "layer",
        "type",
        "dir",
        "path",
        "ms",
        "share",
        "GFLOP",
        "MB",
        "FLOP/B",
        "GB/s",
        "TFLOP/s",
        "% BW",
        "% compute",
        "bound",
        "x roof",
        "atomics",
        "kernels",
    ]
    rows = []
    for r in report.layers:
        x = r.rates
        cls = {"reference": "ref", "kernel": "kern"}.get(r.path, "")
        rows.append(
            f'<tr><td class="l">{escape(r.label)}</td><td class="l">{escape(r.type)}</td><td>{r.dir}</td>'
            f'<td class="{cls}" title="{escape(r.fallback or "")}">{escape(_path_label(r))}</td>'
            f"<td>{_cell(r.time_ms, '.4g')}</td>"
            f"<td>{_cell(r.share, '.1%')}</td><td>{_cell(r.flops, '.4g', 1e-9)}</td>"
            f"<td>{_cell(r.bytes, '.4g', 1e-6)}</td><td>{_cell(x.intensity, '.3g')}</td>"
            f"<td>{_cell(x.achieved_gbps, '.4g')}</td><td>{_cell(x.achieved_tflops, '.3g')}</td>"
            f"<td>{_cell(x.bandwidth_fraction, '.1%')}</td><td>{_cell(x.compute_fraction, '.1%')}</td>"
            f"<td>{x.bound or '-'}</td><td>{_cell(_distance(x.roofline_fraction), '.2f')}</td>"
            f'<td>{r.atomics:,}</td><td class="l">{escape(", ".join(r.kernels))}</td></tr>'
        )
    header = "".join(f'<th class="{"l" if h in ("layer", "type", "kernels") else ""}">{h}</th>' for h in head)
    return f'<h2>Layers</h2><table id="layers"><tr>{header}</tr>{"".join(rows)}</table>'


def _distance(fraction: float | None) -> float | None:
    return 1 / fraction if fraction else None


def _path_label(row: LayerRow) -> str:
    return "reference (no kernel)" if row.path == "reference" else row.path


def _kernel_table(report: ProfileReport) -> str:
    if not report.kernels:
        note = escape(report.run.get("kernel_note", ""))
        return f'<h2>Kernels</h2><p class="note">No kanc kernel was launched: {note}.</p>'
    head = ["kernel", "layer", "dir", "launches", "grid", "config", "atomics", "ms", "time from", "GB/s", "% BW"]
    rows = []
    for k in report.kernels:
        config = ", ".join(f"{a}={b}" for a, b in k.config.items())
        config += f", placement={k.placement}" if k.placement else ""
        direction = _SHORT.get(k.direction, k.direction)
        rows.append(
            f'<tr><td class="l">{escape(k.kernel)}</td><td class="l">{escape(k.layer)}</td><td>{direction}</td>'
            f'<td>{k.launches}</td><td>{escape(str(tuple(k.grid)))}</td><td class="l">{escape(config)}</td>'
            f'<td>{k.atomics:,}</td><td>{_cell(k.time_ms, ".4g")}</td><td class="l">{escape(k.time_source)}</td>'
            f"<td>{_cell(k.rates.achieved_gbps, '.4g')}</td><td>{_cell(k.rates.bandwidth_fraction, '.1%')}</td></tr>"
        )
    header = "".join(f"<th>{h}</th>" for h in head)
    return f'<h2>Kernels</h2><table id="kernels"><tr>{header}</tr>{"".join(rows)}</table>'


def _stalls(report: ProfileReport) -> str:
    s = report.stalls
    if not s.kernels:
        return f'<h2>Memory stalls</h2><p class="note">Not collected: {escape(s.note)}.</p>'
    head = ["kernel", "launches", "ms", "DRAM %", "L2 %", "SM %", "occupancy %", "long-scoreboard", "LG-throttle"]
    rows = []
    for k in s.kernels:
        rows.append(
            f'<tr><td class="l">{escape(k.kernel)}</td><td>{k.launches}</td><td>{_cell(k.duration_ms, ".4g")}</td>'
            f"<td>{_cell(k.dram_throughput_pct, '.1f')}</td><td>{_cell(k.l2_throughput_pct, '.1f')}</td>"
            f"<td>{_cell(k.sm_throughput_pct, '.1f')}</td><td>{_cell(k.achieved_occupancy_pct, '.1f')}</td>"
            f"<td>{_cell(k.long_scoreboard_fraction, '.0%')}</td><td>{_cell(k.lg_throttle_fraction, '.0%')}</td></tr>"
        )
    header = "".join(f"<th>{h}</th>" for h in head)
    return (
        f'<h2>Memory stalls ({escape(str(s.tool))})</h2><p class="note">{escape(s.note)}</p>'
        f'<table id="stalls"><tr>{header}</tr>{"".join(rows)}</table>'
    )


def _other_kernels(report: ProfileReport) -> str:
    if not report.other_kernels:
        return ""
    rows = "".join(
        f'<tr><td class="l">{escape(_short(k["name"], 90))}</td><td>{k["calls"]:.3g}</td>'
        f"<td>{k['time_ms']:.4g}</td></tr>"
        for k in report.other_kernels
    )
    return (
        f"<h2>Other GPU kernels (per step)</h2><table><tr><th>kernel</th><th>calls</th><th>ms</th></tr>{rows}</table>"
    )


def _notes(report: ProfileReport) -> str:
    notes = [*report.notes, *(f.text for f in report.findings if f.kind == "note")]
    items = "".join(f"<li>{escape(n)}</li>" for n in notes if n)
    counted = (
        "FLOPs and bytes are hand-counted from each layer's math (kanc.runtime.counts); bytes are the ideal "
        "traffic of a fused kernel, so GB/s is an effective rate."
    )
    return f'<h2>Notes</h2><ul class="note"><li>{escape(counted)}</li>{items}</ul>'


def _short(label: str, width: int = 28) -> str:
    return label if len(label) <= width else "..." + label[-(width - 3) :]


def _report_dtype(report: ProfileReport) -> torch.dtype:
    dtypes = [r.dtype for r in report.layers if r.dtype and r.rates.intensity]
    name = max(set(dtypes), key=dtypes.count) if dtypes else "float32"
    value = getattr(torch, name, torch.float32)
    return value if isinstance(value, torch.dtype) else torch.float32
