"""Hand-counted FLOPs and ideal bytes of each layer, from its math (design.md section 5).

How things are counted (one convention for every layer, so that rates compare across layers):

- A FLOP is one elementary floating-point operation: add, multiply, compare, abs, sign, division, and one per
  special function (exp, cos, erf); a fused multiply-add is 2. Integer/index work is not counted.
- Ideal bytes are the compulsory traffic of a perfectly fused kernel: every tensor the layer must read is read
  once and every tensor it must produce is written once, in its storage dtype. Intermediates that a fused
  kernel keeps in registers (F(x) inside a GR-KAN linear, Phi(x) inside an SNNK block) cost nothing.
- Matmul FLOPs (``matmul_flops``) run on tensor cores; the rest (``flops - matmul_flops``) on the vector units.
  The roofline uses a different peak for each part.
- Backward counts follow what autograd computes in the profiled step: the input gradient when the input needs
  one, each parameter gradient when that parameter requires grad.

Counts of layers whose math kanc does not own (LayerNorm, embeddings, activations) are estimates of the same kind
and say so in their ``note``; modules kanc cannot count get ``None`` (time is still measured).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

Shape = Sequence[int]


@dataclass(frozen=True)
class Counts:
    """FLOPs and ideal bytes of one layer in one direction (``matmul_flops`` is the tensor-core part)."""

    flops: float
    bytes: float
    matmul_flops: float = 0.0
    note: str = ""

    def __add__(self, other: Counts) -> Counts:
        note = "; ".join(n for n in (self.note, other.note) if n)
        return Counts(self.flops + other.flops, self.bytes + other.bytes, self.matmul_flops + other.matmul_flops, note)

    @property
    def vector_flops(self) -> float:
        return self.flops - self.matmul_flops

    @property
    def intensity(self) -> float | None:
        """Arithmetic intensity in FLOP per byte (None when no byte moves)."""
        return self.flops / self.bytes if self.bytes > 0 else None


ZERO = Counts(0.0, 0.0)


# ---------------------------------------------------------------------------------------------- group rational
def rational_forward_flops(m: int = 5, n: int = 4) -> int:
    """FLOPs per element of F(x) = P(x) / Q(x) with degrees (m, n): 21 for (5, 4).

    Horner P: m FMAs (2m); |x| (1); Horner Q(|x|) = 1 + |x| (b1 + |x| (b2 + ...)): n - 1 FMAs and one multiply
    (2n), plus the 1 (1); the division (1). Total 2m + 2n + 3. Without denominator (n = 0) only P: 2m.
    """
    _check_degrees(m, n)
    return 2 * m + 2 * n + 3 if n > 0 else 2 * m


def rational_backward_flops(m: int = 5, n: int = 4) -> int:
    """FLOPs per element of the rational's backward (dx and the per-element terms of both coefficient grads): 65
    for (5, 4).

    The terms (kat_flashkat.md section 8): powers x^2..x^max(m,n), |x| and sign(x) (max(m,n) + 1); P and Q from
    the powers (2m + 2n); P' by pre-scaled Horner (2(m - 1)); sign(x) Q'(|x|) (2n - 1); r = 1/Q, gq = g r, y = P r,
    dx = gq (P' - y sign Q') (6); da_i = gq x^i for i = 1..m (m); db_j = (-gq y) |x|^j (n + 1); and one
    accumulation per coefficient, (m + 1) + n. Total max(m, n) + 6m + 6n + 6. Without denominator: powers (m),
    P' (2(m - 1)), dx = g P' (1), da (m), accumulations (m + 1).
    """
    _check_degrees(m, n)
    if n == 0:
        return m + 2 * max(m - 1, 0) + 1 + m + (m + 1)
    return max(m, n) + 6 * m + 6 * n + 6


def rational_counts(
    numel: int,
    itemsize: int,
    groups: int,
    degrees: tuple[int, int] = (5, 4),
    direction: str = "forward",
    coef_itemsize: int = 4,
    input_grad: bool = True,
    coef_grad: bool = True,
) -> Counts:
    """Counts of a group rational over ``numel`` elements stored with ``itemsize`` bytes.

    Forward bytes: read x, write y (2 x itemsize per element) plus reading the G (m + 1 + n) coefficients once.
    Backward bytes: read x and dy, write dx (3 x itemsize per element) plus reading the coefficients and writing
    their gradients once; without ``input_grad`` dx is neither computed nor written.
    """
    m, n = degrees
    coef_bytes = groups * (m + 1 + n) * coef_itemsize
    if direction == "forward":
        return Counts(numel * rational_forward_flops(m, n), 2 * numel * itemsize + coef_bytes)
    _check_direction(direction)
    flops = numel * rational_backward_flops(m, n)
    element_bytes = (3 if input_grad else 2) * itemsize
    return Counts(flops, numel * element_bytes + coef_bytes * (2 if coef_grad else 1))


# ---------------------------------------------------------------------------------------------------- matmul
def matmul_counts(m: int, n: int, k: int, itemsize: int, out_itemsize: int | None = None) -> Counts:
    """C (m x n) = A (m x k) B (k x n): 2 m n k FLOPs; bytes of A, B and C, each moved once."""
    out = itemsize if out_itemsize is None else out_itemsize
    return Counts(2.0 * m * n * k, float((m * k + k * n) * itemsize + m * n * out), matmul_flops=2.0 * m * n * k)


def linear_counts(
    rows: int,
    in_features: int,
    out_features: int,
    itemsize: int,
    bias: bool,
    direction: str = "forward",
    input_grad: bool = True,
    weight_grad: bool = True,
) -> Counts:
    """y = x W^T + b over ``rows`` rows (M = rows, K = in, N = out).

    Forward: the matmul (2MNK; x, W, y) plus the bias add (MN FLOPs, N values read).
    Backward: dx = dy W (2MNK) when the input needs a gradient, dW = dy^T x (2MNK) and db = sum dy (MN) when the
    parameters do; bytes read dy, and W or x as needed, and write dx, dW, db, each tensor once.
    """
    m, k, n = rows, in_features, out_features
    if direction == "forward":
        c = matmul_counts(m, n, k, itemsize)
        return c + Counts(m * n, n * itemsize) if bias else c
    _check_direction(direction)
    mm = (2.0 * m * n * k) * (int(input_grad) + int(weight_grad))
    flops = mm + (m * n if bias and weight_grad else 0)
    elems = m * n  # dy
    elems += (n * k + m * k) if input_grad else 0  # read W, write dx
    elems += (m * k + n * k) if weight_grad else 0  # read x, write dW
    elems += n if bias and weight_grad else 0
    return Counts(flops, float(elems * itemsize), matmul_flops=mm)


# --------------------------------------------------------------------------------------------------------- SNNK
# Vector FLOPs per feature of g and its derivative (the 1/sqrt(m) scale included).
_SNNK_FEATURE_FLOPS = {"relu": (2, 2), "exp": (3, 2), "cos": (4, 6)}


def snnk_counts(
    rows: int,
    in_features: int,
    num_features: int,
    kind: str,
    out_features: int | None,
    itemsize: int,
    bias: bool,
    direction: str = "forward",
    input_grad: bool = True,
    weight_grad: bool = True,
    input_scale: float = 1.0,
) -> Counts:
    """An SNNK block y = Phi(x) W^T + b with Phi(x) = m^-1/2 g(G s x) fused (``out_features=None``: Phi alone).

    Forward: z = G x (2 M m d, matmul), s x (M d, when s != 1), the feature map per feature (relu: max and scale 2;
    exp: subtract, exp, scale 3, plus |x|^2 / 2 per row, 2d + 1; cos: cos and sin, two scales per pair 4 per m),
    the readout (2 M width d_out, matmul) and the bias (M d_out). Bytes: x, G, W, b, y (Phi stays on chip;
    without readout, Phi is the output and is written).
    Backward: dPhi = dy W (2 M width d_out) and dW = dy^T Phi (same) as needed; dz = dPhi g'(z) per feature; dx =
    dz G (2 M m d); Phi is recomputed from x in a fused kernel, so bytes are x, G, W, dy, dx, dW, db.
    """
    width = 2 * num_features if kind == "cos" else num_features
    d, m, rows_f = in_features, num_features, float(rows)
    fwd_elem, bwd_elem = _SNNK_FEATURE_FLOPS[kind]
    per_row_fwd = width * fwd_elem // (2 if kind == "cos" else 1) + (2 * d + 1 if kind == "exp" else 0)
    per_row_fwd += d if input_scale != 1.0 else 0
    proj = 2.0 * rows_f * m * d
    if direction == "forward":
        flops, mm = proj + rows_f * per_row_fwd, proj
        elems = rows_f * d + m * d
        if out_features is None:
            return Counts(flops, elems * itemsize + rows_f * width * itemsize, mm)
        readout = 2.0 * rows_f * width * out_features
        flops, mm = flops + readout + (rows_f * out_features if bias else 0), mm + readout
        elems += width * out_features + (out_features if bias else 0) + rows_f * out_features
        return Counts(flops, elems * itemsize, mm)
    _check_direction(direction)
    dout = out_features or 0
    readout_bwd = 2.0 * rows_f * width * dout * (int(input_grad) + int(weight_grad)) if out_features else 0.0
    recompute = proj + rows_f * per_row_fwd if (weight_grad and out_features) or input_grad else 0.0
    dx = (proj + rows_f * width * bwd_elem) if input_grad else 0.0
    flops = readout_bwd + recompute + dx + (rows_f * dout if bias and weight_grad and out_features else 0)
    mm = readout_bwd + (proj if recompute else 0.0) + (proj if input_grad else 0.0)
    elems = rows_f * (dout if out_features else width) + rows_f * d + m * d  # dy, x, G
    elems += width * dout if out_features else 0  # W
    elems += rows_f * d if input_grad else 0  # dx
    elems += (width * dout + (dout if bias else 0)) if weight_grad and out_features else 0  # dW, db
    return Counts(flops, elems * itemsize, mm)


# ------------------------------------------------------------------------------------------ estimated layers
# Vector FLOPs per element (forward, backward) of common activations; estimates, see the module docstring.
ACTIVATION_FLOPS: dict[str, tuple[int, int]] = {
    "ReLU": (1, 1),
    "ReLU6": (2, 2),
    "LeakyReLU": (2, 2),
    "GELU": (8, 14),
    "SiLU": (4, 7),
    "Sigmoid": (3, 3),
    "Tanh": (1, 3),
    "Softplus": (4, 4),
    "Mish": (8, 12),
    "Hardswish": (4, 4),
    "ELU": (3, 3),
    "NewGELUActivation": (9, 14),
    "GELUActivation": (8, 14),
    "FastGELUActivation": (9, 14),
    "PytorchGELUTanh": (9, 14),
    "QuickGELUActivation": (5, 7),
}


def elementwise_counts(numel: int, itemsize: int, flops_per_element: int, direction: str) -> Counts:
    """A pointwise map: forward reads x and writes y; backward reads x and dy and writes dx."""
    return Counts(float(numel * flops_per_element), float(numel * itemsize * (2 if direction == "forward" else 3)))


def layer_norm_counts(numel: int, width: int, itemsize: int, affine: bool, direction: str) -> Counts:
    """LayerNorm/RMSNorm over the last ``width`` values: ~8 FLOPs per element forward (mean, variance, normalise,
    scale, shift), ~14 backward; bytes as a pointwise map plus the affine parameters (and their gradients)."""
    params = (2 * width * itemsize) if affine else 0
    base = elementwise_counts(numel, itemsize, 8 if direction == "forward" else 14, direction)
    return base + Counts(0.0, float(params * (1 if direction == "forward" else 2)), note="estimate")


# ------------------------------------------------------------------------------------------- module dispatch
@dataclass(frozen=True)
class CallShapes:
    """What the profiler saw of one module call: first tensor input and output, and which children ran."""

    input_shape: tuple[int, ...] | None
    input_dtype: torch.dtype | None
    output_shape: tuple[int, ...] | None
    output_dtype: torch.dtype | None
    input_requires_grad: bool = True
    children_ran: frozenset[str] = frozenset()


Counter = Callable[[nn.Module, CallShapes, str], "Counts | None"]


def module_counts(module: nn.Module, call: CallShapes, direction: str) -> Counts | None:
    """Counts of one call of ``module`` in ``direction``, for the work the module does itself (children that ran
    are counted on their own rows); None when kanc has no count for this module type."""
    for kind in type(module).__mro__:
        counter = _COUNTERS.get(kind.__name__)
        if counter is not None:
            return counter(module, call, direction)
    name = type(module).__name__
    if name.endswith(("LayerNorm", "RMSNorm")) and not any(True for _ in module.children()):
        return _count_layer_norm(module, call, direction)  # HF's LlamaRMSNorm, T5LayerNorm, ...
    return None


def _itemsize(dtype: torch.dtype | None) -> int:
    return torch.empty((), dtype=dtype).element_size() if dtype is not None else 4


def _numel(shape: tuple[int, ...] | None) -> int:
    return math.prod(shape) if shape is not None else 0


def _param_grad(p: torch.Tensor | None) -> bool:
    return p is not None and p.requires_grad


def _count_group_rational(module: nn.Module, call: CallShapes, direction: str) -> Counts | None:
    if call.input_shape is None:
        return None
    num, _ = module.coefficients()
    return rational_counts(
        _numel(call.input_shape),
        _itemsize(call.input_dtype),
        module.groups,
        tuple(module.degrees),
        direction,
        coef_itemsize=num.element_size(),
        input_grad=call.input_requires_grad,
        coef_grad=_param_grad(module.numerator) or _param_grad(module.denominator),
    )


def _count_linear_like(module: nn.Module, call: CallShapes, direction: str, k: int, n: int) -> Counts | None:
    if call.input_shape is None:
        return None
    rows = _numel(call.input_shape) // max(k, 1)
    weight = module.weight
    return linear_counts(
        rows,
        k,
        n,
        _itemsize(call.input_dtype),
        getattr(module, "bias", None) is not None,
        direction,
        input_grad=call.input_requires_grad,
        weight_grad=_param_grad(weight),
    )


def _count_linear(module: nn.Module, call: CallShapes, direction: str) -> Counts | None:
    return _count_linear_like(module, call, direction, module.in_features, module.out_features)


def _count_hf_conv1d(module: nn.Module, call: CallShapes, direction: str) -> Counts | None:
    """transformers' Conv1D: y = x W + b with W stored (in, out)."""
    if not hasattr(module, "nf") or getattr(module, "weight", None) is None:
        return None
    return _count_linear_like(module, call, direction, module.weight.shape[0], module.nf)


def _count_grkan_linear(module: nn.Module, call: CallShapes, direction: str) -> Counts | None:
    """The matmul on F(x); the rational too when it did not run as its own module (a fused kernel)."""
    rational = module.rational
    # The matmul's input is F(x): it needs a gradient when x or a coefficient does.
    f_grad = call.input_requires_grad or _param_grad(rational.numerator) or _param_grad(rational.denominator)
    linear = _count_linear(module, CallShapes(**{**call.__dict__, "input_requires_grad": f_grad}), direction)
    if linear is None or "rational" in call.children_ran:
        return linear
    fused = linear + _count_group_rational(rational, call, direction)
    # Fused, F(x) never reaches memory: forward saves its write and the matmul's read of it; backward saves dF's
    # write and read, and the read of F(x) for dW (recomputed from x, which the rational reads anyway).
    passes = 2 if direction == "forward" else 2 + int(_param_grad(module.weight))
    saved = passes * _numel(call.input_shape) * _itemsize(call.input_dtype)
    return Counts(fused.flops, fused.bytes - saved, fused.matmul_flops)


def _count_grkan_block(module: nn.Module, call: CallShapes, direction: str, layers_ran: bool) -> Counts | None:
    """GRKANMlp / GRKANPair run as one op (the epilogue placement): both fused GR-KAN linears from the block's input
    shape; when the layers ran as modules (``layers_ran``) they are counted on their own rows."""
    if layers_ran:
        return ZERO
    if call.input_shape is None:
        return None
    fc1, fc2 = module.fc1, module.fc2
    first = CallShapes(**{**call.__dict__, "children_ran": frozenset()})
    hidden = CallShapes(**{**first.__dict__, "input_shape": (*call.input_shape[:-1], fc1.out_features)})
    counts = [_count_grkan_linear(fc1, first, direction), _count_grkan_linear(fc2, hidden, direction)]
    return None if None in counts else counts[0] + counts[1]


def _count_snnk(module: nn.Module, call: CallShapes, direction: str, readout: nn.Module | None) -> Counts | None:
    if call.input_shape is None:
        return None
    f = module.features if hasattr(module, "features") else module
    weight = readout.weight if readout is not None else None
    bias = getattr(readout, "bias", None) if readout is not None else None
    return snnk_counts(
        _numel(call.input_shape) // f.in_features,
        f.in_features,
        f.num_features,
        f.kind,
        weight.shape[0] if weight is not None else None,
        _itemsize(call.input_dtype),
        bias is not None,
        direction,
        input_grad=call.input_requires_grad,
        weight_grad=_param_grad(weight),
        input_scale=f.input_scale,
    )


def _count_snnk_mlp(module: nn.Module, call: CallShapes, direction: str) -> Counts | None:
    if call.children_ran & {"features", "linear"}:
        return ZERO  # the parts ran as modules and are counted on their own rows
    return _count_snnk(module, call, direction, module.linear)


def _count_snnk_linear(module: nn.Module, call: CallShapes, direction: str) -> Counts | None:
    if "features" in call.children_ran:
        return None  # features counted on their row; the readout alone is not separable from the call shapes
    return _count_snnk(module, call, direction, module)


def _count_snnk_features(module: nn.Module, call: CallShapes, direction: str) -> Counts | None:
    return _count_snnk(module, call, direction, None)


def _count_activation(module: nn.Module, call: CallShapes, direction: str) -> Counts | None:
    flops = ACTIVATION_FLOPS.get(type(module).__name__)
    if call.input_shape is None or flops is None:
        return None
    c = elementwise_counts(
        _numel(call.input_shape), _itemsize(call.input_dtype), flops[direction != "forward"], direction
    )
    return Counts(c.flops, c.bytes, note="estimate")


def _count_dropout(module: nn.Module, call: CallShapes, direction: str) -> Counts | None:
    if call.input_shape is None:
        return None
    if not module.training or module.p == 0:
        return ZERO  # identity: no work
    c = elementwise_counts(_numel(call.input_shape), _itemsize(call.input_dtype), 2, direction)
    return Counts(c.flops, c.bytes + _numel(call.input_shape), note="estimate (mask of 1 byte per element)")


def _count_layer_norm(module: nn.Module, call: CallShapes, direction: str) -> Counts | None:
    if call.input_shape is None:
        return None
    width = call.input_shape[-1]
    affine = getattr(module, "weight", None) is not None
    return layer_norm_counts(_numel(call.input_shape), width, _itemsize(call.input_dtype), affine, direction)


def _count_embedding(module: nn.Module, call: CallShapes, direction: str) -> Counts | None:
    """Gather: read the indices (8 B) and the selected rows, write them (forward); scatter-add dy (backward)."""
    if call.output_shape is None or call.input_shape is None:
        return None
    rows, item = _numel(call.input_shape), _itemsize(call.output_dtype)
    out = _numel(call.output_shape)
    if direction == "forward":
        return Counts(0.0, float(rows * 8 + 2 * out * item), note="gather")
    if not _param_grad(module.weight):
        return ZERO
    return Counts(float(out), float(rows * 8 + 2 * out * item + module.weight.numel() * item), note="scatter-add")


def _count_conv(module: nn.Module, call: CallShapes, direction: str) -> Counts | None:
    """Convolution as an implicit GEMM: 2 * out elements * (C_in / groups) * kernel size per direction part."""
    if call.input_shape is None or call.output_shape is None:
        return None
    item = _itemsize(call.input_dtype)
    taps = (module.in_channels // module.groups) * math.prod(module.kernel_size)
    out, x, w = _numel(call.output_shape), _numel(call.input_shape), module.weight.numel()
    mm = 2.0 * out * taps
    if direction == "forward":
        return Counts(mm, float((x + w + out) * item), mm)
    parts = int(call.input_requires_grad) + int(_param_grad(module.weight))
    elems = out + (x + w if call.input_requires_grad else 0) + (x + w if _param_grad(module.weight) else 0)
    return Counts(mm * parts, float(elems * item), mm * parts)


_COUNTERS: dict[str, Counter] = {
    "GroupRational": _count_group_rational,
    "GRKANLinear": _count_grkan_linear,
    "GRKANMlp": lambda m, call, d: _count_grkan_block(m, call, d, bool(call.children_ran & {"fc1", "fc2"})),
    "GRKANPair": lambda m, call, d: _count_grkan_block(m, call, d, bool(call.children_ran)),  # holds no children
    "SNNKMlp": _count_snnk_mlp,
    "SNNKLinear": _count_snnk_linear,
    "SNNKFeatures": _count_snnk_features,
    "Linear": _count_linear,
    "Conv1D": _count_hf_conv1d,
    "Conv1d": _count_conv,
    "Conv2d": _count_conv,
    "Conv3d": _count_conv,
    "Dropout": _count_dropout,
    "LayerNorm": _count_layer_norm,
    "RMSNorm": _count_layer_norm,
    "Embedding": _count_embedding,
    **dict.fromkeys(ACTIVATION_FLOPS, _count_activation),
    "Identity": lambda module, call, direction: ZERO,
}


def _check_degrees(m: int, n: int) -> None:
    if m < 0 or n < 0:
        raise ValueError(f"rational degrees must be non-negative, got ({m}, {n})")


def _check_direction(direction: str) -> None:
    if direction != "backward":
        raise ValueError(f"direction must be 'forward' or 'backward', got {direction!r}")
