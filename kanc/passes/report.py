"""The conversion report ``kanc.report(model)`` returns: what was converted, skipped and why, sizes, fidelity."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from kanc.passes.pipeline import Conversion


@dataclass
class ConversionReport:
    """What one kanc.compile did. ``str(report)`` is a table; ``as_dict()`` is JSON-ready."""

    target: str
    model_type: str
    options: dict[str, Any]
    converted: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    fidelity: dict | None = None
    notes: list[str] = field(default_factory=list)
    passes: list[dict] = field(default_factory=list)
    not_traced: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    fallbacks: list[str] = field(default_factory=list)  # kernel calls that ran the reference, refreshed by kanc.report

    @property
    def blocks(self) -> list[str]:
        return [c["name"] for c in self.converted]

    def as_dict(self) -> dict:
        return {
            "target": self.target,
            "model_type": self.model_type,
            "options": self.options,
            "converted": self.converted,
            "skipped": self.skipped,
            "counters": self.counters,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "fidelity": self.fidelity,
            "notes": self.notes,
            "passes": self.passes,
            "not_traced": self.not_traced,
            "seconds": self.seconds,
            "fallbacks": self.fallbacks,
        }

    def __str__(self) -> str:
        return "\n".join(_lines(self))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_report(conv: Conversion, model_type: str, options: dict, params_before: int) -> ConversionReport:
    result = conv.result
    return ConversionReport(
        target=conv.target,
        model_type=model_type,
        options=_jsonable(options),
        converted=[c.as_dict() for c in result.converted],
        skipped=[s.as_dict() for s in result.skipped],
        counters=dict(sorted(result.counters.items())),
        params_before=params_before,
        params_after=count_params(conv.model),
        fidelity=conv.fidelity.as_dict() if conv.fidelity is not None else None,
        notes=list(result.notes),
        passes=[{"name": p.name, "seconds": p.seconds, "counters": p.counters} for p in conv.passes],
        not_traced=conv.found.trace.reasons(),
        seconds=sum(p.seconds for p in conv.passes),
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return repr(value)


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header).rstrip(), *(fmt.format(*map(str, r)).rstrip() for r in rows)]


def _lines(r: ConversionReport) -> list[str]:
    head = f"kanc {r.target}: {r.model_type}, {len(r.converted)} block(s) converted, {len(r.skipped)} skipped"
    lines = [f"{head} ({r.seconds:.2f} s)"]
    delta = (r.params_after - r.params_before) / max(r.params_before, 1) * 100
    lines.append(f"parameters: {r.params_before:,} -> {r.params_after:,} ({delta:+.1f}%)")
    lines += [f"note: {n}" for n in r.notes]
    if r.converted:
        fid = (r.fidelity or {}).get("blocks", {})
        rows = [
            [
                c["name"], c["pattern"], c["shape"], c["activation"], c["mode"],
                f"{c['params_before']:,} -> {c['params_after']:,}", f"{c['error']:.2e}",
                f"{fid[c['name']]:.2e}" if c["name"] in fid else "-",
            ]
            for c in r.converted
        ]  # fmt: skip
        header = ["block", "pattern", "shape", "act", "mode", "params", "block err", "err on inputs"]
        lines += ["", *_table(rows, header)]
        lines += [f"  {c['name']}: {n}" for c in r.converted for n in c["notes"]]
    if r.fidelity and r.fidelity.get("outputs"):
        outs = ", ".join(f"{k} {v:.2e}" for k, v in r.fidelity["outputs"].items())
        lines += ["", f"model outputs on {r.fidelity['inputs']}: relative error {outs}"]
    elif r.converted:
        lines += ["", "model outputs: not measured (pass example_inputs= / --inputs to measure them)"]
    if r.skipped:
        lines += ["", "skipped:"]
        lines += [f"  {s['name']}: [{s['code']}] {s['message']}" for s in r.skipped]
    if r.fallbacks:
        lines += ["", "kernel fallbacks (calls so far, per layer):", *(f"  {line}" for line in r.fallbacks)]
    return lines
