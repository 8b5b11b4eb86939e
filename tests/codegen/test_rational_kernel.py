"""Group-rational kernels against rational_ref: forward and every gradient, dtypes, ragged tiles, groups straddling
tiles, non-finite inputs, real atomics counts, launch records, custom-op checks, tuning and KANC_DEBUG=3."""

import math

import pytest
import torch

from kanc.codegen import forced_config, group_rational, rational_ref, recording, tuning
from kanc.testing import assert_equivalent

FWD, BWD = "_rational_fwd_kernel", "_rational_bwd_kernel"


def _coefficients(groups, degrees=(5, 4), device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    num = 0.3 * torch.randn(groups, degrees[0] + 1, generator=gen)
    den = torch.randn(groups, degrees[1], generator=gen)  # mixed signs: sign(b) reaches the gradient
    return num.to(device).requires_grad_(), den.to(device).requires_grad_()


def _inputs(shape, groups, dtype, device, degrees=(5, 4), scale=2.0):
    x = (scale * torch.randn(shape, generator=torch.Generator().manual_seed(1))).to(device, dtype)
    return [x.requires_grad_(), *_coefficients(groups, degrees, device)]


def _tiles(block_r, block_c, rows_per_program=1):
    cfg = {"BLOCK_R": block_r, "BLOCK_C": block_c, "num_warps": 4}
    return forced_config(FWD, cfg), forced_config(BWD, {**cfg, "ROWS_PER_PROGRAM": rows_per_program})


def _check(inputs, **tol):
    with recording() as launches:
        assert_equivalent(group_rational, rational_ref, inputs, **tol)
    kernels = [launch.kernel for launch in launches]
    assert kernels == [FWD, BWD], f"the kernels did not run: {kernels}"
    return launches


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "shape,groups,tiles",
    [  # (BLOCK_R, BLOCK_C, ROWS_PER_PROGRAM of the backward)
        ((3, 45, 96), 3, (16, 64, 4)),  # D = 32: 64-wide tiles straddle groups; 9 row tiles (135 = 8 * 16 + 7): 4, 4, 1
        ((37, 48), 8, (16, 32, 2)),  # D = 6: groups start at unequal offsets in every tile; row tiles 2, 1 (ragged)
        ((5, 2, 3, 12), 12, (8, 32, 1)),  # D = 1, a 4-d input, columns ragged
        ((19, 40), 1, (8, 32, 3)),  # one group, columns ragged (40 = 32 + 8); one program, its last tile ragged
        ((21, 64), 2, (16, 32, 8)),  # D = 32 = BLOCK_C: tiles in one group; 2 row tiles of a program's nominal 8
    ],
)
def test_matches_reference(shape, groups, tiles, dtype, device):
    fwd, bwd = _tiles(*tiles)
    with fwd, bwd:
        _check(_inputs(shape, groups, dtype, device))


@pytest.mark.parametrize("degrees", [(3, 2), (1, 1), (6, 5)])
def test_other_degrees(degrees, device):
    fwd, bwd = _tiles(16, 32)
    with fwd, bwd:
        _check(_inputs((21, 40), 4, torch.float32, device, degrees))


def test_default_config_and_input_layouts(device):
    """Heuristic configs (no forced tiles), a transposed (non-contiguous) input and a shared (expanded) numerator."""
    x = (2 * torch.randn(64, 33)).to(device).t().requires_grad_()  # (33, 64), strides (1, 33)
    num, den = _coefficients(8, device=device)
    _check([x, num, den])
    shared = num[:1].detach().clone().requires_grad_()  # KAT layout: one numerator row, expand()ed to every group
    with recording() as launches:
        assert_equivalent(
            lambda x, a, b: group_rational(x, a.expand(8, -1), b),
            lambda x, a, b: rational_ref(x, a.expand(8, -1), b),
            [x, shared, den],
        )
    assert [launch.kernel for launch in launches] == [FWD, BWD]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_finite_and_extreme_inputs(dtype, device):
    """NaN, +-inf, 0 and |x| > 9.19 (x^5 overflows fp16): fp32 math in registers, NaN where the reference has it."""
    x = 3 * torch.randn(9, 32, generator=torch.Generator().manual_seed(2))
    x[0, :6] = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.0, 30.0, -50.0])
    x[4, 17] = float("inf")  # in another group: that group's coefficient gradients become NaN, others stay finite
    inputs = [x.to(device, dtype).requires_grad_(), *_coefficients(4, device=device)]
    fwd, bwd = _tiles(8, 16)
    with fwd, bwd:
        _check(inputs)
    out = group_rational(*inputs)
    assert torch.isfinite(out[0, 4:6]).all(), "|x| > 9.19 must not overflow in fp16"


def test_atomics_are_one_per_group_and_coefficient_per_program(device, count_atomics):
    """Group-aligned tiles: atomics == programs x coefficients, counted inside the interpreter, as the launch says."""
    inputs = _inputs((50, 128), 4, torch.float32, device)  # D = 32 = BLOCK_C
    fwd, bwd = _tiles(16, 32)
    with fwd, bwd, count_atomics() as counted:
        launches = _check(inputs)
    backward = launches[1]
    assert backward.grid == (4, 4) and backward.extra["direction"] == "backward"
    assert backward.atomics == backward.programs * 10 == counted[0]  # 10 = 6 numerator + 4 denominator coefficients
    assert launches[0].atomics == 0


def test_atomics_when_tiles_straddle_groups(device, count_atomics):
    """D = 24 with 32-wide tiles: a tile touching two groups issues one atomic per group and coefficient."""
    inputs = _inputs((20, 96), 4, torch.float32, device)
    fwd, bwd = _tiles(16, 32)
    with fwd, bwd, count_atomics() as counted:
        launches = _check(inputs)
    groups_per_tile = [2, 2, 2]  # columns 0-31: groups 0,1; 32-63: 1,2; 64-95: 2,3
    assert launches[1].atomics == 2 * sum(groups_per_tile) * 10 == counted[0]


@pytest.mark.parametrize("rows_per_program,row_programs", [(1, 7), (4, 2), (7, 1), (16, 1)])
def test_row_loop_divides_the_atomics(rows_per_program, row_programs, device, count_atomics):
    """100 rows = 7 tiles of 16 (the last ragged): a program reduces rows_per_program of them before its atomics, so
    atomics = row programs x 4 column tiles (one group each) x 10, as counted inside the interpreter."""
    inputs = _inputs((100, 128), 4, torch.float32, device)  # D = 32 = BLOCK_C
    fwd, bwd = _tiles(16, 32, rows_per_program)
    with fwd, bwd, count_atomics() as counted:
        launches = _check(inputs)
    backward = launches[1]
    assert backward.grid == (row_programs, 4) and backward.config["ROWS_PER_PROGRAM"] == rows_per_program
    assert backward.atomics == row_programs * 4 * 10 == counted[0]


def test_row_loop_with_straddling_tiles(device, count_atomics):
    """D = 24 with 32-wide tiles (two groups per tile, G_SPAN 2) and 3 row tiles per program over 5 (2 programs)."""
    inputs = _inputs((70, 96), 4, torch.float16, device)
    fwd, bwd = _tiles(16, 32, 3)
    with fwd, bwd, count_atomics() as counted:
        launches = _check(inputs)
    assert launches[1].grid == (2, 3) and launches[1].atomics == 2 * (2 + 2 + 2) * 10 == counted[0]


def test_rows_per_program_defaults(monkeypatch):
    """The GPU defaults: ViT-B activations (25,216 rows) carry 16-32 row tiles per program and issue fewer atomics
    than FlashKAT's (64 rows, one group) programs while keeping >= 8 programs per SM of an H100; tiny shapes keep 1."""
    from kanc.codegen.kernels import common, rational

    monkeypatch.setattr(rational, "interpreting", lambda: False)
    h100 = common.PROGRAMS_PER_SM * 132
    for channels, rpp in ((3072, 32), (768, 16)):
        cfg = rational.backward_candidates(25216, channels, channels // 8, h100)[0]
        assert cfg["ROWS_PER_PROGRAM"] == rpp, cfg
        row_programs = math.ceil(math.ceil(25216 / cfg["BLOCK_R"]) / rpp)
        programs = row_programs * math.ceil(channels / cfg["BLOCK_C"])
        atomics = row_programs * rational.groups_touched(channels, channels // 8, cfg["BLOCK_C"]) * 10
        assert programs >= h100 and atomics <= math.ceil(25216 / 64) * 8 * 10
    assert rational.backward_candidates(37, 48, 6, h100)[0]["ROWS_PER_PROGRAM"] == 1
    assert {c["ROWS_PER_PROGRAM"] for c in rational.backward_candidates(25216, 3072, 384, h100)} >= {1, 16, 32}


def test_launch_records(device):
    inputs = _inputs((7, 24), 3, torch.float16, device)
    launches = _check(inputs)
    fwd, bwd = launches
    assert fwd.op == bwd.op == "kanc::group_rational"
    assert fwd.extra["direction"] == "forward" and bwd.extra["direction"] == "backward"
    assert fwd.dtype == "float16" and fwd.shapes == ((7, 24), (3, 6), (3, 4))
    assert {"BLOCK_R", "BLOCK_C", "num_warps"} <= set(fwd.config)


def test_opcheck(device):
    x, num, den = _inputs((6, 5, 24), 4, torch.float32, device)
    torch.library.opcheck(torch.ops.kanc.group_rational.default, (x, num, den))
    grad = torch.randn(6, 5, 24, device=device)
    torch.library.opcheck(torch.ops.kanc.group_rational_backward.default, (grad, x.detach(), num.detach(), den))


def test_compiled_graph_holds_the_op(device, compile_capture):
    x, num, den = _inputs((5, 3, 32), 4, torch.float32, device)
    compiled, graphs = compile_capture(group_rational)
    assert_equivalent(compiled, rational_ref, [x, num, den])
    assert "kanc.group_rational.default" in graphs.targets("forward")
    assert "kanc.group_rational_backward.default" in graphs.targets("backward")
    assert "aten.abs.default" not in graphs.targets("forward"), "the reference was traced instead of the op"


def test_reference_without_kernels(device):
    """The switch and fp64 take the reference: nothing is launched."""
    x, num, den = _inputs((4, 8), 2, torch.float32, device)
    with recording() as launches:
        from kanc.codegen import kernels_disabled

        with kernels_disabled():
            group_rational(x, num, den)
        group_rational(x.double(), num.double(), den.double())
    assert launches == []


def test_autotune_times_candidates_and_caches(device):
    inputs = _inputs((40, 96), 2, torch.float32, device)
    with tuning.autotuning("1"):
        group_rational(*inputs)
    cache = tuning.get_cache(device)
    key = next(iter(cache.entries[FWD]))
    assert key == "64,96,2,6,4,float32"
    entry = cache.entries[FWD][key]
    assert len(entry["timings_ms"]) > 1 and all(t > 0 for t in entry["timings_ms"])
    best = min(range(len(entry["timings_ms"])), key=entry["timings_ms"].__getitem__)
    from kanc.codegen.kernels.rational import elementwise_candidates

    assert entry["config"] == elementwise_candidates(40, 96, 48)[best]
    assert tuning.cache_path(device).is_file()
    with recording() as launches:
        group_rational(*inputs)  # second call: the cached choice, no timing
    assert launches[0].config == entry["config"]


def test_debug_level_3_dumps_source_and_config(device, monkeypatch, capfd):
    monkeypatch.setenv("KANC_DEBUG", "3")
    from kanc.codegen import debug

    monkeypatch.setattr(debug, "_seen", set())
    group_rational(*[t.detach() for t in _inputs((3, 8), 2, torch.float32, device)])
    err = capfd.readouterr().err
    assert "def _rational_fwd_kernel(" in err and "tl.store" in err
    assert "_rational_fwd_kernel key=(4, 8, 2, 6, 4, 'float32') config={'BLOCK_R'" in err


def test_denominator_gradient_at_zero_takes_plus_one(device):
    """b = 0 (the identity init): the kernel's d|b|/db is +1, as in the reference, so the gradient is not zero."""
    x, num, _ = _inputs((37, 48), 8, torch.float32, device)
    den = torch.zeros(8, 4, device=device).requires_grad_()
    with recording() as launches:
        assert_equivalent(group_rational, rational_ref, [x, num, den])
    assert [launch.kernel for launch in launches] == [FWD, BWD]
    group_rational(x, num, den).sum().backward()
    assert torch.count_nonzero(den.grad) == den.numel()


@pytest.mark.parametrize("layout", ["expanded_rows", "column_slice"])
def test_strided_operands(layout, device):
    """Views kernels must not read as contiguous: an input whose rows all alias one (stride 0, expand) or a
    column-sliced input (x[:, ::2]), coefficients stored transposed, and an incoming gradient that is a transposed
    view."""
    num, den = _coefficients(4, device=device)
    num_t = num.detach().t().contiguous().requires_grad_()  # (6, G): the op sees num_t.t(), strides (1, G)
    den_t = den.detach().t().contiguous().requires_grad_()
    gen = torch.Generator().manual_seed(3)
    if layout == "expanded_rows":
        base, view = 2 * torch.randn(1, 32, generator=gen), lambda x: x.expand(19, 32)
    else:
        base, view = 2 * torch.randn(24, 64, generator=gen), lambda x: x[:, ::2]
    with recording() as launches:
        assert_equivalent(
            lambda x, a, b: group_rational(view(x), a.t(), b.t()).t(),  # .t(): the gradient arrives transposed
            lambda x, a, b: rational_ref(view(x), a.t(), b.t()).t(),
            [base.to(device).requires_grad_(), num_t, den_t],
        )
    assert [launch.kernel for launch in launches] == [FWD, BWD]


def test_deterministic_mode_reduces_without_atomics(device, count_atomics, deterministic_mode):
    """torch.use_deterministic_algorithms(True): the coefficient gradients leave each program by a plain store into its
    own slot and are summed in a fixed order. D = 24 with 32-wide tiles (groups straddle tiles, G_SPAN 2) over 3 row
    programs of 2 row tiles: no atomic is executed, the gradients match the reference and are bitwise equal run to run.
    """
    inputs = _inputs((70, 96), 4, torch.float32, device)
    fwd, bwd = _tiles(16, 32, 2)
    with fwd, bwd, count_atomics() as counted:
        launches = _check(inputs)
        grads = []
        for _ in range(2):
            x, num, den = [t.detach().clone().requires_grad_() for t in inputs]
            group_rational(x, num, den).square().sum().backward()
            grads.append([x.grad, num.grad, den.grad])
    assert counted[0] == 0 and launches[1].atomics == 0 and launches[1].extra["deterministic"]
    assert launches[1].grid == (3, 3)
    for first, second in zip(*grads):
        assert torch.equal(first, second)


def test_deterministic_sum_matches_the_atomics(device):
    """The fixed-order sum of per-program partials equals the atomics' sum (to fp32 rounding), groups straddling."""
    x, num, den = _inputs((45, 40), 8, torch.float16, device)  # D = 5: 16-wide tiles touch up to 4 groups
    fwd, bwd = _tiles(8, 16, 2)
    grad = torch.randn(45, 40, device=device, dtype=torch.float16)
    with fwd, bwd:
        atomic = torch.ops.kanc.group_rational_backward(grad, x.detach(), num.detach(), den.detach())
        torch.use_deterministic_algorithms(True)
        try:
            fixed = torch.ops.kanc.group_rational_backward(grad, x.detach(), num.detach(), den.detach())
        finally:
            torch.use_deterministic_algorithms(False)
    for a, b in zip(atomic, fixed):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_launches_run_under_their_tensors_device_guard(device, guarded_launches):
    """Every launch (forward, backward, and the tuner's timing runs) happens inside the device guard of its tensors'
    device, so on a GPU it runs on that GPU and not on the current one (KAT's kernels fail on any GPU but cuda:0)."""
    inputs = _inputs((20, 32), 4, torch.float32, device)
    with tuning.autotuning("1"):
        group_rational(*inputs).sum().backward()
    kernels = {name for name, _ in guarded_launches}
    assert kernels == {FWD, BWD} and len(guarded_launches) > 2  # the timing runs too
    assert all(where == torch.device(device) for _, where in guarded_launches), guarded_launches


def test_device_guard_enters_the_cuda_device(monkeypatch):
    """The guard of a CUDA tensor is ``torch.cuda.device`` of its own index (checked with a stand-in: no GPU here),
    unless that is the current device already; the interpreter's CPU tensors need none."""
    from kanc.codegen.kernels import common

    entered = []

    class FakeCudaDevice:
        def __init__(self, device):
            self.device = torch.device(device)

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("exit")

    monkeypatch.setattr(torch.cuda, "device", FakeCudaDevice)
    with common.device_guard(torch.device("cuda", 1)):
        assert entered == [torch.device("cuda", 1)]
    with common.device_guard(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda", 1), "exit"]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    with common.device_guard(torch.device("cuda", 1)):  # already the current device: nothing to enter
        pass
    with common.device_guard(torch.device("cuda", 0)):
        pass
    assert entered == [torch.device("cuda", 1), "exit", torch.device("cuda", 0), "exit"]


def test_launch_plans_built_once_per_operand_geometry(device, monkeypatch):
    """Config, grid and arguments are planned once per operand geometry (shapes, strides, dtypes): repeated calls only
    launch. Another layout of the same shape gets its own plan, a forced config replaces a plan's choice, and
    coefficients in another dtype get their gradients cast (the kernel writes fp32 with the sign of d|b|/db)."""
    asked = []
    pick = tuning.pick_config
    monkeypatch.setattr(tuning, "pick_config", lambda kernel, *a, **k: asked.append(kernel) or pick(kernel, *a, **k))
    x, num, den = _inputs((7, 24), 3, torch.float32, device)
    for _ in range(3):
        _check([x, num, den])
    assert asked == [FWD, BWD]
    wide = (2 * torch.randn(7, 40)).to(device)[:, 8:32].requires_grad_()  # the same shape, row stride 40
    got = torch.autograd.grad(group_rational(wide, num, den).square().sum(), (wide, num, den))
    want = torch.autograd.grad(rational_ref(wide, num, den).square().sum(), (wide, num, den))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    assert asked == [FWD, BWD] * 2
    forced = {"BLOCK_R": 8, "BLOCK_C": 16, "num_warps": 4}
    with forced_config(FWD, forced), recording() as launches:
        group_rational(x, num, den)
    assert launches[0].config == forced and launches[0].grid == (1, 2)
    half = [t.detach().to(torch.bfloat16).requires_grad_() for t in (num, den)]
    grads = torch.autograd.grad(group_rational(x, *half).sum(), half)
    expected = torch.autograd.grad(rational_ref(x, *half).sum(), half)
    assert [g.dtype for g in grads] == [torch.bfloat16] * 2
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=0.05, rtol=0.02)


def _copy_kernel(x_ptr, y_ptr, n, BLOCK: "tl.constexpr"):  # noqa: F821 - only bound, never compiled
    pass


def test_direct_launches_pass_what_triton_passes(monkeypatch):
    """A plan's direct launches (``common.launch_planned``; CUDA only, checked here with a stub driver and a stub
    compiled kernel: no GPU) pass the compiled kernel's launcher the grid and arguments Triton's own launch passes,
    and an unaligned pointer (another specialisation) goes back through Triton's launch."""
    from types import SimpleNamespace

    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from kanc.codegen.kernels import common

    launched = []

    class Compiled:
        function, packed_metadata = 1, ()

        def launch_metadata(self, grid, stream, *args):
            return None

        def run(self, g0, g1, g2, stream, function, packed, metadata, enter, exit_, *args):
            launched.append(("triton", (g0, g1, g2), args))

        def __getitem__(self, grid):
            return lambda *args: launched.append(("direct", (*grid, *(1,) * (3 - len(grid))), args))

    class StubDriver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    def compile_stub(self, key, signature, device, constexprs, options, attrs, warmup):
        kernel = self.device_caches[device][0][key] = Compiled()
        return kernel

    monkeypatch.setattr(JITFunction, "_do_compile", compile_stub)
    monkeypatch.setattr(common, "_COMPILED", Compiled)
    kernel = JITFunction(_copy_kernel)
    plan = SimpleNamespace(grid=(3,), args=(48, 16), options={"num_warps": 4}, record=None, direct=[])
    x, y = torch.randn(64), torch.empty(64)
    monkeypatch.setattr(driver, "_active", StubDriver())  # reset_active would look for a GPU
    for _ in range(3):
        common.launch_planned(kernel, plan, x, y)
    common.launch_planned(kernel, plan, x[1:], y[1:])  # 4-byte offsets: not what the kept kernel was built for
    assert [entry[0] for entry in launched] == ["triton", "direct", "direct", "triton"]
    assert launched[0][1:] == launched[1][1:] == launched[2][1:] == ((3, 1, 1), (x, y, 48, 16))
    assert len(plan.direct) == 1
