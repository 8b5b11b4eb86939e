"""Walking a model's layers one at a time inside its own forward, the way sequential quantizers (GPTQ) calibrate.

``LayerWalk`` runs a model whose layers are still on the meta device forward on a few calibration sequences. A
hook on each layer of its layer stacks calls ``before`` when the forward reaches the layer (fill it, convert it)
and ``after`` once it ran (check it, write it, drop it); what ``after`` returns is what the next layer sees. The
forward runs to its end, so a layer called twice (shared weights, as in ALBERT) is caught, never half-handled.
Everything the model computes between layers (masks, positions, rotary embeddings) comes from the model's own
code, so each layer gets exactly the arguments it gets in real use.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from kanc.api import default_inputs
from kanc.checkpoint import meta
from kanc.checkpoint.precision import HALF, LayerGemms
from kanc.errors import CheckFailedError, KancError, first_line
from kanc.numerics import rel_error
from kanc.passes import calibrate
from kanc.passes.find import ROOT

Progress = Callable[[str, int, int], None]


class LayerWalk:
    """Subclasses say what happens to each layer (``before`` / ``after``); ``walk`` drives the forward."""

    def __init__(self, model: nn.Module, progress: Progress | None = None) -> None:
        self.model = model
        self.progress = progress
        self.stacks = meta.layer_lists(model)
        self.layers = [(f"{s}.{i}", m) for s in self.stacks for i, m in enumerate(model.get_submodule(s))]
        self.done: list[str] = []
        self._names = {id(m): name for name, m in self.layers}
        self._busy = False
        self._gemm = LayerGemms()
        self._mode: Any = contextlib.nullcontext()  # the walk's GEMM mode (set by walk)

    def stack_of(self, name: str) -> str:
        """The layer list (``model.layers``, ``encoder.block``, ...) that layer ``name`` belongs to."""
        return name.rpartition(".")[0]

    def following(self, name: str) -> str | None:
        """The layer after ``name`` in the layer lists (the one the forward normally reaches next); None at the end."""
        names = [n for n, _ in self.layers]
        i = names.index(name) + 1
        return names[i] if i < len(names) else None

    def starts_stack(self, name: str) -> bool:
        """Whether layer ``name`` is the first of its layer list (an encoder-decoder has two)."""
        stack, _, index = name.rpartition(".")
        return index == "0" and stack in self.stacks

    def before(self, name: str, layer: nn.Module, inputs: dict[str, Any]) -> None:
        """The forward reached ``layer``, called with ``inputs`` (its arguments by name)."""

    def after(self, name: str, layer: nn.Module, inputs: dict[str, Any], output: Any) -> Any:
        """``layer`` ran and gave ``output``; returns what the rest of the model sees."""
        return output

    def walk(self, inputs: Any) -> None:
        """Run the model on ``inputs`` (no grad) until every layer went through ``before`` and ``after``."""
        hooks = []
        for _, layer in self.layers:
            hooks.append(layer.register_forward_pre_hook(self._pre, with_kwargs=True))
            hooks.append(layer.register_forward_hook(self._post, with_kwargs=True))
        self._mode = self._precision()
        try:
            with torch.no_grad(), self._mode:
                call(self.model, inputs)
        except (KancError, OSError):
            raise  # an OSError is the file system's (reading, writing): the writer names the file and the cause
        except Exception as e:  # noqa: BLE001 - the model's own code on the calibration inputs
            what = f"{type(e).__name__}: {first_line(e)}"
            raise KancError(f"the model does not run on the calibration inputs: {what}") from None
        finally:
            for h in hooks:
                h.remove()
        missing = [name for name, _ in self.layers if name not in self.done]
        if missing:
            raise KancError(f"layers {', '.join(missing[:4])} did not run on the calibration inputs")

    def run_aside(self, module: nn.Module, inputs: dict[str, Any]) -> Any:
        """``module(**inputs)`` as the walk runs its layers (no grad, its precision mode), on another thread: grad
        mode and torch function modes are each thread's own."""
        with torch.no_grad(), self._mode:
            return module(**inputs)

    def _precision(self) -> LayerGemms:
        """The walk's GEMMs (kanc.checkpoint.precision): each computed once per layer, and half-precision ones as
        fp32 GEMMs (faster on the CPU) when the model holds half-precision tensors. The rational fit's thousands of
        small ops bypass the mode (kanc.passes.ratfit), so its Python dispatch costs the fp32 walk little."""
        tensors = itertools.chain(self.model.parameters(), self.model.buffers())
        self._gemm.half = any(t.dtype in HALF for t in tensors)
        return self._gemm

    def _pre(self, layer: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._busy:
            return
        name = self._names[id(layer)]
        if name in self.done:
            raise KancError(f"layer {name} runs twice in one forward (shared weights): it cannot be streamed")
        if self.progress is not None:
            self.progress(name, len(self.done), len(self.layers))
        self._quietly(self.before, name, layer, bind_inputs(layer, args, kwargs))

    def _post(self, layer: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self._busy:
            return None
        name = self._names[id(layer)]
        output = self._quietly(self.after, name, layer, bind_inputs(layer, args, kwargs), output)
        self._gemm.clear()  # the layer's GEMM memo and fp32 weight copies
        self.done.append(name)
        return output

    def _quietly(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call ``fn`` with the hooks switched off (it may call the layer itself)."""
        self._busy = True
        try:
            return fn(*args)
        finally:
            self._busy = False


# ---- inputs and outputs ---------------------------------------------------------------------------------------------


def calibration_inputs(model: nn.Module, calibration: Any) -> Any:
    """The user's calibration inputs (a tensor is a Hugging Face model's main input), or seeded token ids; no
    key/value cache."""
    inputs = default_inputs(model) if calibration is None else calibration
    if inputs is None:
        raise KancError(f"{type(model).__name__} takes no token ids: pass calibration= model inputs")
    if isinstance(inputs, Tensor) and isinstance(getattr(model, "main_input_name", None), str):
        inputs = {model.main_input_name: inputs}  # a Hugging Face model's token ids
    inputs = calibrate.move_inputs(inputs, torch.device("cpu"))
    if isinstance(inputs, Mapping) and "use_cache" in inspect.signature(model.forward).parameters:
        inputs = {"use_cache": False, **inputs}  # a cache would grow with every extra call of a layer
    return inputs


def bind_inputs(layer: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A layer call's arguments as keyword arguments (what kanc.compile takes as calibration)."""
    signature = inspect.signature(layer.forward)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as e:
        raise KancError(f"cannot read the arguments of {type(layer).__name__}.forward: {e}") from None
    inputs: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL and value:
            raise KancError(f"{type(layer).__name__}.forward is called with *args: it cannot be streamed")
        if kind is inspect.Parameter.VAR_KEYWORD:
            inputs.update(value)
        elif kind is not inspect.Parameter.VAR_POSITIONAL:
            inputs[name] = value
    return inputs


def call(model: nn.Module, inputs: Any) -> Any:
    """``model(inputs)``: a dict is keyword arguments, a tuple positional ones, anything else the one argument."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


def output_error(actual: Any, expected: Any, what: str) -> float:
    """The worst relative error over ``expected``'s floating outputs; a non-finite output is an error, never 0."""
    got = dict(calibrate.output_tensors(actual))
    worst = 0.0
    for key, want in calibrate.output_tensors(expected):
        if not want.is_floating_point() or key not in got or got[key].shape != want.shape:
            continue
        if not torch.isfinite(want).all():
            raise KancError(f"the original {what} gives non-finite outputs on the calibration inputs")
        if not torch.isfinite(got[key]).all():
            raise CheckFailedError(
                f"the converted {what} gives non-finite outputs on the calibration inputs; nothing written"
            )
        worst = max(worst, rel_error(got[key], want))
    return worst


def first_tensor(out: Any) -> Tensor:
    """A layer's hidden states: its output, or the first tensor of it (tuple, dict or ModelOutput)."""
    tensors = calibrate.output_tensors(out)
    if not tensors:
        raise KancError(f"a layer returned {type(out).__name__}, which holds no tensor")
    return tensors[0][1]


def with_hidden(inputs: dict[str, Any], hidden: Tensor | None) -> dict[str, Any]:
    """``inputs`` with its first argument (the hidden states) replaced by ``hidden``; ``inputs`` itself if None."""
    if hidden is None:
        return inputs
    first = next(iter(inputs))
    if not isinstance(inputs[first], Tensor) or inputs[first].shape != hidden.shape:
        raise KancError(f"cannot carry the original hidden states: the layer's first argument {first!r} differs")
    return {**inputs, first: hidden}


def full_name(layer: str, name: str) -> str:
    """A name from a layer's own discovery made full: the layer's root (``""``, ``ROOT``, ``ROOT:node``) is the
    layer itself (BERT's split MLP is the whole layer)."""
    if name.startswith(ROOT):
        return layer + name[len(ROOT) :]
    return f"{layer}.{name}" if name else layer


def local_name(layer: str, block: str) -> str:
    """The inverse of :func:`full_name` for a block of ``layer``: its name inside the layer (the layer is ROOT)."""
    return ROOT if block == layer else block[len(layer) + 1 :]


def describe(inputs: Any) -> str:
    tensors = calibrate.output_tensors(inputs, "input")
    return ", ".join(f"{n} {tuple(t.shape)}" for n, t in tensors) or "inputs"
