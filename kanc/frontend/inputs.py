"""Example inputs for a model, inferred the same way by every command (convert, profile, tune, export onnx).

What to draw (:func:`input_spec`), first match wins:
1. the dtype the user gives (``--input-dtype`` / ``dtype=``): ``long`` for token ids, a floating dtype for floats;
2. a model from a ``.pt2`` file: the dtypes of the program's own example inputs;
3. a model that starts with an embedding (a Hugging Face model whose main input is ``input_ids``, or whose first
   module with weights is an ``nn.Embedding``): token ids below its vocabulary size;
4. otherwise floats N(0, 1) in the model's floating dtype (its first floating parameter or buffer; float32 if none).

Shapes come from the user (``--input-shape``); without them, a ``.pt2`` model's own example inputs are used and a
token model gets (2, 16); anything else needs a shape (:func:`example_inputs` says so in one line).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kanc.errors import KancError, UsageError

FLOAT_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
TOKEN_NAMES = ("long", "int64", "tokens")
DTYPE_CHOICES = ("long", "float", *FLOAT_DTYPES)  # what --input-dtype accepts; "float": the model's floating dtype
DEFAULT_TOKEN_SHAPE = (2, 16)
DEFAULT_VOCAB = 100


@dataclass(frozen=True)
class InputSpec:
    """Token ids below ``vocab`` (``dtype`` int64), or floats N(0, 1) of ``dtype``; ``why`` says how it was chosen."""

    dtype: torch.dtype
    vocab: int | None = None
    why: str = ""

    @property
    def tokens(self) -> bool:
        return not self.dtype.is_floating_point

    def describe(self) -> str:
        what = f"token ids below {self.vocab}" if self.tokens else f"{str(self.dtype).replace('torch.', '')} N(0, 1)"
        return f"{what} ({self.why})" if self.why else what


def input_spec(model: nn.Module, dtype: str | torch.dtype | None = None, vocab: int | None = None) -> InputSpec:
    """How to draw example inputs for ``model`` (see the module docstring); ``vocab`` overrides the model's."""
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).replace("torch.", "")
    if dtype is not None and dtype not in (*DTYPE_CHOICES, *TOKEN_NAMES):
        raise UsageError(f"unknown input dtype {dtype!r}: use one of {', '.join(DTYPE_CHOICES)}")
    found_vocab = _vocab(model)
    if dtype in TOKEN_NAMES:
        return InputSpec(torch.int64, vocab or found_vocab or DEFAULT_VOCAB, "as asked")
    if dtype in FLOAT_DTYPES:
        return InputSpec(FLOAT_DTYPES[dtype], None, "as asked")
    if dtype is None:
        exported = _exported_dtype(model)
        if exported is not None:
            return InputSpec(exported, vocab or found_vocab or DEFAULT_VOCAB, "the .pt2 program's inputs")
        if found_vocab is not None:
            return InputSpec(torch.int64, vocab or found_vocab, "the model starts with an embedding")
    return InputSpec(model_dtype(model), None, "the model's dtype")


def example_inputs(
    model: nn.Module,
    shapes: Sequence[str | Sequence[int]] = (),
    dtype: str | torch.dtype | None = None,
    vocab: int | None = None,
    seed: int = 0,
) -> tuple[Tensor, ...]:
    """Seeded example inputs for ``model``, one per shape (``"8,197,768"`` or a tuple), drawn as ``input_spec`` says.

    Without shapes: a .pt2 model's own example inputs, (2, 16) token ids for a model that starts with an embedding;
    otherwise a UsageError asking for ``--input-shape``.
    """
    parsed = [parse_shape(s) if isinstance(s, str) else tuple(int(d) for d in s) for s in shapes]
    if not parsed:
        own = exported_inputs(model)
        if own is not None and dtype is None:
            return own
        spec = input_spec(model, dtype, vocab)
        if own is not None:
            parsed = [tuple(t.shape) for t in own]
        elif spec.tokens:
            parsed = [DEFAULT_TOKEN_SHAPE]
        else:
            raise UsageError("give the example input's shape: --input-shape 8,197,768 (repeatable) or --inputs FILE")
    return draw(input_spec(model, dtype, vocab), parsed, seed)


def draw(spec: InputSpec, shapes: Sequence[tuple[int, ...]], seed: int = 0) -> tuple[Tensor, ...]:
    """One seeded tensor per shape, as ``spec`` says."""
    gen = torch.Generator().manual_seed(seed)
    if spec.tokens:
        return tuple(torch.randint(0, spec.vocab or DEFAULT_VOCAB, s, generator=gen) for s in shapes)
    return tuple(torch.randn(s, generator=gen).to(spec.dtype) for s in shapes)


def parse_shape(text: str) -> tuple[int, ...]:
    """``"8,197,768"`` (or ``"8x197x768"``) -> (8, 197, 768); a one-line error otherwise."""
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise KancError(f"bad --input-shape {text!r}: expected integers like 8,197,768") from None
    if not shape or any(d <= 0 for d in shape):
        raise KancError(f"bad --input-shape {text!r}: dimensions must be positive integers")
    if len(shape) > 8 or _numel(shape) > 2**31:
        raise KancError(f"bad --input-shape {text!r}: too large for an example input")
    return shape


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def exported_inputs(model: nn.Module) -> tuple[Tensor, ...] | None:
    """The positional example inputs of the ExportedProgram a .pt2 model came from (None: not a .pt2, or kwargs)."""
    from kanc.manifest import EXPORTED_ATTR  # where kanc.load keeps a .pt2 model's ExportedProgram

    exported = model.__dict__.get(EXPORTED_ATTR)
    if exported is None or exported.example_inputs is None:
        return None
    args, kwargs = exported.example_inputs
    if kwargs or not args or not all(isinstance(a, Tensor) for a in args):
        return None
    return tuple(args)


def _exported_dtype(model: nn.Module) -> torch.dtype | None:
    own = exported_inputs(model)
    return own[0].dtype if own else None


def _vocab(model: nn.Module) -> int | None:
    """The vocabulary size when the model starts with an embedding (token ids in), else None."""
    config = getattr(model, "config", None)
    if getattr(model, "main_input_name", None) == "input_ids" and isinstance(getattr(config, "vocab_size", None), int):
        return config.vocab_size
    first = next((m for m in model.modules() if next(m.parameters(recurse=False), None) is not None), None)
    if isinstance(first, nn.Embedding | nn.EmbeddingBag):
        return first.num_embeddings
    return None


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating parameter or buffer (float32 when it has none)."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32
