"""Fused SNNK block kernels against snnk_block_ref: every kind, forward and gradients (x, W, b), dtypes, ragged
sizes (m not a power of two nor a multiple of the feature block, rows/widths not multiples of the blocks, row splits),
non-finite inputs, only the gradients asked for, no (rows, m) tensor in the backward's memory, limits that fall back,
custom-op checks and torch.compile of an SNNK block."""

import contextlib
import math

import pytest
import torch

from kanc.codegen import forced_config, kernels_disabled, recording, snnk_block, snnk_block_ref
from kanc.codegen.snnk import SNNK_KINDS, snnk_width
from kanc.nn import SNNKMlp
from kanc.testing import assert_equivalent

FWD, DX, DW = "_snnk_fwd_kernel", "_snnk_dx_kernel", "_snnk_dw_kernel"


def _inputs(rows, d_in, feats, d_out, kind, dtype, device, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows, d_in, generator=gen).to(device, dtype).requires_grad_()
    g = torch.randn(feats, d_in, generator=gen).to(device)  # fixed projection: no gradient
    w = (torch.randn(d_out, snnk_width(feats, kind), generator=gen) / feats**0.5).to(device).requires_grad_()
    b = torch.randn(d_out, generator=gen).to(device).requires_grad_() if bias else None
    return x, g, w, b


def _params(kind):
    return {"relu": (-0.1, 1.0), "exp": (0.0, 0.25), "cos": (0.0, 0.7)}[kind]  # (floor, input_scale)


def _check(x, g, w, b, kind, kernels=(FWD, DX, DW), **tol):
    floor, scale = _params(kind)
    fn = lambda x, w, *b: snnk_block(x, g, w, b[0] if b else None, kind, floor, scale)
    ref = lambda x, w, *b: snnk_block_ref(x, g, w, b[0] if b else None, kind, floor, scale)
    with recording() as launches:
        assert_equivalent(fn, ref, [x, w] + ([b] if b is not None else []), **tol)
    assert [launch.kernel for launch in launches] == list(kernels), "the fused kernels did not run"
    return launches


def _tiles(bm, bd, bn, dw=(16, 16, 16, 16, 1), bf=64):
    """Forced configs: forward and dx (BLOCK_M rows, BLOCK_D, BLOCK_N chunks, BLOCK_F features per tile); dW
    (BLOCK_N, BLOCK_F, BLOCK_M, BLOCK_D, SPLIT_M)."""
    cfg = {"BLOCK_M": bm, "BLOCK_F": bf, "BLOCK_D": bd, "BLOCK_N": bn, "num_warps": 4, "num_stages": 1}
    names = ("BLOCK_N", "BLOCK_F", "BLOCK_M", "BLOCK_D", "SPLIT_M")
    dw_cfg = {**dict(zip(names, dw)), "num_warps": 4, "num_stages": 1}
    stack = contextlib.ExitStack()
    for kernel, config in ((FWD, cfg), (DX, cfg), (DW, dw_cfg)):
        stack.enter_context(forced_config(kernel, config))
    return stack


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", SNNK_KINDS)
def test_matches_reference_ragged(kind, dtype, device):
    """rows 3 x 13 = 39 (16-row tiles), d_in 45 and d_out 29 (16-wide chunks), m = 21 in two 16-wide feature tiles,
    the second ragged (the forward and dx sum them through partials; dW gives each its programs); dW over 2 row splits
    (32 + 7 rows, fp32 partial sums)."""
    with _tiles(16, 16, 16, dw=(16, 16, 16, 16, 2), bf=16):
        launches = _check(*_inputs((3, 13), 45, 21, 29, kind, dtype, device), kind)
    assert launches[0].extra["feature_tiles"] == launches[1].extra["feature_tiles"] == 2
    dw = launches[2]
    assert dw.grid == (2 * 2, 2) and dw.extra["splits"] == 2 and dw.extra["z_recomputed"] == 2


@pytest.mark.parametrize("kind", SNNK_KINDS)
def test_default_configs_without_bias(kind, device):
    _check(*_inputs((70,), 32, 16, 24, kind, torch.float32, device, bias=False), kind)


def test_wide_dw_tiles_many_splits(device):
    """dW tiles wider than the problem in outputs (32 > 20) and rows split 5 ways (one program per 16 rows), exp."""
    with _tiles(32, 32, 32, dw=(32, 16, 16, 32, 5)):
        launches = _check(*_inputs((75,), 40, 24, 20, "exp", torch.float16, device), "exp")
    assert launches[2].grid == (2, 5)


def test_non_finite_inputs(device):
    x, g, w, b = _inputs((20,), 24, 12, 10, "relu", torch.float32, device)
    with torch.no_grad():
        x[2, 3], x[5, 0], x[9, 9] = float("nan"), float("inf"), -1e3
    _check(x, g, w, b, "relu")


def test_weight_only_gradient_and_layouts(device):
    """x without grad (a first layer) and a transposed-storage weight: dW and db match, and no dx kernel runs."""
    x, g, w, b = _inputs((33,), 20, 8, 12, "exp", torch.float32, device)
    wt = w.detach().t().contiguous().t().requires_grad_()
    floor, scale = _params("exp")
    with recording() as launches:
        assert_equivalent(
            lambda w, b: snnk_block(x.detach(), g, w, b, "exp", floor, scale),
            lambda w, b: snnk_block_ref(x.detach(), g, w, b, "exp", floor, scale),
            [wt, b],
        )
    assert [launch.kernel for launch in launches] == [FWD, DW]


def test_input_only_gradient(device):
    """A frozen weight with a trainable bias: dx by its kernel, db from dy's column sums, no dW kernel."""
    x, g, w, b = _inputs((3, 11), 20, 13, 12, "cos", torch.float16, device)
    floor, scale = _params("cos")
    frozen = w.detach()
    with recording() as launches:
        assert_equivalent(
            lambda x, b: snnk_block(x, g, frozen, b, "cos", floor, scale),
            lambda x, b: snnk_block_ref(x, g, frozen, b, "cos", floor, scale),
            [x, b],
        )
    assert [launch.kernel for launch in launches] == [FWD, DX]


def _allocations(profile) -> list[tuple[str, int]]:
    """(op, bytes) of every allocation an op made itself during a torch.profiler run (host and device memory)."""
    out = []
    for event in profile.events():
        for field in ("self_cpu_memory_usage", "self_device_memory_usage"):
            size = getattr(event, field, 0) or 0
            if size > 0:
                out.append((event.name, size))
    return out


@pytest.mark.parametrize("kind", SNNK_KINDS)
def test_backward_allocates_no_feature_tensor(kind, device):
    """The backward keeps Phi and Gx on chip: torch's memory profiler sees no allocation as large as one (rows, m)
    tensor in 16-bit (the reference's backward, checked alongside, makes several). rows 96, m 40, d_in 8, d_out 6:
    every legitimate buffer (dy, dx, dW partials of 3 row splits) is smaller."""
    from torch.profiler import ProfilerActivity, profile

    rows, feats = 96, 40
    x, g, w, b = _inputs((rows,), 8, feats, 6, kind, torch.float32, device)
    floor, scale = _params(kind)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    feature_bytes = rows * feats * 2

    def backward_allocations():
        y = snnk_block(x, g, w, b, kind, floor, scale)
        with profile(activities=activities, profile_memory=True) as prof:
            y.backward(torch.ones_like(y))
        return _allocations(prof)

    with _tiles(16, 16, 16, dw=(16, 16, 32, 16, 3), bf=16), recording() as launches:  # 3 feature tiles
        allocations = backward_allocations()
    assert [launch.kernel for launch in launches] == [FWD, DX, DW] and launches[2].grid[1] == 3
    assert allocations and max(size for _, size in allocations) < feature_bytes, allocations
    with kernels_disabled():
        reference = backward_allocations()
    assert max(size for _, size in reference) >= feature_bytes, "the check cannot see feature tensors"


def test_dw_defaults_fill_the_gpu(monkeypatch):
    """GPU defaults at ViT-B (25,216 tokens, d 768, m 256): the dW grid reaches 2 programs per SM of an H100 by row
    splits; the default output tile has the least modelled work (Z recomputed twice, with 512-wide tiles); tiny
    problems take one split."""
    from kanc.codegen.kernels import snnk

    monkeypatch.setattr(snnk, "interpreting", lambda: False)
    for kind in SNNK_KINDS:
        candidates = snnk.dw_candidates(25216, 768, 256, 768, kind, 132)
        cfg = candidates[0]
        tiles = math.ceil(768 / cfg["BLOCK_N"]) * math.ceil(256 / cfg["BLOCK_F"])
        assert tiles * cfg["SPLIT_M"] >= 2 * 132 and tiles * (cfg["SPLIT_M"] - 1) < 2 * 132
        work = [snnk.dw_work(c["BLOCK_N"], 768, 768, kind, 2) for c in candidates]
        assert work[0] == min(work) and math.ceil(768 / cfg["BLOCK_N"]) == 2
        assert {c["BLOCK_N"] for c in candidates} >= {128, 256, 512}
    tiny = snnk.dw_candidates(40, 8, 12, 6, "relu", 132)
    assert tiny[0]["SPLIT_M"] <= 3 and all(c["BLOCK_F"] == 16 and c["BLOCK_N"] == 16 for c in tiny)


def test_projection_with_grad_falls_back_to_the_reference(device):
    """A projection that wants a gradient (the kernels do not differentiate it): the reference runs, nothing
    launches."""
    x, g, w, b = _inputs((4,), 8, 4, 6, "relu", torch.float32, device)
    with recording() as launches:
        out = snnk_block(x, g.requires_grad_(), w, b, "relu")
        out.sum().backward()
    assert launches == [] and g.grad is not None


@pytest.mark.parametrize(
    "feats,kind,dtype,tiles",
    [
        (768, "relu", torch.bfloat16, 3),  # ViT-B/BERT/GPT-2's default m = hidden / 4: three 256-wide tiles
        (1000, "exp", torch.float32, 2),  # odd m: 512 + 488, the partials are y and dx themselves (fp32)
        (600, "cos", torch.float16, 5),  # 2m = 1200 features, m not a multiple of the tile: 4 x 128 + 88
    ],
)
def test_any_feature_count_runs_fused(feats, kind, dtype, tiles, device):
    """No feature limit: m beyond one tile runs the fused kernels with their default configs, feature tiles summed
    through partials, every gradient against the reference."""
    launches = _check(*_inputs((21,), 24, feats, 13, kind, dtype, device), kind)
    assert launches[0].extra["feature_tiles"] == launches[1].extra["feature_tiles"] == tiles


@pytest.mark.parametrize("bias_view", ["strided", "expanded"])
def test_strided_operands(bias_view, device):
    """Every operand as a view read through its strides: a column-sliced input (x[:, ::2]), a transposed projection
    and weight, and a bias that is b[::2] or one value expanded to d_out (stride 0), which the forward once read as
    contiguous. Two feature tiles, so the partials path reads them too."""
    gen = torch.Generator().manual_seed(6)
    xb = torch.randn(2, 17, 40, generator=gen).to(device).requires_grad_()
    gt = torch.randn(20, 24, generator=gen).to(device)  # the op sees gt.t(): (m = 24, d = 20)
    wt = (torch.randn(48, 14, generator=gen) / 5).to(device).requires_grad_()  # cos: width 2m = 48; op sees wt.t()
    if bias_view == "strided":
        bb, bias = torch.randn(28, generator=gen).to(device).requires_grad_(), lambda b: b[::2]
    else:
        bb, bias = torch.randn(1, generator=gen).to(device).requires_grad_(), lambda b: b.expand(14)
    floor, scale = _params("cos")

    def call(op):
        return lambda x, w, b: op(x[..., ::2], gt.t(), w.t(), bias(b), "cos", floor, scale)

    with _tiles(16, 16, 16, bf=16), recording() as launches:
        assert_equivalent(call(snnk_block), call(snnk_block_ref), [xb, wt, bb])
    assert [launch.kernel for launch in launches] == [FWD, DX, DW]


def test_launches_run_under_their_tensors_device_guard(device, guarded_launches):
    """The forward, dx and dW kernels launch inside the device guard of their tensors' device."""
    x, g, w, b = _inputs((9,), 16, 10, 7, "exp", torch.float32, device)
    snnk_block(x, g, w, b, "exp").sum().backward()
    assert [name for name, _ in guarded_launches] == [FWD, DX, DW]
    assert all(where == torch.device(device) for _, where in guarded_launches), guarded_launches


def test_feature_tile_defaults(monkeypatch):
    """GPU defaults of the forward and dx kernels: up to 512 features one tile (256 for cos, whose halves double the
    arrays), as before tiling; beyond, tiles that pad m least, then the fewest (m = 768: 3 x 256, m = 1000: 2 x 512,
    m = 3072: 6 x 512; cos at m = 512: 2 x 256), every candidate within the register budget of its tile; dx defaults
    to the narrower output chunk (compile_report: exp with 64-wide chunks spills at sm_90)."""
    from kanc.codegen.kernels import snnk

    monkeypatch.setattr(snnk, "interpreting", lambda: False)
    tiles = snnk.feature_tiles
    assert tiles(256, "relu") == [256] and tiles(300, "exp") == [512] and tiles(5, "relu") == [16]
    assert tiles(768, "relu")[0] == 256 and tiles(1000, "exp")[0] == 512 and tiles(3072, "relu")[0] == 512
    assert tiles(256, "cos") == [256] and tiles(512, "cos") == [256, 128] and tiles(600, "cos")[0] == 128
    for kind in SNNK_KINDS:
        candidates = snnk.snnk_candidates(25216, 768, kind)
        assert candidates[0]["BLOCK_F"] == 256
        assert {c["BLOCK_F"] for c in candidates} == ({128, 256} if kind == "cos" else {128, 256, 512})
        per_thread = 16 if kind == "cos" else 32
        assert all(c["BLOCK_M"] * c["BLOCK_F"] <= per_thread * 32 * c["num_warps"] for c in candidates)
        dx = snnk.snnk_candidates(25216, 256, kind, snnk.DX_CHUNKS)[0]
        assert (dx["BLOCK_D"], dx["BLOCK_N"], dx["num_warps"]) == (32, 32, 8)


def test_double_backward_through_the_reference(device):
    x, g, w, b = _inputs((9,), 12, 8, 5, "cos", torch.float32, device)

    def penalty(fn):
        (gx,) = torch.autograd.grad(fn(x, g, w, b, "cos").square().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (w, b), allow_unused=True)

    got, want = penalty(snnk_block), penalty(snnk_block_ref)
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", SNNK_KINDS)
def test_opcheck(kind, device):
    x, g, w, b = _inputs((2, 5), 16, 8, 6, kind, torch.float32, device)
    floor, scale = _params(kind)
    torch.library.opcheck(torch.ops.kanc.snnk_block.default, (x, g, w, b, kind, floor, scale))
    torch.library.opcheck(torch.ops.kanc.snnk_block.default, (x, g, w, None, kind, floor, scale))
    grad = torch.randn(2, 5, 6, device=device)
    for has_bias, input_grad, weight_grad in ((True, True, True), (False, True, False), (True, False, True)):
        args = (grad, x.detach(), g, w, has_bias, input_grad, weight_grad, kind, floor, scale)
        torch.library.opcheck(torch.ops.kanc.snnk_block_backward.default, args)


def test_compiled_block_holds_the_fused_op(device, compile_capture):
    torch.manual_seed(0)
    block = SNNKMlp(24, 16, 20, kind="exp").to(device)
    compiled, graphs = compile_capture(block)
    x = torch.randn(3, 7, 24, device=device, requires_grad=True)
    out = compiled(x)
    out.square().sum().backward()
    grads = [x.grad.clone(), block.linear.weight.grad.clone(), block.linear.bias.grad.clone()]
    x.grad = None
    block.zero_grad()
    with kernels_disabled():
        ref = block(x)
        ref.square().sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for got, want in zip(grads, [x.grad, block.linear.weight.grad, block.linear.bias.grad]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    forward, backward = graphs.targets("forward"), graphs.targets("backward")
    assert "kanc.snnk_block.default" in forward and "kanc.snnk_block_backward.default" in backward
    matmuls = {"aten.exp.default", "aten.mm.default", "aten.addmm.default", "aten.bmm.default"}
    assert not matmuls & forward and not matmuls & backward, "the features were computed outside the fused ops"


def test_launch_records(device):
    launches = _check(*_inputs((5,), 16, 10, 7, "cos", torch.float16, device), "cos")
    fwd, dx, dw = launches
    assert fwd.op == dx.op == dw.op == "kanc::snnk_block" and fwd.atomics == dx.atomics == dw.atomics == 0
    assert fwd.extra == {"direction": "forward", "kind": "cos", "BLOCK_F": 16, "feature_tiles": 1}
    assert dx.extra["direction"] == dw.extra["direction"] == "backward" and fwd.dtype == "float16"
    assert dx.extra["grads"] == "input" and dw.extra["grads"] == "weight,bias"
    assert {"BLOCK_N", "BLOCK_F", "BLOCK_M", "BLOCK_D", "SPLIT_M"} <= set(dw.config)


def test_launch_plans_built_once_per_operand_geometry(device, monkeypatch):
    """Each SNNK launcher plans its config, grid and arguments once per operand geometry and feature map: repeated
    calls only launch (and still match the reference, through the fp32 partials of 16-bit outputs over two feature
    tiles); another layout or another floor gets a plan of its own, and so does a config forced after."""
    from kanc.codegen import tuning

    asked = []
    pick = tuning.pick_config
    monkeypatch.setattr(tuning, "pick_config", lambda kernel, *a, **k: asked.append(kernel) or pick(kernel, *a, **k))
    x, g, w, b = _inputs((9,), 24, 24, 12, "relu", torch.bfloat16, device)
    wide = torch.randn(9, 48, device=device).to(torch.bfloat16)[:, ::2].requires_grad_()  # the same shape, strided
    with _tiles(16, 16, 16, dw=(16, 16, 16, 16, 2), bf=16):
        for _ in range(3):
            _check(x, g, w, b, "relu", atol=0.05, rtol=0.02)
        assert asked == [FWD, DX, DW]
        floor, scale = _params("relu")
        got = torch.autograd.grad(snnk_block(wide, g, w, b, "relu", floor, scale).float().square().sum(), (wide, w))
        ref = snnk_block_ref(wide, g, w, b, "relu", floor, scale).float().square().sum()
        for got_grad, want in zip(got, torch.autograd.grad(ref, (wide, w))):
            torch.testing.assert_close(got_grad.float(), want.float(), atol=0.1, rtol=0.05)
        assert asked == [FWD, DX, DW] * 2
        with recording() as launches:
            snnk_block(x, g, w, b, "relu", 0.5, 1.0)
        assert asked == [FWD, DX, DW] * 2 + [FWD] and launches[0].extra["feature_tiles"] == 2
    with recording() as launches:
        snnk_block(x, g, w, b, "relu", 0.5, 1.0)
    assert asked[-1] == FWD and len(asked) == 8 and launches[0].config["BLOCK_F"] != 16


def test_eager_calls_skip_the_custom_op(device):
    """Eager code runs the fused kernels through a plain autograd.Function (no custom-op dispatch, the host time the
    rational and the GR-KAN linear already save), with the same launches and gradients; torch.compile still sees the
    op (``test_compiled_block_holds_the_fused_op``)."""
    x, g, w, b = _inputs((5,), 16, 24, 8, "exp", torch.float32, device)
    floor, scale = _params("exp")
    y = snnk_block(x, g, w, b, "exp", floor, scale)
    assert type(y.grad_fn).__name__ == "_SNNKBlockBackward"
    _check(x, g, w, b, "exp")
    with recording() as launches:
        grads = torch.autograd.grad(snnk_block(x.detach(), g, w, None, "exp", floor, scale).sum(), (w,))
    assert [launch.kernel for launch in launches] == [FWD, DW]  # no input gradient asked: no dx launch
    torch.testing.assert_close(
        grads[0], torch.autograd.grad(snnk_block_ref(x.detach(), g, w, None, "exp", floor, scale).sum(), (w,))[0]
    )
