"""Fused SNNK block kernels against snnk_block_ref: every kind, forward and gradients (x, W, b), dtypes, ragged
sizes (m not a power of two, rows/widths not multiples of the blocks), non-finite inputs, limits that fall back,
custom-op checks and torch.compile of an SNNK block."""

import pytest
import torch

from kanc.codegen import forced_config, recording, snnk_block, snnk_block_ref
from kanc.codegen.snnk import MAX_KERNEL_FEATURES, SNNK_KINDS, snnk_width
from kanc.nn import SNNKMlp
from kanc.testing import assert_equivalent

FWD, BWD = "_snnk_fwd_kernel", "_snnk_bwd_kernel"


def _inputs(rows, d_in, feats, d_out, kind, dtype, device, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows, d_in, generator=gen).to(device, dtype).requires_grad_()
    g = torch.randn(feats, d_in, generator=gen).to(device)  # fixed projection: no gradient
    w = (torch.randn(d_out, snnk_width(feats, kind), generator=gen) / feats**0.5).to(device).requires_grad_()
    b = torch.randn(d_out, generator=gen).to(device).requires_grad_() if bias else None
    return x, g, w, b


def _params(kind):
    return {"relu": (-0.1, 1.0), "exp": (0.0, 0.25), "cos": (0.0, 0.7)}[kind]  # (floor, input_scale)


def _check(x, g, w, b, kind, **tol):
    floor, scale = _params(kind)
    fn = lambda x, w, *b: snnk_block(x, g, w, b[0] if b else None, kind, floor, scale)
    ref = lambda x, w, *b: snnk_block_ref(x, g, w, b[0] if b else None, kind, floor, scale)
    with recording() as launches:
        assert_equivalent(fn, ref, [x, w] + ([b] if b is not None else []), **tol)
    assert [launch.kernel for launch in launches] == [FWD, BWD], "the fused kernels did not run"
    return launches


def _tiles(bm, bd, bn):
    cfg = {"BLOCK_M": bm, "BLOCK_D": bd, "BLOCK_N": bn, "num_warps": 4, "num_stages": 1}
    return forced_config(FWD, cfg), forced_config(BWD, cfg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", SNNK_KINDS)
def test_matches_reference_ragged(kind, dtype, device):
    """rows 3 x 13 = 39 (16-row tiles), d_in 45 and d_out 29 (16-wide chunks), m = 21 (padded to 32)."""
    a, b = _tiles(16, 16, 16)
    with a, b:
        _check(*_inputs((3, 13), 45, 21, 29, kind, dtype, device), kind)


@pytest.mark.parametrize("kind", SNNK_KINDS)
def test_default_configs_without_bias(kind, device):
    _check(*_inputs((70,), 32, 16, 24, kind, torch.float32, device, bias=False), kind)


def test_non_finite_inputs(device):
    x, g, w, b = _inputs((20,), 24, 12, 10, "relu", torch.float32, device)
    with torch.no_grad():
        x[2, 3], x[5, 0], x[9, 9] = float("nan"), float("inf"), -1e3
    _check(x, g, w, b, "relu")


def test_weight_only_gradient_and_layouts(device):
    """x without grad (a first layer) and a transposed-storage weight: dW and db still match."""
    x, g, w, b = _inputs((33,), 20, 8, 12, "exp", torch.float32, device)
    wt = w.detach().t().contiguous().t().requires_grad_()
    floor, scale = _params("exp")
    with recording() as launches:
        assert_equivalent(
            lambda w, b: snnk_block(x.detach(), g, w, b, "exp", floor, scale),
            lambda w, b: snnk_block_ref(x.detach(), g, w, b, "exp", floor, scale),
            [wt, b],
        )
    assert [launch.kernel for launch in launches] == [FWD, BWD]


def test_limits_fall_back_to_the_reference(device):
    """More features than fit on chip, or a projection that wants a gradient: the reference runs, nothing launches."""
    x, g, w, b = _inputs((4,), 8, MAX_KERNEL_FEATURES + 1, 6, "relu", torch.float32, device)
    with recording() as launches:
        snnk_block(x, g, w, b, "relu")
        x2, g2, w2, b2 = _inputs((4,), 8, 4, 6, "relu", torch.float32, device)
        out = snnk_block(x2, g2.requires_grad_(), w2, b2, "relu")
        out.sum().backward()
    assert launches == [] and g2.grad is not None


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
    for has_bias, weight_grad in ((True, True), (False, False)):
        args = (grad, x.detach(), g, w, has_bias, weight_grad, kind, floor, scale)
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
    from kanc.codegen import kernels_disabled

    with kernels_disabled():
        ref = block(x)
        ref.square().sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for got, want in zip(grads, [x.grad, block.linear.weight.grad, block.linear.bias.grad]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    forward, backward = graphs.targets("forward"), graphs.targets("backward")
    assert "kanc.snnk_block.default" in forward and "kanc.snnk_block_backward.default" in backward
    assert not {"aten.exp.default", "aten.mm.default", "aten.addmm.default"} & forward


def test_launch_records(device):
    launches = _check(*_inputs((5,), 16, 10, 7, "cos", torch.float16, device), "cos")
    fwd, bwd = launches
    assert fwd.op == bwd.op == "kanc::snnk_block" and fwd.atomics == bwd.atomics == 0
    assert fwd.extra == {"direction": "forward", "kind": "cos", "BLOCK_F": 16}
    assert bwd.extra["direction"] == "backward" and fwd.dtype == "float16"
