"""The gradient convention at b = 0: d|b|/db = +1 (never sign(0) = 0), so identity rationals learn.

An identity-initialised rational has every denominator coefficient b = 0. With sign(0) = 0 its denominator
gradient would be exactly zero forever; the convention makes the gradient the right-hand derivative, which a
one-sided finite difference measures independently of autograd.
"""

import sys
from pathlib import Path

import pytest
import torch

import kanc
from kanc.codegen import group_rational, rational_ref
from kanc.nn import GRKANMlp, GroupRational

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from digits_vit import ViT  # noqa: E402


def _one_sided(loss_of_den, den: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Right-hand finite difference of a scalar loss in every denominator entry, in float64."""
    base = loss_of_den(den)
    grads = torch.zeros_like(den)
    for idx in range(den.numel()):
        bumped = den.clone()
        bumped.view(-1)[idx] += eps
        grads.view(-1)[idx] = (loss_of_den(bumped) - base) / eps
    return grads


@pytest.mark.parametrize("fn", [rational_ref, group_rational])
def test_denominator_gradient_at_zero_is_the_right_hand_derivative(fn):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(33, 24, generator=gen, dtype=torch.float64)
    w = torch.randn(33, 24, generator=gen, dtype=torch.float64)
    layer = GroupRational(24, groups=4, init="gelu")
    num = layer.numerator.detach().double()
    den = torch.zeros(4, 4, dtype=torch.float64)  # b = 0 exactly, as in the identity init
    loss = lambda d: (fn(x, num, d) * w).sum()

    d = den.clone().requires_grad_()
    loss(d).backward()
    expected = _one_sided(loss, den)
    assert torch.isfinite(d.grad).all()
    assert (d.grad != 0).all(), "the denominator gradient at b = 0 must not vanish"
    torch.testing.assert_close(d.grad, expected, rtol=1e-4, atol=1e-4)


def test_grkan_mlp_fc1_denominator_learns():
    """GRKANMlp's fc1 rational is the identity (b = 0): its denominator gradient is non-zero and correct."""
    torch.manual_seed(0)
    mlp = GRKANMlp(24, 48)
    den = mlp.fc1.rational.denominator
    assert torch.count_nonzero(den) == 0, "fc1 starts as the identity"
    x = torch.randn(16, 24)
    mlp(x).square().sum().backward()
    assert den.grad is not None and torch.count_nonzero(den.grad) == den.numel()


def test_one_step_moves_every_rational_of_a_converted_vit():
    torch.manual_seed(0)
    vit = ViT(dim=32, depth=2, heads=2, mlp_ratio=2.0).eval()
    kan = kanc.compile(vit, target="grkan", example_inputs=(torch.randn(4, 1, 8, 8),))
    rationals = {n: m for n, m in kan.named_modules() if isinstance(m, GroupRational)}
    assert len(rationals) == 4, sorted(rationals)  # fc1 and fc2 of each of the two blocks
    before = {n: (m.numerator.detach().clone(), m.denominator.detach().clone()) for n, m in rationals.items()}
    kan.train()
    opt = torch.optim.SGD(kan.parameters(), lr=1e-2)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    torch.nn.functional.cross_entropy(kan(x), y).backward()
    opt.step()
    for name, m in rationals.items():
        num0, den0 = before[name]
        assert not torch.equal(m.numerator, num0), f"{name}: numerator did not move"
        assert not torch.equal(m.denominator, den0), f"{name}: denominator did not move"
