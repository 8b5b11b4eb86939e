"""kanc's C kernels of the group rational (``kanc.codegen.cpu``) against rational_ref: forward to the last bit,
every gradient, dtypes, odd shapes and layouts, other degrees, NaN/inf, b = 0, groups of width 1, thread counts; the
GR-KAN linear on the CPU; and the build: cache, concurrent processes, a read-only cache dir, no compiler."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kanc.codegen import cpu, fallbacks, grkan_linear, grkan_linear_ref, group_rational, rational_ref, recording
from kanc.codegen.cpu import build
from kanc.testing import assert_equivalent

FWD, BWD = "kanc_rational_forward", "kanc_rational_backward"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _cpu_route(monkeypatch):
    """These tests run the C kernels: CPU tensors outside Triton's interpreter (make test-kernels sets it)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if cpu.unavailable_reason() is not None:
        pytest.fail(f"the C kernels must build here (a C compiler is on every CI machine): {cpu.unavailable_reason()}")


def _coefficients(groups, degrees=(5, 4), seed=0):
    gen = torch.Generator().manual_seed(seed)
    num = 0.3 * torch.randn(groups, degrees[0] + 1, generator=gen)
    den = torch.randn(groups, degrees[1], generator=gen)  # mixed signs: sign(b) reaches the gradient
    return num.requires_grad_(), den.requires_grad_()


def _inputs(shape, groups, dtype=torch.float32, degrees=(5, 4), scale=2.0):
    x = (scale * torch.randn(shape, generator=torch.Generator().manual_seed(1))).to(dtype)
    return [x.requires_grad_(), *_coefficients(groups, degrees)]


def _check(inputs, **tol):
    with recording() as launches:
        assert_equivalent(group_rational, rational_ref, inputs, **tol)
    assert [launch.kernel for launch in launches] == [FWD, BWD], "the C kernels did not run"
    return launches


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,groups",
    [
        ((3, 45, 96), 3),  # D = 32: whole SIMD blocks
        ((37, 48), 8),  # D = 6: every group is a tail shorter than a SIMD block
        ((5, 2, 3, 12), 12),  # D = 1: groups of width 1, a 4-d input
        ((19, 40), 1),  # one group of 40 = 5 blocks of 8
        ((1151, 60), 4),  # D = 15 (per-channel layout), 1151 rows: several backward chunks, threads on
        ((700, 96), 4),  # D = 24 (a block of 8 lanes and a tail), 700 rows: several (chunk, group) items
        ((3, 300), 300),  # D = 1 over more channels than a tile of the per-channel layout
    ],
)
def test_matches_reference(shape, groups, dtype):
    _check(_inputs(shape, groups, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_is_the_reference_to_the_last_bit(dtype):
    """Same operations in the same order, no FMA contraction, rounding to the I/O dtype as torch rounds."""
    x, num, den = (t.detach() for t in _inputs((67, 96), 4, dtype, scale=4.0))
    assert torch.equal(group_rational(x, num, den), rational_ref(x, num, den))


@pytest.mark.parametrize("degrees", [(3, 2), (1, 1), (6, 5), (0, 3)])
def test_other_degrees(degrees):
    _check(_inputs((21, 40), 4, degrees=degrees))


def test_no_denominator():
    """Degree n = 0 (Q = 1, a polynomial): the checker sends an empty denominator to the reference, the C kernel
    itself computes it too."""
    x, num, den = (t.detach() for t in _inputs((21, 40), 4, degrees=(2, 0)))
    assert torch.equal(cpu.rational_forward(x, num, den), rational_ref(x, num, den))
    g = torch.randn(21, 40)
    leaves = [t.clone().requires_grad_() for t in (x, num)]
    rational_ref(*leaves, den).backward(g)
    dx, dnum, dden = cpu.rational_backward(g, x, num, den)
    torch.testing.assert_close(dx, leaves[0].grad) and torch.testing.assert_close(dnum, leaves[1].grad)
    assert dden.shape == (4, 0)


def test_layouts_and_a_shared_numerator():
    """A transposed input (strides (1, 33)), an expanded row-broadcast input (row stride 0) and a KAT-layout numerator
    (one row expanded to every group)."""
    x = (2 * torch.randn(64, 33)).t().requires_grad_()
    num, den = _coefficients(16)
    _check([x, num, den])
    row = (2 * torch.randn(1, 48)).requires_grad_()
    num8, den8 = _coefficients(8)
    with recording() as launches:
        assert_equivalent(lambda r, a, b: group_rational(r.expand(5, 48), a, b),
                          lambda r, a, b: rational_ref(r.expand(5, 48), a, b), [row, num8, den8])  # fmt: skip
    assert [launch.kernel for launch in launches] == [FWD, BWD]
    shared = num8[:1].detach().clone().requires_grad_()
    inputs = [torch.randn(7, 48), shared, den8]
    assert_equivalent(lambda x, a, b: group_rational(x, a.expand(8, -1), b),
                      lambda x, a, b: rational_ref(x, a.expand(8, -1), b), inputs)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_non_finite_and_extreme_inputs(dtype):
    """NaN, +-inf, 0 and |x| > 9.19 (x^5 overflows fp16): fp32 math, NaN where the reference has it, the group with an
    inf gets NaN coefficient gradients and the others stay finite."""
    x = 3 * torch.randn(9, 32, generator=torch.Generator().manual_seed(2))
    x[0, :6] = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.0, 30.0, -50.0])
    x[4, 17] = float("inf")
    inputs = [x.to(dtype).requires_grad_(), *_coefficients(4)]
    _check(inputs)
    out = group_rational(*inputs)
    assert torch.isfinite(out[0, 4:6]).all(), "|x| > 9.19 must not overflow in fp16"
    out.backward(torch.ones_like(out))
    assert not torch.isfinite(inputs[1].grad[0]).all() and torch.isfinite(inputs[1].grad[1]).all()


def test_denominator_gradient_at_zero_is_the_right_hand_derivative():
    """b = 0 (the identity init) and b = -0.0: d|b|/db = +1 as in the reference (``abs_grad_sign``), so the gradient
    is the one-sided difference and not zero."""
    x, num, _ = _inputs((37, 48), 8, scale=1.0)
    den = torch.zeros(8, 4)
    den[1] = -0.0
    den.requires_grad_()
    _check([x, num, den])
    w = torch.randn(37, 48, generator=torch.Generator().manual_seed(3))
    loss = lambda d: (group_rational(x.detach().double(), num.detach().double(), d) * w).sum()  # fp64: reference
    (group_rational(x, num, den) * w).sum().backward()
    eps, base = 1e-8, loss(torch.zeros(8, 4, dtype=torch.float64))
    for g, k in ((0, 0), (1, 2), (7, 3)):
        bumped = torch.zeros(8, 4, dtype=torch.float64)
        bumped[g, k] = eps
        one_sided = float((loss(bumped) - base) / eps)
        assert den.grad[g, k] != 0 and den.grad[g, k].item() == pytest.approx(one_sided, rel=1e-3, abs=1e-3)


@pytest.mark.parametrize("groups", [8, 64])  # D = 24 (a work item per row chunk and group), D = 3 (per row chunk)
def test_results_do_not_depend_on_the_thread_count(groups):
    """Backward partial sums are per work item whatever the threads, summed in one order: same bits."""
    x, num, den = (t.detach() for t in _inputs((517, 192), groups))  # 99,264 elements: the parallel path
    g = torch.randn(517, 192, generator=torch.Generator().manual_seed(4))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append((cpu.rational_forward(x, num, den), *cpu.rational_backward(g, x, num, den)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_launch_records_and_no_fallback():
    fallbacks.reset()
    (launch_fwd, launch_bwd) = _check(_inputs((7, 24), 3, torch.float16))
    assert launch_fwd.op == launch_bwd.op == "kanc::group_rational"
    assert (
        launch_fwd.extra == {"direction": "forward", "backend": "cpu"} and launch_bwd.extra["direction"] == "backward"
    )
    assert launch_fwd.dtype == "float16" and launch_fwd.shapes == ((7, 24), (3, 6), (3, 4))
    assert fallbacks.snapshot() == {}, "a call the C kernel ran is no fallback"


def test_fp64_stays_on_the_reference_and_is_counted():
    fallbacks.reset()
    x, num, den = (t.detach().double() for t in _inputs((4, 8), 2))
    with recording() as launches:
        group_rational(x, num, den)
    assert launches == []
    assert list(fallbacks.snapshot()[id(den)].items()) == [(("kanc::group_rational", "dtype"), 1)]


def test_grkan_linear_is_the_c_rational_then_torch_matmul():
    x, num, den = _inputs((3, 7, 48), 8)
    w = (0.1 * torch.randn(20, 48)).requires_grad_()
    b = torch.randn(20).requires_grad_()
    with recording() as launches:
        assert_equivalent(grkan_linear, grkan_linear_ref, [x, num, den, w, b])
        assert_equivalent(lambda *a: grkan_linear(*a, None), lambda *a: grkan_linear_ref(*a, None), [x, num, den, w])
    assert [launch.kernel for launch in launches] == [FWD, BWD, FWD, BWD]


@pytest.mark.parametrize("has_bias", [True, False])
def test_grkan_linear_ops_called_directly_run_on_the_cpu(has_bias):
    """A traced graph calls ``kanc::grkan_linear`` and its backward op itself: on the CPU they compute F(x) with the C
    kernel (recomputed in the backward) and the matmuls with torch."""
    x, num, den = (t.detach() for t in _inputs((5, 9, 48), 8))
    w, b = 0.1 * torch.randn(20, 48), torch.randn(20)
    bias = b if has_bias else None
    with recording() as launches:
        y = torch.ops.kanc.grkan_linear(x, num, den, w, bias)
        grad = torch.randn_like(y)
        dx, dnum, dden, dw, db = torch.ops.kanc.grkan_linear_backward(grad, x, num, den, w, has_bias)
    assert [launch.kernel for launch in launches] == [FWD, FWD, BWD]
    leaves = [t.clone().requires_grad_() for t in (x, num, den, w)] + ([b.clone().requires_grad_()] if has_bias else [])
    ref = grkan_linear_ref(*leaves[:4], leaves[4] if has_bias else None)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)
    ref.backward(grad)
    for got, leaf in zip((dx, dnum, dden, dw, db), leaves):
        torch.testing.assert_close(got, leaf.grad, atol=1e-4, rtol=1e-4)
    assert db.numel() == (20 if has_bias else 0)


def test_compiled_graph_holds_the_op(compile_capture):
    x, num, den = _inputs((5, 3, 32), 4)
    compiled, graphs = compile_capture(group_rational)
    assert_equivalent(compiled, rational_ref, [x, num, den])
    assert "kanc.group_rational.default" in graphs.targets("forward")
    assert "kanc.group_rational_backward.default" in graphs.targets("backward")


def test_opcheck():
    x, num, den = _inputs((6, 5, 24), 4)
    torch.library.opcheck(torch.ops.kanc.group_rational.default, (x, num, den))
    grad = torch.randn(6, 5, 24)
    torch.library.opcheck(torch.ops.kanc.group_rational_backward.default, (grad, x.detach(), num.detach(), den))


# ------------------------------------------------------------------------------------------------------ build
@pytest.fixture
def fresh_build():
    """The next call builds or loads the library anew; the process's loaded one is put back after."""
    saved = cpu._state
    cpu.reset()
    yield
    cpu._state = saved


def test_cached_by_key_and_built_atomically(tmp_path, monkeypatch, fresh_build):
    monkeypatch.setenv("KANC_CACHE_DIR", str(tmp_path / "cache"))
    assert cpu.unavailable_reason() is None
    lib = cpu.library()
    assert lib.path.parent == tmp_path / "cache" / "cpu" and lib.path.name.startswith("kanc_cpu_")
    assert sorted(p.name for p in lib.path.parent.iterdir() if not p.name.endswith(".lock")) == [lib.path.name]
    _check(_inputs((9, 16), 2))
    cpu.reset()  # a second process: the cached file is loaded, nothing is compiled
    monkeypatch.setattr(build, "_compile", lambda *a: pytest.fail("compiled again despite the cache"))
    assert cpu.library().path == lib.path


def test_unwritable_cache_builds_in_a_private_temp_dir(tmp_path, monkeypatch, fresh_build):
    """A cache dir that cannot be created (a file is in the way, as a read-only home would refuse it)."""
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("KANC_CACHE_DIR", str(tmp_path / "file" / "cache"))
    assert cpu.unavailable_reason() is None
    assert not cpu.library().path.is_relative_to(tmp_path) and cpu.library().path.parent.name.startswith("kanc-cpu-")
    _check(_inputs((9, 16), 2))


def test_no_compiler_falls_back_visibly(tmp_path, monkeypatch, fresh_build):
    """Without a compiler every call runs the reference (same numbers) and says why, once, counted per layer."""
    monkeypatch.setenv("KANC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    reason = cpu.unavailable_reason()
    assert reason is not None and reason.startswith("cpu kernel unavailable: C compiler")
    fallbacks.reset()
    x, num, den = _inputs((5, 16), 2)
    with recording() as launches:
        assert_equivalent(group_rational, rational_ref, [x, num, den])
        group_rational(x, num, den)
    assert launches == [] and fallbacks.snapshot()[id(den)] == {("kanc::group_rational", reason): 1}
    assert not (tmp_path / "cache" / "cpu").exists()


_WORKER = textwrap.dedent(
    """
    import os, sys, torch
    os.environ["TRITON_INTERPRET"] = "0"
    from kanc.codegen import cpu, group_rational, rational_ref
    x, num, den = torch.randn(33, 48), torch.randn(8, 6), torch.randn(8, 4)
    assert cpu.unavailable_reason() is None, cpu.unavailable_reason()
    assert torch.equal(group_rational(x, num, den), rational_ref(x, num, den))
    print(cpu.library().path)
    """
)


def test_concurrent_processes_build_once(tmp_path):
    """Processes starting together on an empty cache (pytest-xdist workers, DDP ranks): one compiles under the lock,
    the others wait and load its file; no half-written file is ever loaded, no temporary file is left."""
    env = {**os.environ, "KANC_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]  # fmt: skip
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    paths = {Path(out.strip()) for out, _ in outs}
    assert len(paths) == 1 and next(iter(paths)).parent == tmp_path / "cache" / "cpu"
    left = sorted(p.name for p in (tmp_path / "cache" / "cpu").iterdir() if not p.name.endswith(".lock"))
    assert left == [next(iter(paths)).name]
