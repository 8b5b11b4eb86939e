"""Linear then rational in one Triton kernel: u = F(x W^T + b), the group rational in the matmul's EPILOGUE.

This is the other fusion placement of a GR-KAN MLP block (``kanc.codegen.grkan_mlp``): fc2's rational F2 is evaluated
once per element of h = fc1's output, in fc1's epilogue (as cuBLASLt fuses GELU), instead of in fc2's prologue once
per output tile of fc2 (``kanc.codegen.kernels.grkan_linear``). fc2 then is a plain matmul on u = F2(h).

``_linear_rational_fwd_kernel``: one (BLOCK_M, BLOCK_N) tile of h = x W^T + b accumulated in fp32 over K; h rounded
to the I/O dtype (the value the reference stores and the backward reads); with STORE_H, h is written (the backward
needs the pre-rational values); then u = F(h) in fp32 registers, rounded and written. F's groups run over the output
columns N (C / G = D columns each): a column tile inside one group reads scalar coefficients (UNIFORM).

What the backward needs (the decision, see ``kanc.codegen.grkan_mlp``): h beside F(h). The rational's dx and
coefficient gradients come from the dF epilogue of fc2's dX matmul (``_grkan_linear_dx_kernel``, on h), and
dW2 = dy^T u is a plain matmul on the saved u: nothing is recomputed, at the cost of holding u for the backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kanc.codegen.kernels import common
from kanc.codegen.kernels.common import cast_to
from kanc.codegen.kernels.grkan_linear import tile_candidates
from kanc.codegen.kernels.jit_common import dot_acc, rational_pq, swizzle, tile_groups

OP = "kanc::grkan_mlp_epilogue"


@triton.jit
def _linear_rational_fwd_kernel(
    # pointers
    x_ptr,
    w_ptr,
    b_ptr,
    h_ptr,
    u_ptr,
    num_ptr,
    den_ptr,
    # sizes: x (M, K), W (N, K), h and u (M, N), D = N / G columns per group of F
    M,
    N,
    K,
    D,
    # strides (x and W any layout; b, h and u unit-stride in their last dimension)
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_hm,
    stride_um,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    STORE_H: tl.constexpr,
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
    """u = F(h) with h = x W^T + b, on one (BLOCK_M, BLOCK_N) tile: h accumulated in fp32 over K, rounded to the I/O
    dtype (and stored with STORE_H), then F(h) = P(h) / Q(h) per column group in fp32 registers."""
    pid_m, pid_n = swizzle(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask, nmask = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=mmask[:, None] & kmask[None, :])
        w = tl.load(w_ptr + rn[None, :] * stride_wn + rk[:, None] * stride_wk, mask=kmask[:, None] & nmask[None, :])
        acc = dot_acc(x, w, acc, DOT, IEEE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    mask = mmask[:, None] & nmask[None, :]
    h = cast_to(acc, u_ptr.dtype.element_ty)  # F reads h as stored, so forward and backward see the same value
    if STORE_H:
        tl.store(h_ptr + rm[:, None] * stride_hm + rn[None, :], h, mask=mask)
    g = tile_groups(pid_n * BLOCK_N, rn, D, UNIFORM)
    p, q = rational_pq(h.to(tl.float32), num_ptr, den_ptr, g, nmask, NP, NQ, UNIFORM)
    tl.store(u_ptr + rm[:, None] * stride_um + rn[None, :], cast_to(p / q, u_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------- launchers

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), first = the default. The epilogue evaluates F on the whole fp32
# accumulator (h, P and Q live together: 3 values per accumulator element), so it needs more registers than the
# prologue kernel at the same tile. Ordered by `benchmarks/compile_report.py --all-candidates` (triton 3.9.0, sm_90,
# ViT-B fc1 in bf16): the first three compile without spills; 128 x 128 x 32 spills 16 B per thread, 128 x 256 x 32
# spills 2.6 kB and is left out. The tuner times them all on a GPU.
EPILOGUE_TILES = [
    (64, 256, 32, 8, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (128, 128, 32, 8, 4),
    (64, 128, 32, 4, 4),
    (128, 64, 32, 4, 4),
    (128, 128, 64, 8, 3),
]


def _key(m: int, n: int, k: int, groups: int, np_: int, nq: int, dtype: torch.dtype, store_h: bool) -> tuple:
    return (common.row_bucket(m), n, k, groups, np_, nq, common.dot_dtype_key(dtype), int(store_h))


_plans: dict = {}


def linear_rational_forward(x, weight, bias, numerator, denominator, store_h: bool):
    """Launch the fused forward: (h, u) with u = F(x W^T + b) of shape (..., N) in x's dtype (== weight's dtype);
    h is the pre-rational output when ``store_h``, else an empty tensor (nothing written). Config, grid and arguments
    are planned once per operand geometry (``common.planned``)."""
    key = common.dot_plan_key((x, weight, bias, numerator, denominator), store_h)
    plan = common.planned(_plans, key, x.device, _plan, x, weight, bias, numerator, denominator, store_h)
    x2 = x.reshape(-1, x.shape[-1])
    u2, h2 = torch.empty_like(plan.outputs[0]), torch.empty_like(plan.outputs[1])
    num, den = numerator.contiguous(), denominator.contiguous()
    b = bias.contiguous() if bias is not None else x2  # read as a unit-stride vector
    common.launch_planned(_linear_rational_fwd_kernel, plan, x2, weight, b, h2 if store_h else u2, u2, num, den)
    n_out = weight.shape[0]
    return h2.view(*x.shape[:-1], n_out) if store_h else h2, u2.view(*x.shape[:-1], n_out)


def _plan(x, weight, bias, numerator, denominator, store_h: bool) -> common.Plan:
    k_in, n_out, groups = x.shape[-1], weight.shape[0], denominator.shape[0]
    x2 = x.reshape(-1, k_in)
    num, den = numerator.contiguous(), denominator.contiguous()
    bias = bias.contiguous() if bias is not None else None
    m, np_, nq, group_size = x2.shape[0], num.shape[1], den.shape[1], n_out // groups
    u2 = torch.empty(m, n_out, dtype=x.dtype, device=x.device)
    h2 = torch.empty(m if store_h else 0, n_out, dtype=x.dtype, device=x.device)
    dot, ieee = common.dot_args(x.dtype)

    def grid(cfg: dict) -> tuple[int]:
        return (common.cdiv(m, cfg["BLOCK_M"]) * common.cdiv(n_out, cfg["BLOCK_N"]),)

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
            weight.stride(0),
            weight.stride(1),
            h2.stride(0),
            u2.stride(0),
            # meta-parameters
            bias is not None,
            store_h,
            np_,
            nq,
            dot,
            ieee,
            group_size % cfg["BLOCK_N"] == 0,
            cfg["BLOCK_M"],
            cfg["BLOCK_N"],
            cfg["BLOCK_K"],
            cfg["GROUP_M"],
        )

    def scratch(cfg: dict) -> None:
        out_h, out_u = torch.empty_like(h2), torch.empty_like(u2)
        tensors = (x2, weight, bias if bias is not None else x2, out_h if store_h else out_u, out_u, num, den)
        _linear_rational_fwd_kernel[grid(cfg)](*tensors, *args(cfg), **common.launch_options(cfg))

    key = _key(m, n_out, k_in, groups, np_, nq, x.dtype, store_h)
    candidates = tile_candidates(EPILOGUE_TILES, ("BLOCK_M", "BLOCK_N", "BLOCK_K"), (m, n_out, k_in))
    cfg = common.choose(_linear_rational_fwd_kernel, key, candidates, scratch, x.device)
    shapes = [x.shape, weight.shape, num.shape, den.shape]
    record = common.launch_record(
        OP, _linear_rational_fwd_kernel, grid(cfg), cfg, shapes, x.dtype, "forward", placement="epilogue"
    )
    outputs = tuple(common.stand_in(t.shape, t.dtype, t.device) for t in (u2, h2))
    direct = common.direct_launches(x.device)
    return common.Plan(grid(cfg), args(cfg), common.launch_options(cfg), record, direct, outputs)
