"""SNNK layers (Scalable Neural Network Kernels, arXiv 2310.13225): random features x -> Phi(x), and the
bundled MLP replacement Phi(x) -> Linear.

The projection G is drawn once from a local, seeded generator (never the global RNG) and kept as a
buffer, so it is saved in the state_dict and a loaded model computes exactly what was saved.
See ``kanc.codegen.snnk`` for the feature kinds ("relu", "exp", "cos") and their widths.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from kanc.codegen.snnk import check_kind, snnk_block, snnk_features_ref, snnk_width
from kanc.nn.fit import ACTIVATION_FUNCTIONS, ALIASES

SNNK_INITS = ("warm", "preserve", "variance")


def random_projection(
    num_features: int, in_features: int, orthogonal: bool = True, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Tensor:
    """(m, d) Gaussian projection; orthogonal=True stacks QR factors of d x d Gaussian blocks (ORF).

    ORF rows are rescaled by chi_d-distributed norms, so each row is still marginally N(0, I_d).
    """
    if num_features <= 0 or in_features <= 0:
        raise ValueError(f"num_features and in_features must be positive, got {num_features}, {in_features}")
    gen = torch.Generator().manual_seed(int(seed))
    if not orthogonal:
        return torch.randn(num_features, in_features, generator=gen, dtype=torch.float64).to(dtype)
    blocks = []
    for _ in range(math.ceil(num_features / in_features)):
        q, r = torch.linalg.qr(torch.randn(in_features, in_features, generator=gen, dtype=torch.float64))
        blocks.append((q * torch.sign(torch.diagonal(r))).T)  # sign fix: Haar-distributed rows
    rows = torch.cat(blocks)[:num_features]
    norms = torch.randn(num_features, in_features, generator=gen, dtype=torch.float64).norm(dim=1, keepdim=True)
    return (rows * norms).to(dtype)


def _resolve_activation(activation: str | Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    if callable(activation):
        return activation
    key = ALIASES.get(activation.lower(), activation.lower()) or activation  # swish, gelu_new, ...
    if key not in ACTIVATION_FUNCTIONS:
        raise ValueError(f"unknown activation {activation!r}; known: {', '.join(sorted(ACTIVATION_FUNCTIONS))}")
    return ACTIVATION_FUNCTIONS[key]


class SNNKFeatures(nn.Module):
    """Phi(x) = m^-1/2 g(G x) with a fixed random G (buffer ``projection``, shape (m, d)).

    Args:
        in_features: d.
        num_features: m, the number of random features (``out_features`` is m, or 2m for "cos").
        kind: "relu", "exp" or "cos".
        orthogonal: orthogonal random features (ORF) instead of i.i.d. Gaussian rows.
        seed: seed of the local generator that draws G.
        floor: ReLU floor c in max(Gx, c).
        input_scale: s in Phi(s x), the kernel bandwidth; default 1 for "relu" (scale free) and d^-1/2 for "exp" and
            "cos", so that N(0, 1) inputs of any width give O(1) feature variance.
    """

    def __init__(
        self,
        in_features: int,
        num_features: int,
        kind: str = "relu",
        orthogonal: bool = True,
        seed: int = 0,
        floor: float = 0.0,
        input_scale: float | None = None,
    ) -> None:
        super().__init__()
        check_kind(kind)
        self.in_features, self.num_features, self.kind = in_features, num_features, kind
        self.orthogonal, self.seed, self.floor = orthogonal, seed, float(floor)
        default_scale = 1.0 if kind == "relu" else in_features**-0.5
        self.input_scale = float(default_scale if input_scale is None else input_scale)
        self.register_buffer("projection", random_projection(num_features, in_features, orthogonal, seed))

    @property
    def out_features(self) -> int:
        """Width of Phi(x): m, or 2m for "cos"."""
        return snnk_width(self.num_features, self.kind)

    def forward(self, x: Tensor) -> Tensor:
        return snnk_features_ref(x, self.projection, self.kind, self.floor, self.input_scale)

    def weight_features(self, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """Psi(W, b): (l, d) -> (l, width), the weight tower matched to Phi.

        With s = input_scale: relu: m^-1/2 max(s W G^T, c) (bias dropped, as in the paper); exp: the same map at
        W / s times e^b, so Psi(W, b) Phi(x) is unbiased for exp(W x + b); cos: m^-1/2 [cos(s W G^T); sin(s W G^T)]
        (bias dropped), the symmetric Fourier map, whose products estimate the Gaussian kernel exp(-s^2 |x - w|^2 / 2).
        """
        g = self.projection.double()
        w = weight.detach().to(g)
        if self.kind == "exp":
            psi = snnk_features_ref(w, g, "exp", input_scale=1.0 / self.input_scale)
            return psi * torch.exp(bias.detach().to(g)).unsqueeze(1) if bias is not None else psi
        return snnk_features_ref(w, g, self.kind, self.floor, self.input_scale)

    def extra_repr(self) -> str:
        orf = "orthogonal" if self.orthogonal else "iid"
        floor = f", floor={self.floor}" if self.kind == "relu" and self.floor else ""
        scale = f", input_scale={self.input_scale:.4g}" if self.input_scale != 1.0 else ""
        return f"{self.in_features} -> {self.out_features}, kind={self.kind!r}, {orf}, seed={self.seed}{floor}{scale}"


def _variance_std(features: SNNKFeatures, samples: int = 4096) -> float:
    """Weight std that keeps unit output variance for N(0, 1) inputs: 1 / sqrt(width E[Phi_j^2])."""
    gen = torch.Generator().manual_seed(features.seed + 1)
    x = torch.randn(samples, features.in_features, generator=gen, dtype=torch.float64)
    x = x.to(features.projection.device)
    second_moment = float(features(x).square().mean())
    return 1.0 / math.sqrt(features.out_features * max(second_moment, 1e-300))


class SNNKLinear(nn.Module):
    """One feedforward layer x -> f(W x + b) as Psi(W, b) Phi(x) (the paper's SNNK layer).

    ``weight`` (out_features, width) is Psi of a placeholder W drawn like nn.Linear's; it is trainable, and W itself
    is not kept. For kind "exp" the layer is unbiased for exp(W x + b). Use ``from_linear`` to convert a given W, b.
    """

    def __init__(self, in_features: int, out_features: int, num_features: int, **features: Any) -> None:
        """``features``: :class:`SNNKFeatures`' keyword arguments (kind, orthogonal, seed, floor, input_scale)."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.features = SNNKFeatures(in_features, num_features, **features)
        self.weight = nn.Parameter(torch.empty(out_features, self.features.out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """weight = Psi(W) for W drawn as nn.Linear's default (from the layer's seed, not the global RNG)."""
        gen = torch.Generator().manual_seed(self.features.seed + 2)
        bound = 1.0 / math.sqrt(self.in_features)
        w = (torch.rand(self.out_features, self.in_features, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        self.set_weights_(w)

    @torch.no_grad()
    def set_weights_(self, weight: Tensor, bias: Tensor | None = None) -> SNNKLinear:
        """Load Psi(W, b) for the layer x -> f(W x + b)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight must be ({self.out_features}, {self.in_features}), got {tuple(weight.shape)}")
        self.weight.copy_(self.features.weight_features(weight, bias))
        return self

    @classmethod
    def from_linear(cls, linear: nn.Linear, num_features: int, **kwargs) -> SNNKLinear:
        """SNNK layer approximating act(linear(x)) (exactly, in expectation, for kind="exp" and act=exp)."""
        layer = cls(linear.in_features, linear.out_features, num_features, **kwargs)
        return layer.set_weights_(linear.weight, linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        f = self.features
        return snnk_block(x, f.projection, self.weight, None, f.kind, f.floor, f.input_scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class SNNKMlp(nn.Module):
    """Bundled SNNK replacement of an MLP block: y = linear(Phi(x)), ``features`` then ``linear``.

    ``linear`` is an nn.Linear(width -> out_features), width = m (or 2m for "cos"); it is the only trainable part.
    Cost per token: 2 m d + 2 width d_out FLOPs, vs 2 d h + 2 h d_out for the MLP.
    """

    def __init__(
        self, in_features: int, out_features: int, num_features: int, *, bias: bool = True, **features: Any
    ) -> None:
        """``features``: :class:`SNNKFeatures`' keyword arguments (kind, orthogonal, seed, floor, input_scale)."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.features = SNNKFeatures(in_features, num_features, **features)
        self.linear = nn.Linear(self.features.out_features, out_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        f = self.features
        return snnk_block(x, f.projection, self.linear.weight, self.linear.bias, f.kind, f.floor, f.input_scale)

    @torch.no_grad()
    def reset_variance_(self) -> SNNKMlp:
        """Fresh init for training from scratch: unit output variance for N(0, 1) inputs, bias zero."""
        gen = torch.Generator().manual_seed(self.features.seed + 3)
        w = torch.randn(self.linear.weight.shape, generator=gen, dtype=torch.float64) * _variance_std(self.features)
        self.linear.weight.copy_(w)
        if self.linear.bias is not None:
            self.linear.bias.zero_()
        return self

    @torch.no_grad()
    def fit_(self, inputs: Tensor, targets: Tensor, ridge: float = 1e-3) -> SNNKMlp:
        """Closed-form ridge least squares of ``linear`` so that self(inputs) ~= targets (float64, Cholesky).

        ``ridge`` is relative to the mean feature energy (scale free); the bias is not penalized.
        """
        device = self.features.projection.device
        x = inputs.detach().reshape(-1, self.in_features).to(device, torch.float64)
        y = targets.detach().reshape(-1, self.out_features).to(device, torch.float64)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"inputs give {x.shape[0]} rows but targets give {y.shape[0]}")
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            raise ValueError("calibration inputs and targets must be finite")
        phi = self.features(x)
        has_bias = self.linear.bias is not None
        a = torch.cat([phi, torch.ones_like(phi[:, :1])], 1) if has_bias else phi
        gram = a.T @ a
        penalty = ridge * float(torch.diagonal(gram)[: phi.shape[1]].mean()) + 1e-12
        reg = torch.full((a.shape[1],), penalty, dtype=torch.float64, device=device)
        if has_bias:
            reg[-1] = 1e-12 * max(1.0, float(gram[-1, -1]))
        sol = _solve_spd(gram + torch.diag(reg), a.T @ y)
        self.linear.weight.copy_(sol[: phi.shape[1]].T)
        if has_bias:
            self.linear.bias.copy_(sol[-1])
        return self

    def calibration_inputs(self, rows: int | None = None) -> Tensor:
        """Synthetic N(0, 1) calibration inputs (seeded): max(4 width, 1024) rows unless given."""
        rows = rows or max(4 * self.features.out_features, 1024)
        gen = torch.Generator().manual_seed(self.features.seed + 4)
        x = torch.randn(rows, self.in_features, generator=gen, dtype=torch.float64)
        return x.to(self.features.projection.device)

    def fit_to(
        self, block_fn: Callable[[Tensor], Tensor], calibration: Tensor | None = None, ridge: float = 1e-3
    ) -> SNNKMlp:
        """Fit ``linear`` to match any block (plain, gated, a whole module) on calibration inputs."""
        x = self.calibration_inputs() if calibration is None else calibration
        with torch.no_grad():
            y = block_fn(x)
        return self.fit_(x, y, ridge)

    @classmethod
    def from_mlp(
        cls,
        w1: Tensor,
        b1: Tensor | None,
        w2: Tensor,
        b2: Tensor | None,
        activation: str | Callable[[Tensor], Tensor],
        num_features: int,
        *,
        init: str = "preserve",
        calibration: Tensor | None = None,
        ridge: float = 1e-3,
        **features: Any,
    ) -> SNNKMlp:
        """SNNK block replacing y = W2 act(W1 x + b1) + b2 (w1: (h, d), w2: (d_out, h)); ``features``:
        :class:`SNNKFeatures`' keyword arguments (kind, orthogonal, seed, floor, input_scale).

        init: "warm" = the paper's bundled start W2 Psi(W1, b1) (a warm start, not function preserving);
        "preserve" = ridge least squares against the original block on ``calibration`` (or synthetic N(0, 1)) inputs;
        "variance" = fresh init for training from scratch.
        """
        if init not in SNNK_INITS:
            raise ValueError(f"init must be one of {', '.join(SNNK_INITS)}, got {init!r}")
        hidden, d = w1.shape
        if w2.dim() != 2 or w2.shape[1] != hidden:
            raise ValueError(f"w2 must be (out_features, {hidden}) after w1 {tuple(w1.shape)}, got {tuple(w2.shape)}")
        act = _resolve_activation(activation)
        block = cls(d, w2.shape[0], num_features, **features)
        block.to(w1.device)
        if init == "variance":
            return block.reset_variance_()
        if init == "preserve":
            return block.fit_to(_mlp_fn(w1, b1, w2, b2, act), calibration, ridge)
        with torch.no_grad():
            block.linear.weight.copy_(w2.detach().double() @ block.features.weight_features(w1, b1))
            block.linear.bias.copy_(b2.detach() if b2 is not None else torch.zeros(w2.shape[0]))
        return block

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _mlp_fn(w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, act: Callable) -> Callable:
    """x -> W2 act(W1 x + b1) + b2 in float64 (the calibration targets)."""
    w1, w2 = w1.detach().double(), w2.detach().double()
    b1 = b1.detach().double() if b1 is not None else None
    b2 = b2.detach().double() if b2 is not None else None
    return lambda x: nn.functional.linear(act(nn.functional.linear(x.double(), w1, b1)), w2, b2)


def _solve_spd(matrix: Tensor, rhs: Tensor) -> Tensor:
    """Cholesky solve; lstsq if the matrix is numerically not positive definite."""
    chol, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, chol)
    return torch.linalg.lstsq(matrix, rhs).solution
