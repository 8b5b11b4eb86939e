"""What a coverage family is: a seeded tiny model, its own example inputs, and the MLP blocks it must have.

The expected blocks come from the library's own code and config (instances of its MLP classes, or layers times
blocks per layer), never from kanc's finder: they are the yardstick kanc is measured against.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# Activations whose GR-KAN fit is held to the looser threshold (kinks: a rational smooths them).
RELU_LIKE = frozenset({"relu", "relu2", "star_relu", "relu6", "leaky_relu", "hardswish", "hardsigmoid"})
THRESHOLD_SMOOTH = 1e-2  # GELU/SiLU families (issue 11)
THRESHOLD_RELU = 2.5e-2  # families with a ReLU-like block


@dataclass(frozen=True)
class Expected:
    """One MLP block the library's code says the model has.

    ``name`` is where it lives (its MLP module, or the layer that holds its linears); ``scope`` are the module
    paths that are the block's own: a kanc layer at or under one of them belongs to this block.
    """

    name: str
    scope: tuple[str, ...]
    activation: str


@dataclass
class Built:
    """A family's model (eval mode, seeded weights), its example inputs and its expected blocks.

    ``inputs`` is a tuple of positional arguments or a dict of keyword arguments, as ``kanc.compile`` takes them.
    """

    model: nn.Module
    inputs: tuple | dict
    expected: list[Expected]


@dataclass(frozen=True)
class Family:
    """A named model build. ``named``: one of issue 11's families (its target is measured over these)."""

    name: str
    library: str
    build: Callable[[], Built]
    named: bool = True
    note: str = ""

    def threshold(self, expected: Iterable[Expected]) -> float:
        """The GR-KAN output-error bound: 2.5e-2 if any block's activation is ReLU-like, else 1e-2."""
        return THRESHOLD_RELU if any(e.activation in RELU_LIKE for e in expected) else THRESHOLD_SMOOTH


@dataclass
class Registry:
    """Families in the order they are declared (``add`` is a decorator over the build function)."""

    families: list[Family] = field(default_factory=list)

    def add(self, name: str, library: str, named: bool = True, note: str = "") -> Callable:
        def register(build: Callable[[], Built]) -> Callable[[], Built]:
            if any(f.name == name for f in self.families):
                raise ValueError(f"family {name!r} declared twice")
            self.families.append(Family(name, library, build, named, note))
            return build

        return register


def seeded(seed: int = 0) -> None:
    """Seed the global generator before building a model (its weights are then the same on every run)."""
    torch.manual_seed(seed)


def require(module: str) -> Any:
    """Import a library a family needs; a missing one fails that family with a one-line reason."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise RuntimeError(f"{module} is not installed ({e}); install the 'zoo' extra (make test does)") from None


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the libraries' warnings and info logging while a family builds or runs."""
    import logging
    import warnings

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


# ---- expected blocks from the library's own classes ----------------------------------------------------------


def instances(model: nn.Module, classes: type | tuple[type, ...], activation: str | Callable) -> list[Expected]:
    """One block per instance of the library's MLP class(es); the instance's subtree is the block's scope.

    ``activation`` is a name, or a function of the instance giving it (where the config chooses it).
    """
    found = []
    for path, module in model.named_modules():
        if isinstance(module, classes):
            act = activation(module) if callable(activation) else activation
            found.append(Expected(path, (path,), act))
    return found


def members(
    model: nn.Module, classes: type | tuple[type, ...], attrs: Iterable[str], activation: str | Callable
) -> list[Expected]:
    """One block per instance of a layer class whose MLP is spread over named attributes (``linear1``, ...)."""
    attrs = tuple(attrs)
    found = []
    for path, module in model.named_modules():
        if isinstance(module, classes):
            act = activation(module) if callable(activation) else activation
            scope = tuple(f"{path}.{a}" if path else a for a in attrs)
            found.append(Expected(path, scope, act))
    return found


def by_class_name(model: nn.Module, names: Iterable[str], activation: str | Callable) -> list[Expected]:
    """Like ``instances`` for classes known by name (Hugging Face modeling classes differ between versions)."""
    names = set(names)
    found = []
    for path, module in model.named_modules():
        if type(module).__name__ in names:
            act = activation(module) if callable(activation) else activation
            found.append(Expected(path, (path,), act))
    return found


def check_count(expected: list[Expected], count: int, what: str) -> list[Expected]:
    """Cross-check the instances against the config (layers x blocks per layer); a mismatch fails the build."""
    if len(expected) != count:
        raise RuntimeError(f"{what}: the config gives {count} MLP block(s), the model holds {len(expected)}")
    return expected


def act_name(module: nn.Module | Callable | None) -> str:
    """A library activation (module, class or function) named as RELU_LIKE and the thresholds name them."""
    if module is None:
        return "identity"
    name = getattr(module, "__name__", None) or type(module).__name__
    name = name.lower().replace("activation", "").replace("_", "")
    aliases = {
        "gelu": "gelu", "gelupytorchtanh": "gelu", "newgelu": "gelu", "quickgelu": "gelu", "geglu": "gelu",
        "gelutanh": "gelu", "silu": "silu", "swish": "silu", "swiglu": "silu", "relu": "relu", "relu6": "relu6",
        "starrelu": "star_relu", "relusquared": "relu2", "squaredrelu": "relu2", "hardswish": "hardswish",
        "leakyrelu": "leaky_relu", "tanh": "tanh", "sigmoid": "sigmoid", "mish": "mish",
    }  # fmt: skip
    return aliases.get(name, name)
