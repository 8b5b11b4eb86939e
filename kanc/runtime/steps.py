"""One profiled step: the model's forward, and with ``train`` its backward from a gradient of ones.

Shared by the profiler, the tuner and the ncu child process, so all three run exactly the same work.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kanc.errors import KancError
from kanc.runtime.timeline import Clock, first_tensor

Inputs = Tensor | Sequence[Any] | Mapping[str, Any]


def split_inputs(inputs: Inputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A tensor is one positional input, a tuple/list the positional inputs, a dict the keyword inputs."""
    if isinstance(inputs, Tensor):
        return (inputs,), {}
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, Sequence) and not isinstance(inputs, (str, bytes)):
        return tuple(inputs), {}
    raise KancError(
        f"inputs must be a tensor, a tuple/list of inputs or a dict of keyword inputs, not {type(inputs).__name__}"
    )


def prepare_inputs(
    inputs: Inputs, device: torch.device, dtype: torch.dtype | None, train: bool
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Inputs on ``device``; floating tensors cast to ``dtype`` (when given) and, when training, made leaves that
    require grad, so that every layer's backward (the first one's included) runs between its hooks."""

    def move(value: Any) -> Any:
        if isinstance(value, Tensor):
            t = value.detach().to(device)
            if t.is_floating_point():
                t = t.to(dtype) if dtype is not None else t
                t.requires_grad_(train)
            return t
        if isinstance(value, (list, tuple)):
            return type(value)(move(v) for v in value)
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        return value

    args, kwargs = split_inputs(inputs)
    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


def input_summary(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    """Shape and dtype of each tensor input (for the report)."""
    items = [(str(i), a) for i, a in enumerate(args)] + list(kwargs.items())
    return [
        {"name": n, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
        for n, t in items
        if isinstance(t, Tensor)
    ]


def run_step(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    train: bool,
    on_backward: Callable[[], None] | None = None,
) -> None:
    """Forward (under no_grad unless ``train``), then backward of the first floating output with a gradient of
    ones; gradients are dropped after the step so that steps stay alike."""
    if not train:
        with torch.no_grad():
            model(*args, **kwargs)
        return
    out = first_tensor(model(*args, **kwargs), floating=True)
    if out is None or not out.requires_grad:
        raise KancError("--train needs a floating-point model output that depends on the parameters")
    if on_backward is not None:
        on_backward()
    torch.autograd.backward(out, torch.ones_like(out))
    clear_grads(model, args, kwargs)


def clear_grads(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    for p in model.parameters():
        p.grad = None
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            value.grad = None


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], device: torch.device, iters: int) -> list[float]:
    """Wall time of ``iters`` calls of ``step`` in ms (CUDA events on a GPU, perf_counter on the CPU)."""
    clock = Clock(device)
    times = []
    for _ in range(iters):
        start = clock.stamp()
        step()
        end = clock.stamp()
        times.append(clock.resolve([start, end])[1])
    return times
