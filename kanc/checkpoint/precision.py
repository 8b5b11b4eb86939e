"""The GEMMs of a layer walk on the CPU: half-precision ones computed in fp32, and each one computed once per layer.

PyTorch's CPU GEMM for bf16/fp16 accumulates in fp32 and rounds the result to the input dtype; on CPUs without
native bf16 instructions (AVX2) it is 3-7x slower than an fp32 GEMM of the same shape. Inside ``LayerGemms`` (for a
half-precision model) a half-precision ``F.linear`` or ``torch.addmm`` on the CPU runs as the fp32 GEMM of the same
operands, rounded to their dtype: the same arithmetic up to the order of the sums. Each weight is cast once per layer
(``clear`` drops the casts), so a layer checked in several runs pays for one copy, and the casts are written into the
memory of the layer before's (:class:`kanc.numerics.CastPool`): a quarter of the time a cast into fresh memory
takes, page faults included.

A walk runs each layer several times on the same inputs: the original (capturing its blocks' inputs), the converted
one without and with grad, and its blocks' references. Most of their GEMMs repeat one another exactly: the converted
layer's attention is the original's, a gated block keeps its gate and up projections, and a block's fp32 reference
starts with the fc1 the capture ran. :class:`GemmMemo` keeps each GEMM's operands and result for the layer and gives a
repeat (the same weight and bias, unchanged, and an input equal element for element) the result already computed:
the value the GEMM would give again, with the same autograd as the GEMM's.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from kanc.numerics import CastPool, cast_once

HALF = (torch.bfloat16, torch.float16)
MEMO_BYTES = 256 << 20  # inputs and results one layer's memo keeps at most (the default calibration: ~10 MB)


class LayerGemms(TorchFunctionMode):
    """A layer walk's GEMMs: each computed once per layer (:class:`GemmMemo`), half-precision ones on the CPU as fp32
    GEMMs rounded to their dtype (``half``), their weight casts kept until ``clear``.

    The memo serves the thread that made this object only (a walk's second thread runs other inputs).
    """

    def __init__(self, half: bool = True, memo_bytes: int = MEMO_BYTES) -> None:
        super().__init__()
        self.half = half
        self.memo = GemmMemo(memo_bytes)
        self._casts: dict[int, tuple[Tensor, Tensor]] = {}  # id(weight) -> (weight, its fp32 copy)
        self._pool = CastPool()
        self._lock = threading.Lock()  # a layer walk may run a layer on a second thread (kanc.checkpoint.stream)
        self._owner = threading.get_ident()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        gemm = _as_gemm(func, args, kwargs)
        if gemm is None:
            return func(*args, **kwargs)
        x, weight, bias, transposed = gemm
        mine = threading.get_ident() == self._owner
        if self.half and x.dtype in HALF and _cpu(x, weight, bias):
            x32, w32 = x.float(), self._fp32(weight)
            b32 = bias.float() if bias is not None else None
            out = self.memo.gemm(x32, w32, b32, transposed) if mine else _gemm(x32, w32, b32, transposed)
            return out.to(x.dtype)
        if mine and x.dtype == weight.dtype:
            return self.memo.gemm(x, weight, bias, transposed)
        return func(*args, **kwargs)

    def _fp32(self, weight: Tensor) -> Tensor:
        """The weight's fp32 copy, made once (detached: the walk's runs only check outputs, they never backprop)."""
        with self._lock:
            seen = self._casts.get(id(weight))
            if seen is None or seen[0] is not weight:
                # the same copy as the block references' fp32 weights (kanc.numerics.cast_once): one cast per weight
                seen = self._casts[id(weight)] = (weight, cast_once(weight, torch.float32, self._pool))
            return seen[1]

    def forget(self) -> None:
        """Drop the memo (before a layer's weights are released: it holds their inputs and results, not them)."""
        self.memo.clear()

    def clear(self) -> None:
        """Drop the memo and the fp32 copies (a layer is done): their memory serves the next layer's."""
        self.memo.clear()
        with self._lock:
            self._casts.clear()
            self._pool.trim()


class GemmMemo:
    """``x @ W^T + b`` computed once per distinct operands: a repeat gets a copy of the result already computed.

    A repeat is the same weight and bias (the same memory, shape and strides, still alive and not written since:
    their ``_version``; ``F.linear(x, W)`` and ``torch.addmm(b, x, W.t())`` are one GEMM) and an input equal to an
    earlier one element for element, or to a run of two or more of its rows (NaN never equals: it is computed
    again). The memo holds copies of the inputs and results, up to ``budget`` bytes, and weak references to the
    weights: it keeps no weight alive, and a weight that is gone (or its memory) never matches. Under autograd a
    recalled result has the GEMM's own backward.
    """

    def __init__(self, budget: int = MEMO_BYTES) -> None:
        self.budget = budget
        self.hits = self.misses = 0
        self._entries: dict[tuple, list[tuple[Tensor, Tensor]]] = {}
        self._guards: dict[tuple, tuple[weakref.ref, int, weakref.ref | None, int]] = {}
        self._bytes = 0

    def gemm(self, x: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool = False) -> Tensor:
        """``F.linear(x, weight, bias)`` (``transposed``: ``torch.addmm(bias, x, weight)``, weight (in, out))."""
        key = _key(weight, bias, transposed)
        rows = x.detach().reshape(-1, x.shape[-1])
        value = self._recall(key, weight, bias, rows)
        if value is None:
            self.misses += 1
            out = _gemm(x, weight, bias, transposed)
            self._keep(key, weight, bias, rows, out)
            return out
        self.hits += 1
        value = value.reshape(*x.shape[:-1], value.shape[-1])
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
            return _Recalled.apply(x, weight, bias, value, transposed)
        return value.clone()

    def clear(self) -> None:
        self._entries.clear()
        self._guards.clear()
        self._bytes = 0

    def _recall(self, key: tuple, weight: Tensor, bias: Tensor | None, rows: Tensor) -> Tensor | None:
        """The result for ``rows``: of an equal input, or the matching rows of an input ``rows`` is a run of (the
        rows a fit keeps of those a capture saw: a GEMM's row depends on that row alone)."""
        guard = self._guards.get(key)
        if guard is None or not _same(guard, weight, bias):
            return None
        n = rows.shape[0]
        for seen, result in self._entries.get(key, ()):
            if seen.dtype != rows.dtype or seen.shape[1:] != rows.shape[1:] or seen.shape[0] < n:
                continue
            if seen.shape[0] == n:
                if torch.equal(seen, rows):
                    return result
                continue
            if n < 2:  # one row is a GEMV, summed in another order
                continue
            starts = (seen[: seen.shape[0] - n + 1] == rows[0]).all(1).nonzero().flatten().tolist()
            for k in starts:
                if torch.equal(seen[k : k + n], rows):
                    return result[k : k + n]
        return None

    def _keep(self, key: tuple, weight: Tensor, bias: Tensor | None, rows: Tensor, out: Tensor) -> None:
        guard = self._guards.get(key)
        if guard is None or not _same(guard, weight, bias):  # new, or written since: its old results are stale
            stale = self._entries.pop(key, [])
            self._bytes -= sum((seen.numel() + result.numel()) * result.element_size() for seen, result in stale)
            version = bias._version if bias is not None else 0
            self._guards[key] = (weakref.ref(weight), weight._version, _ref(bias), version)
        size = (rows.numel() + out.numel()) * out.element_size()
        if self._bytes + size > self.budget:
            return
        result = out.detach().reshape(-1, out.shape[-1]).clone()
        self._entries.setdefault(key, []).append((rows.clone(), result))
        self._bytes += size


class _Recalled(torch.autograd.Function):
    """A GEMM's result taken from the memo, with the GEMM's backward (y = x W^T + b, or x W + b when transposed)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, value: Tensor, transposed: bool) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.transposed, ctx.with_bias = transposed, bias is not None
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        x, weight = ctx.saved_tensors
        w = weight if ctx.transposed else weight.t()  # (in, out)
        gx = grad @ w.t() if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
            gw = x2.t() @ g2 if ctx.transposed else g2.t() @ x2
        gb = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.with_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, None


def _as_gemm(func: Any, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor | None, bool] | None:
    """(x, weight, bias, transposed) of an ``F.linear`` or a plain ``torch.addmm`` call (GPT-2's Conv1D) on real
    tensors; None for anything else."""
    if func is F.linear:
        if len(args) < 2:
            return None
        x, weight = args[0], args[1]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        transposed = False
    elif func is torch.addmm:
        scaled = kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1
        if len(args) != 3 or set(kwargs) - {"beta", "alpha"} or scaled:
            return None
        bias, x, weight = args
        transposed = True
        if not isinstance(x, Tensor) or x.dim() != 2 or not isinstance(bias, Tensor) or bias.dim() != 1:
            return None
    else:
        return None
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if not all(type(t) in (Tensor, torch.nn.Parameter) for t in tensors):  # no subclass, proxy or fake tensor
        return None
    if weight.dim() != 2 or x.dim() < 1 or x.device.type == "meta" or any(t.device != x.device for t in tensors):
        return None
    if any(t.dtype != x.dtype for t in tensors) or not x.is_floating_point():
        return None
    return x, weight, bias, transposed


def _gemm(x: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool) -> Tensor:
    if transposed:
        return torch.addmm(bias, x, weight)
    return F.linear(x, weight, bias)


def _key(weight: Tensor, bias: Tensor | None, transposed: bool) -> tuple:
    """The GEMM as x @ M + b, M (in, out): ``F.linear(x, W)`` and ``torch.addmm(b, x, W.t())`` are one GEMM (GPT-2's
    Conv1D runs addmm on the weight a block reference reads as a transposed view)."""
    m = weight if transposed else weight.t()
    parts = [m.data_ptr(), tuple(m.shape), m.stride(), m.dtype, m.device]
    if bias is not None:
        parts += [bias.data_ptr(), tuple(bias.shape), bias.stride()]
    return tuple(parts)


def _ref(t: Tensor | None) -> weakref.ref | None:
    return weakref.ref(t) if t is not None else None


def _same(guard: tuple, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether the weight (and bias) a memo entry was made with is still alive and unchanged. A view of it (another
    object, the same memory) counts: the memory cannot be another tensor's while the first is alive."""
    w_ref, w_version, b_ref, b_version = guard
    first = w_ref()
    if first is None or first._version != w_version or weight._version != w_version:
        return False
    if bias is None:
        return b_ref is None
    b_first = b_ref() if b_ref is not None else None
    return b_first is not None and b_first._version == b_version and bias._version == b_version


def _cpu(*tensors: Tensor | None) -> bool:
    return all(t is None or t.device.type == "cpu" for t in tensors)
