"""kanc.passes.ratfit: the closed-form loss and gradient are those of autograd through rational_ref, and the fit
improves the start where the samples lie."""

import pytest
import torch
from torch.nn import functional as F

from kanc.nn.fit import evaluate, rational_coefficients
from kanc.passes import ratfit


@pytest.mark.parametrize("degrees", [(5, 4), (3, 0), (7, 6)])
def test_closed_form_loss_and_gradient_match_autograd_through_the_reference(degrees):
    gen = torch.Generator().manual_seed(0)
    m, n = degrees
    z = torch.randn(300, generator=gen, dtype=torch.float64) * 1.5
    z[:3] = 0.0  # |x| at 0
    grid = torch.linspace(-6, 6, 41, dtype=torch.float64)
    fz, fg = F.gelu(z), F.gelu(grid)
    num = torch.randn(m + 1, generator=gen, dtype=torch.float64)
    root = torch.randn(n, generator=gen, dtype=torch.float64)
    root[:1] = 0.0  # b = 0 exactly

    loss, d_num, d_root = ratfit._Loss(z, fz, grid, fg, m, n).value(num, root)

    a, r = num.clone().requires_grad_(), root.clone().requires_grad_()
    scale_z, scale_g = float(fz.square().mean()) + 1e-12, float(fg.square().mean()) + 1e-12
    data = (evaluate(a, r.square(), z) - fz).square().mean() / scale_z
    ref = data + ratfit.GRID_WEIGHT * (evaluate(a, r.square(), grid) - fg).square().mean() / scale_g
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(d_num, a.grad, rtol=1e-10, atol=1e-14)
    if n:
        torch.testing.assert_close(d_root, r.grad, rtol=1e-10, atol=1e-14)
    else:
        assert d_root.numel() == 0


@pytest.mark.parametrize(("fn", "name", "scale", "gain"), [(F.gelu, "gelu", 0.1, 0.1), (F.silu, "silu", 0.3, 0.7)])
def test_fit_lowers_the_error_where_the_samples_lie(fn, name, scale, gain):
    start = rational_coefficients(name, (5, 4))
    samples = torch.randn(50000, generator=torch.Generator().manual_seed(1)) * scale
    num, den = ratfit.fit_to_samples(fn, start, samples)
    held = torch.randn(20000, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * scale

    def err(c):
        return float((evaluate(c[0].double(), c[1].double(), held) - fn(held)).square().mean().sqrt())

    assert num.dtype == den.dtype == torch.float32
    assert bool((den >= 0).all())
    assert err((num, den)) < gain * err(start), (err((num, den)), err(start))


def test_nothing_finite_to_fit_returns_the_start():
    start = rational_coefficients("gelu", (5, 4))
    out = ratfit.fit_to_samples(F.gelu, start, torch.full((10,), float("nan")))
    assert out is start


@pytest.mark.parametrize(("fn", "name", "scale", "bound"), [(F.gelu, "gelu", 0.5, 2e-6), (F.gelu, "gelu", 0.1, 1e-6),
                                                           (F.silu, "silu", 0.5, 1e-8)])  # fmt: skip
def test_the_fit_does_not_stop_on_a_plateau(fn, name, scale, bound):
    """L-BFGS stopped at the first step that gained less than 1e-9: GELU (5, 4) on N(0, 0.5) samples at a relative
    squared error of 5.8e-6, on N(0, 0.1) 3.0e-6, SiLU on N(0, 0.5) 2.6e-8; it reaches 1.3e-6, 5.8e-7 and 3.7e-9."""
    start = rational_coefficients(name, (5, 4))
    samples = torch.randn(40000, generator=torch.Generator().manual_seed(1)) * scale
    num, den = ratfit.fit_to_samples(fn, start, samples)
    held = torch.randn(20000, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * scale
    want = fn(held)
    error = float((evaluate(num.double(), den.double(), held) - want).square().mean() / want.square().mean())
    assert error < bound, error


@pytest.mark.parametrize("outliers", [0, 30])
def test_binned_samples_give_the_loss_of_every_sample(outliers):
    """The fit sees its samples as at most BINS bin means with counts: the loss and gradient on them are those on
    every sample, with a few huge outliers (massive activations) too, and near 0 the bins stay narrow."""
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(300000, generator=gen) * 0.7
    z[:outliers] = torch.randn(outliers, generator=gen) * 400
    points, counts = ratfit._bins(z)
    assert points.numel() <= ratfit.BINS and points.dtype == counts.dtype == torch.float64
    assert float(counts.sum()) == z.numel()
    torch.testing.assert_close((points * counts).sum(), z.double().sum(), rtol=1e-12, atol=1e-9)
    bulk = points[points.abs() < 1.0]
    assert float(bulk.diff().max()) < 0.01 * 0.7, float(bulk.diff().max())  # the outliers leave the bulk narrow bins

    grid = torch.linspace(-6, 6, 101, dtype=torch.float64)
    num = rational_coefficients("gelu", (5, 4))[0].double() * 1.1
    root = rational_coefficients("gelu", (5, 4))[1].double().abs().sqrt()
    every = ratfit._Loss(z.double(), F.gelu(z.double()), grid, F.gelu(grid), 5, 4).value(num, root)
    binned = ratfit._Loss(points, F.gelu(points), grid, F.gelu(grid), 5, 4, counts).value(num, root)
    for got, want in zip(binned, every):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=0)


def test_samples_of_one_value_are_one_point():
    points, counts = ratfit._bins(torch.full((10000,), 0.25))
    assert points.tolist() == [0.25] and counts.tolist() == [10000.0]


def test_samples_near_the_float32_limit_leave_the_bulk_its_bins():
    """Ten samples at +-3e38 among 50,000 (their float32 sum overflows, and a float32 |z| / s would): the bulk keeps
    bins of its own (log bins over 89 decades of e: about 0.03 wide near 0), the outliers their own points, and
    every sample is counted."""
    z = torch.randn(50000, generator=torch.Generator().manual_seed(4))
    z[:10] = torch.tensor([3e38, -3e38] * 5)
    points, counts = ratfit._bins(z)
    assert bool(torch.isfinite(points).all()) and float(counts.sum()) == z.numel()
    bulk = points[points.abs() < 1.0]
    assert bulk.numel() > 40 and float(bulk.diff().max()) < 0.1, (bulk.numel(), float(bulk.diff().max()))
    huge = points.abs() > 1e38
    torch.testing.assert_close(points[huge], torch.tensor([-3e38, 3e38], dtype=torch.float64), rtol=1e-6, atol=0)
    assert counts[huge].tolist() == [5.0, 5.0]
