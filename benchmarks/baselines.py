"""Baselines written here from the published descriptions (/work/shared/docs/background/kat_flashkat.md).

- ``kat_backward``: KAT's Triton backward (rkc ``kat_rational/rational_triton.py``, Feb 2025) as described: a 1-D
  grid of BLOCK_SIZE=256 elementwise programs, and for every element a global ``tl.atomic_add`` into each of the
  10 coefficient gradients of its group (no block-level reduction), fp32 gradient buffers.
- ``flashkat_forward``: FlashKAT's forward, KAT's elementwise kernel with 128-element programs (one lane per element,
  its group's 10 coefficients loaded per lane).
- ``flashkat_backward``: FlashKAT's backward (fk ``flash_rational_triton.py``) as described: grid
  (ceil(rows / 64), G), each program owns one group and 64 rows, loops over the group's columns in 64-wide tiles,
  accumulates the 10 coefficient partial sums with ``tl.sum`` in registers and issues one atomic per coefficient
  per program; dx in fp32; only degrees (5, 4).

Both read x and dy in their own dtype (the published KAT path also casts everything to fp32 around the kernel under
autocast; those extra passes are not reproduced, so the KAT baseline here is, if anything, faster than KAT's code).
They compute the same math as ``kanc.codegen.rational_ref``; the benchmark checks their outputs against it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _load_coefficients(a_ptr, b_ptr, grp, mask):
    """The 6 numerator and |4 denominator| coefficients of each element's group, in fp32 (degrees (5, 4) only)."""
    a0 = tl.load(a_ptr + grp * 6 + 0, mask=mask, other=0.0).to(tl.float32)
    a1 = tl.load(a_ptr + grp * 6 + 1, mask=mask, other=0.0).to(tl.float32)
    a2 = tl.load(a_ptr + grp * 6 + 2, mask=mask, other=0.0).to(tl.float32)
    a3 = tl.load(a_ptr + grp * 6 + 3, mask=mask, other=0.0).to(tl.float32)
    a4 = tl.load(a_ptr + grp * 6 + 4, mask=mask, other=0.0).to(tl.float32)
    a5 = tl.load(a_ptr + grp * 6 + 5, mask=mask, other=0.0).to(tl.float32)
    b0 = tl.abs(tl.load(b_ptr + grp * 4 + 0, mask=mask, other=0.0).to(tl.float32))
    b1 = tl.abs(tl.load(b_ptr + grp * 4 + 1, mask=mask, other=0.0).to(tl.float32))
    b2 = tl.abs(tl.load(b_ptr + grp * 4 + 2, mask=mask, other=0.0).to(tl.float32))
    b3 = tl.abs(tl.load(b_ptr + grp * 4 + 3, mask=mask, other=0.0).to(tl.float32))
    return a0, a1, a2, a3, a4, a5, b0, b1, b2, b3


@triton.jit
def _pq_grads(x, g, a_ptr, b_ptr, grp, mask):
    """P, Q and the derivative pieces for degrees (5, 4): (dx, g / Q, P / Q) in fp32, as in KAT's kernel."""
    a0, a1, a2, a3, a4, a5, b0, b1, b2, b3 = _load_coefficients(a_ptr, b_ptr, grp, mask)
    ax = tl.abs(x)
    p = ((((a5 * x + a4) * x + a3) * x + a2) * x + a1) * x + a0
    q = (((b3 * ax + b2) * ax + b1) * ax + b0) * ax + 1.0
    dp = (((5.0 * a5 * x + 4.0 * a4) * x + 3.0 * a3) * x + 2.0 * a2) * x + a1
    dq = ((4.0 * b3 * ax + 3.0 * b2) * ax + 2.0 * b1) * ax + b0
    sign = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
    gq = g / q
    y = p / q
    return gq * (dp - y * sign * dq), gq, y


@triton.jit
def _kat_fwd_kernel(x_ptr, y_ptr, a_ptr, b_ptr, n, C, D, BLOCK_SIZE: tl.constexpr):
    """KAT's forward (FlashKAT keeps it, with BLOCK_SIZE 128): one element per lane, its group's coefficients."""
    offs = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a0, a1, a2, a3, a4, a5, b0, b1, b2, b3 = _load_coefficients(a_ptr, b_ptr, (offs % C) // D, mask)
    ax = tl.abs(x)
    p = ((((a5 * x + a4) * x + a3) * x + a2) * x + a1) * x + a0
    q = (((b3 * ax + b2) * ax + b1) * ax + b0) * ax + 1.0
    tl.store(y_ptr + offs, p / q, mask=mask)


@triton.jit
def _kat_bwd_kernel(
    x_ptr, dy_ptr, dx_ptr, a_ptr, b_ptr, da_ptr, db_ptr, n, C, D, BLOCK_SIZE: tl.constexpr
):  # fmt: skip
    offs = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    grp = (offs % C) // D
    dx, gq, y = _pq_grads(x, g, a_ptr, b_ptr, grp, mask)
    tl.store(dx_ptr + offs, dx, mask=mask)
    t = gq
    for k in tl.static_range(6):  # one global atomic per element and coefficient: KAT's contention
        tl.atomic_add(da_ptr + grp * 6 + k, t, mask=mask)
        t = t * x
    ax = tl.abs(x)
    u = -gq * y
    for k in tl.static_range(4):
        u = u * ax
        tl.atomic_add(db_ptr + grp * 4 + k, u, mask=mask)


@triton.jit
def _flashkat_bwd_kernel(
    x_ptr, dy_ptr, dx_ptr, a_ptr, b_ptr, da_ptr, db_ptr, rows, C, D,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GROUP_OUT: tl.constexpr,
):  # fmt: skip
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    grp = tl.program_id(1)
    s0, s1, s2, s3, s4, s5, t0, t1, t2, t3 = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    for j in tl.static_range(GROUP_OUT):
        c = grp * D + j * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = c < (grp + 1) * D
        mask = (r[:, None] < rows) & cmask[None, :]
        offs = r[:, None] * C + c[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dx, gq, y = _pq_grads(x, g, a_ptr, b_ptr, grp + tl.zeros_like(c), cmask)
        tl.store(dx_ptr + offs, dx, mask=mask)
        gq = tl.where(mask, gq, 0.0)
        s0 += tl.sum(tl.sum(gq, axis=1), axis=0)
        s1 += tl.sum(tl.sum(gq * x, axis=1), axis=0)
        s2 += tl.sum(tl.sum(gq * x * x, axis=1), axis=0)
        s3 += tl.sum(tl.sum(gq * x * x * x, axis=1), axis=0)
        s4 += tl.sum(tl.sum(gq * x * x * x * x, axis=1), axis=0)
        s5 += tl.sum(tl.sum(gq * x * x * x * x * x, axis=1), axis=0)
        ax = tl.abs(x)
        u = tl.where(mask, -gq * y, 0.0)
        t0 += tl.sum(tl.sum(u * ax, axis=1), axis=0)
        t1 += tl.sum(tl.sum(u * ax * ax, axis=1), axis=0)
        t2 += tl.sum(tl.sum(u * ax * ax * ax, axis=1), axis=0)
        t3 += tl.sum(tl.sum(u * ax * ax * ax * ax, axis=1), axis=0)
    tl.atomic_add(da_ptr + grp * 6 + 0, s0)
    tl.atomic_add(da_ptr + grp * 6 + 1, s1)
    tl.atomic_add(da_ptr + grp * 6 + 2, s2)
    tl.atomic_add(da_ptr + grp * 6 + 3, s3)
    tl.atomic_add(da_ptr + grp * 6 + 4, s4)
    tl.atomic_add(da_ptr + grp * 6 + 5, s5)
    tl.atomic_add(db_ptr + grp * 4 + 0, t0)
    tl.atomic_add(db_ptr + grp * 4 + 1, t1)
    tl.atomic_add(db_ptr + grp * 4 + 2, t2)
    tl.atomic_add(db_ptr + grp * 4 + 3, t3)


def _check(x, numerator, denominator) -> None:
    if numerator.shape[1] != 6 or denominator.shape[1] != 4:
        raise ValueError("the KAT / FlashKAT baselines implement degrees (5, 4) only, as the published kernels")


def flashkat_forward(x, numerator, denominator):
    """F(x) in x's dtype by FlashKAT's forward (KAT's elementwise kernel with 128-element programs)."""
    _check(x, numerator, denominator)
    channels, groups = x.shape[-1], denominator.shape[0]
    x = x.contiguous()
    y = torch.empty_like(x)
    n = x.numel()
    _kat_fwd_kernel[(triton.cdiv(n, 128),)](x, y, numerator.contiguous(), denominator.contiguous(), n, channels,
                                            channels // groups, BLOCK_SIZE=128)  # fmt: skip
    return y


def kat_backward(grad, x, numerator, denominator):
    """(dx fp32, d numerator, d denominator) with one global atomic per element and coefficient."""
    _check(x, numerator, denominator)
    channels, groups = x.shape[-1], denominator.shape[0]
    x, grad = x.contiguous(), grad.contiguous()
    dx = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    da = torch.zeros(groups, 6, dtype=torch.float32, device=x.device)
    db = torch.zeros(groups, 4, dtype=torch.float32, device=x.device)
    n = x.numel()
    grid = (triton.cdiv(n, 256),)
    _kat_bwd_kernel[grid](x, grad, dx, numerator.contiguous(), denominator.contiguous(), da, db, n, channels,
                          channels // groups, BLOCK_SIZE=256)  # fmt: skip
    return dx, da, db * torch.sign(denominator)


def flashkat_backward(grad, x, numerator, denominator):
    """(dx fp32, d numerator, d denominator) with one atomic per coefficient per (64 rows, group) program."""
    _check(x, numerator, denominator)
    channels, groups = x.shape[-1], denominator.shape[0]
    x2, g2 = x.reshape(-1, channels).contiguous(), grad.reshape(-1, channels).contiguous()
    rows, group_size = x2.shape[0], channels // groups
    dx = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    da = torch.zeros(groups, 6, dtype=torch.float32, device=x.device)
    db = torch.zeros(groups, 4, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(rows, 64), groups)
    _flashkat_bwd_kernel[grid](x2, g2, dx, numerator.contiguous(), denominator.contiguous(), da, db, rows, channels,
                               group_size, BLOCK_R=64, BLOCK_C=64, GROUP_OUT=triton.cdiv(group_size, 64))  # fmt: skip
    return dx, da, db * torch.sign(denominator)


def kat_atomics(x) -> int:
    return x.numel() * 10


def flashkat_atomics(x, groups: int) -> int:
    return triton.cdiv(x.numel() // x.shape[-1], 64) * groups * 10
