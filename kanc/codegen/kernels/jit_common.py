"""The ``@triton.jit`` helpers shared by kanc's kernels, in one place: the group rational's math on fp32 tiles (P and Q
by Horner, its gradients, the per-group coefficient sums a program carries and how they leave it), the column
tile's groups, a program's tile in grouped order, and tl.dot with kanc's operand precision.

``kanc.codegen.kernels.rational`` runs the rational alone; ``grkan_linear`` evaluates it in a matmul's prologue (and
its gradients in the dx matmul's epilogue), ``linear_rational`` in a matmul's epilogue, ``snnk`` uses the dot.
``cast_to`` (rounding to the I/O dtype) lives in ``kanc.codegen.kernels.common`` beside the launch helpers.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _coef(ptr, g, k, NCOEF: tl.constexpr, cmask, UNIFORM: tl.constexpr):
    """Coefficient k in fp32: with UNIFORM (the tile lies in one group, g a scalar) one scalar, else that of each
    column's group g as a (1, BLOCK_C) row. Scalars keep 10 vectors of coefficients out of the registers."""
    if UNIFORM:
        return tl.load(ptr + g * NCOEF + k).to(tl.float32)
    else:
        return tl.load(ptr + g * NCOEF + k, mask=cmask, other=0.0).to(tl.float32)[None, :]


@triton.jit
def rational_pq(x, num_ptr, den_ptr, g, cmask, NP: tl.constexpr, NQ: tl.constexpr, UNIFORM: tl.constexpr):
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
def rational_grads(x, dy, num_ptr, den_ptr, g, cmask, NP: tl.constexpr, NQ: tl.constexpr, UNIFORM: tl.constexpr):
    """(dx, dy / Q, F(x)) for fp32 tiles: dx = dy (P' - F sign(x) Q'(|x|)) / Q."""
    p, q = rational_pq(x, num_ptr, den_ptr, g, cmask, NP, NQ, UNIFORM)
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
def zero_sums(NCOEF: tl.constexpr, G_SPAN: tl.constexpr):
    """The coefficient-gradient sums a program carries over its row tiles: NCOEF fp32 zero vectors of G_SPAN (one
    entry per group the program's columns touch), a tuple."""
    out = ()
    for _ in tl.static_range(NCOEF):
        out = out + (tl.zeros((G_SPAN,), tl.float32),)
    return out


@triton.jit
def _group_sums(s, g, cmask, g_first, G_SPAN: tl.constexpr):
    """Sums of a (rows, cols) fp32 tile (zero where masked) over its rows and each group's columns: (G_SPAN,), entry j
    for group g_first + j. A tile in one group (G_SPAN 1) is summed whole."""
    col = tl.sum(s, axis=0)
    if G_SPAN == 1:
        return tl.zeros((1,), tl.float32) + tl.sum(col, axis=0)
    else:
        j = tl.arange(0, G_SPAN)
        hit = ((g - g_first)[:, None] == j[None, :]) & cmask[:, None]
        return tl.sum(tl.where(hit, col[:, None], 0.0), axis=0)


@triton.jit
def add_coef_partials(
    sums, x, gq, y, mask, g, cmask, g_first, NP: tl.constexpr, NQ: tl.constexpr, G_SPAN: tl.constexpr
):
    """``sums`` plus this tile's per-group sums of dF/da_k = dy x^k / Q and dF/d|b_k| = -dy F |x|^(k+1) / Q (fp32)."""
    out = ()
    t = tl.where(mask, gq, 0.0)
    for k in tl.static_range(NP):
        out = out + (sums[k] + _group_sums(t, g, cmask, g_first, G_SPAN),)
        t = t * x
    ax = tl.abs(x)
    u = tl.where(mask, -gq * y, 0.0)
    for k in tl.static_range(NQ):
        u = u * ax
        out = out + (sums[NP + k] + _group_sums(u, g, cmask, g_first, G_SPAN),)
    return out


@triton.jit
def _signed(s, den_ptr, g, k, NQ: tl.constexpr, gmask):
    """A sum of dL/d|b_k| (one per group g) as dL/db_k: d|b|/db is -1 where b < 0, else +1 (b = 0 included, as
    ``kanc.codegen.rational.abs_grad_sign``)."""
    b = tl.load(den_ptr + g * NQ + k, mask=gmask, other=0.0).to(tl.float32)
    return tl.where(b < 0, -s, s)


@triton.jit
def reduce_coef_grads(
    dnum_ptr,
    dden_ptr,
    den_ptr,
    slot,
    sums,
    g_first,
    g_last,
    NP: tl.constexpr,
    NQ: tl.constexpr,
    G_SPAN: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
):
    """A program's coefficient sums out, the denominator's with kanc's sign convention applied (``_signed``): atomic
    adds into the fp32 gradients dnum (G, NP) and dden (G, NQ), one per (group touched, coefficient); or with
    DETERMINISTIC (``torch.use_deterministic_algorithms``) stored whole into the program's own ``slot`` of a
    (slots, G_SPAN, NP + NQ) partials buffer at dnum_ptr, which ``sum_coef_partials`` adds up in a fixed order:
    bitwise reproducible, no atomics. Entries of groups past g_last are sums over no column: zero."""
    j = tl.arange(0, G_SPAN)
    g = g_first + j
    gmask = g <= g_last
    if DETERMINISTIC:
        base = dnum_ptr + slot.to(tl.int64) * (G_SPAN * (NP + NQ))
        for k in tl.static_range(NP):
            tl.store(base + j * (NP + NQ) + k, sums[k])
        for k in tl.static_range(NQ):
            tl.store(base + j * (NP + NQ) + NP + k, _signed(sums[NP + k], den_ptr, g, k, NQ, gmask))
    else:
        for k in tl.static_range(NP):
            tl.atomic_add(dnum_ptr + g * NP + k, sums[k], mask=gmask)
        for k in tl.static_range(NQ):
            tl.atomic_add(dden_ptr + g * NQ + k, _signed(sums[NP + k], den_ptr, g, k, NQ, gmask), mask=gmask)


@triton.jit
def swizzle(pid, rows, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GROUP: tl.constexpr):
    """Program id -> (row tile, column tile), GROUP row tiles at a time so their column tiles stay in L2."""
    tiles_r = tl.cdiv(rows, BLOCK_R)
    tiles_c = tl.cdiv(cols, BLOCK_C)
    per_group = GROUP * tiles_c
    first = (pid // per_group) * GROUP
    size = tl.minimum(tiles_r - first, GROUP)
    return first + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def dot_acc(a, b, acc, DOT: tl.constexpr, IEEE: tl.constexpr):
    """acc + a b with both operands cast to DOT (fp16/bf16 on tensor cores, fp32 in TF32 or, with IEEE, exactly)."""
    if IEEE:
        return tl.dot(a.to(DOT), b.to(DOT), acc, input_precision="ieee")
    return tl.dot(a.to(DOT), b.to(DOT), acc)


@triton.jit
def tile_groups(start, cols, D, UNIFORM: tl.constexpr):
    """The rational's group of a column tile that starts at column ``start`` (D columns per group): one scalar when
    the tile lies in one group (UNIFORM), else the group of each column in ``cols``."""
    if UNIFORM:
        return start // D
    else:
        return cols // D
