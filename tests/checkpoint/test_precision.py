"""Fp32Gemm: half-precision linear layers on the CPU as fp32 GEMMs rounded to their dtype, each weight cast once."""

import torch
import torch.nn.functional as F

from kanc.checkpoint.precision import Fp32Gemm


def _operands(dtype):
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=gen).to(dtype) for shape in ((6, 64), (48, 64), (48,)))
    return x, w, b


def test_half_linears_are_fp32_gemms_rounded_to_their_dtype():
    for dtype in (torch.bfloat16, torch.float16):
        x, w, b = _operands(dtype)
        with Fp32Gemm():
            got = F.linear(x, w, b)
        want = F.linear(x.float(), w.float(), b.float()).to(dtype)
        assert got.dtype == dtype and torch.equal(got, want)
        native = F.linear(x, w, b)  # the CPU's own half GEMM accumulates in fp32 too: equal up to the sums' order
        assert (got.float() - native.float()).abs().max() <= 2 * native.float().abs().max() * 2**-7


def test_each_weight_is_cast_once_per_layer_and_other_dtypes_pass_through():
    x, w, b = _operands(torch.bfloat16)
    layer = torch.nn.Linear(64, 48).to(torch.bfloat16)
    with torch.no_grad(), Fp32Gemm() as gemm:
        first, again = layer(x), layer(x)
        assert torch.equal(first, again) and len(gemm._casts) == 1
        gemm.clear()
        assert gemm._casts == {}
        x32, w32, b32 = _operands(torch.float32)
        assert torch.equal(F.linear(x32, w32, b32), torch.addmm(b32, x32, w32.t())) and gemm._casts == {}


def test_the_walk_enters_fp32gemm_only_for_half_precision_models():
    """A mode's Python dispatch on every op (the fit's thousands) costs time: an fp32 model walks without it."""
    from torch.overrides import _get_current_function_mode

    from kanc.checkpoint.walk import LayerWalk

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4)])

        def forward(self, x):
            return self.layers[0](x)

    class Seen(LayerWalk):
        def before(self, name, layer, inputs):
            self.mode = _get_current_function_mode()

    for dtype, want in ((torch.float32, False), (torch.bfloat16, True)):
        walk = Seen(Model().to(dtype))
        walk.walk({"x": torch.ones(2, 4, dtype=dtype)})
        assert isinstance(walk.mode, Fp32Gemm) is want


def test_the_rational_fit_bypasses_the_walks_mode_with_the_same_result():
    """The fit's thousands of small fp64 ops skip a caller's TorchFunctionMode (Fp32Gemm in a bf16 walk)."""
    from torch.overrides import TorchFunctionMode

    from kanc.nn.fit import rational_coefficients
    from kanc.passes.ratfit import fit_to_samples

    class Count(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    samples = 0.1 * torch.randn(4000, generator=torch.Generator().manual_seed(0))
    start = rational_coefficients("gelu", (5, 4))
    alone = fit_to_samples(F.gelu, start, samples)
    with Count():
        inside = fit_to_samples(F.gelu, start, samples)
    assert all(torch.equal(a, b) for a, b in zip(alone, inside))
    assert 0 < Count.calls < 1000  # the set-up only (~200); with the L-BFGS loop, ~11000
