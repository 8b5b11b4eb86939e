"""``verify_equivalence``: the converted model itself against the original, on the same inputs, in both grad modes.

The original runs once without grad and once with grad (eval mode both times): PyTorch's fused paths and other
code that branches on ``torch.is_grad_enabled()`` may compute differently, and a conversion they bypass shows up
only in one mode. The converted model runs the same way; its grad run carries hooks on each converted block's own
entry and exit modules (its no_grad run does not: a hook is itself a reason for PyTorch to leave its fused path).
A block's error compares what the converted block returned with what the original block computes on the input
that converted block received (its weights read in place, in the model's dtype: one cheap measurement).

A check fails when an output that was finite becomes non-finite, or when the converted model's two modes disagree
(something in the model bypassed a converted layer in one of them). Failures are listed in ``Fidelity.failures``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kanc.errors import KancError, one_line
from kanc.frontend.leaves import linear_kind
from kanc.numerics import rel_error
from kanc.passes import calibrate
from kanc.passes.convert import ConvertedBlock, PassResult

MODES = ("no_grad", "grad")
# The two modes of the converted model may differ by float rounding, never by more than this (relative).
MODE_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 5e-2}
DEFAULT_MODE_TOLERANCE = 1e-4


@dataclass
class Snapshot:
    """What the original model returned on some inputs, per grad mode: mode -> named outputs."""

    outputs: dict[str, list[tuple[str, Tensor]]]


@dataclass
class Fidelity:
    """Relative errors ||converted - original|| / ||original|| of every output (per mode) and every converted block.

    ``failures``: one line per failed check (non-finite output, modes that disagree); empty when all passed.
    """

    outputs: dict[str, float] = field(default_factory=dict)  # no_grad
    outputs_grad: dict[str, float] = field(default_factory=dict)
    blocks: dict[str, float] = field(default_factory=dict)
    inputs: str = ""
    failures: list[str] = field(default_factory=list)

    @property
    def worst_output(self) -> float:
        return max([*self.outputs.values(), *self.outputs_grad.values()], default=0.0)

    @property
    def failed(self) -> bool:
        return bool(self.failures)

    def as_dict(self) -> dict:
        return {
            "inputs": self.inputs,
            "outputs": self.outputs,
            "outputs_grad": self.outputs_grad,
            "blocks": self.blocks,
            "failures": list(self.failures),
        }


def run_outputs(model: nn.Module, inputs: Any, mode: str) -> list[tuple[str, Tensor]]:
    """``model``'s named output tensors on ``inputs`` in eval mode, with grad (``mode="grad"``) or without."""
    with calibrate.eval_mode(model), torch.set_grad_enabled(mode == "grad"):
        out = calibrate.call_model(model, inputs)
    return [(n, t.detach().clone()) for n, t in calibrate.output_tensors(out)]


def snapshot(model: nn.Module, inputs: Any) -> Snapshot:
    """Run the original ``model`` (eval) on ``inputs`` without and with grad; keep its outputs."""
    try:
        return Snapshot({mode: run_outputs(model, inputs, mode) for mode in MODES})
    except Exception as e:  # noqa: BLE001 - the user's model on the user's inputs
        raise calibrate.does_not_run(e) from None


def verify_equivalence(
    original: nn.Module | Snapshot,
    converted: nn.Module,
    inputs: Any,
    result: PassResult | None = None,
    no_grad_outputs: list[tuple[str, Tensor]] | None = None,
) -> Fidelity:
    """Relative error of every output of ``converted`` vs ``original`` on ``inputs`` in both grad modes, and of
    every block in ``result`` (hooked on ``converted``); failed checks in ``Fidelity.failures``.

    ``original`` may be a Snapshot taken before an in-place conversion. ``no_grad_outputs``: ``converted``'s named
    outputs on ``inputs`` from a no_grad eval run the caller already made (a layer-by-layer walk), not run again.
    """
    before = original if isinstance(original, Snapshot) else snapshot(original, inputs)
    converted_blocks = result.converted if result is not None else []
    blocks = [c for c in converted_blocks if c.entry is not None and c.exit is not None and c.reference is not None]
    fidelity = Fidelity(inputs=_describe(inputs))
    probes = [_BlockProbe(c) for c in blocks]
    if no_grad_outputs is None:
        no_grad_outputs = _run_converted(converted, inputs, "no_grad")
    after = {"no_grad": no_grad_outputs}
    handles = [h for p in probes for h in p.attach()]  # only now: hooks turn PyTorch's fused paths off
    try:
        after["grad"] = _run_converted(converted, inputs, "grad")
    finally:
        for h in handles:
            h.remove()
    fidelity.outputs = _compare(before.outputs["no_grad"], after["no_grad"])
    fidelity.outputs_grad = _compare(before.outputs["grad"], after["grad"])
    fidelity.blocks = {p.block.name: p.error() for p in probes if p.calls}
    fidelity.failures = _failures(before, after, fidelity)
    return fidelity


def _run_converted(model: nn.Module, inputs: Any, mode: str) -> list[tuple[str, Tensor]]:
    try:
        return run_outputs(model, inputs, mode)
    except Exception as e:  # noqa: BLE001 - the original ran on these inputs: the conversion broke something
        raise KancError(
            f"the converted model fails on inputs the original model runs on ({mode}): {one_line(e)}"
        ) from None


def _compare(expected: list[tuple[str, Tensor]], actual: list[tuple[str, Tensor]]) -> dict[str, float]:
    got = dict(actual)
    return {
        name: rel_error(got[name], ref)
        for name, ref in expected
        if name in got and ref.is_floating_point() and got[name].shape == ref.shape
    }


def _failures(before: Snapshot, after: dict, fidelity: Fidelity) -> list[str]:
    failures = []
    for mode, errors in (("no_grad", fidelity.outputs), ("grad", fidelity.outputs_grad)):
        ref = dict(before.outputs[mode])
        got = dict(after[mode])
        for name in errors:
            if bool(torch.isfinite(ref[name]).all()) and not bool(torch.isfinite(got[name]).all()):
                failures.append(f"output {name} is finite in the original but not in the converted model ({mode})")
    grad = dict(after["grad"])
    for name, value in after["no_grad"]:
        other = grad.get(name)
        if other is None or not value.is_floating_point() or other.shape != value.shape:
            continue
        gap, ref_gap = rel_error(value, other), _original_gap(before, name)
        if gap > MODE_TOLERANCE.get(value.dtype, DEFAULT_MODE_TOLERANCE) + 10 * ref_gap:
            failures.append(
                f"output {name} differs between no_grad and grad mode by {gap:.2e} (the original: {ref_gap:.2e}): "
                "something in the model bypasses a converted layer in one mode"
            )
    return failures


def _original_gap(before: Snapshot, name: str) -> float:
    a, b = dict(before.outputs["no_grad"]).get(name), dict(before.outputs["grad"]).get(name)
    if a is None or b is None or a.shape != b.shape:
        return 0.0
    gap = rel_error(a, b)
    return gap if gap != float("inf") else 0.0


class _BlockProbe:
    """Hooks on a converted block's entry and exit modules: the input it got, the output it gave, per call."""

    def __init__(self, converted: ConvertedBlock) -> None:
        self.block = converted.block
        self.converted = converted
        self.calls: list[tuple[Tensor, Tensor]] = []
        self._pending: list[Tensor] = []
        # an original 1x1 conv as entry or exit sees channels-first maps; kanc's layers see channels-last rows
        self._first = [linear_kind(m) == "conv1x1" for m in (converted.entry, converted.exit)]

    def attach(self) -> list[Any]:
        entry, exit_ = self.converted.entry, self.converted.exit
        return [entry.register_forward_pre_hook(self._enter), exit_.register_forward_hook(self._leave)]

    def _enter(self, module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], Tensor):
            self._pending.append(args[0].detach())

    def _leave(self, module: nn.Module, args: tuple, out: Any) -> None:
        if self._pending and isinstance(out, Tensor):
            self.calls.append((self._pending.pop(0), out.detach()))
        elif self._pending:
            self._pending.pop(0)

    def error(self) -> float:
        """sqrt(sum ||y - ref(x)||^2 / sum ||ref(x)||^2) over the calls, rows in the model's dtype (fp32 at least)."""
        num = den = 0.0
        for x, y in self.calls:
            rows = calibrate.rows_of(x, self._first[0])
            with torch.no_grad():
                ref = self.converted.reference(rows)
            dtype = ref.dtype
            out = calibrate.rows_of(y, self._first[1]).to(dtype)
            err = rel_error(out, ref)
            if err == float("inf"):
                return err
            scale = float(ref.double().norm()) ** 2
            num, den = num + err**2 * scale, den + scale
        return (num / den) ** 0.5 if den > 0 else (0.0 if num == 0 else float("inf"))


def _describe(inputs: Any) -> str:
    tensors = calibrate.output_tensors(inputs, "input")
    return ", ".join(f"{n} {tuple(t.shape)}" for n, t in tensors) or "inputs"
