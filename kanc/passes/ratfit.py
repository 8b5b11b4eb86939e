"""Fitting a block's rational to its activation where that block's pre-activations actually lie.

The shipped fits (kanc.nn.fit) are near-minimax on [-6, 6]: about 3e-3 absolute error everywhere, including at 0.
A block whose pre-activations are small (any freshly initialised transformer: std ~0.1) then sees that error as
a few percent of its output. ``fit_to_samples`` starts from the shipped fit and minimises the squared error on
the block's own pre-activation samples, plus a small weight on the whole [-6, 6] grid so the curve stays close to
the activation outside the sampled range (tails stay linear; no blow-up when fine-tuning moves the inputs).
The denominator is optimised through its square root (b = root^2), which has no kink where a b_k reaches 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from kanc.nn.fit import DEFAULT_INTERVAL, evaluate, minimize

GRID_WEIGHT = 0.05
MAX_SAMPLES = 20000
# L-BFGS iterations: the fit converges in ~140 evaluations at degrees (5, 4), ~500 at (7, 6), ~1100 at (9, 8).
MAX_ITER = 2000


def fit_to_samples(
    fn: Callable[[Tensor], Tensor], start: tuple[Tensor, Tensor], samples: Tensor, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """(numerator, denominator) float32, refined from ``start`` for pre-activation ``samples`` (any shape)."""
    z = samples.detach().reshape(-1).double().cpu()
    z = z[torch.isfinite(z)]
    if z.numel() == 0:
        return start
    if z.numel() > MAX_SAMPLES:
        gen = torch.Generator().manual_seed(seed)
        z = z[torch.randperm(z.numel(), generator=gen)[:MAX_SAMPLES]]
    grid = torch.linspace(*DEFAULT_INTERVAL, 2001, dtype=torch.float64)
    with torch.no_grad():
        fz, fg = fn(z).double(), fn(grid).double()
    if not (torch.isfinite(fz).all() and torch.isfinite(fg).all()):
        return start
    num = start[0].detach().double().clone().requires_grad_()
    # Optimised as b = root^2: F uses |b|, whose kink at b = 0 stalls L-BFGS when a coefficient gets there (a (7, 6)
    # ReLU fit stopped at 70x the loss it reaches this way, and worse than (5, 4)). root^2 is smooth everywhere.
    root = start[1].detach().double().abs().sqrt().clone().requires_grad_()
    scale_z, scale_g = float(fz.square().mean()) + 1e-12, float(fg.square().mean()) + 1e-12

    def loss() -> Tensor:
        den = root.square()
        data = (evaluate(num, den, z) - fz).square().mean() / scale_z
        return data + GRID_WEIGHT * (evaluate(num, den, grid) - fg).square().mean() / scale_g

    with torch.no_grad():
        before = float(loss())
    # DisableTorchFunction: the fit's tensors are its own plain fp64 ones; a caller's TorchFunctionMode (the layer
    # walk's Fp32Gemm) would only add a Python dispatch to each of its thousands of small ops
    with torch.random.fork_rng(devices=[]), torch._C.DisableTorchFunction():
        after = minimize([num, root], loss, max_iter=MAX_ITER, tolerance_grad=1e-12, tolerance_change=1e-9)
    if not after < before or not all(torch.isfinite(t).all() for t in (num, root)):
        return start
    return num.detach().float(), root.detach().square().float()
