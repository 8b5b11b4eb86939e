"""``verify_equivalence``: the original and the converted model on the same inputs, per output and per block."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kanc.errors import KancError
from kanc.passes import calibrate
from kanc.passes.patterns import MLPBlock
from kanc.passes.rewrite import ConvertedBlock, PassResult
from kanc.testing import rel_error


@dataclass
class Snapshot:
    """What the original model did on some inputs: its named outputs and each block's input rows."""

    outputs: list[tuple[str, Tensor]]
    rows: dict[tuple, Tensor] = field(default_factory=dict)


@dataclass
class Fidelity:
    """Relative errors ||converted - original|| / ||original|| of every output and of every converted block.

    Block errors compare the new block with the original block on the inputs that block saw in the original model.
    """

    outputs: dict[str, float] = field(default_factory=dict)
    blocks: dict[str, float] = field(default_factory=dict)
    inputs: str = ""

    @property
    def worst_output(self) -> float:
        return max(self.outputs.values(), default=0.0)

    def as_dict(self) -> dict:
        return {"inputs": self.inputs, "outputs": self.outputs, "blocks": self.blocks}


def snapshot(model: nn.Module, inputs: Any, blocks: Sequence[MLPBlock] = ()) -> Snapshot:
    """Run ``model`` (eval, no grad) on ``inputs``; keep its outputs and the input rows of ``blocks`` (by fc1 path)."""
    seen: dict[tuple, list[Tensor]] = {}
    hooks = []
    for block in blocks:
        if block.fc1.module is None:
            continue
        try:
            module = model.get_submodule(block.fc1.path)
        except AttributeError:
            continue
        seen[block.key] = []
        hooks.append(module.register_forward_pre_hook(_catcher(seen[block.key], block.channels_first)))
    try:
        with torch.no_grad(), calibrate.eval_mode(model):
            out = calibrate.call_model(model, inputs)
    except Exception as e:  # noqa: BLE001 - the user's model on the user's inputs
        raise KancError(f"the model does not run on the given inputs: {type(e).__name__}: {e}") from None
    finally:
        for h in hooks:
            h.remove()
    rows = {k: torch.cat(v).double() for k, v in seen.items() if v}
    return Snapshot([(n, t.detach().clone()) for n, t in calibrate.output_tensors(out)], rows)


def _catcher(store: list, channels_first: bool):
    def pre_hook(module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], Tensor):
            store.append(calibrate.rows_of(args[0].detach(), channels_first))

    return pre_hook


def verify_equivalence(
    original: nn.Module | Snapshot, converted: nn.Module, inputs: Any, result: PassResult | None = None
) -> Fidelity:
    """Relative error of every output of ``converted`` vs ``original`` on ``inputs``, and of every block in ``result``.

    ``original`` may be a Snapshot taken before an in-place conversion. Both run in eval mode without grad.
    """
    blocks = result.converted if result is not None else []
    before = original if isinstance(original, Snapshot) else snapshot(original, inputs, [c.block for c in blocks])
    after = snapshot(converted, inputs)
    fidelity = Fidelity(inputs=_describe(inputs))
    actual = dict(after.outputs)
    for name, expected in before.outputs:
        if name in actual and actual[name].shape == expected.shape and expected.is_floating_point():
            fidelity.outputs[name] = rel_error(actual[name], expected)
    with calibrate.eval_mode(converted):
        for c in blocks:
            rows = before.rows.get(c.block.key) if c.block is not None else None
            if rows is not None and c.replacement is not None:
                fidelity.blocks[c.name] = _block_error(c, rows)
    return fidelity


def _block_error(c: ConvertedBlock, rows: Tensor) -> float:
    weight = c.block.fc1.weights.weight
    with torch.no_grad():
        expected = c.block.reference()(rows.to(weight.device))
        actual = c.replacement(rows.to(device=weight.device, dtype=weight.dtype))
    return rel_error(actual, expected)


def _describe(inputs: Any) -> str:
    tensors = calibrate.output_tensors(inputs, "input")
    return ", ".join(f"{n} {tuple(t.shape)}" for n, t in tensors) or "inputs"
