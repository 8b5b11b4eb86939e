"""Group-rational Triton kernels: forward, backward (dx and per-program coefficient gradients), launchers.

The math of ``kanc.codegen.rational.rational_ref`` on (rows, C) tiles, fp32 in registers, I/O in the tensor's dtype.
The ``@triton.jit`` helpers (``_rational_pq``, ``_rational_grads``, ``_coef_grads``) are shared with the fused GR-KAN
linear kernels, which evaluate the same rational in a matmul's prologue or epilogue.

Coefficient gradients (FlashKAT's design, not KAT's per-element global atomics): each program reduces its tile over
rows in registers, then over the columns of each group it touches, and issues one atomic add per (group, coefficient)
it touches. A tile may straddle groups (C / G not a multiple of BLOCK_C): the per-group sum uses a one-hot mask over
at most G_SPAN groups per tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kanc.codegen.checker import interpreting
from kanc.codegen.kernels import common
from kanc.codegen.kernels.common import cast_to

OP = "kanc::group_rational"


@triton.jit
def _coef(ptr, g, k, NCOEF: tl.constexpr, cmask, UNIFORM: tl.constexpr):
    """Coefficient k in fp32: with UNIFORM (the tile lies in one group, g a scalar) one scalar, else that of each
    column's group g as a (1, BLOCK_C) row. Scalars keep 10 vectors of coefficients out of the registers."""
    if UNIFORM:
        return tl.load(ptr + g * NCOEF + k).to(tl.float32)
    else:
        return tl.load(ptr + g * NCOEF + k, mask=cmask, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _rational_pq(x, num_ptr, den_ptr, g, cmask, NP: tl.constexpr, NQ: tl.constexpr, UNIFORM: tl.constexpr):
    """P(x) and Q(x) for an fp32 (rows, cols) tile, by Horner in the reference's order (same rounding, same NaNs)."""
    p = tl.zeros(x.shape, tl.float32) + _coef(num_ptr, g, NP - 1, NP, cmask, UNIFORM)
    for i in tl.static_range(1, NP):
        p = p * x + _coef(num_ptr, g, NP - 1 - i, NP, cmask, UNIFORM)
    ax = tl.abs(x)
    q = tl.full(x.shape, 1.0, tl.float32)
    if NQ > 0:
        q = tl.abs(_coef(den_ptr, g, NQ - 1, NQ, cmask, UNIFORM)) * ax
        for i in tl.static_range(1, NQ):
            q = (q + tl.abs(_coef(den_ptr, g, NQ - 1 - i, NQ, cmask, UNIFORM))) * ax
        q = q + 1.0
    return p, q


@triton.jit
def _rational_grads(x, dy, num_ptr, den_ptr, g, cmask, NP: tl.constexpr, NQ: tl.constexpr, UNIFORM: tl.constexpr):
    """(dx, dy / Q, F(x)) for fp32 tiles: dx = dy (P' - F sign(x) Q'(|x|)) / Q."""
    p, q = _rational_pq(x, num_ptr, den_ptr, g, cmask, NP, NQ, UNIFORM)
    dp = tl.zeros(x.shape, tl.float32)
    if NP > 1:
        dp += _coef(num_ptr, g, NP - 1, NP, cmask, UNIFORM) * (NP - 1)
        for i in tl.static_range(2, NP):
            dp = dp * x + _coef(num_ptr, g, NP - i, NP, cmask, UNIFORM) * (NP - i)
    ax = tl.abs(x)
    dq = tl.zeros(x.shape, tl.float32)
    if NQ > 0:
        dq += tl.abs(_coef(den_ptr, g, NQ - 1, NQ, cmask, UNIFORM)) * NQ
        for i in tl.static_range(1, NQ):
            dq = dq * ax + tl.abs(_coef(den_ptr, g, NQ - 1 - i, NQ, cmask, UNIFORM)) * (NQ - i)
    sign = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
    gq = dy / q
    y = p / q
    return gq * (dp - y * sign * dq), gq, y


@triton.jit
def _group_atomic_add(acc_ptr, s, g, cmask, g_first, g_last, k, NCOEF: tl.constexpr, G_SPAN: tl.constexpr):
    """acc[group, k] += sum of ``s`` (per-column partial sums) over each group's columns: one atomic per group."""
    if G_SPAN == 1:
        tl.atomic_add(acc_ptr + g_first * NCOEF + k, tl.sum(tl.where(cmask, s, 0.0), axis=0))
    else:
        j = tl.arange(0, G_SPAN)
        hit = ((g - g_first)[:, None] == j[None, :]) & cmask[:, None]
        total = tl.sum(tl.where(hit, s[:, None], 0.0), axis=0)
        tl.atomic_add(acc_ptr + (g_first + j) * NCOEF + k, total, mask=g_first + j <= g_last)


@triton.jit
def _coef_grads(
    acc_ptr, x, gq, y, mask, g, cmask, g_first, g_last, NP: tl.constexpr, NQ: tl.constexpr, G_SPAN: tl.constexpr
):
    """Accumulate dF/da_k = dy x^k / Q and dF/d|b_k| = -dy F |x|^(k+1) / Q into acc (G, NP + NQ), fp32."""
    t = tl.where(mask, gq, 0.0)
    for k in tl.static_range(NP):
        _group_atomic_add(acc_ptr, tl.sum(t, axis=0), g, cmask, g_first, g_last, k, NP + NQ, G_SPAN)
        t = t * x
    ax = tl.abs(x)
    u = tl.where(mask, -gq * y, 0.0)
    for k in tl.static_range(NQ):
        u = u * ax
        _group_atomic_add(acc_ptr, tl.sum(u, axis=0), g, cmask, g_first, g_last, NP + k, NP + NQ, G_SPAN)


@triton.jit
def _tile(pid_r, pid_c, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    return rows, cols, cmask, (rows[:, None] < R) & cmask[None, :]


@triton.jit
def _groups(pid_c, cols, D, BLOCK_C: tl.constexpr, UNIFORM: tl.constexpr):
    """Group of the tile (a scalar) when it lies in one group, else the group of each column."""
    if UNIFORM:
        return (pid_c * BLOCK_C) // D
    else:
        return cols // D


@triton.jit
def _rational_fwd_kernel(
    x_ptr,
    y_ptr,
    num_ptr,
    den_ptr,
    R,
    C,
    D,
    stride_x,
    stride_y,
    NP: tl.constexpr,
    NQ: tl.constexpr,
    UNIFORM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """y = F(x) on one (BLOCK_R, BLOCK_C) tile of the (R, C) view; D = C / G channels per group."""
    pid_c = tl.program_id(1)
    rows, cols, cmask, mask = _tile(tl.program_id(0), pid_c, R, C, BLOCK_R, BLOCK_C)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = _groups(pid_c, cols, D, BLOCK_C, UNIFORM)
    p, q = _rational_pq(x, num_ptr, den_ptr, g, cmask, NP, NQ, UNIFORM)
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], cast_to(p / q, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rational_bwd_kernel(
    x_ptr,
    dy_ptr,
    dx_ptr,
    num_ptr,
    den_ptr,
    acc_ptr,
    R,
    C,
    D,
    stride_x,
    stride_dy,
    stride_dx,
    NP: tl.constexpr,
    NQ: tl.constexpr,
    G_SPAN: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """dx on one tile, and the tile's coefficient-gradient partial sums: one atomic per (group, coefficient)."""
    pid_c = tl.program_id(1)
    rows, cols, cmask, mask = _tile(tl.program_id(0), pid_c, R, C, BLOCK_R, BLOCK_C)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = _groups(pid_c, cols, D, BLOCK_C, G_SPAN == 1)
    dx, gq, y = _rational_grads(x, dy, num_ptr, den_ptr, g, cmask, NP, NQ, G_SPAN == 1)
    tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], cast_to(dx, dx_ptr.dtype.element_ty), mask=mask)
    g_first = (pid_c * BLOCK_C) // D
    g_last = (tl.minimum(pid_c * BLOCK_C + BLOCK_C, C) - 1) // D
    _coef_grads(acc_ptr, x, gq, y, mask, g, cmask, g_first, g_last, NP, NQ, G_SPAN)


# ---------------------------------------------------------------------------------------------------- launchers


def group_span(block_c: int, group_size: int) -> int:
    """G_SPAN: the most groups one BLOCK_C-wide column tile can touch (a power of two for tl.arange)."""
    if group_size % block_c == 0:
        return 1
    return common.next_pow2(-(-(block_c - 1) // group_size) + 1)


def groups_touched(channels: int, group_size: int, block_c: int) -> int:
    """Sum over column tiles of the groups each touches: atomics per coefficient per row of programs."""
    total = 0
    for start in range(0, channels, block_c):
        total += (min(start + block_c, channels) - 1) // group_size - start // group_size + 1
    return total


# (BLOCK_R, BLOCK_C, num_warps): 16 elements per thread each (ptxas at sm_90: the backward's ~15 live fp32 values per
# element stay in registers without spills; 32 per thread reach 255 registers). First = default on a GPU.
GPU_TILES = [(16, 128, 4), (32, 128, 8), (64, 64, 8), (16, 256, 8), (8, 128, 2), (32, 256, 16), (64, 128, 16)]
INTERPRETER_TILES = [(32, 128, 4), (16, 64, 4), (64, 64, 4)]  # few programs: the interpreter pays per program


def elementwise_candidates(rows: int, channels: int, group_size: int) -> list[dict]:
    """Tile configs; the first is the heuristic default, group-aligned column tiles (scalar coefficients) first."""
    tiles = INTERPRETER_TILES if interpreting() else GPU_TILES
    col_cap, row_cap = max(common.next_pow2(channels), 32), max(common.next_pow2(rows), 8)
    out = []
    for br, bc, warps in tiles:
        cfg = {"BLOCK_R": min(br, row_cap), "BLOCK_C": min(bc, col_cap), "num_warps": warps}
        if cfg not in out:
            out.append(cfg)
    aligned = lambda cfg: group_size % cfg["BLOCK_C"] == 0
    return sorted(out, key=lambda cfg: not aligned(cfg))  # stable: the order above within each class


def _key(rows: int, channels: int, groups: int, dtype: torch.dtype, np_: int, nq: int) -> tuple:
    return (common.row_bucket(rows), channels, groups, np_, nq, str(dtype).removeprefix("torch."))


def rational_forward(x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """Launch the forward kernel: y = F(x) in x's dtype, same shape."""
    channels, groups = x.shape[-1], denominator.shape[0]
    x2 = common.as_rows(x, channels)
    num, den = numerator.contiguous(), denominator.contiguous()
    rows, np_, nq = x2.shape[0], num.shape[1], den.shape[1]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y2 = y.view(-1, channels)

    def run(cfg: dict, out: torch.Tensor = y2) -> tuple:
        grid = (triton.cdiv(rows, cfg["BLOCK_R"]), triton.cdiv(channels, cfg["BLOCK_C"]))
        _rational_fwd_kernel[grid](
            x2, out, num, den, rows, channels, channels // groups, x2.stride(0), out.stride(0), np_, nq,
            (channels // groups) % cfg["BLOCK_C"] == 0, cfg["BLOCK_R"], cfg["BLOCK_C"], **common.launch_options(cfg),
        )  # fmt: skip
        return grid

    key = _key(rows, channels, groups, x.dtype, np_, nq)
    candidates = elementwise_candidates(rows, channels, channels // groups)
    cfg = common.choose(_rational_fwd_kernel, key, candidates, lambda c: run(c, torch.empty_like(y2)), x.device)
    grid = run(cfg)
    common.record(OP, _rational_fwd_kernel, grid, cfg, [x.shape, num.shape, den.shape], x.dtype, "forward")
    return y


def rational_backward(
    grad: torch.Tensor, x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernel: (dx in x's dtype, d numerator, d denominator in the coefficients' dtypes)."""
    channels, groups = x.shape[-1], denominator.shape[0]
    x2, dy2 = common.as_rows(x, channels), common.as_rows(grad.to(x.dtype), channels)
    num, den = numerator.contiguous(), denominator.contiguous()
    rows, np_, nq, group_size = x2.shape[0], num.shape[1], den.shape[1], channels // groups
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dx2 = dx.view(-1, channels)
    acc = torch.zeros(groups, np_ + nq, dtype=torch.float32, device=x.device)

    def run(cfg: dict, out: torch.Tensor = dx2, sums: torch.Tensor = acc) -> tuple:
        grid = (triton.cdiv(rows, cfg["BLOCK_R"]), triton.cdiv(channels, cfg["BLOCK_C"]))
        _rational_bwd_kernel[grid](
            x2, dy2, out, num, den, sums, rows, channels, group_size, x2.stride(0), dy2.stride(0), out.stride(0),
            np_, nq, group_span(cfg["BLOCK_C"], group_size), cfg["BLOCK_R"], cfg["BLOCK_C"],
            **common.launch_options(cfg),
        )  # fmt: skip
        return grid

    key = _key(rows, channels, groups, x.dtype, np_, nq)
    candidates = elementwise_candidates(rows, channels, group_size)
    scratch = lambda c: run(c, torch.empty_like(dx2), torch.zeros_like(acc))
    cfg = common.choose(_rational_bwd_kernel, key, candidates, scratch, x.device)
    grid = run(cfg)
    atomics = grid[0] * groups_touched(channels, group_size, cfg["BLOCK_C"]) * (np_ + nq)
    shapes = [x.shape, num.shape, den.shape]
    common.record(OP, _rational_bwd_kernel, grid, cfg, shapes, x.dtype, "backward", atomics, coefficients=np_ + nq)
    return dx, acc[:, :np_].to(numerator.dtype).contiguous(), (acc[:, np_:] * torch.sign(den)).to(denominator.dtype)
