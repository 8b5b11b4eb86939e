"""ONNX export of (converted) models, verified with onnxruntime at the example shape and a second shape.

kanc's ops fall back to their pure-PyTorch reference under ``torch.onnx.is_in_onnx_export()``, so a GR-KAN
rational becomes Abs/Add/Div/MatMul/Mul and an SNNK block MatMul/Relu/Exp/Cos: no custom ONNX domain.
The file is written through kanc.writing: atomically (on any failure, export, onnxruntime or tolerance, nothing is
left at ``path``), never over a file in ``protect``, and over an existing file only with ``force``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from kanc.errors import CheckFailedError, KancError, first_line
from kanc.writing import Output, check_outputs, write_file

DYNAMIC_AXES = ("batch", "seq")


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and how well onnxruntime matched PyTorch.

    ``max_abs_diff`` maps output name -> max |ORT - PyTorch| at the example shape; ``checks`` holds one entry
    per verified shape: ``{"shapes": [...], "max_abs_diff": {name: float}}``.
    """

    path: Path
    opset: int | None
    dynamic: tuple[str, ...]
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    checks: list[dict] = field(default_factory=list)
    note: str | None = None  # set when the dynamic export failed and the file has static shapes instead

    @property
    def worst(self) -> float:
        """Largest difference over all outputs and all verified shapes (0.0 when not verified)."""
        return max((d for c in self.checks for d in c["max_abs_diff"].values()), default=0.0)


def export_onnx(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    path: str | os.PathLike,
    *,
    dynamic: Sequence[str] | None = DYNAMIC_AXES,
    opset: int | None = None,
    verify: bool = True,
    atol: float = 1e-4,
    force: bool = False,
    protect: Iterable[str | os.PathLike] = (),
) -> ExportResult:
    """Export ``model`` to ONNX at ``path`` (torch.onnx dynamo exporter) and check it with onnxruntime.

    ``dynamic`` names the axes left symbolic: "batch" is dim 0 of every input, "seq" is dim 1 of token ids (B, T) and
    token embeddings (B, T, D). With ``verify``, onnxruntime (CPU) runs the file at the example shape
    and, when axes are dynamic, at a second shape; a difference above ``atol`` raises :class:`CheckFailedError`.
    Where the dynamic export fails (the exporter, onnxruntime or the check), the file is exported and checked again
    with static shapes: ``result.dynamic`` is then empty and ``result.note`` says why in one line.
    An existing ``path`` is replaced only with ``force``; ``protect``: paths it must never touch (the model file).
    """
    inputs = _as_tuple(example_inputs)
    axes = _check_axes(dynamic)
    path = Path(path)
    protect = list(protect)
    check_outputs([Output(path)], inputs=protect, force=force)  # fail before the slow export
    model = model.eval()
    with _without_kv_cache(model):
        _check_runs(model, inputs)
        result = ExportResult(path=path, opset=opset, dynamic=axes)
        write_file(path, lambda tmp: _export_or_static(model, inputs, tmp, result, verify, atol), inputs=protect,
                   force=force)  # fmt: skip
        return result


def _export_or_static(
    model: nn.Module, inputs: tuple[Tensor, ...], tmp: Path, result: ExportResult, verify: bool, atol: float
) -> None:
    """The dynamic export, else (it failed to export, to run or to match) the static one, saying so in ``note``."""
    if not result.dynamic:
        _export_checked(model, inputs, tmp, result, verify, atol)
        return
    try:
        _export_checked(model, inputs, tmp, result, verify, atol)
    except _MissingKernel:
        raise  # static shapes need the same kernels
    except KancError as e:
        shapes = ", ".join(str(list(t.shape)) for t in inputs)
        axes = "/".join(result.dynamic)
        cause = _exporter_cause(e)
        result.note = f"the export with dynamic {axes} failed ({cause}); exported with static shapes {shapes}"
        result.dynamic, result.checks, result.max_abs_diff = (), [], {}
        _export_checked(model, inputs, tmp, result, verify, atol)


def _export_checked(
    model: nn.Module, inputs: tuple[Tensor, ...], tmp: Path, result: ExportResult, verify: bool, atol: float
) -> None:
    """Export to ``tmp`` and check it with onnxruntime; the writer publishes it only if this returns."""
    _export(model, _export_inputs(inputs, result.dynamic), str(tmp), result.dynamic, result.opset)
    if not verify:
        return
    shapes = [inputs] + ([_second_inputs(inputs, result.dynamic)] if result.dynamic else [])
    for probe in shapes:
        diffs = _compare(model, probe, str(tmp))
        result.checks.append({"shapes": [list(t.shape) for t in probe], "max_abs_diff": diffs})
    result.max_abs_diff = result.checks[0]["max_abs_diff"]
    if result.worst > atol or result.worst != result.worst:
        raise CheckFailedError(f"onnxruntime differs from PyTorch by {result.worst:.3g} (> atol {atol:g})")


@contextlib.contextmanager
def _without_kv_cache(model: nn.Module) -> Iterator[None]:
    """Hugging Face models return a key/value cache object that torch.export cannot flatten: export without it."""
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "use_cache", False):
        yield
        return
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = True


def _as_tuple(example_inputs: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(t, Tensor) for t in inputs):
        raise KancError("example_inputs must be a tensor or a non-empty sequence of tensors")
    return inputs


class _MissingKernel(KancError):
    """onnxruntime has no kernel for an op of the file (bfloat16 on the CPU): no other shapes can help."""


def _check_axes(dynamic: Sequence[str] | None) -> tuple[str, ...]:
    axes = tuple(dynamic or ())
    bad = [a for a in axes if a not in DYNAMIC_AXES]
    if bad:
        raise KancError(f"unknown dynamic axis {bad[0]!r}; choose from {', '.join(DYNAMIC_AXES)}")
    return axes


def _check_runs(model: nn.Module, inputs: tuple[Tensor, ...]) -> None:
    """Fail early, in one line, when the model does not accept the example inputs (wrong shape or dtype)."""
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as e:  # noqa: BLE001 - any forward failure is a user-facing bad-input error
        shapes = ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in inputs)
        raise KancError(f"model does not run on inputs {shapes}: {_exporter_cause(e)}") from e


def _has_seq(t: Tensor) -> bool:
    """Dim 1 is a sequence for token ids (B, T) and token embeddings (B, T, D); a float (B, D) has none."""
    return t.dim() == 3 or (t.dim() == 2 and not t.is_floating_point())


def _dim_spec(t: Tensor, axes: tuple[str, ...]) -> dict[int, object] | None:
    spec: dict[int, object] = {}
    if "batch" in axes and t.dim() >= 1:
        spec[0] = torch.export.Dim.DYNAMIC
    if "seq" in axes and _has_seq(t):
        spec[1] = torch.export.Dim.DYNAMIC
    return spec or None


def _export(model: nn.Module, inputs: tuple[Tensor, ...], file: str, axes: tuple[str, ...], opset: int | None) -> None:
    dynamic_shapes = tuple(_dim_spec(t, axes) for t in inputs) if axes else None
    kwargs = {"opset_version": opset} if opset is not None else {}
    # the exporter warns once per torchvision op it cannot register when torchvision is absent: not our concern
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        torch.onnx.export(
            model,
            inputs,
            file,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            external_data=False,
            verbose=False,
            **kwargs,
        )
    except Exception as e:  # noqa: BLE001 - exporter failures are many types; report the cause in one line
        raise KancError(f"model does not export to ONNX: {_exporter_cause(e)}") from e


def _second_inputs(inputs: tuple[Tensor, ...], axes: tuple[str, ...]) -> tuple[Tensor, ...]:
    """Inputs at another shape along the dynamic axes: batch + 1, sequence - 1 (never past the example length)."""
    return _resized(inputs, axes, lambda axis, n: n + 1 if axis == "batch" or n == 1 else n - 1)


def _export_inputs(inputs: tuple[Tensor, ...], axes: tuple[str, ...]) -> tuple[Tensor, ...]:
    """The example, at least 2 long on each dynamic axis: torch.export specializes a size of 1 (it reads as
    broadcastable), and the ONNX exporter then writes a graph that fails at any other size (a batch-1 LLaMA)."""
    if all(n >= 2 for t in inputs for n in _dynamic_sizes(t, axes)):
        return inputs
    return _resized(inputs, axes, lambda axis, n: max(n, 2))


def _dynamic_sizes(t: Tensor, axes: tuple[str, ...]) -> list[int]:
    return [t.shape[dim] for dim in (_dim_spec(t, axes) or {})]


def _resized(inputs: tuple[Tensor, ...], axes: tuple[str, ...], size: Callable[[str, int], int]) -> tuple[Tensor, ...]:
    """Seeded random inputs like ``inputs`` (ids within the example's range), dynamic axes at ``size(axis, n)``."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for t in inputs:
        shape = list(t.shape)
        if "batch" in axes and t.dim() >= 1:
            shape[0] = size("batch", shape[0])
        if "seq" in axes and _has_seq(t):
            shape[1] = size("seq", shape[1])
        if t.is_floating_point():
            out.append(torch.randn(shape, generator=gen).to(t.dtype))
        else:
            lo, hi = int(t.min()), int(t.max()) + 1
            out.append(torch.randint(lo, hi, shape, generator=gen).to(t.dtype))
    return tuple(out)


def _compare(model: nn.Module, inputs: tuple[Tensor, ...], file: str) -> dict[str, float]:
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(file, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        got = session.run(None, {n: t.numpy() for n, t in zip(names, inputs, strict=True)})
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        text = f"onnxruntime cannot run the exported model: {_exporter_cause(e)}"
        if "NOT_IMPLEMENTED" in str(e):
            bf16 = any(t.dtype == torch.bfloat16 for t in (*inputs, *model.parameters(), *model.buffers()))
            hint = "; its CPU kernels lack bfloat16: export a float32 copy (model.float())" if bf16 else ""
            raise _MissingKernel(text + hint) from e
        raise KancError(text) from e
    with torch.no_grad():
        expected = [t for t in torch.utils._pytree.tree_leaves(model(*inputs)) if isinstance(t, Tensor)]
    outputs = [o.name for o in session.get_outputs()]
    if len(expected) != len(got):
        raise KancError(f"ONNX model has {len(got)} outputs but PyTorch returns {len(expected)}")
    return {
        name: float((torch.from_numpy(g).double() - e.double()).abs().max()) if e.numel() else 0.0
        for name, g, e in zip(outputs, got, expected, strict=True)
    }


def _exporter_cause(e: BaseException) -> str:
    """One line for a failure in torch.export or the ONNX exporter: the cause its summary names, else the first line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # the exporter colours its messages
    cause = re.search(r"Exception summary\s+<class '(?:[\w.]+\.)?(\w+)'>: (.+)", text, re.DOTALL)
    if cause:  # the exporter's first line is generic ("step 1/3"); its summary names the cause
        return f"{cause.group(1)}: {_opening(cause.group(2))}"
    return _opening(text) if text.strip() else type(e).__name__


def _opening(text: str) -> str:
    """The first line, and the next when the first only announces it ("Found the following conflicts ...:")."""
    lines = [s.strip() for s in text.splitlines() if s.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return first_line(f"{lines[0]} {lines[1].lstrip('- ')}")
    return first_line(text)
