"""The conversion report ``kanc.report(model)`` returns: what was converted, skipped and why, sizes, fidelity."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from kanc.passes.find import Skip
from kanc.passes.pipeline import Conversion
from kanc.text import json_safe, table


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

    @property
    def failed_checks(self) -> list[str]:
        """The fidelity checks that failed (non-finite outputs, grad modes that disagree); empty when all passed."""
        return list((self.fidelity or {}).get("failures") or [])

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
        options=json_safe(options),
        converted=[c.as_dict() for c in result.converted],
        skipped=[s.as_dict() for s in result.skipped],
        counters=dict(sorted(result.counters.items())),
        params_before=params_before,
        params_after=count_params(conv.model),
        fidelity=conv.fidelity.as_dict() if conv.fidelity is not None else None,
        notes=list(result.notes),
        passes=[{"name": p.name, "seconds": p.seconds, "counters": p.counters} for p in conv.passes],
        not_traced=dict(conv.found.untraced),
        seconds=sum(p.seconds for p in conv.passes),
    )


def _error_text(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.2e}"


def _lines(r: ConversionReport) -> list[str]:
    head = f"kanc {r.target}: {r.model_type}, {len(r.converted)} block(s) converted, {len(r.skipped)} skipped"
    lines = [f"{head} ({r.seconds:.2f} s)"]
    delta = (r.params_after - r.params_before) / max(r.params_before, 1) * 100
    lines.append(f"parameters: {r.params_before:,} -> {r.params_after:,} ({delta:+.1f}%)")
    lines += [f"note: {n}" for n in r.notes]
    if r.converted:
        rows = [
            [
                c["name"], c["pattern"], c["shape"], c["activation"], c["mode"],
                f"{c['params_before']:,} -> {c['params_after']:,}", _error_text(c["error"]), c["error_inputs"] or "-",
            ]
            for c in r.converted
        ]  # fmt: skip
        header = ["block", "pattern", "shape", "act", "mode", "params", "block err", "measured on"]
        lines += ["", *table(rows, header)]
        lines += [f"  {c['name']}: {n}" for c in r.converted for n in c["notes"]]
    if r.fidelity and (r.fidelity.get("outputs") or r.fidelity.get("outputs_grad")):
        lines.append("")
        for mode, key in (("no_grad", "outputs"), ("grad", "outputs_grad")):
            outs = ", ".join(f"{k} {_error_text(v)}" for k, v in (r.fidelity.get(key) or {}).items()) or "-"
            lines.append(f"model outputs on {r.fidelity['inputs']} ({mode}): relative error {outs}")
    elif r.fidelity and r.fidelity.get("summary"):  # measured another way (a checkpoint streamed layer by layer)
        lines += ["", *(str(line) for line in r.fidelity["summary"])]
    elif r.converted:
        lines += ["", "model outputs: not measured (pass example_inputs= / --inputs to measure them)"]
    if r.failed_checks:
        lines += ["", "FAILED CHECKS:"] + [f"  {f}" for f in r.failed_checks]
    if r.skipped:
        lines += ["", "skipped:"]
        lines += [f"  {Skip(**s).line()}" for s in r.skipped]
    if r.fallbacks:
        lines += ["", "kernel fallbacks (calls so far, per layer):", *(f"  {line}" for line in r.fallbacks)]
    return lines
