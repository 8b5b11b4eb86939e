"""Kernel-test fixtures: where kernels run (CUDA, or CPU under TRITON_INTERPRET=1), an isolated tuning cache,
a count of the atomic adds the interpreter really executes, and the graphs torch.compile produces."""

from __future__ import annotations

import contextlib

import pytest
import torch

from kanc.codegen import checker, tuning


@pytest.fixture(autouse=True)
def _isolated_tuning(tmp_path, monkeypatch):
    """Each test gets an empty tuning cache and the default mode (no timing under the interpreter)."""
    monkeypatch.setenv("KANC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("KANC_AUTOTUNE", raising=False)
    monkeypatch.delenv("KANC_KERNELS", raising=False)
    tuning.clear_memory_caches()
    torch.manual_seed(0)  # test inputs drawn from the global generator are the same in any test order
    yield
    tuning.set_autotune(None)
    tuning.clear_memory_caches()


@pytest.fixture
def device() -> str:
    """The device kernels run on here; skip (never fall back silently to the reference) when there is none."""
    if torch.cuda.is_available() and not checker.interpreting():
        return "cuda"
    if checker.interpreting():
        return "cpu"
    pytest.skip("kernel tests need CUDA or TRITON_INTERPRET=1 (make test-kernels sets it)")


@pytest.fixture
def count_atomics():
    """Context manager factory counting the atomic read-modify-write lanes the interpreter executes."""
    if not checker.interpreting():
        pytest.skip("atomics are counted inside Triton's interpreter")

    @contextlib.contextmanager
    def counting():
        from triton.runtime import interpreter

        counts = [0]
        original = interpreter.InterpreterBuilder.create_atomic_rmw

        def create_atomic_rmw(self, rmw_op, ptr, val, mask, sem, scope):
            counts[0] += int(mask.data.sum())
            return original(self, rmw_op, ptr, val, mask, sem, scope)

        interpreter.InterpreterBuilder.create_atomic_rmw = create_atomic_rmw
        try:
            yield counts
        finally:
            interpreter.InterpreterBuilder.create_atomic_rmw = original

    return counting


class CapturedGraphs:
    """The FX graphs an AOT backend received: ``targets("forward")`` names every op they call."""

    def __init__(self) -> None:
        self.graphs: dict[str, list] = {"forward": [], "backward": []}

    def targets(self, kind: str) -> set[str]:
        """``{"kanc.grkan_linear.default", "aten.mm.default", ...}`` over the graphs of one kind."""
        return {str(n.target) for gm in self.graphs[kind] for n in gm.graph.nodes if n.op == "call_function"}


@pytest.fixture
def compile_capture():
    """fn -> (torch.compile(fn, fullgraph=True) with an AOT backend that keeps its graphs, CapturedGraphs)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def compile_fn(fn):
        captured = CapturedGraphs()

        def keep(kind):
            def compiler(gm, example_inputs):
                captured.graphs[kind].append(gm)
                return make_boxed_func(gm.forward)

            return compiler

        torch._dynamo.reset()
        backend = aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"))
        return torch.compile(fn, fullgraph=True, backend=backend), captured

    yield compile_fn
    torch._dynamo.reset()


@pytest.fixture
def guarded_launches(monkeypatch):
    """Where kernels launch: the device guard (``kernels.common.device_guard``) replaced by a recorder, and every kanc
    kernel's launch wrapped to note the device whose guard is active then (None outside any guard). Yields the list
    of (kernel name, device) per launch."""
    from kanc.codegen.kernels import common, grkan_linear, rational, snnk

    active: list = []
    seen: list = []

    @contextlib.contextmanager
    def guard(device):
        active.append(device)
        try:
            yield
        finally:
            active.pop()

    monkeypatch.setattr(common, "device_guard", guard)
    for module in (rational, grkan_linear, snnk):
        for name, kernel in vars(module).items():
            if name.endswith("_kernel") and callable(getattr(kernel, "run", None)):

                def run(*args, _run=kernel.run, _name=name, **kwargs):
                    seen.append((_name, active[-1] if active else None))
                    return _run(*args, **kwargs)

                monkeypatch.setattr(kernel, "run", run)
    return seen


@pytest.fixture
def deterministic_mode():
    """``torch.use_deterministic_algorithms(True)`` for the test, the previous mode restored after."""
    previous, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous, warn_only=warn_only)
