"""Fitting a block's rational to its activation where that block's pre-activations actually lie.

The shipped fits (kanc.nn.fit) are near-minimax on [-6, 6]: about 3e-3 absolute error everywhere, including at 0.
A block whose pre-activations are small (any freshly initialised transformer: std ~0.1) then sees that error as
a few percent of its output. ``fit_to_samples`` starts from the shipped fit and minimises the squared error on
the block's own pre-activation samples, plus a small weight on the whole [-6, 6] grid so the curve stays close to
the activation outside the sampled range (tails stay linear; no blow-up when fine-tuning moves the inputs).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from kanc.nn.fit import DEFAULT_INTERVAL, evaluate

GRID_WEIGHT = 0.05
MAX_SAMPLES = 20000


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
    num, den = (t.detach().double().clone().requires_grad_() for t in start)
    scale_z, scale_g = float(fz.square().mean()) + 1e-12, float(fg.square().mean()) + 1e-12

    def loss() -> Tensor:
        data = (evaluate(num, den, z) - fz).square().mean() / scale_z
        return data + GRID_WEIGHT * (evaluate(num, den, grid) - fg).square().mean() / scale_g

    with torch.no_grad():
        before = float(loss())
    opt = torch.optim.LBFGS([num, den], max_iter=200, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        value = loss()
        value.backward()
        return value

    with torch.random.fork_rng(devices=[]):
        opt.step(closure)
    with torch.no_grad():
        after = float(loss())
    if not after < before or not all(torch.isfinite(t).all() for t in (num, den)):
        return start
    return num.detach().float(), den.detach().abs().float()
