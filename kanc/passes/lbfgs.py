"""L-BFGS with a strong Wolfe line search, for the few parameters of one rational fit.

The algorithm, its defaults and its stopping rules are those of ``torch.optim.LBFGS(line_search_fn="strong_wolfe")``
(lr 1, history 100), which kanc's fits used before: the same iterates up to the rounding of the sums. What differs
is the cost of a step: torch's optimizer does each vector operation of its two-loop recursion as a tensor op (about
9000 of them in a (5, 4) GELU fit, 55 of its 100 ms), where a rational's 10 coefficients are better served by NumPy
(a few microseconds per step), and it imports ``torch._dynamo`` when first built (1.3-1.9 s on this project's CPU
machine). Measured on that machine: ``benchmarks/README.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Objective = Callable[[np.ndarray], tuple[float, np.ndarray]]  # x -> (f(x), grad f(x))

C1, C2 = 1e-4, 0.9  # sufficient decrease and curvature constants of the Wolfe conditions
MAX_LINE_SEARCH = 25


@dataclass
class Result:
    x: np.ndarray  # where it stopped
    f: float  # f there
    f0: float  # f at the start
    evaluations: int
    iterations: int


def minimize(
    fun: Objective,
    x0: np.ndarray,
    *,
    max_iter: int,
    tolerance_grad: float = 1e-7,
    tolerance_change: float = 1e-9,
    history: int = 100,
    max_eval: int | None = None,
) -> Result:
    """Minimise ``fun`` from ``x0`` (float64); stops as torch's LBFGS.step does: at ``max_iter`` iterations or
    ``max_eval`` evaluations (default 1.25 max_iter), a gradient below ``tolerance_grad`` (max norm), or a step, a
    change of f or a directional derivative below ``tolerance_change``."""
    max_eval = max_iter * 5 // 4 if max_eval is None else max_eval
    x = np.array(x0, dtype=np.float64)
    f, g = fun(x)
    f0, evaluations, iterations = f, 1, 0
    if np.abs(g).max() <= tolerance_grad:
        return Result(x, f, f, evaluations, iterations)
    steps: list[np.ndarray] = []  # s_i = x_{i+1} - x_i
    changes: list[np.ndarray] = []  # y_i = g_{i+1} - g_i
    rho: list[float] = []
    scale = 1.0  # H_0 = scale * I: s.y / y.y of the latest pair
    d, t, g_prev = -g, 1.0, None
    while iterations < max_iter:
        iterations += 1
        if g_prev is not None:
            y, s = g - g_prev, d * t
            ys = float(y @ s)
            if ys > 1e-10:  # a pair that keeps the update positive definite
                if len(steps) == history:
                    steps.pop(0), changes.pop(0), rho.pop(0)
                steps.append(s), changes.append(y), rho.append(1.0 / ys)
                scale = ys / float(y @ y)
            d = _two_loop(g, steps, changes, rho, scale)
        g_prev, f_prev = g, f
        t = min(1.0, 1.0 / float(np.abs(g).sum())) if iterations == 1 else 1.0
        gtd = float(g @ d)
        if gtd > -tolerance_change:
            break
        f, g, t, used = _strong_wolfe(fun, x, t, d, f, g, gtd, tolerance_change)
        x = x + t * d
        evaluations += used
        if iterations == max_iter or evaluations >= max_eval or np.abs(g).max() <= tolerance_grad:
            break
        if np.abs(d * t).max() <= tolerance_change or abs(f - f_prev) < tolerance_change:
            break
    return Result(x, f, f0, evaluations, iterations)


def _two_loop(
    g: np.ndarray, steps: list[np.ndarray], changes: list[np.ndarray], rho: list[float], scale: float
) -> np.ndarray:
    """-H g for the L-BFGS inverse Hessian H of the stored pairs, from H_0 = scale * I."""
    q = -g
    alpha = [0.0] * len(steps)
    for i in range(len(steps) - 1, -1, -1):
        alpha[i] = float(steps[i] @ q) * rho[i]
        q = q - alpha[i] * changes[i]
    r = q * scale
    for i in range(len(steps)):
        beta = float(changes[i] @ r) * rho[i]
        r = r + (alpha[i] - beta) * steps[i]
    return r


def _cubic_min(
    x1: float, f1: float, g1: float, x2: float, f2: float, g2: float, bounds: tuple[float, float] | None = None
) -> float:
    """The minimiser of the cubic through (x1, f1, g1) and (x2, f2, g2), clipped to ``bounds`` (default: between
    the two points); the middle of the bounds when the cubic has no minimum."""
    lo, hi = bounds if bounds is not None else (min(x1, x2), max(x1, x2))
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    square = d1 * d1 - g1 * g2
    if square < 0:
        return (lo + hi) / 2.0
    d2 = math.sqrt(square)
    if x1 <= x2:
        at = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
    else:
        at = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
    return min(max(at, lo), hi)


def _strong_wolfe(
    fun: Objective, x: np.ndarray, t: float, d: np.ndarray, f: float, g: np.ndarray, gtd: float, tolerance: float
) -> tuple[float, np.ndarray, float, int]:
    """A step t along d meeting the strong Wolfe conditions (bracketing, then zooming by cubic interpolation);
    returns (f, grad, t, evaluations) at the step taken."""
    d_norm = float(np.abs(d).max())
    f_new, g_new = fun(x + t * d)
    used = 1
    gtd_new = float(g_new @ d)
    t_prev, f_prev, g_prev, gtd_prev = 0.0, f, g, gtd
    done = False
    tries = 0
    while tries < MAX_LINE_SEARCH:  # bracket a step that meets the conditions
        if f_new > f + C1 * t * gtd or (tries > 1 and f_new >= f_prev):
            bracket = [(t_prev, f_prev, g_prev, gtd_prev), (t, f_new, g_new, gtd_new)]
            break
        if abs(gtd_new) <= -C2 * gtd:
            bracket, done = [(t, f_new, g_new, gtd_new)], True
            break
        if gtd_new >= 0:
            bracket = [(t_prev, f_prev, g_prev, gtd_prev), (t, f_new, g_new, gtd_new)]
            break
        step = _cubic_min(t_prev, f_prev, gtd_prev, t, f_new, gtd_new, bounds=(t + 0.01 * (t - t_prev), t * 10))
        t_prev, f_prev, g_prev, gtd_prev = t, f_new, g_new, gtd_new
        t = step
        f_new, g_new = fun(x + t * d)
        used += 1
        gtd_new = float(g_new @ d)
        tries += 1
    if tries == MAX_LINE_SEARCH:
        bracket = [(0.0, f, g, gtd), (t, f_new, g_new, gtd_new)]
    low, high = (0, 1) if bracket[0][1] <= bracket[-1][1] else (1, 0)
    stalled = False
    while not done and tries < MAX_LINE_SEARCH:  # zoom into the bracket
        (a, fa, _, ga), (b, fb, _, gb) = bracket
        if abs(b - a) * d_norm < tolerance:
            break
        t = _cubic_min(a, fa, ga, b, fb, gb)
        top, bottom = max(a, b), min(a, b)
        eps = 0.1 * (top - bottom)
        if min(top - t, t - bottom) < eps:  # too close to an end: after a second time, step 10% in
            if stalled or t >= top or t <= bottom:
                t = top - eps if abs(t - top) < abs(t - bottom) else bottom + eps
                stalled = False
            else:
                stalled = True
        else:
            stalled = False
        f_new, g_new = fun(x + t * d)
        used += 1
        gtd_new = float(g_new @ d)
        tries += 1
        point = (t, f_new, g_new, gtd_new)
        if f_new > f + C1 * t * gtd or f_new >= bracket[low][1]:
            bracket[high] = point
            low, high = (0, 1) if bracket[0][1] <= bracket[1][1] else (1, 0)
        else:
            if abs(gtd_new) <= -C2 * gtd:
                done = True
            elif gtd_new * (bracket[high][0] - bracket[low][0]) >= 0:
                bracket[high] = bracket[low]
            bracket[low] = point
    t, f_new, g_new, _ = bracket[low]
    return f_new, g_new, t, used
