"""kanc: rewrite the MLP blocks of PyTorch models into Kolmogorov-Arnold layers and run them fast.

    import kanc
    kan_model = kanc.compile(model, target="grkan")   # or target="snnk"
    print(kanc.report(kan_model))

Heavy parts load lazily, so ``import kanc`` needs neither a GPU nor triton.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "compile": "kanc.api",
    "report": "kanc.api",
    "load": "kanc.api",
    "save": "kanc.api",
    "convert_checkpoint": "kanc.checkpoint",
    "checkpoint": "kanc.checkpoint",
    "profile": "kanc.runtime",
    "tune": "kanc.runtime",
    "export_onnx": "kanc.export",
    "KancError": "kanc.errors",
    "nn": "kanc.nn",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kanc' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if module == f"kanc.{name}" else getattr(mod, name)
    globals()[name] = value
    return value
