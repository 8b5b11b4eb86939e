"""Half-precision linear layers computed as fp32 GEMMs during a layer walk on the CPU.

PyTorch's CPU GEMM for bf16/fp16 accumulates in fp32 and rounds the result to the input dtype; on CPUs without
native bf16 instructions (AVX2) it is 3-7x slower than an fp32 GEMM of the same shape. Inside ``Fp32Gemm`` a
half-precision ``F.linear`` on the CPU runs as the fp32 GEMM of the same operands, rounded to their dtype: the same
arithmetic up to the order of the sums. Each weight is cast once per layer (``clear`` drops the casts), so a layer
checked in several runs pays for one copy, and the casts are written into the memory of the layer before's
(:class:`kanc.numerics.CastPool`): a quarter of the time a cast into fresh memory takes, page faults included.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from kanc.numerics import CastPool, cast_once

HALF = (torch.bfloat16, torch.float16)


class Fp32Gemm(TorchFunctionMode):
    """``F.linear`` on CPU bf16/fp16 tensors as an fp32 GEMM rounded to their dtype; weight casts kept until
    ``clear``."""

    def __init__(self) -> None:
        super().__init__()
        self._casts: dict[int, tuple[Tensor, Tensor]] = {}  # id(weight) -> (weight, its fp32 copy)
        self._pool = CastPool()
        self._lock = threading.Lock()  # a layer walk may run a layer on a second thread (kanc.checkpoint.stream)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear and _half_cpu(args, kwargs):
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            out = F.linear(x.float(), self._fp32(weight), bias.float() if bias is not None else None)
            return out.to(x.dtype)
        return func(*args, **kwargs)

    def _fp32(self, weight: Tensor) -> Tensor:
        """The weight's fp32 copy, made once (detached: the walk's runs only check outputs, they never backprop)."""
        with self._lock:
            seen = self._casts.get(id(weight))
            if seen is None or seen[0] is not weight:
                # the same copy as the block references' fp32 weights (kanc.numerics.cast_once): one cast per weight
                seen = self._casts[id(weight)] = (weight, cast_once(weight, torch.float32, self._pool))
            return seen[1]

    def clear(self) -> None:
        """Drop the fp32 copies (a layer is done): their memory serves the next layer's."""
        with self._lock:
            self._casts.clear()
            self._pool.trim()


def _half_cpu(args: tuple, kwargs: dict) -> bool:
    if len(args) < 2 or not all(isinstance(t, Tensor) for t in args[:2]):
        return False
    x, weight = args[0], args[1]
    return x.dtype in HALF and x.dtype == weight.dtype and x.device.type == "cpu" and weight.device.type == "cpu"
