"""Fused GR-KAN linear Triton kernels: y = F(x) W^T + b with the group rational in the A-tile prologue.

F(x) never goes to memory, in either direction:
- forward ``_grkan_linear_fwd_kernel``: each (BLOCK_M, BLOCK_K) tile of x is loaded, F applied in fp32 registers,
  cast to the matmul operand dtype and fed to tl.dot; bias in the epilogue.
- backward ``_grkan_linear_dw_kernel``: dW = dy^T F(x) with F(x) recomputed in the prologue (and db = column sums
  of dy by the programs of the first K tile).
- backward ``_grkan_linear_dx_kernel``: dF = dy W accumulated in fp32, then in the epilogue dx = dF F'(x) and the
  coefficient gradients. A program runs ROWS_PER_PROGRAM row tiles of one K column in turn, carrying the coefficient
  partial sums in registers, and reduces them per group at the end (one atomic per group and coefficient; under
  ``torch.use_deterministic_algorithms(True)`` a store into the program's own slot, summed after in a fixed order).

x, W and b are read through their strides (a transposed weight, a sliced input, a strided or expanded bias);
dy is made unit-stride in its last dimension and the outputs are allocated row-major.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from kanc.codegen import launches
from kanc.codegen.checker import interpreting
from kanc.codegen.kernels import common
from kanc.codegen.kernels.common import cast_to
from kanc.codegen.kernels.jit_common import (
    add_coef_partials,
    dot_acc,
    rational_grads,
    rational_pq,
    reduce_coef_grads,
    swizzle,
    tile_groups,
    zero_sums,
)
from kanc.codegen.kernels.rational import (
    coefficient_grads,
    coefficient_stand_ins,
    final_coefficient_grads,
    group_span,
    groups_touched,
)

OP = "kanc::grkan_linear"


@triton.jit
def _rational_tile(
    x_ptr,
    rm,
    rk,
    k0,
    mmask,
    kmask,
    stride_xm,
    stride_xk,
    num_ptr,
    den_ptr,
    D,
    NP: tl.constexpr,
    NQ: tl.constexpr,
    UNIFORM: tl.constexpr,
):
    """F(x) of one (BLOCK_M, BLOCK_K) tile in fp32, exactly zero outside the matrix (padding never relies on the
    other operand being masked too)."""
    mask = mmask[:, None] & kmask[None, :]
    x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
    p, q = rational_pq(x, num_ptr, den_ptr, tile_groups(k0, rk, D, UNIFORM), kmask, NP, NQ, UNIFORM)
    return tl.where(mask, p / q, 0.0)


@triton.jit
def _grkan_linear_fwd_kernel(
    # pointers
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    num_ptr,
    den_ptr,
    # sizes: x (M, K), W (N, K), D = K / G channels per group
    M,
    N,
    K,
    D,
    # strides (any layout of x, W and b; y is row-major)
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_b,
    stride_ym,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    NP: tl.constexpr,
    NQ: tl.constexpr,
    DOT: tl.constexpr,
    IEEE: tl.constexpr,
    UNIFORM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y = F(x) W^T + b on one (BLOCK_M, BLOCK_N) tile: F applied to each (BLOCK_M, BLOCK_K) x tile as it is loaded,
    rounded to the I/O dtype (as the reference stores F(x)) and fed to tl.dot; the bias in the epilogue."""
    pid_m, pid_n = swizzle(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask, nmask = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < K
        f = _rational_tile(x_ptr, rm, rk, k0, mmask, kmask, stride_xm, stride_xk, num_ptr, den_ptr, D, NP, NQ, UNIFORM)
        w_ptrs = w_ptr + rn[None, :] * stride_wn + rk[:, None] * stride_wk
        w = tl.load(w_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc = dot_acc(cast_to(f, y_ptr.dtype.element_ty), w, acc, DOT, IEEE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn * stride_b, mask=nmask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, cast_to(acc, y_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _grkan_linear_dw_kernel(
    # pointers
    x_ptr,
    dy_ptr,
    dw_ptr,
    db_ptr,
    num_ptr,
    den_ptr,
    # sizes: x (M, K), dy (M, N), D = K / G channels per group
    M,
    N,
    K,
    D,
    # strides (x any layout; dy, dW and db unit-stride in their last dimension)
    stride_xm,
    stride_xk,
    stride_dym,
    stride_dwn,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    NP: tl.constexpr,
    NQ: tl.constexpr,
    DOT: tl.constexpr,
    IEEE: tl.constexpr,
    UNIFORM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """dW = dy^T F(x) on one (BLOCK_N, BLOCK_K) tile, reducing over M with F recomputed per x tile; db = column sums
    of dy, from the programs of the first K tile."""
    pid_n, pid_k = swizzle(tl.program_id(0), N, K, BLOCK_N, BLOCK_K, GROUP_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    nmask, kmask = rn < N, rk < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    db = tl.zeros((BLOCK_N,), tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rm = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        mmask = rm < M
        f = _rational_tile(
            x_ptr, rm, rk, pid_k * BLOCK_K, mmask, kmask, stride_xm, stride_xk, num_ptr, den_ptr, D, NP, NQ, UNIFORM
        )
        dyt = tl.load(dy_ptr + rm[None, :] * stride_dym + rn[:, None], mask=nmask[:, None] & mmask[None, :], other=0.0)
        acc = dot_acc(dyt, cast_to(f, dy_ptr.dtype.element_ty), acc, DOT, IEEE)
        if HAS_BIAS:
            if pid_k == 0:
                db += tl.sum(dyt.to(tl.float32), axis=1)
    dw_ptrs = dw_ptr + rn[:, None] * stride_dwn + rk[None, :]
    tl.store(dw_ptrs, cast_to(acc, dw_ptr.dtype.element_ty), mask=nmask[:, None] & kmask[None, :])
    if HAS_BIAS:
        if pid_k == 0:
            tl.store(db_ptr + rn, cast_to(db, db_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def _grkan_linear_dx_kernel(
    # pointers
    x_ptr,
    dy_ptr,
    w_ptr,
    dx_ptr,
    num_ptr,
    den_ptr,
    dnum_ptr,  # fp32 (G, NP) gradient (atomics), or with DETERMINISTIC (programs, G_SPAN, NP + NQ) partials
    dden_ptr,  # fp32 (G, NQ) gradient (atomics; unused with DETERMINISTIC)
    # sizes: x (M, K), dy (M, N), W (N, K), D = K / G channels per group
    M,
    N,
    K,
    D,
    # strides (x and W any layout; dy and dx unit-stride in their last dimension)
    stride_xm,
    stride_xk,
    stride_dym,
    stride_wn,
    stride_wk,
    stride_dxm,
    # meta-parameters
    NP: tl.constexpr,
    NQ: tl.constexpr,
    G_SPAN: tl.constexpr,
    DOT: tl.constexpr,
    IEEE: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr,
):
    """dF = dy W (fp32) on ROWS_PER_PROGRAM (BLOCK_M, BLOCK_K) tiles of one K column, each followed by the epilogue
    dx = dF F'(x) and the coefficient partial sums (as ``_rational_bwd_kernel``, dF in place of dy), carried in
    registers across the tiles; they leave the program once (``reduce_coef_grads``), as dL/db_k for the denominator
    (kanc's sign of d|b|/db applied)."""
    pid_m, pid_k = swizzle(tl.program_id(0), M, K, BLOCK_M * ROWS_PER_PROGRAM, BLOCK_K, GROUP_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = rk < K
    g = tile_groups(pid_k * BLOCK_K, rk, D, G_SPAN == 1)
    g_first = (pid_k * BLOCK_K) // D
    g_last = (tl.minimum(pid_k * BLOCK_K + BLOCK_K, K) - 1) // D
    sums = zero_sums(NP + NQ, G_SPAN)
    first = pid_m * ROWS_PER_PROGRAM
    for i in range(tl.minimum(ROWS_PER_PROGRAM, tl.cdiv(M, BLOCK_M) - first)):  # the last program may own fewer
        rm = ((first + i) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        mmask = rm < M
        df = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
        for n0 in range(0, N, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            nmask = rn < N
            dy_ptrs = dy_ptr + rm[:, None] * stride_dym + rn[None, :]
            dy = tl.load(dy_ptrs, mask=mmask[:, None] & nmask[None, :], other=0.0)
            w_ptrs = w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk
            w = tl.load(w_ptrs, mask=nmask[:, None] & kmask[None, :], other=0.0)
            df = dot_acc(dy, w, df, DOT, IEEE)
        mask = mmask[:, None] & kmask[None, :]
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
        dx, gq, y = rational_grads(x, df, num_ptr, den_ptr, g, kmask, NP, NQ, G_SPAN == 1)
        tl.store(dx_ptr + rm[:, None] * stride_dxm + rk[None, :], cast_to(dx, dx_ptr.dtype.element_ty), mask=mask)
        sums = add_coef_partials(sums, x, gq, y, mask, g, kmask, g_first, NP, NQ, G_SPAN)
    slot = pid_m * tl.cdiv(K, BLOCK_K) + pid_k
    reduce_coef_grads(dnum_ptr, dden_ptr, den_ptr, slot, sums, g_first, g_last, NP, NQ, G_SPAN, DETERMINISTIC)


# ---------------------------------------------------------------------------------------------------- launchers

# GPU tiles per kernel, each as (output rows, output cols, reduction, num_warps, num_stages) in that kernel's own
# names; the first is the default. Ordered by `benchmarks/compile_report.py` at ViT-B shapes on sm_90: the rational in
# the prologue/epilogue holds BLOCK x BLOCK_K fp32 values per thread on top of the accumulator, so the tiles that
# compile without register spills come first. The tuner times all of them on a GPU.
FWD_TILES = [  # y tile (BLOCK_M, BLOCK_N), K reduced
    (128, 128, 32, 8, 4),
    (64, 128, 64, 4, 4),
    (64, 256, 32, 8, 4),
    (128, 256, 32, 8, 3),
    (64, 128, 32, 4, 4),
    (128, 64, 32, 4, 4),
    (128, 128, 64, 8, 3),
    (64, 64, 64, 4, 4),
]
DW_TILES = [  # dW tile (BLOCK_N, BLOCK_K), M reduced
    (128, 128, 32, 8, 3),
    (128, 64, 64, 8, 3),
    (128, 64, 32, 8, 3),
    (64, 128, 32, 8, 3),
    (64, 128, 64, 8, 3),
    (64, 64, 32, 4, 4),
    (64, 64, 64, 4, 4),
    (128, 128, 64, 8, 3),
]
# dx tile (BLOCK_M, BLOCK_K), N reduced; the epilogue holds ~10 fp32 values per element and the row loop carries the
# coefficient sums: the first six compile spill-free with the loop (ROWS_PER_PROGRAM 8, sm_90), the last two spill
# ~200 B per thread and are left for the tuner to time.
DX_TILES = [
    (64, 64, 64, 8, 3),
    (32, 64, 64, 4, 4),
    (32, 64, 64, 8, 3),
    (64, 64, 32, 8, 3),
    (32, 128, 32, 8, 3),
    (64, 32, 64, 4, 4),
    (128, 64, 64, 8, 3),
    (64, 128, 64, 8, 3),
]
INTERPRETER_TILES = [(64, 64, 64, 4, 1), (32, 32, 32, 4, 1), (16, 16, 16, 4, 1)]  # few programs, little numpy work


@common.memoized
def tile_candidates(tiles, names: tuple[str, str, str], sizes: tuple[int, int, int]) -> list[dict]:
    """Configs from (rows, cols, reduction, warps, stages) tiles, first = the heuristic default.

    Blocks are capped at the problem's size (rounded up to a power of two, at least 16 as tl.dot needs), so a small
    problem does not pay for a large tile; duplicates after capping are dropped.
    """
    cap = lambda block, size: max(16, min(block, common.next_pow2(size)))
    out: list[dict] = []
    for *blocks, warps, stages in INTERPRETER_TILES if interpreting() else tiles:
        cfg = {name: cap(b, size) for name, b, size in zip(names, blocks, sizes)}
        cfg.update(GROUP_M=8, num_warps=warps, num_stages=stages)
        if cfg not in out:
            out.append(cfg)
    return out


@common.memoized
def dx_candidates(rows: int, cols: int, inner: int, min_programs: int) -> list[dict]:
    """Configs of the dx kernel (dx tile (rows, cols), reducing over ``inner``): each tile with its heuristic
    ROWS_PER_PROGRAM (row tiles whose coefficient partial sums a program carries before its atomics), then the default
    tile with other row counts (1, half, double)."""
    tiles = tile_candidates(DX_TILES, ("BLOCK_M", "BLOCK_K", "BLOCK_N"), (rows, cols, inner))
    counts = lambda cfg: (common.cdiv(rows, cfg["BLOCK_M"]), common.cdiv(cols, cfg["BLOCK_K"]))
    return common.with_rows_per_program(tiles, counts, min_programs)


@common.memoized
def matmul_candidates(rows: int, cols: int, inner: int) -> list[dict]:
    """Configs of the forward kernel: y (rows, cols), reducing over ``inner``."""
    return tile_candidates(FWD_TILES, ("BLOCK_M", "BLOCK_N", "BLOCK_K"), (rows, cols, inner))


def _key(m: int, n: int, k: int, groups: int, np_: int, nq: int, dtype: torch.dtype) -> tuple:
    return (common.row_bucket(m), n, k, groups, np_, nq, common.dot_dtype_key(dtype))


class _Plan(NamedTuple):
    """A launch prepared once per operand geometry (``common.planned``): grid, every argument that is not a tensor
    (sizes, strides, constexprs), launch options, the launch record, and how x is passed (its (rows, K) strides,
    or None: copied)."""

    grid: tuple[int, ...]
    args: tuple
    options: dict[str, Any]
    record: launches.Launch
    direct: list | None  # the compiled kernel's launcher, once known (``common.launch_planned``)
    x_strides: tuple[int, int] | None
    extra: tuple = ()
    outputs: tuple = ()  # stand-ins of the launch's outputs (``common.stand_in``)


_fwd_plans: dict = {}
_dw_plans: dict = {}
_dx_plans: dict = {}


def _coefficients(numerator: torch.Tensor, denominator: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return numerator.contiguous(), denominator.contiguous()  # the same tensors when already contiguous


@common.on_tensor_device
def grkan_linear_forward(x, numerator, denominator, weight, bias):
    """Launch the fused forward: y = F(x) W^T + b, shape (..., N), in x's dtype (== weight's dtype)."""
    key = common.dot_plan_key((x, numerator, denominator, weight, bias))
    plan = common.planned(_fwd_plans, key, x.device, _fwd_plan, x, numerator, denominator, weight, bias)
    x2 = common.matrix_of(x, x.shape[-1], plan.x_strides)
    y = torch.empty_like(plan.outputs[0])
    common.launch_planned(
        _grkan_linear_fwd_kernel,
        plan,
        x2,
        weight,
        x2 if bias is None else bias,
        y,
        *_coefficients(numerator, denominator),
    )
    return y


def _fwd_plan(x, numerator, denominator, weight, bias) -> _Plan:
    k_in, n_out, groups = x.shape[-1], weight.shape[0], denominator.shape[0]
    x_strides = common.matrix_strides(x, k_in)
    x2 = common.matrix_of(x, k_in, x_strides).view(-1, k_in)
    num, den = _coefficients(numerator, denominator)
    m, np_, nq = x2.shape[0], num.shape[1], den.shape[1]
    dot, ieee = common.dot_args(x.dtype)

    def grid(cfg: dict) -> tuple[int]:
        return (common.cdiv(m, cfg["BLOCK_M"]) * common.cdiv(n_out, cfg["BLOCK_N"]),)

    def args(cfg: dict) -> tuple:
        return (
            # sizes
            m,
            n_out,
            k_in,
            k_in // groups,
            # strides
            x2.stride(0),
            x2.stride(1),
            weight.stride(0),
            weight.stride(1),
            bias.stride(0) if bias is not None else 0,
            n_out,
            # meta-parameters
            bias is not None,
            np_,
            nq,
            dot,
            ieee,
            (k_in // groups) % cfg["BLOCK_K"] == 0,
            cfg["BLOCK_M"],
            cfg["BLOCK_N"],
            cfg["BLOCK_K"],
            cfg["GROUP_M"],
        )

    def scratch(cfg: dict) -> None:
        out = torch.empty(m, n_out, dtype=x.dtype, device=x.device)
        b = bias if bias is not None else x2
        _grkan_linear_fwd_kernel[grid(cfg)](x2, weight, b, out, num, den, *args(cfg), **common.launch_options(cfg))

    key = _key(m, n_out, k_in, groups, np_, nq, x.dtype)
    candidates = matmul_candidates(m, n_out, k_in)
    cfg = common.choose(_grkan_linear_fwd_kernel, key, candidates, scratch, x.device)
    shapes = [x.shape, weight.shape, num.shape, den.shape]
    record = common.launch_record(
        OP, _grkan_linear_fwd_kernel, grid(cfg), cfg, shapes, x.dtype, "forward", placement="prologue"
    )
    outputs = (common.stand_in((*x.shape[:-1], n_out), x.dtype, x.device),)
    direct = common.direct_launches(x.device)
    return _Plan(grid(cfg), args(cfg), common.launch_options(cfg), record, direct, x_strides, outputs=outputs)


@common.on_tensor_device
def grkan_linear_backward(grad, x, numerator, denominator, weight, has_bias: bool):
    """Launch the two backward kernels: (dx, d numerator, d denominator, dW, db or an empty tensor).

    The dx kernel writes the final coefficient gradients (fp32, kanc's sign of d|b|/db applied; cast only for
    coefficients in another dtype). They are reduced with atomics, or bitwise reproducibly when torch's deterministic
    mode is on."""
    key = common.dot_plan_key((grad, x, numerator, denominator, weight), has_bias)
    plans = common.planned(_bwd_plans, key, x.device, _bwd_plan, grad, x, numerator, denominator, weight, has_bias)
    dy_stride, x_strides, dw_plan, dx_plan, dx_stand_in = plans
    k_in, n_out = x.shape[-1], weight.shape[0]
    if grad.dtype != x.dtype:
        grad = grad.to(x.dtype)
    dy2 = common.rows_of(grad, n_out, dy_stride)
    x2 = common.matrix_of(x, k_in, x_strides)
    num, den = _coefficients(numerator, denominator)
    dw, db = torch.empty_like(dw_plan.outputs[0]), torch.empty_like(dw_plan.outputs[1])
    common.launch_planned(_grkan_linear_dw_kernel, dw_plan, x2, dy2, dw, db if has_bias else dw, num, den)
    dx = torch.empty_like(dx_stand_in)
    dnum, dden = coefficient_grads(dx_plan.extra, dx_plan.outputs[1:])
    common.launch_planned(_grkan_linear_dx_kernel, dx_plan, x2, dy2, weight, dx, num, den, dnum, dden)
    return dx, *final_coefficient_grads(dx_plan.extra, dnum, dden, numerator.dtype, denominator.dtype), dw, db


_bwd_plans: dict = {}


def _bwd_plan(grad, x, numerator, denominator, weight, has_bias: bool) -> tuple:
    """(dy's row stride, x's matrix strides, the dW plan, the dx plan, a stand-in of dx): how the backward passes its
    (rows, N) dy and (rows, K) x (views when they can be, else copies), launches its two kernels and allocates dx."""
    k_in, n_out = x.shape[-1], weight.shape[0]
    if grad.dtype != x.dtype:  # converted per call: a tensor of the same layout (row-major where not dense)
        grad = grad.to(x.dtype)
    dy_stride, x_strides = common.row_stride(grad, n_out), common.matrix_strides(x, k_in)
    dy2 = common.rows_of(grad, n_out, dy_stride).view(-1, n_out)
    x2 = common.matrix_of(x, k_in, x_strides).view(-1, k_in)
    dw = torch.empty(weight.shape, dtype=weight.dtype, device=x.device)
    db = torch.empty(n_out if has_bias else 0, dtype=weight.dtype, device=x.device)
    return (
        dy_stride,
        x_strides,
        _dw_plan(x2, dy2, numerator, denominator, dw, db, has_bias),
        _dx_plan(x2, dy2, weight, numerator, denominator),
        common.stand_in(x.shape, x.dtype, x.device),
    )


def launch_dw(x2, dy2, numerator, denominator, dw, db, has_bias: bool) -> None:
    """dW = dy^T F(x) into ``dw`` (and db = dy's column sums into ``db`` when ``has_bias``); x2 (M, K), dy2 (M, N)
    with a unit column stride."""
    key = common.dot_plan_key((x2, dy2, numerator, denominator, dw, db if has_bias else None))
    plan = common.planned(_dw_plans, key, x2.device, _dw_plan, x2, dy2, numerator, denominator, dw, db, has_bias)
    common.launch_planned(
        _grkan_linear_dw_kernel, plan, x2, dy2, dw, db if has_bias else dw, *_coefficients(numerator, denominator)
    )


def _dw_plan(x2, dy2, numerator, denominator, dw, db, has_bias: bool) -> _Plan:
    (m, k_in), n_out, groups = x2.shape, dy2.shape[1], denominator.shape[0]
    num, den = _coefficients(numerator, denominator)
    np_, nq = num.shape[1], den.shape[1]
    dot, ieee = common.dot_args(x2.dtype)

    def grid(cfg: dict) -> tuple[int]:
        return (common.cdiv(n_out, cfg["BLOCK_N"]) * common.cdiv(k_in, cfg["BLOCK_K"]),)

    def args(cfg: dict) -> tuple:
        return (
            # sizes
            m,
            n_out,
            k_in,
            k_in // groups,
            # strides
            x2.stride(0),
            x2.stride(1),
            dy2.stride(0),
            dw.stride(0),
            # meta-parameters
            has_bias,
            np_,
            nq,
            dot,
            ieee,
            (k_in // groups) % cfg["BLOCK_K"] == 0,
            cfg["BLOCK_M"],
            cfg["BLOCK_N"],
            cfg["BLOCK_K"],
            cfg["GROUP_M"],
        )

    def scratch(cfg: dict) -> None:
        out, out_b = torch.empty_like(dw), torch.empty_like(db)
        tensors = (x2, dy2, out, out_b if has_bias else out, num, den)
        _grkan_linear_dw_kernel[grid(cfg)](*tensors, *args(cfg), **common.launch_options(cfg))

    candidates = tile_candidates(DW_TILES, ("BLOCK_N", "BLOCK_K", "BLOCK_M"), (n_out, k_in, m))
    key = _key(m, n_out, k_in, groups, np_, nq, x2.dtype)
    cfg = common.choose(_grkan_linear_dw_kernel, key, candidates, scratch, x2.device)
    shapes = [x2.shape, dy2.shape, dw.shape]
    record = common.launch_record(
        OP, _grkan_linear_dw_kernel, grid(cfg), cfg, shapes, x2.dtype, "backward", grads="weight,bias"
    )
    outputs = (common.stand_in(dw.shape, dw.dtype, dw.device), common.stand_in(db.shape, db.dtype, db.device))
    direct = common.direct_launches(x2.device)
    return _Plan(grid(cfg), args(cfg), common.launch_options(cfg), record, direct, None, outputs=outputs)


def launch_dx(x2, dy2, weight, numerator, denominator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx (M, K), d numerator, d denominator) of y = F(x) W^T: dF = dy W, then dx = dF F'(x) and the coefficient
    gradients in the epilogue; x2 (M, K), dy2 (M, N) with a unit column stride."""
    key = common.dot_plan_key((x2, dy2, weight, numerator, denominator))
    plan = common.planned(_dx_plans, key, x2.device, _dx_plan, x2, dy2, weight, numerator, denominator)
    dx = torch.empty_like(plan.outputs[0])
    dnum, dden = coefficient_grads(plan.extra, plan.outputs[1:])
    common.launch_planned(
        _grkan_linear_dx_kernel, plan, x2, dy2, weight, dx, *_coefficients(numerator, denominator), dnum, dden
    )
    return dx, *final_coefficient_grads(plan.extra, dnum, dden, numerator.dtype, denominator.dtype)


def _dx_plan(x2, dy2, weight, numerator, denominator) -> _Plan:
    (m, k_in), n_out, groups = x2.shape, dy2.shape[1], denominator.shape[0]
    num, den = _coefficients(numerator, denominator)
    np_, nq, group_size = num.shape[1], den.shape[1], k_in // groups
    dot, ieee = common.dot_args(x2.dtype)
    det = common.deterministic()

    def row_programs(cfg: dict) -> int:
        return common.cdiv(common.cdiv(m, cfg["BLOCK_M"]), cfg["ROWS_PER_PROGRAM"])

    def grid(cfg: dict) -> tuple[int]:
        return (row_programs(cfg) * common.cdiv(k_in, cfg["BLOCK_K"]),)

    def args(cfg: dict) -> tuple:
        return (
            # sizes
            m,
            n_out,
            k_in,
            group_size,
            # strides
            x2.stride(0),
            x2.stride(1),
            dy2.stride(0),
            weight.stride(0),
            weight.stride(1),
            k_in,
            # meta-parameters
            np_,
            nq,
            group_span(cfg["BLOCK_K"], group_size),
            dot,
            ieee,
            det,
            cfg["BLOCK_M"],
            cfg["BLOCK_N"],
            cfg["BLOCK_K"],
            cfg["GROUP_M"],
            cfg["ROWS_PER_PROGRAM"],
        )

    def buffers(cfg: dict) -> tuple:
        tiles = (row_programs(cfg), common.cdiv(k_in, cfg["BLOCK_K"]))
        return tiles, group_span(cfg["BLOCK_K"], group_size), groups, np_, nq, k_in, cfg["BLOCK_K"], det

    def scratch(cfg: dict) -> None:
        dx = torch.empty(m, k_in, dtype=x2.dtype, device=x2.device)
        dnum, dden = coefficient_grads(buffers(cfg), coefficient_stand_ins(buffers(cfg), x2.device))
        tensors = (x2, dy2, weight, dx, num, den, dnum, dden)
        _grkan_linear_dx_kernel[grid(cfg)](*tensors, *args(cfg), **common.launch_options(cfg))

    # the output tile is (M, K) and the reduction runs over N
    candidates = dx_candidates(m, k_in, n_out, common.min_programs(x2.device))
    key = _key(m, n_out, k_in, groups, np_, nq, x2.dtype)
    cfg = common.choose(_grkan_linear_dx_kernel, key, candidates, scratch, x2.device)
    atomics = 0 if det else row_programs(cfg) * groups_touched(k_in, group_size, cfg["BLOCK_K"]) * (np_ + nq)
    record = common.launch_record(
        OP,
        _grkan_linear_dx_kernel,
        grid(cfg),
        cfg,
        [x2.shape, dy2.shape, weight.shape],
        x2.dtype,
        "backward",
        atomics,
        grads="input,coefficients",
        coefficients=np_ + nq,
        deterministic=det,
    )
    direct = common.direct_launches(x2.device)
    outputs = (common.stand_in(x2.shape, x2.dtype, x2.device), *coefficient_stand_ins(buffers(cfg), x2.device))
    return _Plan(grid(cfg), args(cfg), common.launch_options(cfg), record, direct, None, buffers(cfg), outputs)
