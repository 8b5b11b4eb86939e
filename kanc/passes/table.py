"""The MLP pattern table: one row per block shape, each with its check and its rewrite for every target.

A new MLP shape is a new row. Rows are tried in order around every activation node; the first hit wins.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from kanc.passes import builders
from kanc.passes.checks import Act, Miss, MLPBlock, View, check_gated, check_glu_chunk, check_plain, check_split

Check = Callable[[View, Act], "MLPBlock | Miss | None"]


@dataclass(frozen=True)
class Pattern:
    name: str
    check: Check
    grkan: Callable
    snnk: Callable
    description: str


PATTERNS: tuple[Pattern, ...] = (
    Pattern(
        "gated", check_gated, builders.grkan_substitute, builders.snnk_span,
        "act(gate(x)) * up(x) -> down: LLaMA SwiGLU, GeGLU, timm SwiGLU",
    ),
    Pattern(
        "glu_chunk", check_glu_chunk, builders.grkan_substitute, builders.snnk_span,
        "fc1(x).chunk(2) -> act(a) * b -> fc2: timm GluMlp",
    ),
    Pattern(
        "plain", partial(check_plain, kinds=("linear", "aten", "lora")), builders.grkan_substitute, builders.snnk_span,
        "Linear -> act -> (Dropout | Identity | norm)* -> Linear, act a module, function or method",
    ),
    Pattern(
        "conv1d", partial(check_plain, kinds=("conv1d",)), builders.grkan_substitute, builders.snnk_span,
        "HF Conv1D -> act -> Conv1D: GPT-2's MLP, weights stored (in, out)",
    ),
    Pattern(
        "conv1x1", partial(check_plain, kinds=("conv1x1",)), builders.grkan_substitute, builders.snnk_span,
        "1x1 Conv2d -> act -> 1x1 Conv2d on channels-first maps",
    ),
    Pattern(
        "split", check_split, builders.grkan_substitute, builders.snnk_split,
        "fc1 -> act returned by one module, fc2 first in the next: BERT intermediate/output",
    ),
)  # fmt: skip


def pattern(name: str) -> Pattern:
    return next(p for p in PATTERNS if p.name == name)
