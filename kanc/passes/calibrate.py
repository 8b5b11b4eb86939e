"""Running a model on the user's inputs and catching what each MLP block really sees (its input rows)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn

from kanc.errors import KancError, one_line
from kanc.passes.checks import MLPBlock

DEFAULT_MAX_ROWS = 16384


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(inputs)``: a tensor is one argument, a tuple/list positional arguments, a dict keyword arguments.

    Inputs are moved to the device of the model's first parameter (calibration files load on the CPU).
    """
    device = next((p.device for p in model.parameters()), None)
    if device is not None:
        inputs = move_inputs(inputs, device)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


def does_not_run(e: Exception) -> KancError:
    """The one error for the user's model failing on the user's inputs (the original, before any conversion)."""
    return KancError(f"the model does not run on the given inputs: {one_line(e)}")


def move_inputs(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, Tensor):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return {k: move_inputs(v, device) for k, v in inputs.items()}
    if isinstance(inputs, tuple | list):
        return type(inputs)(move_inputs(v, device) for v in inputs)
    return inputs


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """model.eval() inside, every module's own training flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    for m, _ in flags:
        m.training = False  # not model.eval(): ExportedProgram.module() refuses it
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def rows_of(x: Tensor, channels_first: bool) -> Tensor:
    """(..., C) or (B, C, ...) -> (N, C)."""
    if channels_first:
        x = x.movedim(1, -1)
    return x.reshape(-1, x.shape[-1])


def _subsample(rows: Tensor, max_rows: int, seed: int) -> Tensor:
    if rows.shape[0] <= max_rows:
        return rows
    gen = torch.Generator().manual_seed(seed)
    return rows[torch.randperm(rows.shape[0], generator=gen)[:max_rows].to(rows.device)]


def capture_block_inputs(
    model: nn.Module, blocks: Sequence[MLPBlock], inputs: Any, max_rows: int = DEFAULT_MAX_ROWS, seed: int = 0
) -> dict[tuple, Tensor]:
    """Block key -> float64 input rows the block sees when ``model`` runs on ``inputs`` (eval mode, no grad)."""
    seen: dict[tuple, list[Tensor]] = {b.key: [] for b in blocks}
    aten = [b for b in blocks if b.fc1.module is None]
    hooks = [_hook(b, seen) for b in blocks if b.fc1.module is not None]
    try:
        with torch.no_grad(), eval_mode(model):
            if aten:
                _interpret(model, aten, inputs, seen)
            else:
                call_model(model, inputs)
    except KancError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's model on the user's inputs
        raise does_not_run(e) from None
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for i, (key, chunks) in enumerate(seen.items()):
        if chunks:
            out[key] = _subsample(torch.cat(chunks).double(), max_rows, seed + i)
    return out


def _hook(block: MLPBlock, seen: dict) -> Any:
    def pre_hook(module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], Tensor):
            seen[block.key].append(rows_of(args[0].detach(), block.channels_first).cpu())

    return block.fc1.module.register_forward_pre_hook(pre_hook)


def _interpret(gm: nn.Module, blocks: Sequence[MLPBlock], inputs: Any, seen: dict) -> None:
    """Aten graphs have no module calls to hook: run the graph and read each fc1's input value."""
    wanted = {b.fc1.input: b for b in blocks}

    class Catch(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            value = super().run_node(n)
            if n in wanted and isinstance(value, Tensor):
                seen[wanted[n].key].append(rows_of(value.detach(), False).cpu())
            return value

    device = next((p.device for p in gm.parameters()), None)
    inputs = move_inputs(inputs, device) if device is not None else inputs
    args = list(inputs.values()) if isinstance(inputs, Mapping) else inputs
    args = list(args) if isinstance(args, tuple | list) else [args]
    Catch(gm).run(*args)


def top_up(rows: Tensor, target: int, seed: int) -> Tensor:
    """Add Gaussian rows with the real rows' per-channel mean and std until there are ``target`` rows."""
    missing = target - rows.shape[0]
    if missing <= 0:
        return rows
    gen = torch.Generator().manual_seed(seed)
    mean, std = rows.mean(0), rows.std(0, unbiased=False) if rows.shape[0] > 1 else torch.ones_like(rows[0])
    extra = torch.randn(missing, rows.shape[1], generator=gen, dtype=rows.dtype).to(rows.device) * std + mean
    return torch.cat([rows, extra])


def synthetic_rows(width: int, rows: int, seed: int, device: torch.device | None = None) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, width, generator=gen, dtype=torch.float64).to(device or "cpu")


def output_tensors(out: Any, root: str = "output", prefix: str | None = None) -> list[tuple[str, Tensor]]:
    """Named tensors of a model output (tensor, tuple/list, dict or HF ModelOutput); other objects are skipped.

    A bare tensor is ``root``; a dict's entries go by their keys, a tuple's by ``root[i]``.
    """
    if isinstance(out, Tensor):
        return [(prefix or root, out)]
    if isinstance(out, Mapping):
        groups = [output_tensors(v, root, f"{prefix}.{k}" if prefix else str(k)) for k, v in out.items()]
    elif isinstance(out, tuple | list):
        groups = [output_tensors(v, root, f"{prefix or root}[{i}]") for i, v in enumerate(out)]
    else:
        return []
    return [t for group in groups for t in group]


def input_spec(inputs: Any) -> Any:
    """JSON description of model inputs (shapes and dtypes, no values): enough to run the model again for
    discovery when a saved conversion is re-applied (kanc.load)."""
    if isinstance(inputs, Tensor):
        return {"shape": list(inputs.shape), "dtype": str(inputs.dtype).removeprefix("torch.")}
    if isinstance(inputs, Mapping):
        return {"dict": {str(k): input_spec(v) for k, v in inputs.items()}}
    if isinstance(inputs, tuple | list):
        return {"tuple": [input_spec(v) for v in inputs]}
    return {"value": inputs if isinstance(inputs, bool | int | float | str) or inputs is None else None}


MAX_SPEC_ELEMENTS = 1 << 26  # a manifest is untrusted data: it may not ask for more than 256 MB of fp32 inputs
_SPEC_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool,
)}  # fmt: skip


def inputs_from_spec(spec: Any, where: Any = "the manifest") -> Any:
    """Inputs of the described shapes: zeros for integer tensors (valid token ids), seeded N(0, 1) for floats.
    A spec that is not one input_spec writes (unknown dtype, bad shape, too many elements) is a KancError."""
    budget = [MAX_SPEC_ELEMENTS]
    try:
        return _from_spec(spec, budget, depth=0)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise KancError(f"{where}: discovery_inputs is not a valid input description ({one_line(e)})") from None


def _from_spec(spec: Any, budget: list[int], depth: int) -> Any:
    if depth > 8 or not isinstance(spec, Mapping):
        raise ValueError("nested too deep" if depth > 8 else f"{type(spec).__name__} where a mapping belongs")
    if "shape" in spec:
        dtype, shape = _SPEC_DTYPES[spec["dtype"]], spec["shape"]
        if not isinstance(shape, list) or len(shape) > 8 or not all(type(n) is int and 0 <= n for n in shape):
            raise ValueError(f"bad shape {str(shape)[:40]}")
        budget[0] -= math.prod(shape)
        if budget[0] < 0:
            raise ValueError(f"more than {MAX_SPEC_ELEMENTS} elements")
        if dtype.is_floating_point:
            return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
        return torch.zeros(shape, dtype=dtype)
    if "dict" in spec:
        return {str(k): _from_spec(v, budget, depth + 1) for k, v in dict(spec["dict"]).items()}
    if "tuple" in spec:
        return tuple(_from_spec(v, budget, depth + 1) for v in list(spec["tuple"]))
    value = spec.get("value")
    if not (isinstance(value, bool | int | float | str) or value is None):
        raise ValueError(f"bad value of type {type(value).__name__}")
    return value
