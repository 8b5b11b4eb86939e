"""Finding a decoder layer's MLP blocks once per kind of layer.

The layers of a stack are usually one class with the same submodules and parameter shapes. The first of each kind
is examined in full: traced, and run once recorded so that modules torch.fx cannot trace (Hugging Face attention)
are examined on what really ran. A later layer of the same kind is only traced (no extra forward); its trace is
accepted when it gives exactly what the first layer's trace gave (the same blocks, skips and untraced modules) and
the first layer's recorded run showed those untraced modules hide no block and read no block's weights. Anything
else, and every layer of a kind whose recorded run found more than its trace, is examined in full.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from kanc.passes.find import FindResult, find_mlp_blocks


@dataclass
class Pattern:
    """What the trace alone finds on a kind of layer, checked on ``first``'s recorded run."""

    first: str
    traced: tuple
    untraced: dict[str, str]


def signature(layer: nn.Module) -> tuple:
    """The layer's class, its submodules' names and classes, its parameters' and buffers' names, shapes, dtypes."""
    modules = tuple((n, type(m)) for n, m in layer.named_modules())
    tensors = tuple((n, tuple(t.shape), t.dtype) for n, t in (*layer.named_parameters(), *layer.named_buffers()))
    return type(layer), modules, tensors


class Patterns:
    """Per kind of layer: the first layer's pattern (or None where its recorded run found more than its trace)."""

    def __init__(self) -> None:
        self._known: dict[tuple, Pattern | None] = {}
        self._pending: tuple | None = None
        self.note: str | None = None  # what the report says about the layer ``find`` last vouched for

    def find(self, name: str, layer: nn.Module) -> FindResult | None:
        """The blocks of ``layer`` (not converted yet) from its trace alone, when a layer of its kind vouches for
        them; None: find them in full (then call ``learn`` with the result)."""
        sig = signature(layer)
        if sig in self._known:
            known = self._known[sig]
            if known is None:
                return None
            traced = find_mlp_blocks(layer)
            if _outline(traced) != known.traced or dict(traced.untraced) != known.untraced:
                return None
            self.note = _note(known)
            return _examined(traced)
        self._pending = (sig, name, find_mlp_blocks(layer))
        return None

    def learn(self, found: FindResult) -> None:
        """``found``: the full discovery of the layer ``find`` last returned None for, as a first of its kind."""
        if self._pending is None:
            return
        (sig, name, traced), self._pending = self._pending, None
        if sig in self._known:
            return
        pattern = Pattern(name, _outline(traced), dict(traced.untraced))
        same = _outline(found) == _outline(_examined(traced)) and not found.untraced
        self._known[sig] = pattern if same and _unread(found) else None


def _note(known: Pattern) -> str | None:
    """The report's note for the layers found by their trace alone."""
    if not known.untraced:
        return None
    return (
        f"layers like {known.first} (one class, submodules and parameter shapes): found by tracing; their modules "
        f"torch.fx cannot trace ({', '.join(sorted(known.untraced))}) were examined on {known.first}'s recorded run"
    )


def _outline(found: FindResult) -> tuple:
    """What discovery decided: blocks (name, pattern, linear layers) and skips (name, code)."""
    blocks = tuple(
        (b.name, b.pattern, b.fc1.path, b.fc2.path, b.up.path if b.up is not None else None) for b in found.blocks
    )
    return blocks, tuple((s.name, s.code) for s in found.skipped)


def _examined(found: FindResult) -> FindResult:
    """``found`` with its untraced modules counted as examined (on the first layer's recorded run)."""
    dropped = [s for s in found.skipped if s.code == "not_traced"]
    found.skipped = [s for s in found.skipped if s.code != "not_traced"]
    if dropped:
        found.counters["skip:not_traced"] -= len(dropped)
        if found.counters["skip:not_traced"] <= 0:
            del found.counters["skip:not_traced"]
    found.untraced = {}
    return found


def _unread(found: FindResult) -> bool:
    """No code but the layers themselves reads any block's weights (seen in the trace or the recorded run)."""
    lins = [lin for b in found.blocks for lin in (b.fc1, b.fc2, b.up) if lin is not None]
    return all(found.weights_read(lin) is None for lin in lins)
