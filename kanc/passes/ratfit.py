"""Fitting a block's rational to its activation where that block's pre-activations actually lie.

The shipped fits (kanc.nn.fit) are near-minimax on [-6, 6]: about 3e-3 absolute error everywhere, including at 0.
A block whose pre-activations are small (any freshly initialised transformer: std ~0.1) then sees that error as
a few percent of its output. ``fit_to_samples`` starts from the shipped fit and minimises the squared error on
the block's own pre-activation samples, plus a small weight on the whole [-6, 6] grid so the curve stays close to
the activation outside the sampled range (tails stay linear; no blow-up when fine-tuning moves the inputs).
The denominator is optimised through its square root (b = root^2), which has no kink where a b_k reaches 0.

The loss and its gradient are computed in closed form (``_Loss``) rather than by autograd through
``rational_ref``: a converted model fits one rational per block, and autograd's per-op bookkeeping over ~20 small
ops per evaluation was most of a fit's time. ``tests/passes/test_ratfit.py`` checks both against autograd through
``rational_ref``, the definition the layers use.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from kanc.nn.fit import DEFAULT_INTERVAL
from kanc.passes import lbfgs

GRID_WEIGHT = 0.05
GRID_POINTS = 2001
BINS = 4096
# L-BFGS iterations: the fit converges in ~140 evaluations at degrees (5, 4), ~500 at (7, 6), ~1100 at (9, 8).
MAX_ITER = 2000
# The fit stops when a step lowers the loss (a relative squared error: the same scale for every block) by less than
# this. At 1e-9 GELU fits stopped on a plateau: 3 of 4 GPT-2 medium blocks at 2.9x the held-out error they reach at
# 1e-11 (3.6e-6 against 1.25e-6); GELU(erf) (5, 4) on N(0, 0.5) samples 5.8e-6 against 1.3e-6. Measured on this
# project's CPU machine, 1e-11 cost 30% more fit time over 54 activation, degree and scale cases (benchmarks/README).
TOLERANCE_CHANGE = 1e-11


class _Loss:
    """sum_i w_i (P(x_i) / Q(x_i) - y_i)^2 over the samples and the grid, with P(x) = sum_k a_k x^k and
    Q(x) = 1 + sum_k root_k^2 |x|^k (k >= 1): the rational of ``rational_ref`` with b = root^2 >= 0 (so |b| = b).
    The samples' squared error is averaged (each sample counted ``counts`` times; default once) and scaled by their
    mean square target, the grid's likewise and weighted by GRID_WEIGHT, as one weighted sum. The powers of x are
    built once."""

    def __init__(
        self, z: Tensor, fz: Tensor, grid: Tensor, fg: Tensor, m: int, n: int, counts: Tensor | None = None
    ) -> None:
        counts = torch.ones_like(z) if counts is None else counts.to(z.dtype)
        total = float(counts.sum())
        scale_z, scale_g = float((counts * fz.square()).sum()) / total + 1e-12, float(fg.square().mean()) + 1e-12
        x = torch.cat([z, grid])
        self.y = torch.cat([fz, fg])
        self.w = torch.cat(
            [counts / (total * scale_z), grid.new_full(grid.shape, GRID_WEIGHT / (grid.numel() * scale_g))]
        )
        self.powers = torch.stack([x**k for k in range(m + 1)], 1)  # (N, m + 1): P's columns
        ax = x.abs()
        self.abs_powers = torch.stack([ax**k for k in range(1, n + 1)], 1) if n else x.new_zeros(x.numel(), 0)

    def value(self, num: Tensor, root: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(loss, d loss / d num, d loss / d root)."""
        p = self.powers @ num
        q = 1.0 + self.abs_powers @ root.square()
        f = p / q
        wr = self.w * (f - self.y)
        loss = (wr * (f - self.y)).sum()
        g = 2.0 * wr / q  # d loss / d P at each point
        return loss, self.powers.T @ g, (self.abs_powers.T @ (-g * f)) * (2.0 * root)


def fit_to_samples(
    fn: Callable[[Tensor], Tensor], start: tuple[Tensor, Tensor], samples: Tensor
) -> tuple[Tensor, Tensor]:
    """(numerator, denominator) float32, refined from ``start`` for pre-activation ``samples`` (any shape): every
    finite sample counts, binned (``_bins``)."""
    z = samples.detach().reshape(-1).cpu()
    z = z[torch.isfinite(z)]
    if z.numel() == 0:
        return start
    z, counts = _bins(z)
    grid = torch.linspace(*DEFAULT_INTERVAL, GRID_POINTS, dtype=torch.float64)
    with torch.no_grad():
        fz, fg = fn(z).double(), fn(grid).double()
    if not (torch.isfinite(fz).all() and torch.isfinite(fg).all()):
        return start
    loss = _Loss(z, fz, grid, fg, start[0].numel() - 1, start[1].numel(), counts)
    m = start[0].numel()
    # Optimised as b = root^2: F uses |b|, whose kink at b = 0 stalls L-BFGS when a coefficient gets there (a (7, 6)
    # ReLU fit stopped at 70x the loss it reaches this way, and worse than (5, 4)). root^2 is smooth everywhere.
    x0 = torch.cat([start[0].detach().double().reshape(-1), start[1].detach().double().abs().sqrt().reshape(-1)])

    def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
        v = torch.from_numpy(x)
        value, d_num, d_root = loss.value(v[:m], v[m:])
        return float(value), torch.cat([d_num, d_root]).numpy()

    # DisableTorchFunction: the fit's tensors are its own plain fp64 ones; a caller's TorchFunctionMode (the layer
    # walk's LayerGemms) would only add a Python dispatch to each of its small ops
    with torch.no_grad(), torch._C.DisableTorchFunction():
        fit = lbfgs.minimize(
            objective, x0.numpy(), max_iter=MAX_ITER, tolerance_grad=1e-12, tolerance_change=TOLERANCE_CHANGE
        )
    if not fit.f < fit.f0 or not np.isfinite(fit.x).all():
        return start
    num, root = torch.from_numpy(fit.x[:m]), torch.from_numpy(fit.x[m:])
    return num.reshape(start[0].shape).float(), root.square().reshape(start[1].shape).float()


def _bins(z: Tensor) -> tuple[Tensor, Tensor]:
    """Finite samples ``z`` as at most BINS fp64 points with counts: the mean of the samples in each bin and how many
    fell there (empty bins dropped). The bins are equal in sign(z) log(1 + |z| / s), s the median |z| (of every
    n-th sample; the mean |z| when that is 0): near 0 a bin is s times the range of log(1 + |z| / s) over BINS
    wide, and wider in proportion to |z| in the tails. Outliers widen the bins of the bulk only logarithmically:
    0.15% of s for normal samples, 0.5% with ten of 300,000 at 900 s (a transformer's massive activations), 6% with
    ten near float32's limit. The loss is a smooth function of x: a bin's mean stands for its samples to within a
    relative error of the order of the bin's width squared."""
    points = z.double()
    if z.numel() <= BINS:
        return points, torch.ones_like(points)
    size = points.abs()  # fp64: |z| / s stays finite for any float32 z
    s = float(size[:: max(1, z.numel() // 8192)].median()) or float(size.mean()) or 1.0
    u = torch.log1p(size / s).copysign(points)
    lo, hi = float(u.min()), float(u.max())
    if hi <= lo:
        return points[:1], points.new_full((1,), z.numel())
    index = ((u - lo) * (BINS / (hi - lo))).long().clamp_(max=BINS - 1)
    counts = torch.bincount(index, minlength=BINS).double()
    sums = torch.bincount(index, weights=points, minlength=BINS)
    kept = counts > 0
    return sums[kept] / counts[kept], counts[kept]
