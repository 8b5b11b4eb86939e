"""A GR-KAN MLP block y = fc2(fc1(x)) = F2(F1(x) W1^T + b1) W2^T + b2 at one of two fusion placements of F2.

- ``prologue`` (GRKANMlp's default): each layer is its own fused op (``kanc::grkan_linear``) with its rational in
  the matmul's prologue, so F2 is evaluated once per output tile of fc2 (C / BLOCK_N times per element of h) and
  F1 once per output tile of fc1. The backward holds x and h and recomputes F in its dW kernels' prologues.
- ``epilogue`` (op ``kanc::grkan_mlp_epilogue``): every rational is evaluated once per element. x1 = F1(x) by the
  rational kernel, u = F2(h) in fc1's epilogue (``kanc.codegen.kernels.linear_rational``), and fc2 is a plain
  matmul on u (cuBLAS through ``F.linear``).

What the epilogue placement's backward needs (the decision): h (pre-rational) beside u = F2(h), and x1 beside x.
  dW2 = dy^T u, db2 = sum(dy)                    plain matmul on the saved u
  dh, dF2/d(coefficients) = epilogue of dy W2   ``_grkan_linear_dx_kernel`` on h: F2' and per-program sums
  dW1 = dh^T x1, db1 = sum(dh)                   plain matmul on the saved x1
  dx, dF1/d(coefficients) = epilogue of dh W1   the same dx kernel, on x
Recomputing instead (holding only x and h, as the prologue placement does) would put F1 and F2 back into the dW
matmuls' prologues, the CUDA-core work this placement exists to remove. The price is memory: x1 (rows x C) and u
(rows x H) are held from the forward to the backward besides h, about what an eager Linear-GELU-Linear holds (h and
GELU(h)). Without a backward (no grad), h is never written.

``auto`` (:func:`choose_placement`) asks the tuning cache (``kanc.codegen.tuning``, pseudo-kernel
``grkan_mlp_placement``) which placement is faster at the block's widths, groups, degrees, dtype and direction
(inference, or forward + backward): on a CUDA GPU a miss is measured once (both placements' launchers, with
``KANC_AUTOTUNE`` as for kernel configs) and cached per device. The key leaves out the token count, so that a
choice made eagerly holds under torch.compile with dynamic shapes; the first measurement's token count decides.
Elsewhere (the CPU, the interpreter, a trace, torch.compile before any eager call) auto takes the cached choice
if there is one and otherwise the prologue placement; it never times anything while being traced.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kanc.codegen import tuning
from kanc.codegen.autograd import reference_vjp, register_reference_double_backward, vjp_with_graph
from kanc.codegen.checker import use_kernel
from kanc.codegen.grkan_linear import check_linear_args, grkan_linear_ref
from kanc.codegen.rational import abs_grad_sign, rational_ref
from kanc.errors import KancError

PLACEMENTS = ("prologue", "epilogue")  # first: the default when nothing is measured
PLACEMENT_OPTIONS = (*PLACEMENTS, "auto")
PLACEMENT_KERNEL = "grkan_mlp_placement"  # the choice's name in the tuning cache
_CANDIDATES = [{"placement": p} for p in PLACEMENTS]


def check_placement(placement: str) -> str:
    """``placement`` if it is one of PLACEMENT_OPTIONS, else a KancError naming them."""
    if placement not in PLACEMENT_OPTIONS:
        raise KancError(f"placement must be one of {', '.join(PLACEMENT_OPTIONS)}, got {placement!r}")
    return placement


def check_mlp_args(x, num1, den1, w1, b1, num2, den2, w2, b2) -> None:
    """Each layer as in ``check_linear_args``; fc2 reads what fc1 writes (w2 is (N, H) with H = w1's rows)."""
    check_linear_args(x, num1, den1, w1, b1)
    if w2.dim() != 2 or w2.shape[1] != w1.shape[0]:
        raise ValueError(f"fc2's weight must be (out_features, {w1.shape[0]}), got {tuple(w2.shape)}")
    check_linear_args(x.new_empty(0, w1.shape[0]), num2, den2, w2, b2)


def linear_rational_ref(x: Tensor, weight: Tensor, bias: Tensor | None, numerator: Tensor, denominator: Tensor):
    """u = F(x W^T + b): the definition of ``_linear_rational_fwd_kernel`` (F reads h as stored, in x's dtype)."""
    return rational_ref(F.linear(x, weight, bias), numerator, denominator)


def grkan_mlp_ref(x, num1, den1, w1, b1, num2, den2, w2, b2) -> Tensor:
    """fc2(fc1(x)) of two GR-KAN linear layers: the definition both placements compute."""
    return grkan_linear_ref(grkan_linear_ref(x, num1, den1, w1, b1), num2, den2, w2, b2)


def kernel_operands(x, w1, b1, w2, b2) -> tuple[Tensor, ...] | None:
    """(x, w1, b1, w2, b2) as the kernels get them: cast to the autocast dtype when autocast is on (coefficients keep
    theirs), as ``F.linear`` would; None when the matmul operands then differ in dtype (the reference raises)."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w1, w2 = x.to(dtype), w1.to(dtype), w2.to(dtype)
        b1, b2 = (b.to(dtype) if b is not None else None for b in (b1, b2))
    if any(t is not None and t.dtype != x.dtype for t in (w1, b1, w2, b2)):
        return None
    return x, w1, b1, w2, b2


def needs_backward(*tensors: Tensor | None) -> bool:
    """Whether autograd will ask for a backward of a call on ``tensors``."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def grkan_mlp_epilogue(x, num1, den1, w1, b1, num2, den2, w2, b2) -> Tensor:
    """fc2(fc1(x)) at the epilogue placement where the kernels can run it, else the reference (same math)."""
    check_mlp_args(x, num1, den1, w1, b1, num2, den2, w2, b2)
    if use_kernel(x, num1, den1, w1, b1, num2, den2, w2, b2):
        operands = kernel_operands(x, w1, b1, w2, b2)
        if operands is not None:
            x_, w1_, b1_, w2_, b2_ = operands
            save = needs_backward(x, num1, den1, w1, b1, num2, den2, w2, b2)
            return torch.ops.kanc.grkan_mlp_epilogue(x_, num1, den1, w1_, b1_, num2, den2, w2_, b2_, save)[0]
    return grkan_mlp_ref(x, num1, den1, w1, b1, num2, den2, w2, b2)


# ------------------------------------------------------------------------------------------------------ the ops


@torch.library.custom_op("kanc::grkan_mlp_epilogue", mutates_args=())
def _epilogue_op(
    x: Tensor, num1: Tensor, den1: Tensor, w1: Tensor, b1: Tensor | None,
    num2: Tensor, den2: Tensor, w2: Tensor, b2: Tensor | None, save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(y, x1 = F1(x), h = x1 W1^T + b1 (rows x H, or empty (0, H) without ``save``), u = F2(h))."""
    if use_kernel(x, num1, den1, w1, b1, num2, den2, w2, b2):
        return _kernel_forward(x, num1, den1, w1, b1, num2, den2, w2, b2, save)
    x1 = rational_ref(x, num1, den1)
    h = F.linear(x1, w1, b1)
    u = rational_ref(h, num2, den2)
    kept = h.contiguous() if save else h.new_empty(0, h.shape[-1])
    return F.linear(u, w2, b2).contiguous(), x1.contiguous(), kept, u.contiguous()


@_epilogue_op.register_fake
def _(x, num1, den1, w1, b1, num2, den2, w2, b2, save):
    rows, hidden = x.shape[:-1], w1.shape[0]
    h = x.new_empty(*rows, hidden) if save else x.new_empty(0, hidden)
    return x.new_empty(*rows, w2.shape[0]), x.new_empty(x.shape), h, x.new_empty(*rows, hidden)


def _kernel_forward(x, num1, den1, w1, b1, num2, den2, w2, b2, save: bool):
    from kanc.codegen.kernels.linear_rational import linear_rational_forward
    from kanc.codegen.kernels.rational import rational_forward

    x1 = rational_forward(x, num1, den1)
    h, u = linear_rational_forward(x1, w1, b1, num2, den2, save)
    return F.linear(u, w2, b2), x1, h, u


@torch.library.custom_op("kanc::grkan_mlp_epilogue_backward", mutates_args=())
def _epilogue_backward_op(
    grad: Tensor, x: Tensor, x1: Tensor, h: Tensor, u: Tensor, num1: Tensor, den1: Tensor, w1: Tensor,
    b1: Tensor | None, num2: Tensor, den2: Tensor, w2: Tensor, b2: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(dx, d num1, d den1, dW1, db1, d num2, d den2, dW2, db2); a db is empty when its layer has no bias."""
    if use_kernel(grad, x, x1, u, num1, den1, w1, num2, den2, w2):
        return _kernel_backward(grad, x, x1, h, u, num1, den1, w1, b1, num2, den2, w2, b2)
    inputs = [x, num1, den1, w1, b1, num2, den2, w2, b2]
    grads = reference_vjp(_ref_of_present(inputs), grad, *[t for t in inputs if t is not None])
    return _with_empty_bias_grads(grads, inputs)


@_epilogue_backward_op.register_fake
def _(grad, x, x1, h, u, num1, den1, w1, b1, num2, den2, w2, b2):
    inputs = [x, num1, den1, w1, b1, num2, den2, w2, b2]
    return _with_empty_bias_grads([t.new_empty(t.shape) for t in inputs if t is not None], inputs)


def _kernel_backward(grad, x, x1, h, u, num1, den1, w1, b1, num2, den2, w2, b2):
    from kanc.codegen.kernels.common import as_rows

    channels, hidden, n_out = x.shape[-1], w1.shape[0], w2.shape[0]
    dy2, x12, u2 = as_rows(grad.to(x.dtype), n_out), x1.reshape(-1, channels), u.reshape(-1, hidden)
    h2 = h.reshape(-1, hidden) if h.numel() else F.linear(x12, w1, b1)  # h is kept whenever a backward is expected
    dw2 = torch.mm(dy2.t(), u2)
    dh, dnum2, dden2 = _input_and_coefficient_grads(h2, dy2, w2, num2, den2)
    dw1 = torch.mm(dh.t(), x12)
    dx, dnum1, dden1 = _input_and_coefficient_grads(x.reshape(-1, channels), dh, w1, num1, den1)
    db1 = dh.sum(0) if b1 is not None else w1.new_empty(0)
    db2 = dy2.sum(0) if b2 is not None else w2.new_empty(0)
    return dx.view(x.shape), dnum1, dden1, dw1, db1, dnum2, dden2, dw2, db2


def _input_and_coefficient_grads(x2, dy2, weight, numerator, denominator) -> tuple[Tensor, Tensor, Tensor]:
    """d(F(x) W^T)/dx and the coefficient gradients by the GR-KAN dx kernel (dF = dy W, F' in its epilogue)."""
    from kanc.codegen.kernels.grkan_linear import _launch_dx

    num, den = numerator.contiguous(), denominator.contiguous()
    dx, acc = _launch_dx(x2, dy2, weight, num, den, den.shape[0])
    np_ = num.shape[1]
    return dx, acc[:, :np_].to(numerator.dtype).contiguous(), (acc[:, np_:] * abs_grad_sign(den)).to(den.dtype)


def _ref_of_present(inputs: Sequence[Tensor | None]) -> Callable[..., Tensor]:
    """grkan_mlp_ref as a function of the inputs that are not None (absent biases stay None)."""

    def fn(*present: Tensor) -> Tensor:
        it = iter(present)
        return grkan_mlp_ref(*[next(it) if t is not None else None for t in inputs])

    return fn


def _with_empty_bias_grads(grads: Sequence[Tensor], inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """Gradients of the present inputs, spread over all nine with an empty tensor for each absent bias."""
    it = iter(grads)
    return tuple(next(it) if t is not None else inputs[3 if i == 4 else 7].new_empty(0) for i, t in enumerate(inputs))


def _setup_context(ctx, inputs, output) -> None:
    x, num1, den1, w1, b1, num2, den2, w2, b2, _ = inputs
    _, x1, h, u = output
    ctx.mark_non_differentiable(x1, h, u)  # saved for the backward, never returned to a caller
    ctx.has_bias = (b1 is not None, b2 is not None)
    ctx.save_for_backward(x, x1, h, u, num1, den1, w1, b1, num2, den2, w2, b2)


def _backward(ctx, grad: Tensor, *_saved_outputs):
    grads = torch.ops.kanc.grkan_mlp_epilogue_backward(grad, *ctx.saved_tensors)
    dx, dnum1, dden1, dw1, db1, dnum2, dden2, dw2, db2 = grads
    db1, db2 = (db if has else None for db, has in zip((db1, db2), ctx.has_bias))
    return dx, dnum1, dden1, dw1, db1, dnum2, dden2, dw2, db2, None


_epilogue_op.register_autograd(_backward, setup_context=_setup_context)


def _first_order(grad, x, x1, h, u, num1, den1, w1, b1, num2, den2, w2, b2):
    """The backward op's outputs by differentiable reference ops on the block's inputs (x1, h, u are functions of
    them: recomputing keeps second derivatives exact)."""
    inputs = [x, num1, den1, w1, b1, num2, den2, w2, b2]
    grads = iter(vjp_with_graph(_ref_of_present(inputs), grad, *[t for t in inputs if t is not None]))
    return tuple(next(grads) if t is not None else None for t in inputs)


register_reference_double_backward(_epilogue_backward_op, _first_order)


# ------------------------------------------------------------------------------------------- choosing a placement


def choose_placement(x, num1, den1, w1, b1, num2, den2, w2, b2, placement: str = "auto") -> str:
    """The placement a block with these tensors runs at ("prologue" or "epilogue").

    "epilogue" only where its kernels can run (elsewhere the layers run one by one on the reference: the same math);
    "auto" as in the module docstring: the tuning cache's choice, measured on a CUDA GPU on a miss.
    """
    check_placement(placement)
    if placement == "prologue" or not use_kernel(x, num1, den1, w1, b1, num2, den2, w2, b2):
        return "prologue"
    operands = kernel_operands(x, w1, b1, w2, b2)
    if operands is None:
        return "prologue"
    if placement == "epilogue":
        return "epilogue"
    training = needs_backward(x, num1, den1, w1, b1, num2, den2, w2, b2)
    dims = _block_dims(num1, den1, w1, num2, den2, w2)
    if torch.compiler.is_compiling():  # a trace: never time, take what an eager call cached
        return _cached_placement(str(x.device), operands[0].dtype, training, *dims)
    key = placement_key(operands[0].dtype, training, *dims)
    x_, w1_, b1_, w2_, b2_ = (t.detach() if t is not None else None for t in operands)
    args = (x_, num1.detach(), den1.detach(), w1_, b1_, num2.detach(), den2.detach(), w2_, b2_)
    measurable = x.device.type == "cuda" and not torch.cuda.is_current_stream_capturing()  # no timing in a capture
    bench = _placement_bench(args, training) if measurable else None
    return tuning.pick_config(PLACEMENT_KERNEL, key, _CANDIDATES, bench, x.device)["placement"]


def _block_dims(num1, den1, w1, num2, den2, w2) -> tuple[int, ...]:
    """(C, H, N, G1, G2, m1, n1, m2, n2): what a placement choice depends on besides the dtype and direction."""
    degrees = (num1.shape[1] - 1, den1.shape[1], num2.shape[1] - 1, den2.shape[1])
    return (w1.shape[1], w1.shape[0], w2.shape[0], den1.shape[0], den2.shape[0], *degrees)


def placement_key(dtype: torch.dtype, training: bool, *dims: int) -> tuple:
    """Tuning key of a placement choice: (*_block_dims, dtype, "train" | "infer")."""
    return (*(int(d) for d in dims), str(dtype).removeprefix("torch."), "train" if training else "infer")


def _constant_for_compile(fn: Callable) -> Callable:
    """``torch.compiler.assume_constant_result(fn)`` without importing torch._dynamo at kanc's import (it imports
    triton): the same marker, which dynamo reads when a trace reaches ``fn`` (tests check torch still uses it)."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_for_compile
def _cached_placement(device: str, dtype: torch.dtype, training: bool, *dims: int) -> str:
    """The cached choice (else the default) without timing; a constant for torch.compile, called once per trace."""
    key = placement_key(dtype, training, *dims)
    return tuning.pick_config(PLACEMENT_KERNEL, key, _CANDIDATES, None, torch.device(device))["placement"]


def _placement_bench(args: tuple, training: bool) -> Callable[[dict], float]:
    """config -> ms of one step (forward, and backward when training) at that placement, on scratch outputs."""
    from kanc.codegen.kernels.common import bench_on

    x, w2 = args[0], args[7]
    timer = bench_on(x.device)
    dy = torch.randn(*x.shape[:-1], w2.shape[0], device=x.device, dtype=x.dtype) if training else None
    steps = {"prologue": _prologue_step, "epilogue": _epilogue_step}

    def bench(config: dict) -> float:
        def step() -> None:
            with torch.no_grad():
                steps[config["placement"]](args, dy)

        step()  # compiles and tunes this placement's kernels before it is timed
        return timer(step)

    return bench


def _prologue_step(args: tuple, dy: Tensor | None) -> None:
    from kanc.codegen.kernels.grkan_linear import grkan_linear_backward, grkan_linear_forward

    x, num1, den1, w1, b1, num2, den2, w2, b2 = args
    h = grkan_linear_forward(x, num1, den1, w1, b1)
    grkan_linear_forward(h, num2, den2, w2, b2)
    if dy is not None:
        dh = grkan_linear_backward(dy, h, num2, den2, w2, b2 is not None)[0]
        grkan_linear_backward(dh, x, num1, den1, w1, b1 is not None)


def _epilogue_step(args: tuple, dy: Tensor | None) -> None:
    x, num1, den1, w1, b1, num2, den2, w2, b2 = args
    _, x1, h, u = _kernel_forward(*args, save=dy is not None)
    if dy is not None:
        _kernel_backward(dy, x, x1, h, u, num1, den1, w1, b1, num2, den2, w2, b2)
