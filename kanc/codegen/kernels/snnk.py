"""Fused SNNK block Triton kernels: y = Phi(x) W^T + b with the m-wide features kept on chip, forward and backward.

- forward ``_snnk_fwd_kernel``: each program owns BLOCK_M rows and walks the m features BLOCK_F at a time, so the two
  matmuls chain: Z = (s x) G^T of a feature tile accumulated over the input width (with |s x|^2 for "exp" in the same
  loop), Phi = m^-1/2 g(Z) in registers, then y += Phi W[:, tile]^T tile by tile over the output width.
- backward, input ``_snnk_dx_kernel``: the same row ownership and feature tiles; Z recomputed, dPhi = dy W over the
  output width, dZ = dPhi g'(Z), dx += s dZ G tile by tile (for "exp" the row-norm term once every feature is summed).
  Z, Phi, dPhi and dZ stay in registers.
- any m: up to 512 features (``WHOLE_FEATURES``) a single tile holds them all and y (dx) is stored once; beyond, the
  sums over feature tiles go through fp32 partials of the program's own rows (the output itself when it is fp32),
  read and written once per extra feature tile: (rows, d) traffic in place of the (rows, m) features.
- backward, weight ``_snnk_dw_kernel``: each program owns a (BLOCK_N outputs, BLOCK_F features) tile of dW and a
  range of rows (SPLIT_M ranges in all); per BLOCK_M rows it recomputes Z for its features over the input width (and
  |s x|^2 for "exp"), builds Phi in registers (cos and sin halves for "cos", written to W's two column halves) and
  accumulates dW += dy^T Phi with tl.dot; db = dy's column sums from the first feature tile's programs. Z is thus
  recomputed d_out / BLOCK_N times in all (the price of never writing the (rows, m) features to memory; the launch
  records it as ``z_recomputed``). Several row splits write fp32 partial sums (splits, d_out, width) that the
  launcher adds up: deterministic, no atomics, and no tensor with a row dimension.

Kinds (constexpr KIND): 0 relu max(Z, floor), 1 exp exp(Z - |s x|^2 / 2), 2 cos [cos Z, sin Z] (width 2m, the two
halves as two accumulators, and W's two column halves as two operands).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kanc.codegen.checker import interpreting
from kanc.codegen.kernels import common
from kanc.codegen.kernels.common import cast_to
from kanc.codegen.kernels.jit_common import dot_acc

OP = "kanc::snnk_block"
KIND_CODES = {"relu": 0, "exp": 1, "cos": 2}


@triton.jit
def _projection(
    x_rows,
    g_cols,
    mmask,
    fmask,
    D_IN,
    stride_xd,
    stride_gd,
    scale,
    NORM: tl.constexpr,
    Z_IEEE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Z = (s x) G^T, fp32, for the rows of ``x_rows`` (x_ptr + row offsets, (BLOCK_M, 1)) and the features of
    ``g_cols`` (g_ptr + feature offsets, (1, BLOCK_F)), over the input width BLOCK_D at a time; with NORM also
    r = |s x|^2 per row."""
    z = tl.zeros((x_rows.shape[0], g_cols.shape[1]), tl.float32)
    r = tl.zeros((x_rows.shape[0],), tl.float32)
    for d0 in range(0, D_IN, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        dmask = rd < D_IN
        x = tl.load(x_rows + rd[None, :] * stride_xd, mask=mmask[:, None] & dmask[None, :], other=0.0)
        x = x.to(tl.float32) * scale
        g = tl.load(g_cols + rd[:, None] * stride_gd, mask=dmask[:, None] & fmask[None, :], other=0.0)
        z = dot_acc(x, g, z, tl.float32, Z_IEEE)
        if NORM:
            r += tl.sum(x * x, axis=1)
    return z, r


@triton.jit
def _features(z, r, fmask, floor, coef, KIND: tl.constexpr):
    """Phi (and its sine half for cos) from Z in fp32, zero on padded features. NaN Z stays NaN (as clamp_min)."""
    if KIND == 0:
        phi = tl.where(z < floor, floor, z) * coef
    elif KIND == 1:
        phi = tl.exp(z - 0.5 * r[:, None]) * coef
    else:
        phi = tl.cos(z) * coef
    phi = tl.where(fmask[None, :], phi, 0.0)
    phi_s = phi
    if KIND == 2:
        phi_s = tl.where(fmask[None, :], tl.sin(z) * coef, 0.0)
    return phi, phi_s


@triton.jit
def _feature_grads(
    dy_rows,
    w_cols,
    mmask,
    fmask,
    D_OUT,
    sin_offset,
    stride_wn,
    KIND: tl.constexpr,
    DOT: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dPhi = dy W[:, features], fp32, for the rows of ``dy_rows`` (dy_ptr + row offsets, (BLOCK_M, 1)) and the
    feature columns of ``w_cols`` (w_ptr + column offsets, (1, BLOCK_F)), over the outputs BLOCK_N at a time; for cos
    also the sine half's, ``sin_offset`` further along W's rows."""
    dphi = tl.zeros((dy_rows.shape[0], w_cols.shape[1]), tl.float32)
    dphi_s = tl.zeros((dy_rows.shape[0], w_cols.shape[1]), tl.float32)
    for n0 in range(0, D_OUT, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        nmask = rn < D_OUT
        dy = tl.load(dy_rows + rn[None, :], mask=mmask[:, None] & nmask[None, :], other=0.0)
        w_ptrs = w_cols + rn[:, None] * stride_wn
        wmask = nmask[:, None] & fmask[None, :]
        dphi = dot_acc(dy, tl.load(w_ptrs, mask=wmask, other=0.0), dphi, DOT, IEEE)
        if KIND == 2:
            dphi_s = dot_acc(dy, tl.load(w_ptrs + sin_offset, mask=wmask, other=0.0), dphi_s, DOT, IEEE)
    return dphi, dphi_s


@triton.jit
def _feature_tile_out(acc, out_ptr, part_ptr, rows, cols, mask, stride_out, stride_part, f0, M_FEAT, BLOCK_F):
    """One output tile's share of a sum over the feature tiles starting at f0: the fp32 partial sums of the earlier
    feature tiles (none before the first) added to ``acc``; stored to out in its dtype after the last feature tile, else
    back to the partials. The program owns these rows alone: a plain load and store, no atomics."""
    part_ptrs = part_ptr + rows[:, None] * stride_part + cols[None, :]
    if f0 > 0:
        acc += tl.load(part_ptrs, mask=mask, other=0.0)
    if f0 + BLOCK_F < M_FEAT:
        tl.store(part_ptrs, acc, mask=mask)
    else:
        tl.store(
            out_ptr + rows[:, None] * stride_out + cols[None, :], cast_to(acc, out_ptr.dtype.element_ty), mask=mask
        )


@triton.jit
def _snnk_fwd_kernel(
    # pointers
    x_ptr,
    g_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    part_ptr,  # with ACCUMULATE: fp32 (M, D_OUT) partial sums over feature tiles (y itself when y is fp32)
    # sizes: x (M, D_IN), G (M_FEAT, D_IN), W (D_OUT, width), width = M_FEAT (2 M_FEAT for cos)
    M,
    D_IN,
    D_OUT,
    M_FEAT,
    # strides (any layout of x, G, W and b; y and the partials are unit-stride in their last dimension)
    stride_xm,
    stride_xd,
    stride_gf,
    stride_gd,
    stride_wn,
    stride_wf,
    stride_b,
    stride_ym,
    stride_pm,
    # the feature map: input scale s, ReLU floor, m^-1/2
    scale,
    floor,
    coef,
    # meta-parameters
    KIND: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT: tl.constexpr,
    IEEE: tl.constexpr,
    Z_IEEE: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """y = Phi(x) W^T + b for BLOCK_M rows, Phi = m^-1/2 g(Z), Z = (s x) G^T, BLOCK_F features at a time: a feature
    tile's Z and Phi are built in registers (never in memory), then y += Phi W[:, tile]^T for every output tile of the
    rows. One feature tile (m <= BLOCK_F): y stored directly. Several (ACCUMULATE): the sums over feature tiles pass
    through fp32 partials of the program's own rows (``_feature_tile_out``)."""
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mmask = rm < M
    for f0 in range(0, M_FEAT, BLOCK_F):
        rf = f0 + tl.arange(0, BLOCK_F)
        fmask = rf < M_FEAT
        x_rows, g_cols = x_ptr + rm[:, None] * stride_xm, g_ptr + rf[None, :] * stride_gf
        z, r = _projection(x_rows, g_cols, mmask, fmask, D_IN, stride_xd, stride_gd, scale, KIND == 1, Z_IEEE, BLOCK_D)
        phi, phi_s = _features(z, r, fmask, floor, coef, KIND)
        phi, phi_s = phi.to(DOT), phi_s.to(DOT)
        if ACCUMULATE:
            tl.debug_barrier()  # the partials the other threads stored for the previous feature tile are visible
        for n0 in range(0, D_OUT, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            nmask = rn < D_OUT
            w_ptrs = w_ptr + rn[None, :] * stride_wn + rf[:, None] * stride_wf
            wmask = fmask[:, None] & nmask[None, :]
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            acc = dot_acc(phi, tl.load(w_ptrs, mask=wmask, other=0.0), acc, DOT, IEEE)
            if KIND == 2:
                acc = dot_acc(phi_s, tl.load(w_ptrs + M_FEAT * stride_wf, mask=wmask, other=0.0), acc, DOT, IEEE)
            if HAS_BIAS:
                if f0 == 0:  # the sum over feature tiles starts at b
                    acc += tl.load(b_ptr + rn * stride_b, mask=nmask, other=0.0).to(tl.float32)[None, :]
            mask = mmask[:, None] & nmask[None, :]
            if ACCUMULATE:
                _feature_tile_out(acc, y_ptr, part_ptr, rm, rn, mask, stride_ym, stride_pm, f0, M_FEAT, BLOCK_F)
            else:
                tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], cast_to(acc, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _snnk_dx_kernel(
    # pointers
    x_ptr,
    g_ptr,
    w_ptr,
    dy_ptr,
    dx_ptr,
    part_ptr,  # with ACCUMULATE: fp32 (M, D_IN) partial sums over feature tiles (dx itself when dx is fp32)
    # sizes: x (M, D_IN), G (M_FEAT, D_IN), W (D_OUT, width), width = M_FEAT (2 M_FEAT for cos)
    M,
    D_IN,
    D_OUT,
    M_FEAT,
    # strides (any layout of x, G and W; dy, dx and the partials are unit-stride in their last dimension)
    stride_xm,
    stride_xd,
    stride_gf,
    stride_gd,
    stride_wn,
    stride_wf,
    stride_dym,
    stride_dxm,
    stride_pm,
    # the feature map: input scale s, ReLU floor, m^-1/2
    scale,
    floor,
    coef,
    # meta-parameters
    KIND: tl.constexpr,
    DOT: tl.constexpr,
    IEEE: tl.constexpr,
    Z_IEEE: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dx = s dZ G (exp: minus s^2 x sum_j dZ_j, the row norm's term) for BLOCK_M rows, dZ = dPhi g'(Z), dPhi = dy W,
    BLOCK_F features at a time: Z recomputed, dPhi and dZ built in registers, then dx += s dZ G[tile] for every input
    tile of the rows; several feature tiles sum through fp32 partials of the program's own rows, as in the forward."""
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mmask = rm < M
    t = tl.zeros((BLOCK_M,), tl.float32)  # exp: sum_j dPhi_j Phi_j over every feature, the row-norm term's weight
    for f0 in range(0, M_FEAT, BLOCK_F):
        rf = f0 + tl.arange(0, BLOCK_F)
        fmask = rf < M_FEAT
        x_rows, g_cols = x_ptr + rm[:, None] * stride_xm, g_ptr + rf[None, :] * stride_gf
        z, r = _projection(x_rows, g_cols, mmask, fmask, D_IN, stride_xd, stride_gd, scale, KIND == 1, Z_IEEE, BLOCK_D)
        dy_rows, w_cols = dy_ptr + rm[:, None] * stride_dym, w_ptr + rf[None, :] * stride_wf
        dphi, dphi_s = _feature_grads(
            dy_rows, w_cols, mmask, fmask, D_OUT, M_FEAT * stride_wf, stride_wn, KIND, DOT, IEEE, BLOCK_N
        )
        if KIND == 0:
            dz = tl.where(z >= floor, dphi * coef, 0.0)
        elif KIND == 1:
            phi, _ = _features(z, r, fmask, floor, coef, KIND)
            dz = dphi * phi
        else:
            dz = (tl.cos(z) * dphi_s - tl.sin(z) * dphi) * coef
        dz = tl.where(mmask[:, None] & fmask[None, :], dz, 0.0)
        t += tl.sum(dz, axis=1)
        if ACCUMULATE:
            tl.debug_barrier()  # the partials the other threads stored for the previous feature tile are visible
        for d0 in range(0, D_IN, BLOCK_D):
            rd = d0 + tl.arange(0, BLOCK_D)
            dmask = rd < D_IN
            g_ptrs = g_ptr + rf[:, None] * stride_gf + rd[None, :] * stride_gd
            g = tl.load(g_ptrs, mask=fmask[:, None] & dmask[None, :], other=0.0)
            dx = dot_acc(dz, g, tl.zeros((BLOCK_M, BLOCK_D), tl.float32), tl.float32, Z_IEEE) * scale
            mask = mmask[:, None] & dmask[None, :]
            if KIND == 1:
                if f0 + BLOCK_F >= M_FEAT:  # once t holds every feature
                    x = tl.load(x_ptr + rm[:, None] * stride_xm + rd[None, :] * stride_xd, mask=mask, other=0.0)
                    dx -= (scale * scale) * x.to(tl.float32) * t[:, None]
            if ACCUMULATE:
                _feature_tile_out(dx, dx_ptr, part_ptr, rm, rd, mask, stride_dxm, stride_pm, f0, M_FEAT, BLOCK_F)
            else:
                tl.store(
                    dx_ptr + rm[:, None] * stride_dxm + rd[None, :], cast_to(dx, dx_ptr.dtype.element_ty), mask=mask
                )


@triton.jit
def _snnk_dw_kernel(
    # pointers
    x_ptr,
    g_ptr,
    dy_ptr,
    dw_ptr,  # (splits, D_OUT, width): one slice per row split, in W's dtype for one split, else fp32 partials
    db_ptr,  # (splits, D_OUT)
    # sizes: x (M, D_IN), G (M_FEAT, D_IN), dy (M, D_OUT); ROWS_PER_SPLIT rows per split of the reduction
    M,
    D_IN,
    D_OUT,
    M_FEAT,
    ROWS_PER_SPLIT,
    # strides (any layout of x and G; dy, dW and db are unit-stride in their last dimension)
    stride_xm,
    stride_xd,
    stride_gf,
    stride_gd,
    stride_dym,
    stride_dws,
    stride_dwn,
    stride_dbs,
    # the feature map: input scale s, ReLU floor, m^-1/2
    scale,
    floor,
    coef,
    # meta-parameters
    KIND: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT: tl.constexpr,
    IEEE: tl.constexpr,
    Z_IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dW = dy^T Phi(x) on one (BLOCK_N, BLOCK_F) tile over the rows of one split: per BLOCK_M rows, Z of the tile's
    features recomputed over the input width (with |s x|^2 for exp), Phi built in registers (both halves for cos) and
    fed to tl.dot; db = column sums of dy from the first feature tile's programs. Output: dw[split] (and db[split])."""
    f_tiles = tl.cdiv(M_FEAT, BLOCK_F)
    pid_n, pid_f, split = tl.program_id(0) // f_tiles, tl.program_id(0) % f_tiles, tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rf = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    nmask, fmask = rn < D_OUT, rf < M_FEAT
    acc = tl.zeros((BLOCK_N, BLOCK_F), tl.float32)
    acc_s = tl.zeros((BLOCK_N, BLOCK_F), tl.float32)
    db = tl.zeros((BLOCK_N,), tl.float32)
    start = split * ROWS_PER_SPLIT
    end = tl.minimum(start + ROWS_PER_SPLIT, M)
    for m0 in range(start, end, BLOCK_M):
        rm = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        mmask = rm < end
        x_rows, g_cols = x_ptr + rm[:, None] * stride_xm, g_ptr + rf[None, :] * stride_gf
        z, r = _projection(x_rows, g_cols, mmask, fmask, D_IN, stride_xd, stride_gd, scale, KIND == 1, Z_IEEE, BLOCK_D)
        phi, phi_s = _features(z, r, fmask, floor, coef, KIND)
        dy_ptrs = dy_ptr + rm[None, :] * stride_dym + rn[:, None]
        dyt = tl.load(dy_ptrs, mask=nmask[:, None] & mmask[None, :], other=0.0)  # (BLOCK_N, BLOCK_M): dy^T
        acc = dot_acc(dyt, phi, acc, DOT, IEEE)
        if KIND == 2:
            acc_s = dot_acc(dyt, phi_s, acc_s, DOT, IEEE)
        if HAS_BIAS:
            if pid_f == 0:
                db += tl.sum(dyt.to(tl.float32), axis=1)
    dw_ptrs = dw_ptr + split * stride_dws + rn[:, None] * stride_dwn + rf[None, :]
    wmask = nmask[:, None] & fmask[None, :]
    tl.store(dw_ptrs, cast_to(acc, dw_ptr.dtype.element_ty), mask=wmask)
    if KIND == 2:
        tl.store(dw_ptrs + M_FEAT, cast_to(acc_s, dw_ptr.dtype.element_ty), mask=wmask)
    if HAS_BIAS:
        if pid_f == 0:
            tl.store(db_ptr + split * stride_dbs + rn, cast_to(db, db_ptr.dtype.element_ty), mask=nmask)


# ---------------------------------------------------------------------------------------------------- launchers


# (BLOCK_M, num_warps) pairs and (BLOCK_D, BLOCK_N) chunks. A program holds a few (BLOCK_M, BLOCK_F) fp32 arrays (Z,
# Phi, dPhi, dZ; twice for cos) and (BLOCK_F, chunk) operand tiles of G and W, so configs are kept to at most 32
# elements per thread per array and BLOCK_F x chunk <= 16384 (16 and 8192 for cos, whose operands come in halves).
# First = default on a GPU, checked spill-free by benchmarks/compile_report.py (sm_90, ViT-B, bf16, m = 256 and 768,
# bound as a launch binds). The dx kernel holds dPhi and dZ on top of Z: its default takes the narrower output chunk
# (exp with 64-wide chunks needs 255 registers and spills 4 B). With 16 warps a thread has at most 128 registers, and
# most of those candidates spill: they are left for the tuner.
ROW_WARPS = [(32, 8), (16, 8), (64, 16), (32, 16), (16, 4), (64, 8), (16, 16)]
CHUNKS = [(32, 64), (64, 64), (32, 128), (64, 128), (32, 32), (16, 32), (16, 16)]
DX_CHUNKS = [(32, 32), (32, 64), (64, 64), (32, 128), (64, 128), (16, 32), (16, 16)]
# Feature tiles (BLOCK_F) of the forward and dx kernels. Up to the widest tile (512 features, 256 for cos, whose two
# halves double the arrays), all m features are one tile (Phi built once, y stored once); beyond, m is cut into tiles
# whose sums pass through fp32 partials (a read and a write of the (rows, d) output per extra tile, instead of the
# (rows, m) features).
FEATURE_TILES = (512, 256, 128)
OTHER_TILE_CONFIGS = 4  # candidates kept per feature tile other than the default one (the tuner times them all)


def feature_tiles(feats: int, kind: str) -> list[int]:
    """BLOCK_F choices, first = default: one tile of all features (a power of two, >= 16 for tl.dot) up to the widest
    tile of ``kind``; beyond, the FEATURE_TILES widths by least padding of m, then fewest tiles."""
    widest = 256 if kind == "cos" else FEATURE_TILES[0]
    whole = max(16, common.next_pow2(feats))
    if whole <= widest:
        return [whole]
    tiles = [bf for bf in FEATURE_TILES if bf <= widest]
    return sorted(tiles, key=lambda bf: (common.cdiv(feats, bf) * bf, common.cdiv(feats, bf)))


def snnk_candidates(rows: int, feats: int, kind: str, chunks: list[tuple[int, int]] = CHUNKS) -> list[dict]:
    """Configs of the forward (``chunks`` = CHUNKS) and dx (DX_CHUNKS) kernels: rows per program, feature tile, warps,
    chunks of the input and output widths; first = heuristic default."""
    rows_cap = max(16, common.next_pow2(rows))
    tiles = feature_tiles(feats, kind)
    if interpreting():  # few, large programs: the interpreter pays per program, registers do not matter
        bf = tiles[0]
        bm = max(16, min(64, 16384 // bf, rows_cap))
        return [_config(bm, bf, bd, bn, 4, 1) for bd, bn in CHUNKS[:3]]
    out: list[dict] = []
    for i, bf in enumerate(tiles):
        configs = [cfg for cfg in _gpu_configs(rows_cap, bf, kind, chunks) if cfg not in out]
        out += configs if i == 0 else configs[:OTHER_TILE_CONFIGS]
    return out or [_config(16, tiles[0], 16, 16, 16, 2)]


def _gpu_configs(rows_cap: int, block_f: int, kind: str, chunks: list[tuple[int, int]]) -> list[dict]:
    """The (rows, warps) x chunks configs within the register budget of one feature tile."""
    per_thread, operand = (16, 8192) if kind == "cos" else (32, 16384)
    out = []
    for bm, warps in ROW_WARPS:
        bm = min(bm, rows_cap)
        if bm * block_f > per_thread * 32 * warps:
            continue
        for bd, bn in chunks:
            cfg = _config(bm, block_f, bd, bn, warps, 2)
            if max(bd, bn) * block_f <= operand and cfg not in out:
                out.append(cfg)
    return out


def _config(bm: int, bf: int, bd: int, bn: int, warps: int, stages: int) -> dict:
    return {"BLOCK_M": bm, "BLOCK_F": bf, "BLOCK_D": bd, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}


# dW tiles (BLOCK_N outputs, BLOCK_F features, BLOCK_M rows per step, BLOCK_D input chunk, num_warps, num_stages).
# A program recomputes Z for its BLOCK_F features once per BLOCK_M rows, so Z is recomputed once per output tile
# (cdiv(d_out, BLOCK_N) times in all): wide output tiles cost fewer recomputations but pad d_out up to a multiple of
# BLOCK_N. A tile's registers do not depend on m: all of these compile spill-free for relu, exp and cos in bf16 and fp32
# (ptxas, sm_90, ViT-B); BLOCK_N x BLOCK_F = 16384 (1024 x 16, 512 x 32) spills. The default is the tile of least
# modelled work (``dw_work``), ties in this order.
DW_TILES = [
    (256, 32, 32, 32, 8, 3),
    (512, 16, 32, 32, 8, 3),
    (256, 32, 32, 32, 8, 2),
    (512, 16, 32, 64, 8, 3),
    (256, 32, 64, 32, 8, 2),
    (256, 32, 32, 64, 8, 2),
    (128, 64, 32, 32, 8, 3),
    (128, 32, 32, 32, 8, 2),
    (128, 32, 64, 32, 8, 2),
    (64, 64, 32, 32, 8, 2),
]
INTERPRETER_DW_TILES = [(64, 64, 64, 64, 4, 1), (32, 32, 32, 32, 4, 1)]
DW_PROGRAMS_PER_SM = 2  # row splits until the dW grid has this many programs per SM (each one a GEMM-sized tile)


def dw_work(block_n: int, d_in: int, d_out: int, kind: str, io_itemsize: int) -> int:
    """Modelled tensor-core work of the dW kernel per row and feature, in 16-bit MAC units: Z over d_in once per output
    tile (its fp32 operands run at half the 16-bit rate when the I/O is 16-bit) plus dy^T Phi over the padded outputs
    (twice for cos)."""
    tiles = common.cdiv(d_out, block_n)
    z_cost = 2 if io_itemsize < 4 else 1
    return tiles * (z_cost * d_in + block_n * (2 if kind == "cos" else 1))


def dw_candidates(rows: int, d_in: int, feats: int, d_out: int, kind: str, sms: int, io_itemsize: int = 2) -> list:
    """Configs of the dW kernel: tiles capped at the problem, each with its heuristic SPLIT_M (row splits until the
    grid has DW_PROGRAMS_PER_SM programs per SM; 1 under the interpreter), ordered by ``dw_work`` (stable), then the
    default tile with other splits (1, double)."""
    cap = lambda block, size: max(16, min(block, common.next_pow2(size)))
    if interpreting():
        tiles, target = INTERPRETER_DW_TILES, 1
    else:
        tiles, target = DW_TILES, DW_PROGRAMS_PER_SM * sms
    out: list[dict] = []
    for bn, bf, bm, bd, warps, stages in tiles:
        cfg = {"BLOCK_N": cap(bn, d_out), "BLOCK_F": cap(bf, feats), "BLOCK_M": cap(bm, rows), "BLOCK_D": cap(bd, d_in)}
        programs = common.cdiv(d_out, cfg["BLOCK_N"]) * common.cdiv(feats, cfg["BLOCK_F"])
        split = min(common.cdiv(rows, cfg["BLOCK_M"]), common.cdiv(target, programs))
        cfg.update(SPLIT_M=split, num_warps=warps, num_stages=stages)
        if cfg not in out:
            out.append(cfg)
    if not interpreting():
        out.sort(key=lambda cfg: dw_work(cfg["BLOCK_N"], d_in, d_out, kind, io_itemsize))
    first = out[0]
    for split in (1, 2 * first["SPLIT_M"]):
        cfg = {**first, "SPLIT_M": split}
        if split <= common.cdiv(rows, first["BLOCK_M"]) and cfg not in out:
            out.append(cfg)
    return out


def _flags(x: torch.Tensor) -> dict:
    dot = common.dot_dtype(x.dtype)
    ieee = common.fp32_precision() == "ieee"
    # Z feeds exp/cos: keep it fp32 (TF32 where torch allows it for fp32, or where the I/O is 16-bit anyway)
    z_ieee = ieee if x.dtype == torch.float32 else interpreting()
    return {"DOT": dot, "IEEE": dot == tl.float32 and ieee, "Z_IEEE": z_ieee}


def _key(m: int, d_in: int, feats: int, d_out: int, kind: str, dtype: torch.dtype) -> tuple:
    return (common.row_bucket(m), d_in, feats, d_out, kind, common.dot_dtype_key(dtype))


def _partials(out: torch.Tensor, feats: int, block_f: int) -> torch.Tensor:
    """Where the forward and dx kernels sum over feature tiles: ``out`` itself when one tile covers m (unused) or when
    it is fp32, else a new fp32 buffer of its shape (the sums are never rounded to 16 bits before the end)."""
    if feats <= block_f or out.dtype == torch.float32:
        return out
    return torch.empty(out.shape, dtype=torch.float32, device=out.device)


_fwd_plans: dict = {}
_dx_plans: dict = {}
_dw_plans: dict = {}


def _outputs(out: torch.Tensor, feats: int, block_f: int) -> tuple[torch.Tensor, ...]:
    """Stand-ins of the output ``out`` and, where :func:`_partials` would allocate them, its fp32 partials."""
    outputs = (common.stand_in(out.shape, out.dtype, out.device),)
    part = _partials(out, feats, block_f)
    return outputs if part is out else (*outputs, common.stand_in(part.shape, torch.float32, out.device))


def _planned_out(plan: common.Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, partials) for one call of ``plan``: new tensors, the partials being the output where it holds them."""
    out = torch.empty_like(plan.outputs[0])
    return out, out if len(plan.outputs) == 1 else torch.empty_like(plan.outputs[1])


@common.on_tensor_device
def snnk_forward(x, projection, weight, bias, kind: str, floor: float, input_scale: float) -> torch.Tensor:
    """Launch the fused forward: y (..., d_out) in x's dtype."""
    floor, input_scale = float(floor), float(input_scale)
    key = common.dot_plan_key((x, projection, weight, bias), kind, floor, input_scale)
    plan = common.planned(_fwd_plans, key, x.device, _fwd_plan, x, projection, weight, bias, kind, floor, input_scale)
    x2 = x.reshape(-1, x.shape[-1])
    y2, part = _planned_out(plan)
    common.launch_planned(_snnk_fwd_kernel, plan, x2, projection, weight, weight if bias is None else bias, y2, part)
    return y2.view(*x.shape[:-1], weight.shape[0])


def _fwd_plan(x, projection, weight, bias, kind: str, floor: float, input_scale: float) -> common.Plan:
    d_in, (feats, _), d_out = x.shape[-1], projection.shape, weight.shape[0]
    x2 = x.reshape(-1, d_in)
    m = x2.shape[0]
    y2 = torch.empty(m, d_out, dtype=x.dtype, device=x.device)
    flags, coef = _flags(x), 1.0 / math.sqrt(feats)
    b, stride_b = (bias, bias.stride(0)) if bias is not None else (weight, 0)

    def grid(cfg: dict) -> tuple[int]:
        return (common.cdiv(m, cfg["BLOCK_M"]),)

    def args(cfg: dict) -> tuple:
        return (
            # sizes
            m,
            d_in,
            d_out,
            feats,
            # strides (the output and its partials are row-major (m, d_out))
            x2.stride(0),
            x2.stride(1),
            projection.stride(0),
            projection.stride(1),
            weight.stride(0),
            weight.stride(1),
            stride_b,
            y2.stride(0),
            y2.stride(0),
            # scalars of the feature map
            input_scale,
            floor,
            coef,
            # meta-parameters
            KIND_CODES[kind],
            bias is not None,
            flags["DOT"],
            flags["IEEE"],
            flags["Z_IEEE"],
            feats > cfg["BLOCK_F"],
            cfg["BLOCK_M"],
            cfg["BLOCK_F"],
            cfg["BLOCK_D"],
            cfg["BLOCK_N"],
        )

    def scratch(cfg: dict) -> None:
        out = torch.empty_like(y2)
        part = _partials(out, feats, cfg["BLOCK_F"])
        _snnk_fwd_kernel[grid(cfg)](x2, projection, weight, b, out, part, *args(cfg), **common.launch_options(cfg))

    key = _key(m, d_in, feats, d_out, kind, x.dtype)
    candidates = snnk_candidates(m, feats, kind)
    cfg = common.choose(_snnk_fwd_kernel, key, candidates, scratch, x.device)
    shapes = [x.shape, projection.shape, weight.shape]
    tiles = common.cdiv(feats, cfg["BLOCK_F"])
    record = common.launch_record(
        OP, _snnk_fwd_kernel, grid(cfg), cfg, shapes, x.dtype, "forward", kind=kind, BLOCK_F=cfg["BLOCK_F"],
        feature_tiles=tiles,
    )  # fmt: skip
    options, direct = common.launch_options(cfg), common.direct_launches(x.device)
    return common.Plan(grid(cfg), args(cfg), options, record, direct, _outputs(y2, feats, cfg["BLOCK_F"]))


@common.on_tensor_device
def snnk_backward(
    grad,
    x,
    projection,
    weight,
    has_bias: bool,
    input_grad: bool,
    weight_grad: bool,
    kind: str,
    floor: float,
    input_scale: float,
):
    """Launch the fused backward kernels: (dx, dW, db), Phi recomputed on chip by each (never written to memory).

    dx (``_snnk_dx_kernel``) is empty unless ``input_grad``; dW and db (``_snnk_dw_kernel``) are empty unless
    ``weight_grad`` and ``has_bias``. With a bias but no weight gradient, db is dy's column sums (torch).
    """
    d_in, d_out = x.shape[-1], weight.shape[0]
    x2, dy2 = x.reshape(-1, d_in), common.as_rows(grad if grad.dtype == x.dtype else grad.to(x.dtype), d_out)
    args = (x2, projection, weight, dy2, kind, float(floor), float(input_scale))
    dx = _launch_dx(*args).view(x.shape) if input_grad else x.new_empty(0)
    if weight_grad:
        dw, db = _launch_dw(*args, has_bias)
    else:
        dw = weight.new_empty(0)
        db = dy2.sum(0, dtype=torch.float32).to(weight.dtype) if has_bias else weight.new_empty(0)
    return dx, dw, db if has_bias else weight.new_empty(0)


def _launch_dx(x2, projection, weight, dy2, kind, floor, input_scale) -> torch.Tensor:
    key = common.dot_plan_key((x2, projection, weight, dy2), kind, floor, input_scale)
    plan = common.planned(_dx_plans, key, x2.device, _dx_plan, x2, projection, weight, dy2, kind, floor, input_scale)
    dx2, part = _planned_out(plan)
    common.launch_planned(_snnk_dx_kernel, plan, x2, projection, weight, dy2, dx2, part)
    return dx2


def _dx_plan(x2, projection, weight, dy2, kind, floor, input_scale) -> common.Plan:
    (m, d_in), feats, d_out = x2.shape, projection.shape[0], weight.shape[0]
    dx2 = torch.empty(m, d_in, dtype=x2.dtype, device=x2.device)
    flags, coef = _flags(x2), 1.0 / math.sqrt(feats)

    def grid(cfg: dict) -> tuple[int]:
        return (common.cdiv(m, cfg["BLOCK_M"]),)

    def args(cfg: dict) -> tuple:
        return (
            # sizes
            m,
            d_in,
            d_out,
            feats,
            # strides (dx and its partials are row-major (m, d_in))
            x2.stride(0),
            x2.stride(1),
            projection.stride(0),
            projection.stride(1),
            weight.stride(0),
            weight.stride(1),
            dy2.stride(0),
            dx2.stride(0),
            dx2.stride(0),
            # scalars of the feature map
            input_scale,
            floor,
            coef,
            # meta-parameters
            KIND_CODES[kind],
            flags["DOT"],
            flags["IEEE"],
            flags["Z_IEEE"],
            feats > cfg["BLOCK_F"],
            cfg["BLOCK_M"],
            cfg["BLOCK_F"],
            cfg["BLOCK_D"],
            cfg["BLOCK_N"],
        )

    def scratch(cfg: dict) -> None:
        out = torch.empty_like(dx2)
        part = _partials(out, feats, cfg["BLOCK_F"])
        _snnk_dx_kernel[grid(cfg)](x2, projection, weight, dy2, out, part, *args(cfg), **common.launch_options(cfg))

    key = _key(m, d_in, feats, d_out, kind, x2.dtype)
    candidates = snnk_candidates(m, feats, kind, DX_CHUNKS)
    cfg = common.choose(_snnk_dx_kernel, key, candidates, scratch, x2.device)
    shapes = [x2.shape, projection.shape, weight.shape]
    tiles = common.cdiv(feats, cfg["BLOCK_F"])
    record = common.launch_record(
        OP, _snnk_dx_kernel, grid(cfg), cfg, shapes, x2.dtype, "backward", kind=kind, BLOCK_F=cfg["BLOCK_F"],
        feature_tiles=tiles, grads="input",
    )  # fmt: skip
    options, direct = common.launch_options(cfg), common.direct_launches(x2.device)
    return common.Plan(grid(cfg), args(cfg), options, record, direct, _outputs(dx2, feats, cfg["BLOCK_F"]))


def _launch_dw(x2, projection, weight, dy2, kind, floor, input_scale, has_bias: bool) -> tuple:
    """dW (and db) by ``_snnk_dw_kernel``: one launch over (output tiles x feature tiles, row splits); with more than
    one split each writes fp32 partial sums (splits, d_out, width) that torch adds up (deterministic, no atomics)."""
    key = (*common.dot_plan_key((x2, projection, weight, dy2), kind, floor, input_scale), has_bias)
    plan = common.planned(
        _dw_plans, key, x2.device, _dw_plan, x2, projection, weight, dy2, kind, floor, input_scale, has_bias
    )
    dw, db = torch.empty_like(plan.outputs[0]), torch.empty_like(plan.outputs[1])
    common.launch_planned(_snnk_dw_kernel, plan, x2, projection, dy2, dw, db if has_bias else dw)
    if plan.grid[1] == 1:
        return dw[0], db[0]
    return dw.sum(0).to(weight.dtype), db.sum(0).to(weight.dtype)


def _dw_plan(x2, projection, weight, dy2, kind, floor, input_scale, has_bias: bool) -> common.Plan:
    (m, d_in), feats, (d_out, width) = x2.shape, projection.shape[0], weight.shape
    device = x2.device
    flags, coef = _flags(x2), 1.0 / math.sqrt(feats)

    def rows_per_split(cfg: dict) -> int:
        return common.cdiv(common.cdiv(m, cfg["BLOCK_M"]), cfg["SPLIT_M"]) * cfg["BLOCK_M"]

    def grid(cfg: dict) -> tuple[int, int]:
        splits = common.cdiv(m, rows_per_split(cfg))
        return common.cdiv(d_out, cfg["BLOCK_N"]) * common.cdiv(feats, cfg["BLOCK_F"]), splits

    def buffers(cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
        splits = grid(cfg)[1]
        dtype = weight.dtype if splits == 1 else torch.float32
        dw = torch.empty(splits, d_out, width, dtype=dtype, device=device)
        return dw, torch.empty(splits, d_out if has_bias else 0, dtype=dtype, device=device)

    def args(cfg: dict) -> tuple:
        dw, db = buffers(cfg)
        return (
            # sizes
            m,
            d_in,
            d_out,
            feats,
            rows_per_split(cfg),
            # strides
            x2.stride(0),
            x2.stride(1),
            projection.stride(0),
            projection.stride(1),
            dy2.stride(0),
            dw.stride(0),
            dw.stride(1),
            db.stride(0),
            # scalars of the feature map
            input_scale,
            floor,
            coef,
            # meta-parameters
            KIND_CODES[kind],
            has_bias,
            flags["DOT"],
            flags["IEEE"],
            flags["Z_IEEE"],
            cfg["BLOCK_N"],
            cfg["BLOCK_F"],
            cfg["BLOCK_M"],
            cfg["BLOCK_D"],
        )

    def scratch(cfg: dict) -> None:
        dw, db = buffers(cfg)
        tensors = (x2, projection, dy2, dw, db if has_bias else dw)
        _snnk_dw_kernel[grid(cfg)](*tensors, *args(cfg), **common.launch_options(cfg))

    key = _key(m, d_in, feats, d_out, kind, x2.dtype)
    candidates = dw_candidates(m, d_in, feats, d_out, kind, common.sm_count(device), x2.dtype.itemsize)
    cfg = common.choose(_snnk_dw_kernel, key, candidates, scratch, device)
    shapes = [x2.shape, projection.shape, weight.shape]
    record = common.launch_record(
        OP, _snnk_dw_kernel, grid(cfg), cfg, shapes, x2.dtype, "backward", kind=kind, grads="weight,bias",
        splits=grid(cfg)[1], z_recomputed=common.cdiv(d_out, cfg["BLOCK_N"]),
    )  # fmt: skip
    outputs = tuple(common.stand_in(t.shape, t.dtype, device) for t in buffers(cfg))
    options, direct = common.launch_options(cfg), common.direct_launches(device)
    return common.Plan(grid(cfg), args(cfg), options, record, direct, outputs)
