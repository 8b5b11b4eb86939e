"""kanc.passes.lbfgs: torch.optim.LBFGS (strong Wolfe line search) for a few parameters, in NumPy."""

import numpy as np
import pytest
import torch

from kanc.passes import lbfgs


def _rosenbrock(x):
    a, b = x[:-1], x[1:]
    f = float(np.sum(100.0 * (b - a**2) ** 2 + (1 - a) ** 2))
    g = np.zeros_like(x)
    g[:-1] += -400.0 * a * (b - a**2) - 2 * (1 - a)
    g[1:] += 200.0 * (b - a**2)
    return f, g


def _torch_lbfgs(fun, x0, **kwargs):
    """What kanc's fits ran before: torch's optimizer on the same objective."""
    x = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    evaluations = [0]

    def closure():
        evaluations[0] += 1
        f, g = fun(x.detach().numpy().copy())
        x.grad = torch.from_numpy(g)
        return torch.tensor(f, dtype=torch.float64)

    opt = torch.optim.LBFGS([x], line_search_fn="strong_wolfe", **kwargs)
    opt.step(closure)
    return x.detach().numpy(), evaluations[0]


def _quadratic(scales):
    h = np.diag(scales)
    return lambda x: (float(0.5 * x @ h @ x - x.sum()), h @ x - 1.0)


@pytest.mark.parametrize(
    ("fun", "x0"),
    [
        (_rosenbrock, [-1.2, 1.0]),
        (_rosenbrock, [-1.2, 1.0, -0.5, 0.8, 1.3]),
        (_quadratic([1.0, 10.0, 100.0, 1e3]), [1.0] * 4),
    ],
)
def test_it_follows_torchs_lbfgs_step_for_step(fun, x0):
    settings = {"max_iter": 500, "tolerance_grad": 1e-12, "tolerance_change": 1e-12}
    want, evaluations = _torch_lbfgs(fun, x0, **settings)
    got = lbfgs.minimize(fun, np.array(x0), **settings)
    assert got.evaluations == evaluations
    np.testing.assert_allclose(got.x, want, rtol=0, atol=1e-9)
    assert got.f == pytest.approx(fun(got.x)[0]) and got.f < got.f0


def test_it_finds_the_minimum_and_honours_its_budgets():
    fun = _rosenbrock
    done = lbfgs.minimize(fun, np.array([-1.2, 1.0, -0.5, 0.8]), max_iter=1000, tolerance_grad=1e-10)
    np.testing.assert_allclose(done.x, np.ones(4), atol=1e-6)
    short = lbfgs.minimize(fun, np.array([-1.2, 1.0]), max_iter=3, max_eval=100)
    assert short.iterations == 3 and short.f < short.f0
    capped = lbfgs.minimize(fun, np.array([-1.2, 1.0]), max_iter=1000, max_eval=10)
    assert 10 <= capped.evaluations < 10 + lbfgs.MAX_LINE_SEARCH


def test_a_start_at_the_minimum_costs_one_evaluation():
    calls = []

    def flat(x):
        calls.append(x)
        return 0.0, np.zeros_like(x)

    done = lbfgs.minimize(flat, np.array([3.0, 4.0]), max_iter=100)
    assert len(calls) == 1 and done.evaluations == 1 and done.iterations == 0
    np.testing.assert_array_equal(done.x, [3.0, 4.0])
