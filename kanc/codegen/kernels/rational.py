"""Group-rational Triton kernels: forward, backward (dx and per-program coefficient gradients), launchers.

The math of ``kanc.codegen.rational.rational_ref`` on (rows, C) tiles, fp32 in registers, I/O in the tensor's dtype.
The rational's ``@triton.jit`` math (P and Q, gradients, coefficient sums and their reduction) lives in
``kanc.codegen.kernels.jit_common``, shared with the fused GR-KAN linear kernels, which evaluate the same rational in a
matmul's prologue or epilogue.

Coefficient gradients (FlashKAT's design, not KAT's per-element global atomics): each program owns one column tile
and ROWS_PER_PROGRAM consecutive row tiles (a tuning dimension). It reduces every tile over its rows and over the
columns of each group it touches into sums that stay in registers across its row tiles (a tuple of NP + NQ vectors of
G_SPAN, the most groups a column tile can touch), then issues one atomic add per (group, coefficient): atomics = row
programs x groups touched by the column tiles x coefficients, ROWS_PER_PROGRAM times fewer than one program per tile.
A tile may straddle groups (C / G not a multiple of BLOCK_C): the per-group sum uses a one-hot mask over the G_SPAN
groups.

Determinism: fp32 atomics add in whatever order programs finish, so their sums differ in the last bits run to run.
Under ``torch.use_deterministic_algorithms(True)`` each program stores its sums into its own slot of a partials buffer
instead, and the launcher adds the slots up in a fixed order (``sum_coef_partials``): no atomics, bitwise reproducible.
"""

from __future__ import annotations

import functools
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
    rational_grads,
    rational_pq,
    reduce_coef_grads,
    tile_groups,
    zero_sums,
)

OP = "kanc::group_rational"


@triton.jit
def _tile(pid_r, pid_c, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows (int64), columns, the column mask and the element mask of tile (pid_r, pid_c) of an (R, C) matrix."""
    rows = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    return rows, cols, cmask, (rows[:, None] < R) & cmask[None, :]


@triton.jit
def _rational_fwd_kernel(
    # pointers
    x_ptr,
    y_ptr,
    num_ptr,
    den_ptr,
    # sizes: R rows of C channels, D = C / G channels per group
    R,
    C,
    D,
    # strides (rows; columns are unit-stride)
    stride_x,
    stride_y,
    # meta-parameters
    NP: tl.constexpr,
    NQ: tl.constexpr,
    UNIFORM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """y = F(x) = P(x) / Q(x) on one (BLOCK_R, BLOCK_C) tile of the (R, C) view, each column with its group's
    coefficients (one scalar set when UNIFORM: the tile lies in one group)."""
    pid_c = tl.program_id(1)
    rows, cols, cmask, mask = _tile(tl.program_id(0), pid_c, R, C, BLOCK_R, BLOCK_C)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tile_groups(pid_c * BLOCK_C, cols, D, UNIFORM)
    p, q = rational_pq(x, num_ptr, den_ptr, g, cmask, NP, NQ, UNIFORM)
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], cast_to(p / q, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rational_bwd_kernel(
    # pointers
    x_ptr,
    dy_ptr,
    dx_ptr,
    num_ptr,
    den_ptr,
    dnum_ptr,  # fp32 (G, NP) gradient (atomics), or with DETERMINISTIC (programs, G_SPAN, NP + NQ) partials
    dden_ptr,  # fp32 (G, NQ) gradient (atomics; unused with DETERMINISTIC)
    # sizes: R rows of C channels, D = C / G channels per group
    R,
    C,
    D,
    # strides (rows; columns are unit-stride)
    stride_x,
    stride_dy,
    stride_dx,
    # meta-parameters
    NP: tl.constexpr,
    NQ: tl.constexpr,
    G_SPAN: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr,
):
    """dx = dy (P'(x) - F(x) sign(x) Q'(|x|)) / Q(x), and per group dL/da_k = sum dy x^k / Q (k = 0..NP-1) and
    dL/d|b_k| = -sum dy F |x|^k / Q (k = 1..NQ), on ROWS_PER_PROGRAM row tiles of one column tile: the coefficient sums
    are carried in registers across the tiles, then leave the program once (``reduce_coef_grads``: one atomic per
    group and coefficient, or one store), as dL/db_k (kanc's sign of d|b|/db applied)."""
    pid_c = tl.program_id(1)
    first = tl.program_id(0) * ROWS_PER_PROGRAM
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    g = tile_groups(pid_c * BLOCK_C, cols, D, G_SPAN == 1)
    g_first = (pid_c * BLOCK_C) // D
    g_last = (tl.minimum(pid_c * BLOCK_C + BLOCK_C, C) - 1) // D
    sums = zero_sums(NP + NQ, G_SPAN)
    # 32-bit offsets within a tile, loop-invariant; each tile moves 64-bit scalar bases (few registers per element)
    r = tl.arange(0, BLOCK_R)
    off_x, off_dy = r[:, None] * stride_x + cols[None, :], r[:, None] * stride_dy + cols[None, :]
    off_dx = r[:, None] * stride_dx + cols[None, :]
    for i in range(tl.minimum(ROWS_PER_PROGRAM, tl.cdiv(R, BLOCK_R) - first)):  # the last program may own fewer
        row0 = ((first + i) * BLOCK_R).to(tl.int64)
        mask = (row0 + r[:, None] < R) & cmask[None, :]
        x = tl.load(x_ptr + row0 * stride_x + off_x, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row0 * stride_dy + off_dy, mask=mask, other=0.0).to(tl.float32)
        dx, gq, y = rational_grads(x, dy, num_ptr, den_ptr, g, cmask, NP, NQ, G_SPAN == 1)
        tl.store(dx_ptr + row0 * stride_dx + off_dx, cast_to(dx, dx_ptr.dtype.element_ty), mask=mask)
        sums = add_coef_partials(sums, x, gq, y, mask, g, cmask, g_first, NP, NQ, G_SPAN)
    slot = tl.program_id(0) * tl.num_programs(1) + pid_c
    reduce_coef_grads(dnum_ptr, dden_ptr, den_ptr, slot, sums, g_first, g_last, NP, NQ, G_SPAN, DETERMINISTIC)


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


# (BLOCK_R, BLOCK_C, num_warps), first = default on a GPU. Forward: 16 elements per thread each (ptxas at sm_90: the
# ~15 live fp32 values per element stay in registers without spills; 32 per thread reach 255 registers).
GPU_TILES = [(16, 128, 4), (32, 128, 8), (64, 64, 8), (16, 256, 8), (8, 128, 2), (32, 256, 16), (64, 128, 16)]
# Backward: the row loop keeps loop-invariant offsets and coefficients live across its tiles, so a tile of 16 elements
# per thread needs ~203 registers there (2 programs of 4 warps per SM at sm_90) against 128 without the loop; 8 per
# thread needs ~80 (6 programs per SM, 3/4 of the elements in flight per SM of the unlooped kernel). Default: 8.
BWD_GPU_TILES = [(8, 128, 4), (8, 256, 8), (16, 128, 8), (8, 64, 2), (4, 256, 4), (16, 128, 4), (32, 32, 4)]
INTERPRETER_TILES = [(32, 128, 4), (16, 64, 4), (64, 64, 4)]  # few programs: the interpreter pays per program


@common.memoized
def elementwise_candidates(rows: int, channels: int, group_size: int, tiles=None) -> list[dict]:
    """Tile configs; the first is the heuristic default, group-aligned column tiles (scalar coefficients) first."""
    tiles = INTERPRETER_TILES if interpreting() else (tiles or GPU_TILES)
    col_cap, row_cap = max(common.next_pow2(channels), 32), max(common.next_pow2(rows), 8)
    out = []
    for br, bc, warps in tiles:
        cfg = {"BLOCK_R": min(br, row_cap), "BLOCK_C": min(bc, col_cap), "num_warps": warps}
        if cfg not in out:
            out.append(cfg)
    aligned = lambda cfg: group_size % cfg["BLOCK_C"] == 0
    return sorted(out, key=lambda cfg: not aligned(cfg))  # stable: the order above within each class


@common.memoized
def backward_candidates(rows: int, channels: int, group_size: int, min_programs: int) -> list[dict]:
    """Backward configs: each tile with its heuristic ROWS_PER_PROGRAM (``common.rows_per_program``), then the default
    tile with other row counts (1, half, double). First = the heuristic default."""
    tiles = elementwise_candidates(rows, channels, group_size, BWD_GPU_TILES)
    counts = lambda cfg: (common.cdiv(rows, cfg["BLOCK_R"]), common.cdiv(channels, cfg["BLOCK_C"]))
    return common.with_rows_per_program(tiles, counts, min_programs)


def _key(rows: int, channels: int, groups: int, dtype: torch.dtype, np_: int, nq: int) -> tuple:
    return (common.row_bucket(rows), channels, groups, np_, nq, str(dtype).removeprefix("torch."))


class _Plan(NamedTuple):
    """A launch prepared once per operand geometry (``common.planned``): the grid, every argument that is not a tensor
    (sizes, strides, constexprs, launch options), how each operand is passed, and the launch record."""

    grid: tuple[int, ...]
    args: tuple
    options: dict[str, Any]
    strides: tuple[int | None, ...]  # per row operand: its row stride, or None when it must be copied (common.rows_of)
    contiguous: tuple[bool, ...]  # numerator, denominator already contiguous
    record: launches.Launch
    direct: list | None  # the compiled kernel's launcher, once known (``common.launch_planned``)
    extra: tuple = ()
    outputs: tuple = ()  # stand-ins of the launch's outputs (``common.stand_in``)


_fwd_plans: dict = {}
_bwd_plans: dict = {}


@common.on_tensor_device
def rational_forward(x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """Launch the forward kernel: y = F(x) in x's dtype, same shape."""
    plan = common.planned(
        _fwd_plans, common.operands_key(x, numerator, denominator), x.device, _fwd_plan, x, numerator, denominator
    )
    y = torch.empty_like(plan.outputs[0])
    num, den = _coefficients(plan, numerator, denominator)
    common.launch_planned(_rational_fwd_kernel, plan, common.rows_of(x, x.shape[-1], plan.strides[0]), y, num, den)
    return y


def _coefficients(plan: _Plan, numerator: torch.Tensor, denominator: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    num = numerator if plan.contiguous[0] else numerator.contiguous()
    return num, denominator if plan.contiguous[1] else denominator.contiguous()


def _fwd_plan(x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor) -> _Plan:
    channels, groups = x.shape[-1], denominator.shape[0]
    stride = common.row_stride(x, channels)
    rows, np_, nq, group_size = x.numel() // channels, numerator.shape[1], denominator.shape[1], channels // groups
    num, den = numerator.contiguous(), denominator.contiguous()
    x2 = common.rows_of(x, channels, stride)

    def args(cfg: dict) -> tuple:
        return (
            # sizes
            rows,
            channels,
            group_size,
            # strides of x and y
            channels if stride is None else stride,
            channels,
            # meta-parameters
            np_,
            nq,
            group_size % cfg["BLOCK_C"] == 0,
            cfg["BLOCK_R"],
            cfg["BLOCK_C"],
        )

    def grid(cfg: dict) -> tuple[int, int]:
        return common.cdiv(rows, cfg["BLOCK_R"]), common.cdiv(channels, cfg["BLOCK_C"])

    def scratch(cfg: dict) -> None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        _rational_fwd_kernel[grid(cfg)](x2, out, num, den, *args(cfg), **common.launch_options(cfg))

    key = _key(rows, channels, groups, x.dtype, np_, nq)
    candidates = elementwise_candidates(rows, channels, group_size)
    cfg = common.choose(_rational_fwd_kernel, key, candidates, scratch, x.device)
    shapes = [x.shape, num.shape, den.shape]
    record = common.launch_record(OP, _rational_fwd_kernel, grid(cfg), cfg, shapes, x.dtype, "forward")
    contiguous = (numerator.is_contiguous(), denominator.is_contiguous())
    options, direct = common.launch_options(cfg), common.direct_launches(x.device)
    outputs = (common.stand_in(x.shape, x.dtype, x.device),)
    return _Plan(grid(cfg), args(cfg), options, (stride,), contiguous, record, direct, outputs=outputs)


@common.on_tensor_device
def rational_backward(
    grad: torch.Tensor, x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernel: (dx in x's dtype, d numerator, d denominator in the coefficients' dtypes).

    The kernel writes the final coefficient gradients (fp32, kanc's sign of d|b|/db applied); they are cast only for
    coefficients in another dtype. Coefficient gradients are reduced with atomics, or bitwise reproducibly when
    torch's deterministic mode is on."""
    key = common.operands_key(grad, x, numerator, denominator)
    plan = common.planned(_bwd_plans, key, x.device, _bwd_plan, grad, x, numerator, denominator)
    channels = x.shape[-1]
    if grad.dtype != x.dtype:
        grad = grad.to(x.dtype)
    dy = common.rows_of(grad, channels, plan.strides[0])
    num, den = _coefficients(plan, numerator, denominator)
    dx = torch.empty_like(plan.outputs[0])
    dnum, dden = coefficient_grads(plan.extra, plan.outputs[1:])
    rows = common.rows_of(x, channels, plan.strides[1])
    common.launch_planned(_rational_bwd_kernel, plan, rows, dy, dx, num, den, dnum, dden)
    return dx, *final_coefficient_grads(plan.extra, dnum, dden, numerator.dtype, denominator.dtype)


def _bwd_plan(grad: torch.Tensor, x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor) -> _Plan:
    channels, groups = x.shape[-1], denominator.shape[0]
    if grad.dtype != x.dtype:  # converted per call: a new tensor of grad's layout (or row-major when not dense)
        grad = grad.to(x.dtype)
    strides = (common.row_stride(grad, channels), common.row_stride(x, channels))
    x2, dy2 = common.rows_of(x, channels, strides[1]), common.rows_of(grad, channels, strides[0])
    num, den = numerator.contiguous(), denominator.contiguous()
    rows, np_, nq, group_size = x2.numel() // channels, num.shape[1], den.shape[1], channels // groups
    det = common.deterministic()
    row_strides = [channels if s is None else s for s in (strides[1], strides[0])]

    def grid(cfg: dict) -> tuple[int, int]:
        row_tiles = common.cdiv(rows, cfg["BLOCK_R"])
        return common.cdiv(row_tiles, cfg["ROWS_PER_PROGRAM"]), common.cdiv(channels, cfg["BLOCK_C"])

    def args(cfg: dict) -> tuple:
        return (
            # sizes
            rows,
            channels,
            group_size,
            # strides of x, dy and dx
            *row_strides,
            channels,
            # meta-parameters
            np_,
            nq,
            group_span(cfg["BLOCK_C"], group_size),
            det,
            cfg["BLOCK_R"],
            cfg["BLOCK_C"],
            cfg["ROWS_PER_PROGRAM"],
        )

    def buffers(cfg: dict) -> tuple:
        return (grid(cfg), group_span(cfg["BLOCK_C"], group_size), groups, np_, nq, channels, cfg["BLOCK_C"], det)

    def scratch(cfg: dict) -> None:
        dx, stand_ins = torch.empty_like(x), coefficient_stand_ins(buffers(cfg), x.device)
        dnum, dden = coefficient_grads(buffers(cfg), stand_ins)
        _rational_bwd_kernel[grid(cfg)](x2, dy2, dx, num, den, dnum, dden, *args(cfg), **common.launch_options(cfg))

    key = _key(rows, channels, groups, x.dtype, np_, nq)
    candidates = backward_candidates(rows, channels, group_size, common.min_programs(x.device))
    cfg = common.choose(_rational_bwd_kernel, key, candidates, scratch, x.device)
    atomics = 0 if det else grid(cfg)[0] * groups_touched(channels, group_size, cfg["BLOCK_C"]) * (np_ + nq)
    record = common.launch_record(
        OP,
        _rational_bwd_kernel,
        grid(cfg),
        cfg,
        [x.shape, num.shape, den.shape],
        x.dtype,
        "backward",
        atomics,
        coefficients=np_ + nq,
        deterministic=det,
    )
    contiguous = (numerator.is_contiguous(), denominator.is_contiguous())
    options, direct = common.launch_options(cfg), common.direct_launches(x.device)
    outputs = (common.stand_in(x.shape, x.dtype, x.device), *coefficient_stand_ins(buffers(cfg), x.device))
    return _Plan(grid(cfg), args(cfg), options, strides, contiguous, record, direct, buffers(cfg), outputs)


# ------------------------------------------------------------------------------- deterministic coefficient gradients


def coefficient_stand_ins(buffers: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-ins (``common.stand_in``) of where a backward launch writes its coefficient gradients, from a plan's
    ``buffers`` (grid, G_SPAN, G, NP, NQ, channels, BLOCK, deterministic): fp32 (G, NP) and (G, NQ) gradients for
    its atomics, or (row programs, column tiles, G_SPAN, NP + NQ) fp32 partials, one slot per program, twice, when
    deterministic."""
    grid, g_span, groups, np_, nq, _, _, det = buffers
    if det:
        partials = common.stand_in((*grid, g_span, np_ + nq), torch.float32, device)
        return partials, partials
    return common.stand_in((groups, np_), torch.float32, device), common.stand_in((groups, nq), torch.float32, device)


def coefficient_grads(
    buffers: tuple, stand_ins: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """New buffers for a backward launch's coefficient gradients (see :func:`coefficient_stand_ins`): zeroed for its
    atomics, or one uninitialised partials tensor (every entry written), twice, when deterministic."""
    if buffers[-1]:
        partials = torch.empty_like(stand_ins[0])
        return partials, partials
    return torch.zeros_like(stand_ins[0]), torch.zeros_like(stand_ins[1])


def final_coefficient_grads(
    buffers: tuple, dnum: torch.Tensor, dden: torch.Tensor, num_dtype: torch.dtype, den_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (d numerator, d denominator) a backward returns, from what its launch wrote (:func:`coefficient_grads`):
    as they are for fp32 coefficients with atomics; the partials summed in a fixed order when deterministic; cast to
    the coefficients' dtypes."""
    _, _, groups, np_, _, channels, block, det = buffers
    if det:
        acc = sum_coef_partials(dnum, channels, channels // groups, block)
        dnum, dden = acc[:, :np_].contiguous(), acc[:, np_:].contiguous()
    if dnum.dtype != num_dtype:
        dnum = dnum.to(num_dtype)
    if dden.dtype != den_dtype:
        dden = dden.to(den_dtype)
    return dnum, dden


def sum_coef_partials(partials: torch.Tensor, channels: int, group_size: int, block_c: int) -> torch.Tensor:
    """(row programs, column tiles, G_SPAN, NCOEF) per-program sums -> (G, NCOEF) per-group sums in a fixed order
    (bitwise equal run to run): over row programs by one torch reduction, then each group's (tile, slot) entries by a
    gather and a sum."""
    tiles, g_span, ncoef = partials.shape[1:]
    per_entry = torch.cat([partials.sum(0).reshape(tiles * g_span, ncoef), partials.new_zeros(1, ncoef)])
    return per_entry[_group_entries(channels, group_size, block_c, g_span).to(partials.device)].sum(1)


@functools.lru_cache(maxsize=256)
def _group_entries(channels: int, group_size: int, block_c: int, g_span: int) -> torch.Tensor:
    """(G, L) indices into the flattened (column tile, slot) entries: slot j of tile t holds group
    t * block_c // group_size + j; row g lists the entries of group g, padded with the index of a zero row."""
    entries: list[list[int]] = [[] for _ in range(channels // group_size)]
    for t, start in enumerate(range(0, channels, block_c)):
        first, last = start // group_size, (min(start + block_c, channels) - 1) // group_size
        for j in range(last - first + 1):
            entries[first + j].append(t * g_span + j)
    pad, width = triton.cdiv(channels, block_c) * g_span, max(len(e) for e in entries)
    return torch.tensor([e + [pad] * (width - len(e)) for e in entries], dtype=torch.int64)
