"""The conversion pipeline, read top to bottom: find, rewrite, fuse, lint, verify.

    find_mlp_blocks -> rewrite_to_<target> -> fuse_rationals (grkan) -> (lint) -> verify_equivalence

``KANC_DEBUG=1`` prints each pass with its time and hit counters on stderr; ``KANC_DEBUG=2`` also prints the
graph of every module the pass changed. After each pass that changes the model, every changed module's graph
is linted; a failure names the pass and the passes before it.
"""

from __future__ import annotations

import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from torch import fx, nn

from kanc.env import debug_level
from kanc.errors import KancError
from kanc.frontend.tracing import trace_module
from kanc.passes.convert import PassResult, rewrite_to_grkan, rewrite_to_snnk
from kanc.passes.find import FindResult, find_mlp_blocks
from kanc.passes.fuse import fuse_rationals
from kanc.passes.hazards import guard_fast_paths
from kanc.passes.surgery import get_module
from kanc.passes.verify import Fidelity, Snapshot, snapshot, verify_equivalence

REWRITES: dict[str, Callable[..., PassResult]] = {"grkan": rewrite_to_grkan, "snnk": rewrite_to_snnk}

# Inductor-style global counters: counters["find_mlp_blocks"]["found:plain"] += 1, summed over every run.
counters: defaultdict[str, Counter] = defaultdict(Counter)


@dataclass
class PassRecord:
    name: str
    seconds: float
    counters: dict[str, int] = field(default_factory=dict)


@dataclass
class Conversion:
    """Everything one pipeline run produced."""

    model: nn.Module
    target: str
    found: FindResult
    result: PassResult
    fidelity: Fidelity | None
    passes: list[PassRecord] = field(default_factory=list)


def run_pipeline(
    model: nn.Module,
    target: str,
    *,
    include: Any = None,
    exclude: Any = None,
    calibration: Any = None,
    reference: nn.Module | Snapshot | None = None,
    verify_inputs: Any = None,
    discovery_inputs: Any = None,
    progress: Callable[[str, int, int], None] | None = None,
    near_misses: bool = False,
    measure: bool | None = None,
    found: FindResult | None = None,
    **options: Any,
) -> Conversion:
    """Convert ``model`` in place and, with ``verify_inputs``, measure it against ``reference`` (the original model
    or its Snapshot; when None, a snapshot of ``model`` is taken on those inputs before it is rewritten).

    Blocks are found on a recorded run of the model on ``verify_inputs`` (or ``discovery_inputs``, which only find),
    and on its symbolic trace. Each block is measured on rows inside the rewrite when no ``verify_inputs`` are given,
    unless ``measure=False`` (the caller measures the converted model itself, e.g. with verify_equivalence).
    ``found``: the blocks a caller already found on ``model`` (find_mlp_blocks is not run again)."""
    if target not in REWRITES:
        raise KancError(f"unknown target {target!r}: use one of {', '.join(REWRITES)}")
    ran: list[PassRecord] = []
    given = found
    found = _run(
        ran,
        "find_mlp_blocks",
        lambda: (
            given
            if given is not None
            else find_mlp_blocks(
                model,
                include=include,
                exclude=exclude,
                inputs=verify_inputs if verify_inputs is not None else discovery_inputs,
                near_misses=near_misses,
            )
        ),
    )
    if verify_inputs is not None and reference is None and found.blocks:
        reference = _run(ran, "snapshot", lambda: snapshot(model, verify_inputs))
    rewrite = REWRITES[target]
    measure = verify_inputs is None if measure is None else measure
    result = _run(
        ran,
        f"rewrite_to_{target}",
        lambda: rewrite(model, found, calibration=calibration, progress=progress, measure=measure, **options),
    )
    if target == "grkan":
        reads = partial(found.weights_read, values=True)  # a fused layer keeps its weight's dtype and device
        fused = _run(ran, "fuse_rationals", lambda: fuse_rationals(result.model, result.converted, reads))
        result.touched = sorted({*result.touched, *fused.touched})
    guarded = guard_fast_paths(result.model)
    result.notes += [f"{p or '<root>'}: PyTorch's fused fast path turned off (it would bypass kanc)" for p in guarded]
    lint_model(result.model, result.touched, ran)
    _print_graphs(result.model, result.touched)
    fidelity = None
    if reference is not None and verify_inputs is not None and result.converted:
        fidelity = _run(
            ran, "verify_equivalence", lambda: verify_equivalence(reference, result.model, verify_inputs, result)
        )
        record_block_errors(result, fidelity)
    return Conversion(result.model, target, found, result, fidelity, ran)


def record_block_errors(result: PassResult, fidelity: Fidelity) -> None:
    for c in result.converted:
        if c.name in fidelity.blocks:
            c.error, c.error_inputs = fidelity.blocks[c.name], f"example inputs ({fidelity.inputs})"
        elif c.error is None:
            c.error_inputs = "not measured: the block did not run on the example inputs"


def _run(ran: list[PassRecord], name: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    out = fn()
    record = PassRecord(name, time.perf_counter() - start, dict(getattr(out, "counters", {}) or {}))
    ran.append(record)
    counters[name].update(record.counters)
    if debug_level() >= 1:
        hits = " ".join(f"{k}={v}" for k, v in sorted(record.counters.items())) or "-"
        print(f"[kanc] {name:<22} {record.seconds * 1000:8.1f} ms  {hits}", file=sys.stderr)
    return out


def lint_model(model: nn.Module, paths: list[str], ran: list[PassRecord]) -> None:
    """fx-lint the graph of every changed module (its GraphModule, or a fresh trace when it traces)."""
    for path in paths:
        try:
            module = get_module(model, path)
        except AttributeError as e:
            _lint_failure(path, e, ran)
        graph = _graph_of(module)
        if graph is None:
            continue
        try:
            graph.lint()
        except Exception as e:  # noqa: BLE001 - fx raises RuntimeError and others
            _lint_failure(path, e, ran)


def _graph_of(module: nn.Module) -> fx.Graph | None:
    if isinstance(module, fx.GraphModule):
        return module.graph
    try:
        return trace_module(module).graph
    except Exception:  # noqa: BLE001 - modules that did not trace before the pass need not trace now
        return None


def _lint_failure(path: str, error: BaseException, ran: list[PassRecord]) -> None:
    names = [r.name for r in ran]
    raise KancError(
        f"graph lint failed in {path or '<root>'} after pass {names[-1]} (passes run: {', '.join(names)}): {error}"
    )


def _print_graphs(model: nn.Module, paths: list[str]) -> None:
    if debug_level() < 2:
        return
    for path in paths:
        graph = _graph_of(get_module(model, path))
        if graph is not None:
            print(f"[kanc] graph of {path or '<root>'}:\n{graph}", file=sys.stderr)
