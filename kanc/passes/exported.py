"""Models that came from ``.pt2`` files: re-exporting the converted aten graph with the original's dynamism.

kanc converts ``ExportedProgram.module()`` (an aten-level GraphModule) in place: ``aten.linear`` nodes become calls of
GRKANLinear / SNNKMlp modules. Saving it as ``.pt2`` again means exporting it again, on the original program's
example inputs, with every dimension that was symbolic in the original marked ``Dim.AUTO``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kanc.errors import KancError, first_line


def dynamic_shapes_of(exported: Any) -> tuple | None:
    """Per positional input: {dim: Dim.AUTO} for the dims that were symbolic in ``exported`` (None if none were)."""
    args, kwargs = exported.example_inputs
    if kwargs:
        return None
    user = [n for n in exported.graph.nodes if n.op == "placeholder"][-len(args) :] if args else []
    shapes, any_dynamic = [], False
    for node in user:
        val = node.meta.get("val")
        dims = {}
        if isinstance(val, torch.Tensor):
            dims = {i: torch.export.Dim.AUTO for i, s in enumerate(val.shape) if not isinstance(s, int)}
        any_dynamic |= bool(dims)
        shapes.append(dims or None)
    return tuple(shapes) if any_dynamic else None


def reexport(model: nn.Module, example_inputs: Any = None, original: Any = None) -> Any:
    """torch.export ``model`` on ``example_inputs`` (or the original program's), keeping its dynamic dims."""
    if example_inputs is None and original is None:
        raise KancError("saving as .pt2 needs example inputs (the model did not come from a .pt2 file)")
    if example_inputs is None:
        args, kwargs = original.example_inputs
    else:
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        kwargs = {}
    dynamic = dynamic_shapes_of(original) if original is not None and example_inputs is None else None
    try:
        return torch.export.export(model, tuple(args), kwargs or None, dynamic_shapes=dynamic)
    except Exception as e:  # noqa: BLE001 - export failures come in many types
        raise KancError(f"the converted model does not export: {first_line(e)}") from None
