"""The model families of ``benchmarks/coverage.py``: tiny seeded builds from third-party libraries and
handwritten code, each with the MLP blocks its library's code says it has (see ``families.base``)."""

from __future__ import annotations

import importlib

from families.base import Family

# one module per library; each holds a REGISTRY of families in declaration order
MODULES = (
    "torch_nn", "tv", "timm_models", "diffusers_models", "xtransformers_models", "other_libs", "handwritten", "hf",
)  # fmt: skip


def all_families() -> list[Family]:
    """Every family, in a fixed order."""
    return [f for name in MODULES for f in importlib.import_module(f"families.{name}").REGISTRY.families]
