"""Helpers shared by the launchers: dtypes, matmul operand precision, the device a launch runs on, benchmarking,
launching with a tuned config, deterministic reductions."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from kanc import env
from kanc.codegen import debug, launches, tuning
from kanc.codegen.checker import interpreting

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_INTERPRETER = tl.constexpr(interpreting())  # read when triton compiles a kernel; kernels import after the env is set


@triton.jit
def cast_to(x, dtype: tl.constexpr):
    """fp32 ``x`` rounded to ``dtype`` to nearest even, as GPUs and torch round.

    Triton's interpreter truncates fp32 -> bf16 (and its "rtne" mode does not carry into the exponent), which biases
    sums toward zero; there the rounding is done on the bits as torch does (NaN kept quiet).
    """
    if _INTERPRETER and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(x != x, 0x7FC0, bits)
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (>= 1); plain Python: launchers call it per launch, on the host's hot path."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the host code (``triton.cdiv`` is a constexpr function: ~20x slower to call from Python)."""
    return -(-a // b)


def memoized(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Cache a launcher's candidate-config builder per arguments (and interpreter mode): the lists are rebuilt on
    every launch otherwise. Callers must not mutate what it returns (``tuning.pick_config`` copies the config). The
    mode is read through the builder's module, as the builder reads it."""
    memo: dict[tuple, Any] = {}
    module = fn.__globals__

    def wrapper(*args: Any) -> Any:
        key = (module.get("interpreting", interpreting)(), *(tuple(a) if isinstance(a, list) else a for a in args))
        found = memo.get(key)
        if found is None:
            found = memo[key] = fn(*args)
        return found

    wrapper.__doc__, wrapper.__name__, wrapper.__wrapped__ = fn.__doc__, fn.__name__, fn  # type: ignore[attr-defined]
    return wrapper


def row_bucket(rows: int) -> int:
    """Tuning key for a row count: the next power of two (shapes in one bucket share a config)."""
    return next_pow2(rows)


# Row loops (coefficient gradients reduced over several row tiles per program before their atomics): at most this many
# row tiles per program, and no fewer programs than ``min_programs`` while the loop can still shrink.
MAX_ROWS_PER_PROGRAM = 32
PROGRAMS_PER_SM = 8
DEFAULT_SMS = 132  # an H100 SXM: the reference target when no GPU is present (interpreter, AOT compile reports)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (DEFAULT_SMS off CUDA)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SMS


def min_programs(device: torch.device) -> int:
    """Programs a row-looping launch should keep: PROGRAMS_PER_SM per streaming multiprocessor of ``device``."""
    return PROGRAMS_PER_SM * sm_count(device)


def rows_per_program(row_tiles: int, col_tiles: int, min_programs: int) -> int:
    """Row tiles per program: the largest power of two <= MAX_ROWS_PER_PROGRAM that leaves at least ``min_programs``
    programs (1 when even one row tile per program leaves fewer). Atomics fall by the same factor."""
    rpp = 1
    while rpp < MAX_ROWS_PER_PROGRAM and cdiv(row_tiles, 2 * rpp) * col_tiles >= min_programs:
        rpp *= 2
    return rpp


def with_rows_per_program(
    configs: Sequence[dict[str, Any]], tiles: Callable[[dict[str, Any]], tuple[int, int]], min_programs: int
) -> list[dict[str, Any]]:
    """Row-looping candidates: each tile config with its heuristic ROWS_PER_PROGRAM (``tiles(cfg)`` gives its row
    and column tile counts), then the first (default) tile with other row counts (1, half, double)."""
    out = [{**cfg, "ROWS_PER_PROGRAM": rows_per_program(*tiles(cfg), min_programs)} for cfg in configs]
    first = out[0]
    for rpp in (1, first["ROWS_PER_PROGRAM"] // 2, 2 * first["ROWS_PER_PROGRAM"]):
        cfg = {**first, "ROWS_PER_PROGRAM": rpp}
        if 1 <= rpp <= MAX_ROWS_PER_PROGRAM and cfg not in out:
            out.append(cfg)
    return out


def dot_dtype(io_dtype: torch.dtype) -> tl.dtype:
    """Operand dtype of tl.dot for I/O in ``io_dtype``: fp16/bf16 on tensor cores, fp32 otherwise.

    The interpreter multiplies bf16's raw bits in tl.dot (triton issue 11584), so bf16 operands go through fp32 there.
    """
    if io_dtype == torch.bfloat16 and interpreting():
        return tl.float32
    return TL_DTYPES[io_dtype]


def fp32_precision() -> str:
    """tl.dot input precision for fp32 operands: TF32 only where torch allows it for its own fp32 matmuls.

    Read from ``torch.backends.cuda.matmul.fp32_precision``, which reflects the legacy switches too (``allow_tf32``,
    ``torch.set_float32_matmul_precision``) and never raises, where reading ``allow_tf32`` raises once a program has
    mixed the legacy and the new API. Anything but "ieee" (or "none", the default: IEEE) lets fp32 dots use TF32.
    """
    if interpreting():
        return "ieee"
    precision = _fp32_getter("cuda", "matmul") if _fp32_getter else torch.backends.cuda.matmul.fp32_precision
    return "ieee" if precision in ("ieee", "none") else "tf32"


# what torch.backends.cuda.matmul.fp32_precision calls, without the module's __getattribute__ (a plan key reads it)
_fp32_getter = getattr(torch._C, "_get_fp32_precision_getter", None)


def dot_args(io_dtype: torch.dtype) -> tuple[tl.dtype, bool]:
    """The DOT and IEEE constexprs of a dot kernel (``jit_common.dot_acc``) for I/O in ``io_dtype``: the operand dtype
    (:func:`dot_dtype`) and whether fp32 operands multiply exactly (IEEE) rather than in TF32."""
    dot = dot_dtype(io_dtype)
    return dot, dot == tl.float32 and fp32_precision() == "ieee"


def dot_dtype_key(io_dtype: torch.dtype) -> str:
    """The dtype field of a dot kernel's tuning key: the I/O dtype, with the fp32 dot precision for fp32 I/O
    ("float32-tf32" and "float32-ieee" are different kernels, timed and cached apart). 16-bit I/O feeds its own
    dtype to tl.dot whatever torch's switch says."""
    name = str(io_dtype).removeprefix("torch.")
    return f"{name}-{fp32_precision()}" if io_dtype == torch.float32 else name


def deterministic() -> bool:
    """Whether reductions must be bitwise reproducible (``torch.use_deterministic_algorithms(True)``): then no
    launch reduces with atomics (their order, hence the fp32 rounding, varies run to run)."""
    return torch.are_deterministic_algorithms_enabled()


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """The context a launch runs in: ``torch.cuda.device(device)`` for a CUDA device other than the current one, so
    Triton (which launches on the current device, on its current stream) runs the kernel on the GPU its tensors live
    on, not on cuda:0; nothing for the current CUDA device (entering and leaving ``torch.cuda.device`` costs a few
    microseconds of host time per launch) nor for the interpreter."""
    if device.type == "cuda" and device.index != _current_cuda_device():
        return torch.cuda.device(device)
    return _NO_GUARD


def _current_cuda_device() -> int | None:
    """The calling thread's current CUDA device, None before CUDA is initialised (then every CUDA launch is guarded)."""
    return torch.cuda.current_device() if torch.cuda.is_initialized() else None


_NO_GUARD = contextlib.nullcontext()  # stateless: one serves every launch


def on_tensor_device(launcher: Callable) -> Callable:
    """Decorator: run a launcher (its first argument a tensor, all on one device as the checker ensures) inside
    :func:`device_guard` of that tensor's device: its tuning runs, launches and outputs all belong there."""

    @functools.wraps(launcher)
    def wrapper(tensor: torch.Tensor, *args: Any) -> Any:
        guard = device_guard(tensor.device)
        if guard is _NO_GUARD:  # no with-statement where there is nothing to enter
            return launcher(tensor, *args)
        with guard:
            return launcher(tensor, *args)

    return wrapper


def bench_on(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    """Time one launch in ms: triton.testing.do_bench on CUDA, a wall-clock median under the interpreter."""
    if device.type == "cuda":
        return lambda fn: triton.testing.do_bench(fn, warmup=5, rep=20)
    return tuning.cpu_bench


def choose(
    kernel: Any, key: tuple, candidates: Sequence[dict[str, Any]], run: Callable[[dict[str, Any]], Any], device
) -> dict[str, Any]:
    """Config for ``kernel`` at ``key`` via the tuning cache; ``run(config)`` launches once (on scratch outputs)."""
    timer = bench_on(device)
    bench = lambda cfg: timer(lambda: run(cfg))
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        bench = None  # inside a CUDA graph capture nothing may be timed: the cached choice, else the default
    config = tuning.pick_config(kernel_name(kernel), key, candidates, bench, device)
    debug.log_launch(kernel, key, config)
    return config


def kernel_name(kernel: Any) -> str:
    return getattr(getattr(kernel, "fn", None), "__name__", None) or getattr(kernel, "__name__", str(kernel))


def launch_options(config: dict[str, Any]) -> dict[str, Any]:
    """The launch keywords of a config (num_warps, num_stages) that are not constexprs of the kernel."""
    return {k: v for k, v in config.items() if k in ("num_warps", "num_stages")}


# ---------------------------------------------------------------------------------------------------- launch plans

PLAN_LIMIT = 4096  # plans kept per launcher; past it the table starts afresh (shapes that vary without end)


# TRITON_DEBUG: Triton's debug option, part of what a kernel is compiled for (a plan's direct launches keep one)
_STATE_VARIABLES = (*tuning.STATE_VARIABLES, "KANC_DEBUG", "TRITON_DEBUG", "KANC_DIRECT_LAUNCH")


def launch_state() -> tuple | None:
    """What a launch plan depends on besides its operands' geometry: the tuning state (``tuning.state``), the
    environment that chooses the mode, the cache file, the interpreter and ``KANC_DEBUG`` (logged choices), and torch's
    deterministic mode. None: plan every call anew (``KANC_AUTOTUNE=force`` re-times every launch)."""
    environment = env.snapshot(_STATE_VARIABLES)
    tuned = tuning.state(environment)
    if tuned is None:
        return None
    return tuned, environment, torch.are_deterministic_algorithms_enabled()


def planned(plans: dict, key: tuple, device: torch.device, build: Callable[..., Any], *args: Any) -> Any:
    """``build(*args)``, cached in ``plans`` under ``key`` (the operands' shapes, strides, dtypes and device) and
    :func:`launch_state`: a launcher pays for its config lookup, grid and argument list once per shape, and each call
    after only launches. A plan chosen inside a CUDA graph capture (where nothing may be timed) is not kept."""
    state = launch_state()
    if state is None:
        return build(*args)
    full = (key, state)
    plan = plans.get(full)
    if plan is None:
        plan = build(*args)
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            if len(plans) >= PLAN_LIMIT:
                plans.clear()
            plans[full] = plan
    return plan


def stand_in(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A one-element tensor expanded to ``shape`` (stride 0): ``torch.empty_like`` / ``torch.zeros_like`` of it make a
    new contiguous tensor of that shape, dtype and device. A plan keeps one per output, so that a call allocates its
    outputs by the cheapest factory (~1.5 us less than ``torch.empty(shape, dtype=, device=)``'s keyword parsing)
    without keeping a full-size template alive."""
    return torch.empty(1, dtype=dtype, device=device).expand(*shape)


class Plan(NamedTuple):
    """A launch prepared once per operand geometry (:func:`planned`): the grid, every argument that is not a tensor
    (sizes, strides, scalars, constexprs), launch options, the launch record, the compiled kernel's launcher once known
    (:func:`launch_planned`), stand-ins of the buffers each call allocates (:func:`stand_in`), and anything else the
    launcher needs per call (``extra``). Launchers that pass operands in several layouts keep their own, with these
    fields first."""

    grid: tuple[int, ...]
    args: tuple
    options: dict[str, Any]
    record: launches.Launch
    direct: list | None
    outputs: tuple = ()
    extra: tuple = ()


def dot_plan_key(tensors: Sequence[torch.Tensor | None], *extra: Any) -> tuple:
    """A dot kernel's plan key: :func:`operands_key` of ``tensors``, ``extra`` (scalars the plan bakes in), and the fp32
    dot precision when the first operand is fp32 (TF32 or IEEE: another kernel)."""
    key = (*operands_key(*tensors), *extra)
    return (*key, fp32_precision()) if tensors[0].dtype == torch.float32 else key


def launch_planned(kernel: Any, plan: Any, *tensors: torch.Tensor) -> None:
    """Launch ``kernel`` as ``plan`` says (its grid, non-tensor args, options) on ``tensors``, and record it.

    The first launch of a plan goes through ``kernel.run`` (what ``kernel[grid](...)`` calls): Triton binds the
    arguments, computes their specialisation (dtypes, each pointer's 16-byte alignment, each integer's value), finds or
    compiles the kernel and launches it, ~10 us of host time per launch (``benchmarks/triton_launch.py``). Where the
    plan allows it (``plan.direct`` is a list: CUDA launches), the compiled kernel's own launcher
    (``CompiledKernel[grid]``, which reads the current stream and Triton's launch hooks per call) is kept, and later
    launches call it directly while every pointer is 16-byte aligned as at the first launch: the integers, dtypes and
    options are the plan's own (its key), so the specialisation is the one that kernel was compiled for. A plan built
    with pre-run hooks on the kernel, or an unaligned pointer, takes ``kernel.run`` every time.
    """
    direct = plan.direct
    if direct and _aligned(tensors):
        direct[0](*tensors, *plan.args)
    else:
        compiled = kernel.run(*tensors, *plan.args, grid=plan.grid, warmup=False, **plan.options)
        if direct is not None and not direct and isinstance(compiled, _COMPILED) and not kernel.pre_run_hooks:
            if _aligned(tensors):  # (not a FutureKernel of async compilation, nor None from a jit cache hook)
                direct.append(compiled[plan.grid])
    if launches.is_recording():
        launches.record(plan.record)


_COMPILED = triton.compiler.CompiledKernel  # what a synchronous kernel.run returns


def _aligned(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every tensor's data pointer is 16-byte aligned (what Triton specialises pointer arguments on)."""
    for t in tensors:
        if t.data_ptr() % 16:
            return False
    return True


def direct_launches(device: torch.device) -> list | None:
    """A plan's ``direct`` slot (see :func:`launch_planned`): an empty list for CUDA launches, None (always
    ``kernel.run``) for the interpreter or with ``KANC_DIRECT_LAUNCH=0`` (Triton's launch every time)."""
    return [] if device.type == "cuda" and env.getenv("KANC_DIRECT_LAUNCH", "1") != "0" else None


def launch_record(
    op: str,
    kernel: Any,
    grid: tuple[int, ...],
    config: dict[str, Any],
    shapes: Sequence[Sequence[int]],
    dtype: torch.dtype,
    direction: str,
    atomics: int = 0,
    **extra: Any,
) -> launches.Launch:
    """The :class:`~kanc.codegen.launches.Launch` a planned launch records (built once, with its plan)."""
    return launches.Launch(
        op=op,
        kernel=kernel_name(kernel),
        grid=tuple(int(g) for g in grid),
        config=dict(config),
        atomics=int(atomics),
        shapes=tuple(tuple(int(d) for d in s) for s in shapes),
        dtype=str(dtype).removeprefix("torch."),
        extra={"direction": direction, **extra},
    )


def row_stride(t: torch.Tensor, width: int) -> int | None:
    """The row stride of ``t`` seen as (rows, width) with unit column stride without a copy, or None when that view
    needs a copy (then :func:`rows_of` copies it row-major: row stride ``width``)."""
    try:
        view = t.view(-1, width)
    except RuntimeError:
        return None
    return view.stride(0) if view.stride(1) == 1 or width == 1 else None


def matrix_strides(t: torch.Tensor, width: int) -> tuple[int, int] | None:
    """The strides of ``t`` seen as a (rows, width) matrix without a copy, or None when that needs a copy (then
    :func:`matrix_of` copies it row-major)."""
    try:
        return t.view(-1, width).stride()
    except RuntimeError:
        return None


def matrix_of(t: torch.Tensor, width: int, strides: tuple[int, int] | None) -> torch.Tensor:
    """``t`` as :func:`matrix_strides` planned it: itself (a launch reads only its data pointer) or a row-major copy."""
    return t if strides is not None else t.reshape(-1, width).contiguous()


def operands_key(*tensors: torch.Tensor | None) -> tuple:
    """What a launch plan depends on in its operands: shapes, strides, dtypes and the device of the first (a flat
    tuple: this runs per launch)."""
    key = [tensors[0].device]
    for t in tensors:
        if t is None:
            key.append(None)
        else:
            key += (t.shape, t.stride(), t.dtype)
    return tuple(key)


def rows_of(t: torch.Tensor, width: int, stride: int | None) -> torch.Tensor:
    """What a kernel reads as (rows, width) rows of ``t``: ``t`` itself (a launch needs only its data pointer) when
    :func:`row_stride` found a view, else a row-major copy."""
    return t if stride is not None else t.reshape(-1, width).contiguous()


def as_rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """(..., width) viewed as (rows, width) with a unit column stride (copied in its own dtype only if needed)."""
    t2 = t.reshape(-1, width)
    return t2 if t2.stride(1) == 1 or width == 1 else t2.contiguous()
