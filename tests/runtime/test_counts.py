"""Hand-counted FLOPs and ideal bytes: the rational, matmuls and the layers, against numbers worked out by hand."""

import pytest
import torch
from torch import nn

from kanc.nn import GRKANLinear, GroupRational, SNNKMlp
from kanc.runtime.counts import (
    CallShapes,
    linear_counts,
    matmul_counts,
    module_counts,
    rational_backward_flops,
    rational_counts,
    rational_forward_flops,
)


def test_rational_flops_per_element_match_design_md():
    # docs/numbers.md: 21 FLOPs forward, ~65 backward at the default degrees (5, 4)
    assert rational_forward_flops(5, 4) == 21
    assert rational_backward_flops(5, 4) == 65


def test_rational_flops_follow_the_degrees():
    # (3, 2) by the documented terms: forward P 6 + |x| 1 + Q 4 + 1 + division 1 = 13;
    # backward powers 4, P and Q 10, P' 4, sign Q' 3, r/gq/y/dx 6, da 3, db 3, accumulations 6 = 39
    assert rational_forward_flops(3, 2) == 13
    assert rational_backward_flops(3, 2) == 39
    assert rational_forward_flops(4, 0) == 8  # a polynomial: no Q, no division
    with pytest.raises(ValueError):
        rational_forward_flops(-1, 2)


def test_rational_counts_bytes_by_hand():
    # 1000 bf16 elements, G = 8 groups of (5, 4) fp32 coefficients: 8 * 10 * 4 = 320 coefficient bytes
    fwd = rational_counts(1000, 2, 8, (5, 4), "forward")
    assert (fwd.flops, fwd.bytes, fwd.matmul_flops) == (21_000, 2 * 1000 * 2 + 320, 0)
    bwd = rational_counts(1000, 2, 8, (5, 4), "backward")
    assert (bwd.flops, bwd.bytes) == (65_000, 3 * 1000 * 2 + 2 * 320)  # x, dy, dx; read coefs, write their grads
    # per element, the coefficients vanish: 4 B forward and 6 B backward in bf16 (docs/numbers.md)
    big = 128 * 197 * 3072
    assert rational_counts(big, 2, 8).bytes / big == pytest.approx(4, rel=1e-5)
    assert rational_counts(big, 2, 8, direction="backward").bytes / big == pytest.approx(6, rel=1e-5)
    assert rational_counts(big, 2, 8).intensity == pytest.approx(21 / 4, rel=1e-5)


def test_matmul_counts_by_hand():
    c = matmul_counts(128, 64, 32, itemsize=2)
    assert c.flops == 2 * 128 * 64 * 32 == 524_288
    assert c.bytes == (128 * 32 + 32 * 64 + 128 * 64) * 2 == 28_672
    assert c.matmul_flops == c.flops and c.vector_flops == 0


def test_linear_counts_forward_and_backward_by_hand():
    m, k, n = 10, 6, 4  # fp32
    fwd = linear_counts(m, k, n, 4, bias=True)
    assert fwd.flops == 2 * m * n * k + m * n  # matmul + bias
    assert fwd.bytes == (m * k + k * n + m * n + n) * 4
    bwd = linear_counts(m, k, n, 4, bias=True, direction="backward")
    assert bwd.flops == 2 * (2 * m * n * k) + m * n  # dx, dW, db
    assert bwd.bytes == (m * n + n * k + m * k + m * k + n * k + n) * 4  # dy, W, dx, x, dW, db
    frozen = linear_counts(m, k, n, 4, bias=True, direction="backward", weight_grad=False)
    assert frozen.flops == 2 * m * n * k and frozen.bytes == (m * n + n * k + m * k) * 4


def _call(x, y=None, children=()):
    return CallShapes(
        tuple(x.shape), x.dtype, tuple(y.shape) if y is not None else None, None, True, frozenset(children)
    )


def test_module_counts_group_rational_and_linear():
    x = torch.randn(4, 5, 16)
    rational = GroupRational(16, groups=4, degrees=(5, 4))
    c = module_counts(rational, _call(x), "forward")
    assert c.flops == 320 * 21 and c.bytes == 320 * 2 * 4 + 4 * 10 * 4
    linear = nn.Linear(16, 8)
    c = module_counts(linear, _call(x), "forward")
    assert c.flops == 2 * 20 * 8 * 16 + 20 * 8 and c.matmul_flops == 2 * 20 * 8 * 16


def test_grkan_linear_counts_only_its_matmul_when_the_rational_ran_as_a_module():
    x = torch.randn(20, 16)
    layer = GRKANLinear(16, 8, groups=4)
    separate = module_counts(layer, _call(x, children={"rational"}), "forward")
    assert separate == module_counts(nn.Linear(16, 8), _call(x), "forward")
    # fused (kanc::grkan_linear): rational + matmul FLOPs, and F(x) never written nor read back
    fused = module_counts(layer, _call(x), "forward")
    assert fused.flops == 20 * 16 * 21 + 2 * 20 * 8 * 16 + 20 * 8
    assert fused.bytes == (20 * 16 + 16 * 8 + 20 * 8 + 8) * 4 + 4 * 10 * 4  # x, W, y, b; coefficients


def test_snnk_block_counts_by_hand():
    x = torch.randn(10, 6)  # rows 10, d 6; m 8 relu features, d_out 3, fp32
    block = SNNKMlp(6, 3, 8, kind="relu")
    c = module_counts(block, _call(x), "forward")
    proj, readout = 2 * 10 * 8 * 6, 2 * 10 * 8 * 3
    assert c.matmul_flops == proj + readout
    assert c.flops == proj + readout + 10 * 8 * 2 + 10 * 3  # relu and scale per feature, bias
    assert c.bytes == (10 * 6 + 8 * 6 + 8 * 3 + 3 + 10 * 3) * 4  # x, G, W, b, y (Phi stays on chip)


def test_unknown_modules_are_not_counted():
    class Custom(nn.Module):
        def forward(self, x):
            return x * 2

    assert module_counts(Custom(), _call(torch.randn(3)), "forward") is None
