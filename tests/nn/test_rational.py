"""GroupRational / GRKANLinear against an independent per-group, per-power loop formulation."""

import pytest
import torch

from kanc.codegen import group_rational
from kanc.nn import GRKANLinear, GroupRational
from kanc.testing import assert_equivalent


def loop_rational(x, num, den):
    """Straightforward definition: for each group g, sum a_k x^k / (1 + sum |b_k| |x|^k), in float64."""
    groups, width = den.shape[0], x.shape[-1] // den.shape[0]
    xd = x.double()
    out = []
    for g in range(groups):
        xg = xd[..., g * width : (g + 1) * width]
        p = sum(num[g, k].double() * xg**k for k in range(num.shape[1]))
        q = 1 + sum(den[g, k].double().abs() * xg.abs() ** (k + 1) for k in range(den.shape[1]))
        out.append(p / q)
    return torch.cat(out, -1).to(x.dtype)


def _random_layer(channels, groups, shared=False, degrees=(5, 4), seed=0):
    torch.manual_seed(seed)
    layer = GroupRational(channels, groups, degrees, init="gelu", shared_numerator=shared)
    with torch.no_grad():  # perturb, so that every coefficient matters and signs of b vary
        layer.numerator.add_(0.1 * torch.randn_like(layer.numerator))
        layer.denominator.add_(0.3 * torch.randn_like(layer.denominator))
    return layer


@pytest.mark.parametrize("shape,groups", [((3, 45, 64), 8), ((1151, 96), 8), ((7, 48), 3), ((5, 2, 3, 12), 12)])
@pytest.mark.parametrize("shared", [False, True])
def test_forward_backward_vs_loop(shape, groups, shared):
    layer = _random_layer(shape[-1], groups, shared)
    x = (2 * torch.randn(shape)).requires_grad_()
    num = layer.numerator.detach().clone().requires_grad_()
    den = layer.denominator.detach().clone().requires_grad_()
    # the layer path: gradients reach the parameters themselves
    out = layer(x)
    ref = loop_rational(x, layer.numerator.expand(groups, -1), layer.denominator)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    out.backward(g)
    ref_grads = torch.autograd.grad(loop_rational(x, num.expand(groups, -1), den), (x, num, den), g)
    torch.testing.assert_close(x.grad, ref_grads[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.numerator.grad, ref_grads[1], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(layer.denominator.grad, ref_grads[2], atol=1e-3, rtol=1e-4)


def test_dispatch_entry_point_vs_loop():
    layer = _random_layer(64, 8)
    inputs = [torch.randn(3, 45, 64), layer.numerator.detach(), layer.denominator.detach()]
    inputs = [t.clone().requires_grad_() for t in inputs]
    assert_equivalent(group_rational, loop_rational, inputs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shared", [False, True])
def test_gradcheck_float64(shared):
    layer = _random_layer(12, 3, shared).double()
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)

    def fn(x, num, den):
        from kanc.codegen import rational_ref

        return rational_ref(x, num.expand(3, -1), den)

    assert torch.autograd.gradcheck(fn, (x, layer.numerator.detach().requires_grad_(), layer.denominator.detach()))
    den = layer.denominator.detach().clone()
    den[den.abs() < 0.05] = 0.2  # |b| is not differentiable at 0: keep gradcheck's steps away from it
    assert torch.autograd.gradcheck(fn, (x, layer.numerator.detach(), den.requires_grad_()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_keep_input_dtype_and_fp32_math(dtype):
    layer = _random_layer(64, 8)
    x = (3 * torch.randn(9, 64)).to(dtype)
    out = layer(x)
    assert out.dtype == dtype
    expected = loop_rational(x.double(), layer.numerator.detach(), layer.denominator.detach()).to(dtype)
    atol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out, expected, atol=atol * 10, rtol=atol)


def test_fp16_large_inputs_do_not_overflow():
    layer = GroupRational(16, 4, init="gelu")
    x = torch.full((2, 16), 12.0, dtype=torch.float16)  # x^5 = 248832 > fp16 max 65504
    out = layer(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), torch.nn.functional.gelu(x.float()), atol=0.05, rtol=5e-3)


def test_extreme_inputs_propagate_without_crashing():
    layer = _random_layer(8, 2)
    x = torch.tensor([[1e4, -1e4, float("inf"), float("-inf"), float("nan"), 0.0, 1.0, -1.0]], requires_grad=True)
    out = layer(x)
    assert torch.isfinite(out[0, :2]).all()
    assert torch.isnan(out[0, 4])
    assert torch.equal(torch.isfinite(out[0, 5:]), torch.tensor([True, True, True]))
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad[0, 5:]).all()


def test_errors():
    with pytest.raises(ValueError, match="multiple of groups"):
        GroupRational(10, groups=4)
    with pytest.raises(ValueError, match="last dimension 16"):
        GroupRational(16, 4)(torch.randn(3, 12))
    with pytest.raises(ValueError, match="unknown rational init"):
        GroupRational(16, 4, init="nope")


def test_state_dict_round_trip():
    for make in (lambda: _random_layer(32, 4, shared=True), lambda: GRKANLinear(32, 7, groups=4, act_init="silu")):
        torch.manual_seed(1)
        a = make()
        b = GRKANLinear(32, 7, groups=4) if isinstance(a, GRKANLinear) else GroupRational(32, 4, shared_numerator=True)
        b.load_state_dict(a.state_dict())
        x = torch.randn(5, 32)
        assert torch.equal(a(x), b(x))


def test_grkan_linear_is_linear_of_rational():
    lin = GRKANLinear(24, 10, groups=3, act_init="tanh")
    x = torch.randn(4, 6, 24)
    expected = torch.nn.functional.linear(
        loop_rational(x, *[t.detach() for t in lin.rational.coefficients()]), lin.weight, lin.bias
    )
    torch.testing.assert_close(lin(x), expected, atol=1e-5, rtol=1e-5)
    assert GRKANLinear(24, 10, bias=False, groups=3).bias is None


def test_torch_compile_fullgraph_cpu():
    layer = _random_layer(32, 4)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(6, 32, requires_grad=True)
    torch.testing.assert_close(compiled(x), layer(x))
    compiled(x).sum().backward()
    assert layer.numerator.grad is not None


@pytest.mark.slow
def test_torch_compile_inductor_cpu():
    """Inductor works on this CPU machine (C++ codegen, ~10-20 s cold): forward and every gradient match eager."""
    layer = _random_layer(32, 4)
    compiled = torch.compile(layer, fullgraph=True, backend="inductor")
    inputs = [torch.randn(6, 32, requires_grad=True)]
    assert_equivalent(compiled, layer, inputs)  # forward and input gradient
    layer.zero_grad()  # both sides above accumulated into the shared parameters
    x = inputs[0].detach().requires_grad_()
    compiled(x).square().sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    x2 = inputs[0].detach().requires_grad_()
    layer(x2).square().sum().backward()
    for got, want in zip(grads, [p.grad for p in layer.parameters()]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(x.grad, x2.grad)
