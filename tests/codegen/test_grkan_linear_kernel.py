"""Fused GR-KAN linear kernels against grkan_linear_ref: forward and every gradient (x, both coefficient sets, W, b),
dtypes, ragged tiles, groups straddling K tiles, layouts, non-finite inputs, atomics, custom ops, torch.compile of
a GR-KAN MLP block, and the module path (GRKANLinear calls the fused op)."""

import pytest
import torch

from kanc.codegen import forced_config, grkan_linear, grkan_linear_ref, kernels_disabled, rational_ref, recording
from kanc.nn import GRKANLinear, GRKANMlp
from kanc.testing import assert_equivalent

FWD, DW, DX = "_grkan_linear_fwd_kernel", "_grkan_linear_dw_kernel", "_grkan_linear_dx_kernel"


def _inputs(shape, n_out, groups, dtype, device, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k_in = shape[-1]
    x = 2 * torch.randn(shape, generator=gen)
    num = 0.3 * torch.randn(groups, 6, generator=gen)
    den = torch.randn(groups, 4, generator=gen)
    w = torch.randn(n_out, k_in, generator=gen) / k_in**0.5
    b = torch.randn(n_out, generator=gen)
    tensors = [x.to(dtype), num, den, w.to(dtype)] + ([b.to(dtype)] if bias else [])
    return [t.to(device).requires_grad_() for t in tensors]


def _fn(x, num, den, w, b=None):
    return grkan_linear(x, num, den, w, b)


def _ref(x, num, den, w, b=None):
    """grkan_linear_ref's definition, linear(F(x)), at fp32 math. F(x) is rounded to x's dtype in the forward (as the
    reference stores it and the kernels feed it to tl.dot), but dF stays fp32 in the backward, as in the kernels'
    accumulators: 16-bit references round dF and the partial sums of their matmuls, which is less accurate, not more.
    """
    f32 = rational_ref(x.float(), num, den)
    f = f32 + (f32.to(x.dtype).float() - f32).detach()  # rounded value, unrounded gradient
    return torch.nn.functional.linear(f, w.float(), None if b is None else b.float()).to(x.dtype)


def test_fp32_math_oracle_is_the_reference():
    inputs = _inputs((5, 16), 7, 2, torch.float32, "cpu")
    torch.testing.assert_close(_ref(*inputs), grkan_linear_ref(*inputs), atol=0, rtol=0)


def _tiles(bm, bn, bk, rpp=1):
    cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 2, "num_warps": 4, "num_stages": 1}
    return (
        forced_config(FWD, cfg),
        forced_config(DW, {**cfg, "BLOCK_N": bm, "BLOCK_K": bn, "BLOCK_M": bk}),  # (N, K) tiles, M reduced
        forced_config(DX, {**cfg, "BLOCK_K": bn, "BLOCK_N": bk, "ROWS_PER_PROGRAM": rpp}),  # (M, K) tiles, N reduced
    )


def _check(inputs, **tol):
    with recording() as launches:
        assert_equivalent(_fn, _ref, inputs, **tol)
    kernels = [launch.kernel for launch in launches]
    assert kernels == [FWD, DW, DX], f"the fused kernels did not run: {kernels}"
    return launches


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("k_in,groups", [(48, 3), (64, 2)])
def test_matches_reference_ragged(k_in, groups, dtype, bias, device):
    """M = 45, N = 37 with 16/32 tiles, every dimension ragged. K = 48, G = 3: groups (D = 16) meet 32-wide K tiles at
    unequal positions; K = 64, G = 2: each K tile lies in one group (scalar coefficients). The dx kernel runs 2 row
    tiles per program: 3 row tiles, so the last program owns one, ragged."""
    a, b, c = _tiles(16, 32, 32, rpp=2)
    with a, b, c:
        _check(_inputs((3, 15, k_in), 37, groups, dtype, device, bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_configs(dtype, device):
    """Heuristic configs on a block-like shape (C = 64 -> 4 C, G = 8)."""
    _check(_inputs((2, 9, 64), 256, 8, dtype, device))


def test_groups_narrower_than_a_tile(device):
    """D = 3: a 16-wide K tile spans up to 7 groups (G_SPAN 8)."""
    a, b, c = _tiles(16, 16, 16)
    with a, b, c:
        _check(_inputs((20, 24), 19, 8, torch.float32, device))


def test_weight_and_input_layouts(device):
    """A transposed-storage weight (nn.Linear after .t().contiguous().t()) and a non-contiguous input."""
    x, num, den, w, b = _inputs((40, 17), 24, 1, torch.float32, device)
    wt = w.detach().t().contiguous().t().requires_grad_()  # strides (1, 24)
    xs = x.detach().t().contiguous().t().requires_grad_()
    assert not wt.is_contiguous() and not xs.is_contiguous()
    _check([xs, num, den, wt, b])


def test_non_finite_inputs(device):
    x, num, den, w, b = _inputs((21, 32), 12, 4, torch.float32, device)
    with torch.no_grad():
        x[3, 2], x[7, 30], x[9, 9] = float("nan"), float("inf"), -40.0
    _check([x, num, den, w, b])


@pytest.mark.parametrize("rpp,row_programs", [(1, 3), (2, 2), (4, 1)])
def test_atomics_one_per_group_and_coefficient_per_program(rpp, row_programs, device, count_atomics):
    """K tiles aligned with groups (D = 16 = BLOCK_K): atomics == dx programs x coefficients, as counted. 33 rows are
    3 row tiles; a program runs ``rpp`` of them before its atomics."""
    a, b, c = _tiles(16, 16, 16, rpp)
    with a, b, c, count_atomics() as counted:
        launches = _check(_inputs((33, 64), 20, 4, torch.float32, device))
    dx = launches[2]
    assert dx.grid == (row_programs * 4,) and dx.config["ROWS_PER_PROGRAM"] == rpp
    assert dx.atomics == dx.programs * 10 == counted[0]
    assert launches[0].atomics == launches[1].atomics == 0
    assert dx.extra["direction"] == "backward" and launches[0].extra["placement"] == "prologue"


def test_straddling_groups_with_a_row_loop(device, count_atomics):
    """D = 3 with 16-wide K tiles (up to 7 groups per tile, G_SPAN 8), 3 row tiles per program over 5 (2 programs)."""
    a, b, c = _tiles(16, 16, 16, rpp=3)
    with a, b, c, count_atomics() as counted:
        launches = _check(_inputs((70, 24), 19, 8, torch.float16, device))
    from kanc.codegen.kernels.rational import groups_touched

    dx = launches[2]
    assert dx.grid == (2 * 2,) and dx.atomics == 2 * groups_touched(24, 3, 16) * 10 == counted[0]


def test_autocast_casts_operands_not_coefficients(device):
    x, num, den, w, b = _inputs((10, 32), 16, 4, torch.float32, device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16), recording() as launches:
        out = grkan_linear(x, num, den, w, b)
    assert out.dtype == torch.bfloat16 and [launch.dtype for launch in launches] == ["bfloat16"]
    ref = grkan_linear_ref(x.bfloat16(), num, den, w.bfloat16(), b.bfloat16())
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    assert num.grad.dtype == torch.float32 and w.grad.dtype == torch.float32


def test_mixed_dtypes_take_the_reference(device):
    """Operands of different dtypes go to the reference, which raises as F.linear does."""
    x, num, den, w, b = _inputs((4, 16), 8, 2, torch.float32, device)
    with recording() as launches, pytest.raises(RuntimeError, match="dtype"):
        grkan_linear(x.half(), num, den, w.half(), b)
    assert launches == []


def test_double_backward_through_the_reference(device):
    """Gradient penalties: the backward op is differentiable (through the reference)."""
    inputs = _inputs((6, 16), 5, 2, torch.float32, device)

    def penalty(fn):
        out = fn(*inputs)
        (gx,) = torch.autograd.grad(out.square().sum(), inputs[0], create_graph=True)
        return torch.autograd.grad(gx.square().sum(), inputs[1:])

    for got, want in zip(penalty(_fn), penalty(_ref)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_opcheck(device):
    x, num, den, w, b = _inputs((3, 5, 24), 10, 4, torch.float32, device)
    torch.library.opcheck(torch.ops.kanc.grkan_linear.default, (x, num, den, w, b))
    torch.library.opcheck(torch.ops.kanc.grkan_linear.default, (x, num, den, w, None))
    grad = torch.randn(3, 5, 10, device=device)
    for has_bias in (True, False):
        args = (grad, x.detach(), num.detach(), den, w, has_bias)
        torch.library.opcheck(torch.ops.kanc.grkan_linear_backward.default, args)


def test_module_uses_the_fused_op(device):
    torch.manual_seed(0)
    layer = GRKANLinear(32, 12, groups=4, act_init="gelu").to(device)
    x = torch.randn(7, 32, device=device, requires_grad=True)
    with recording() as launches:
        layer(x).sum().backward()
    assert [launch.kernel for launch in launches] == [FWD, DW, DX]
    assert layer.rational.numerator.grad is not None and layer.weight.grad is not None


@pytest.mark.parametrize("shared", [False, True])
def test_compiled_mlp_block_holds_the_fused_op(shared, device, compile_capture):
    """torch.compile(fullgraph=True) of GRKANMlp: one kanc::grkan_linear per layer, no decomposed rational."""
    torch.manual_seed(0)
    block = GRKANMlp(32, 64, groups=4, act_init="gelu").to(device)
    if shared:  # KAT layout: one numerator row, expanded inside the module
        for fc in (block.fc1, block.fc2):
            fc.rational.numerator = torch.nn.Parameter(fc.rational.numerator[:1].detach().clone())
            fc.rational.shared_numerator = True
    compiled, graphs = compile_capture(block)
    x = torch.randn(2, 9, 32, device=device, requires_grad=True)
    out = compiled(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in block.parameters()] + [x.grad.clone()]
    block.zero_grad()
    x.grad = None
    with kernels_disabled():  # the same block on the reference path
        ref = block(x)
        ref.square().sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for got, want in zip(grads, [p.grad for p in block.parameters()] + [x.grad]):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
    forward, backward = graphs.targets("forward"), graphs.targets("backward")
    assert "kanc.grkan_linear.default" in forward and "kanc.grkan_linear_backward.default" in backward
    n_ops = sum(str(n.target) == "kanc.grkan_linear.default" for gm in graphs.graphs["forward"] for n in gm.graph.nodes)
    assert n_ops == 2
    assert not {"aten.abs.default", "aten.div.Tensor", "aten.mm.default", "aten.addmm.default"} & forward


def test_torch_export_keeps_one_op_per_layer(device):
    block = GRKANMlp(16, 32, groups=4).to(device)
    exported = torch.export.export(block, (torch.randn(3, 16, device=device),))
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert targets.count("kanc.grkan_linear.default") == 2
    assert not {"aten.abs.default", "aten.linear.default", "aten.addmm.default"} & set(targets)


def test_onnx_export_decomposes_even_with_kernels_available(device, tmp_path):
    """The exporter must see standard ops: the checker sends ONNX export to the reference."""
    onnx = pytest.importorskip("onnx")
    from kanc.export import export_onnx

    torch.manual_seed(0)
    result = export_onnx(GRKANMlp(16, 32, groups=4).to(device), torch.randn(3, 16, device=device), tmp_path / "m.onnx")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert {"Abs", "Div"} <= ops and all(
        n.domain in ("", "ai.onnx") for n in onnx.load(str(tmp_path / "m.onnx")).graph.node
    )
    assert result.worst < 1e-4


def test_denominator_gradient_at_zero_takes_plus_one(device):
    """b = 0 (the identity init of fc1): the fused backward's d|b|/db is +1, as in the reference."""
    x, num, _, w, b = _inputs((37, 48), 20, 3, torch.float32, device)
    den = torch.zeros(3, 4, device=device).requires_grad_()
    _check([x, num, den, w, b])
    grkan_linear(x, num, den, w, b).square().sum().backward()
    assert torch.count_nonzero(den.grad) == den.numel()


@pytest.mark.parametrize("bias_view", ["strided", "expanded"])
def test_strided_operands(bias_view, device):
    """Every operand as a view the kernels must read through its strides: a column-sliced input (x[:, ::2]), a shared
    numerator row expanded to every group (stride 0), a transposed weight, and a bias that is b[::2] or one value
    expanded to N (stride 0), which the forward once read as contiguous (b[::2]: max error 15)."""
    gen = torch.Generator().manual_seed(5)
    xb = (2 * torch.randn(3, 11, 96, generator=gen)).to(device).requires_grad_()
    num_row = (0.3 * torch.randn(1, 6, generator=gen)).to(device).requires_grad_()
    den = torch.randn(4, 4, generator=gen).to(device).requires_grad_()
    wt = (torch.randn(48, 20, generator=gen) / 7).to(device).requires_grad_()  # the op sees wt.t(): (20, 48)
    if bias_view == "strided":
        bb, bias = torch.randn(40, generator=gen).to(device).requires_grad_(), lambda b: b[::2]
    else:
        bb, bias = torch.randn(1, generator=gen).to(device).requires_grad_(), lambda b: b.expand(20)

    def call(op):
        return lambda x, a, b, w, c: op(x[..., ::2], a.expand(4, -1), b, w.t(), bias(c))

    with recording() as launches:
        assert_equivalent(call(grkan_linear), call(_ref), [xb, num_row, den, wt, bb])
    assert [launch.kernel for launch in launches] == [FWD, DW, DX]


def test_deterministic_mode_reduces_without_atomics(device, count_atomics, deterministic_mode):
    """torch.use_deterministic_algorithms(True): the dx kernel stores each program's coefficient sums in its own slot
    (summed after in a fixed order) instead of atomics. D = 3 with 16-wide K tiles (up to 7 groups per tile), 2 row
    programs of 3 row tiles: no atomic executed, gradients match the reference and are bitwise equal run to run."""
    inputs = _inputs((70, 24), 19, 8, torch.float32, device)
    a, b, c = _tiles(16, 16, 16, rpp=3)
    with a, b, c, count_atomics() as counted:
        launches = _check(inputs)
        grads = []
        for _ in range(2):
            leaves = [t.detach().clone().requires_grad_() for t in inputs]
            grkan_linear(*leaves).square().sum().backward()
            grads.append([t.grad for t in leaves])
    dx = launches[2]
    assert counted[0] == 0 and dx.atomics == 0 and dx.extra["deterministic"] and dx.grid == (2 * 2,)
    for first, second in zip(*grads):
        assert torch.equal(first, second)


def test_launches_run_under_their_tensors_device_guard(device, guarded_launches):
    """The forward and both backward kernels launch inside the device guard of their tensors' device."""
    grkan_linear(*_inputs((9, 32), 16, 4, torch.float32, device)).sum().backward()
    assert [name for name, _ in guarded_launches] == [FWD, DW, DX]
    assert all(where == torch.device(device) for _, where in guarded_launches), guarded_launches


def test_tuning_key_holds_the_fp32_dot_precision(device, monkeypatch):
    """fp32 tl.dot in TF32 and in IEEE are different kernels: each is timed and cached under its own key."""
    from kanc.codegen import tuning
    from kanc.codegen.kernels import common

    inputs = [t.detach() for t in _inputs((9, 32), 16, 4, torch.float32, device)]
    for precision in ("ieee", "tf32"):
        monkeypatch.setattr(common, "fp32_precision", lambda p=precision: p)
        with tuning.autotuning("1"):
            grkan_linear(*inputs)
    keys = sorted(tuning.get_cache(device).entries[FWD])
    assert keys == ["16,16,32,4,6,4,float32-ieee", "16,16,32,4,6,4,float32-tf32"]
    assert common.dot_dtype_key(torch.bfloat16) == "bfloat16"  # 16-bit I/O feeds its own dtype to tl.dot


def test_fp32_precision_follows_torch():
    """The precision fp32 dots use is torch's own for fp32 matmuls, set by the new API or the legacy switches, and
    reading it never raises (reading ``allow_tf32`` does, once a program has mixed the two APIs). In a child process:
    the switches are process-wide."""
    import subprocess
    import sys

    script = """
import torch
from kanc.codegen.kernels import common
common.interpreting = lambda: False  # the GPU's answer (the interpreter always computes in IEEE)
m = torch.backends.cuda.matmul
seen = [common.fp32_precision()]
torch.set_float32_matmul_precision("high"); seen.append(common.fp32_precision())
m.allow_tf32 = False; seen.append(common.fp32_precision())
m.fp32_precision = "tf32"; seen.append(common.fp32_precision())
m.fp32_precision = "ieee"; seen.append(common.fp32_precision())
print(",".join(seen))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == "ieee,tf32,ieee,tf32,ieee"
