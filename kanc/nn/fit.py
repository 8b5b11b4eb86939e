"""Fitting the safe rational P/Q to an activation, in exactly the form kanc evaluates.

KAT's published GELU coefficients were fitted with another denominator than the one its kernels
evaluate (max error 1.47 on [-3, 3]); here the fit's objective calls ``rational_ref`` itself.

Method (float64; deterministic on one machine, while another BLAS or SIMD width can change the last bits and with
them which local optimum a fit ends in): a linearised least-squares start
(P - f (Q - 1) = f, signed denominator), then L-BFGS on the exact evaluated form under an L_p loss
with p doubling from 2 to 32, which drives the fit towards minimax.
Named activations are shipped precomputed in ``fits.json``; regenerate it with ``python -m kanc.nn.fit --write``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F

from kanc.codegen.rational import rational_ref
from kanc.writing import write_text

TABLE_PATH = Path(__file__).with_name("fits.json")
DEFAULT_DEGREES = (5, 4)
# Fitted on [-6, 6], checked on [-3, 3]: a fit on [-3, 3] alone lets b_n -> 0, so F grows like x^2
# past 3 and deep stacks blow up (24 variance-init GELU blocks: std 3.27 vs 1.40 for exact GELU).
DEFAULT_INTERVAL = (-6.0, 6.0)
DEFAULT_POINTS = 6001

ACTIVATION_FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda x: x,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}
ALIASES = {"swish": "silu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": None}


@dataclass(frozen=True)
class RationalFit:
    """Coefficients of one fit: numerator a_0..a_m, denominator b_1..b_n, and its max error."""

    numerator: tuple[float, ...]
    denominator: tuple[float, ...]
    max_error: float
    interval: tuple[float, float]

    def tensors(self) -> tuple[Tensor, Tensor]:
        return torch.tensor(self.numerator), torch.tensor(self.denominator)


def evaluate(numerator: Tensor, denominator: Tensor, x: Tensor) -> Tensor:
    """One-group rational at points x (1-D), through the same reference the layers use."""
    return rational_ref(x.reshape(-1, 1), numerator.reshape(1, -1), denominator.reshape(1, -1)).reshape(x.shape)


def _linear_start(x: Tensor, y: Tensor, m: int, n: int) -> tuple[Tensor, Tensor]:
    """Least squares of P(x) - y (Q(x) - 1) = y, linear in (a, signed b).

    Solved through the normal equations of the column-scaled design with Gaussian elimination in Python floats:
    MKL's lstsq differs in the last bits from run to run (memory alignment) and L-BFGS amplifies that; the
    column dot products here are single-threaded native reductions, so the start is bitwise reproducible.
    """
    cols = [x**k for k in range(m + 1)] + [-y * x.abs() ** k for k in range(1, n + 1)]
    scale = [float(c.norm()) or 1.0 for c in cols]
    cols = [c / s for c, s in zip(cols, scale)]
    k = len(cols)
    gram = [[float((cols[i] * cols[j]).sum()) for j in range(k)] for i in range(k)]
    rhs = [float((c * y).sum()) for c in cols]
    for i in range(k):
        gram[i][i] += 1e-13  # a whisper of ridge: the scaled Gram matrix has unit diagonal
    sol = _gauss_solve(gram, rhs)
    out = torch.tensor([v / s for v, s in zip(sol, scale)], dtype=torch.float64)
    return out[: m + 1], out[m + 1 :]


def _gauss_solve(matrix: list[list[float]], rhs: list[float]) -> list[float]:
    """Dense solve with partial pivoting in Python floats (tiny systems; deterministic by construction)."""
    k = len(rhs)
    aug = [row[:] + [r] for row, r in zip(matrix, rhs)]
    for col in range(k):
        piv = max(range(col, k), key=lambda r: abs(aug[r][col]))
        aug[col], aug[piv] = aug[piv], aug[col]
        for r in range(col + 1, k):
            f = aug[r][col] / aug[col][col]
            aug[r] = [a - f * b for a, b in zip(aug[r], aug[col])]
    sol = [0.0] * k
    for r in range(k - 1, -1, -1):
        sol[r] = (aug[r][k] - sum(aug[r][c] * sol[c] for c in range(r + 1, k))) / aug[r][r]
    return sol


def minimize(
    params: list[Tensor],
    loss: Callable[[], Tensor],
    *,
    max_iter: int,
    tolerance_grad: float = 1e-14,
    tolerance_change: float = 1e-16,
) -> float:
    """L-BFGS (strong-Wolfe line search) on ``params`` in place; returns the final loss."""
    opt = torch.optim.LBFGS(
        params,
        max_iter=max_iter,
        tolerance_grad=tolerance_grad,
        tolerance_change=tolerance_change,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        value = loss()
        value.backward()
        return value

    opt.step(closure)
    with torch.no_grad():
        return float(loss())


def _refine(a: Tensor, b: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """L-BFGS on the evaluated form, L_p loss with growing p (towards minimax)."""
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    for p in (2, 4, 8, 16, 32):

        def loss(p: int = p) -> Tensor:
            err = evaluate(a, b, x) - y
            scale = err.detach().abs().max() + 1e-30  # keeps |err/scale|^p in range for large p
            return ((err / scale).abs() ** p).mean() ** (1.0 / p) * scale

        minimize([a, b], loss, max_iter=500)
    return a.detach(), b.detach()


def fit_rational(
    fn: Callable[[Tensor], Tensor],
    degrees: tuple[int, int] = DEFAULT_DEGREES,
    interval: tuple[float, float] = DEFAULT_INTERVAL,
    points: int = DEFAULT_POINTS,
) -> RationalFit:
    """Fit F = P/Q (degrees (m, n), Q = 1 + sum |b_k| |x|^k) to ``fn`` on a dense grid of ``interval``."""
    m, n = degrees
    if m < 0 or n < 0:
        raise ValueError(f"degrees must be non-negative, got {degrees}")
    lo, hi = float(interval[0]), float(interval[1])
    if not lo < hi:
        raise ValueError(f"fit interval must have lo < hi, got {interval}")
    x = torch.linspace(lo, hi, points, dtype=torch.float64)
    with torch.no_grad():
        y = fn(x).to(torch.float64)
    if y.shape != x.shape or not torch.isfinite(y).all():
        raise ValueError("the function to fit must map a 1-D tensor to finite values of the same shape")
    with torch.random.fork_rng(devices=[]):  # L-BFGS is deterministic; keep the user's RNG untouched anyway
        a, b = _refine(*_linear_start(x, y, m, n), x, y)
    err = float((evaluate(a, b, x) - y).abs().max())
    return RationalFit(tuple(a.tolist()), tuple(b.abs().tolist()), err, (lo, hi))


def _key(name: str, degrees: tuple[int, int]) -> str:
    return f"{name}/{degrees[0]}/{degrees[1]}"


@lru_cache(maxsize=1)
def _table() -> dict[str, RationalFit]:
    if not TABLE_PATH.exists():
        return {}
    raw = json.loads(TABLE_PATH.read_text())
    return {
        k: RationalFit(tuple(v["numerator"]), tuple(v["denominator"]), v["max_error"], tuple(v["interval"]))
        for k, v in raw["fits"].items()
    }


def canonical_name(name: str) -> str:
    """Map aliases (swish, gelu_new, ...) to a shipped activation name; ValueError when unknown."""
    key = name.lower()
    key = ALIASES.get(key, key) or key
    if key not in ACTIVATION_FUNCTIONS:
        known = ", ".join(sorted(ACTIVATION_FUNCTIONS))
        raise ValueError(f"unknown rational init {name!r}: use one of {known}, or pass a callable")
    return key


@lru_cache(maxsize=64)
def _named_fit(name: str, degrees: tuple[int, int]) -> RationalFit:
    shipped = _table().get(_key(name, degrees))
    return shipped if shipped is not None else fit_rational(ACTIVATION_FUNCTIONS[name], degrees)


def _identity(degrees: tuple[int, int]) -> tuple[Tensor, Tensor]:
    m, n = degrees
    if m < 1:
        raise ValueError(f"the identity needs numerator degree >= 1, got {degrees}")
    num = torch.zeros(m + 1)
    num[1] = 1.0
    return num, torch.zeros(n)


def rational_coefficients(
    init: str | Callable[[Tensor], Tensor], degrees: tuple[int, int] = DEFAULT_DEGREES
) -> tuple[Tensor, Tensor]:
    """(numerator (m+1,), denominator (n,)) float32 coefficients for a named activation or a callable."""
    degrees = (int(degrees[0]), int(degrees[1]))
    if callable(init):
        num, den = fit_rational(init, degrees).tensors()
        return num.float(), den.float()
    name = canonical_name(init)
    if name == "identity":
        return _identity(degrees)
    num, den = _named_fit(name, degrees).tensors()
    return num.float(), den.float()


def build_table(degrees: tuple[tuple[int, int], ...] = (DEFAULT_DEGREES,)) -> dict:
    """Fit every named activation at every degree pair: the content of fits.json."""
    fits = {}
    for deg in degrees:
        for name, fn in ACTIVATION_FUNCTIONS.items():
            if name != "identity":
                fits[_key(name, deg)] = asdict(fit_rational(fn, deg))
    return {
        "about": "Safe rational fits P/Q, Q = 1 + sum |b_k| |x|^k, made by kanc.nn.fit (python -m kanc.nn.fit --write)",
        "interval": list(DEFAULT_INTERVAL),
        "points": DEFAULT_POINTS,
        "fits": fits,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Regenerate or print kanc's shipped rational fits.")
    parser.add_argument("--write", action="store_true", help=f"write {TABLE_PATH.name} (else print it)")
    args = parser.parse_args(argv)
    table = build_table(((5, 4), (4, 4), (3, 2)))
    for key, fit in table["fits"].items():
        print(f"{key:20s} max |F - f| on {DEFAULT_INTERVAL} = {fit['max_error']:.2e}")
    bad = [key for key, fit in table["fits"].items() if not math.isfinite(fit["max_error"])]
    if bad:
        raise SystemExit(f"error: non-finite fit error for {', '.join(bad)}; {TABLE_PATH.name} left as it was")
    if args.write:  # atomic: a stopped run keeps the old table
        write_text(TABLE_PATH, json.dumps(table, indent=1) + "\n", force=True)
        print(f"wrote {TABLE_PATH}")


if __name__ == "__main__":
    main()
