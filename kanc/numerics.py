"""How far one tensor is from another: the measure the passes report as a block's or a model's fidelity; and one
copy of a weight in another dtype, shared by whoever needs it at the same time.

``kanc.testing`` re-exports :func:`rel_error` for tests; production code imports it from here.
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch import Tensor

# (id(tensor), dtype) -> (the tensor, its _version when cast, the cast), all weak: see ``cast_once``
_CASTS: dict[tuple[int, torch.dtype], tuple[weakref.ref, int, weakref.ref]] = {}
_PRUNE_AT = 4096
_LOCK = threading.Lock()  # the cache is shared by threads (a layer walk runs a layer on a second thread)


def rel_error(actual: Tensor, expected: Tensor) -> float:
    """||a - e|| / ||e|| in float64.

    NaN and inf are never dropped: a non-finite entry of ``actual`` where ``expected`` holds something else (a finite
    value, or another non-finite one) makes the error inf. Entries where both hold the same non-finite value agree.
    A zero ``expected`` gives 0 only when ``actual`` is zero too (inf otherwise), never a misleading small number.
    """
    a, e = actual.detach().double(), expected.detach().double()
    if a.shape != e.shape:
        return float("inf")
    finite = torch.isfinite(e) & torch.isfinite(a)
    same_nonfinite = (a == e) | (torch.isnan(a) & torch.isnan(e))
    if not bool((finite | same_nonfinite).all()):
        return float("inf")
    diff, denom = float((a - e)[finite].norm()), float(e[finite].norm())
    if denom > 0:
        return diff / denom
    return 0.0 if diff == 0 else float("inf")


def cast_once(t: Tensor, dtype: torch.dtype, pool: CastPool | None = None) -> Tensor:
    """``t.detach().to(dtype)``, made once while someone holds it: the casts of one weight by different users (a
    half-precision layer's fp32 GEMMs in a layer walk, a block's fp32 reference, the fit's pre-activations) share
    one copy instead of making one each (a 7B bf16 decoder layer: ~0.25 s of casts per copy).

    Nothing is kept alive by the cache itself: an entry holds its tensor and cast weakly, so the cast lives exactly
    as long as its users keep it. An entry is used only for the same tensor object, unchanged since (its
    ``_version``: an optimizer step or ``copy_`` makes a new cast).

    ``pool``: where a new cast's memory comes from (:class:`CastPool`: the memory of an earlier cast nobody holds).
    """
    if t.dtype == dtype:
        return t.detach()
    key = (id(t), dtype)
    with _LOCK:
        hit = _CASTS.get(key)
    if hit is not None:
        source, version, cast = hit[0](), hit[1], hit[2]()
        if source is t and cast is not None and version == t._version:
            return cast
    cast = pool.cast(t, dtype) if pool is not None else t.detach().to(dtype)
    with _LOCK:
        if len(_CASTS) >= _PRUNE_AT:
            _prune()
        _CASTS[key] = (weakref.ref(t), t._version, weakref.ref(cast))
    return cast


def _prune() -> None:
    """Drop the entries whose tensor or cast is gone."""
    for key in [k for k, (s, _, c) in _CASTS.items() if s() is None or c() is None]:
        del _CASTS[key]


class CastPool:
    """Memory for casts, used again once nobody holds the cast made in it.

    A layer walk casts each bf16 layer's weights to fp32 and drops the casts when the layer is done; the next layer
    has the same shapes. Fresh memory costs a page fault per 4 KiB page: a 7B decoder layer's casts took 0.31 s into
    fresh memory and 0.08 s into memory already touched (measured on this project's 2-core CPU machine). The pool keeps
    the storage of every cast it made; a storage is used again only when its use count says that no tensor, view or
    autograd graph refers to it any more (so a cast someone still holds is never overwritten), and ``trim`` lets go of
    the storages that went unused since the last ``trim`` (a layer of other shapes). Contiguous CPU tensors only; others
    are cast as usual.
    """

    def __init__(self) -> None:
        self._storages: dict[int, list[torch.UntypedStorage]] = {}  # nbytes -> storages of that size
        self._used: set[int] = set()  # id() of the storages used since the last trim
        self._lock = threading.Lock()

    def cast(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        """``t.detach().to(dtype)``, written into a free storage of the pool when there is one."""
        if t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
            return t.detach().to(dtype)
        nbytes = t.numel() * dtype.itemsize
        with self._lock:  # a storage goes to one cast only, whichever thread asks
            same = self._storages.setdefault(nbytes, [])
            storage = next((s for s in same if id(s) not in self._used and _unheld(s)), None)
            if storage is None:
                storage = torch.UntypedStorage(nbytes)
                same.append(storage)
            self._used.add(id(storage))
            out = torch.empty(0, dtype=dtype).set_(storage, 0, t.shape, t.stride())  # held before a trim can free it
        return out.copy_(t.detach())

    def trim(self) -> None:
        """Let go of the storages no cast used since the last call (memory returns once nobody holds them)."""
        with self._lock:
            for nbytes, same in list(self._storages.items()):
                kept = [s for s in same if id(s) in self._used]
                if kept:
                    self._storages[nbytes] = kept
                else:
                    del self._storages[nbytes]
            self._used.clear()

    def nbytes(self) -> int:
        """Bytes the pool holds (in use or free)."""
        return sum(n * len(same) for n, same in self._storages.items())


def _unheld(storage: torch.UntypedStorage) -> bool:
    """Whether only the pool refers to ``storage`` (no tensor, view or saved tensor of an autograd graph)."""
    return torch._C._storage_Use_Count(storage._cdata) == 1
