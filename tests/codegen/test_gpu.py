"""GPU-only kernel tests: real block-sized shapes in bf16/fp16/fp32 on CUDA, do_bench tuning into the JSON cache,
and Inductor around the custom ops. Skipped without CUDA (and under the interpreter, which runs on the CPU)."""

import pytest
import torch

from kanc.codegen import checker, grkan_linear, group_rational, rational_ref, recording, tuning
from kanc.codegen.snnk import snnk_block, snnk_block_ref, snnk_width
from kanc.nn import GRKANMlp
from kanc.testing import assert_equivalent, rel_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or checker.interpreting(), reason="needs a CUDA GPU"),
]


def _coefficients(groups):
    gen = torch.Generator().manual_seed(0)
    num = (0.3 * torch.randn(groups, 6, generator=gen)).cuda().requires_grad_()
    den = torch.randn(groups, 4, generator=gen).cuda().requires_grad_()
    return num, den


def _fp32_math(fn):
    """The reference at fp32 math on the same (rounded) inputs, stored in the input dtype: the oracle for 16-bit I/O."""

    def ref(x, *rest):
        return fn(x.float(), *[t.float() if t is not None and t.dtype != torch.float32 else t for t in rest]).to(
            x.dtype
        )

    return ref


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rational_block_shapes(dtype):
    num, den = _coefficients(8)
    x = (3 * torch.randn(2, 197, 3072, device="cuda")).to(dtype).requires_grad_()
    with recording() as launches:
        assert_equivalent(group_rational, _fp32_math(rational_ref), [x, num, den])
    assert [launch.kernel for launch in launches] == ["_rational_fwd_kernel", "_rational_bwd_kernel"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k_in,n_out", [(768, 3072), (3072, 768)])
def test_grkan_linear_block_shapes(dtype, k_in, n_out, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # fp32 kernels then use IEEE tl.dot
    num, den = _coefficients(8)
    x = (2 * torch.randn(3, 131, k_in, device="cuda")).to(dtype).requires_grad_()
    w = (torch.randn(n_out, k_in, device="cuda") / k_in**0.5).to(dtype).requires_grad_()
    b = torch.randn(n_out, device="cuda").to(dtype).requires_grad_()

    def ref(x, num, den, w, b):
        f = rational_ref(x, num, den).float()
        return torch.nn.functional.linear(f, w.float(), b.float()).to(x.dtype)

    tol = {} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}  # K up to 3072 bf16 products
    with recording() as launches:
        assert_equivalent(grkan_linear, ref, [x, num, den, w, b], **tol)
    assert len(launches) == 3


@pytest.mark.parametrize("kind", ["relu", "exp", "cos"])
@pytest.mark.parametrize("feats", [64, 256, 512])
def test_snnk_block_shapes(kind, feats):
    gen = torch.Generator().manual_seed(0)
    d = 768
    x = torch.randn(4, 197, d, generator=gen).cuda().bfloat16().requires_grad_()
    g = torch.randn(feats, d, generator=gen).cuda()
    w = (torch.randn(d, snnk_width(feats, kind), generator=gen) / feats**0.5).cuda().requires_grad_()
    b = torch.zeros(d, device="cuda", requires_grad=True)
    scale = 1.0 if kind == "relu" else d**-0.5
    with recording() as launches:
        assert_equivalent(
            lambda x, w, b: snnk_block(x, g, w, b, kind, 0.0, scale),
            lambda x, w, b: snnk_block_ref(x.float(), g, w, b, kind, 0.0, scale).to(x.dtype),
            [x, w, b],
            atol=3e-2,
            rtol=3e-2,
        )
    assert [launch.kernel for launch in launches] == ["_snnk_fwd_kernel", "_snnk_dx_kernel", "_snnk_dw_kernel"]


def test_do_bench_tuning_fills_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KANC_CACHE_DIR", str(tmp_path))
    tuning.clear_memory_caches()
    num, den = _coefficients(8)
    x = torch.randn(1000, 3072, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with tuning.autotuning("1"):
        group_rational(x, num, den).sum().backward()
    cache = tuning.get_cache("cuda")
    assert {"_rational_fwd_kernel", "_rational_bwd_kernel"} <= set(cache.entries)
    entry = next(iter(cache.entries["_rational_fwd_kernel"].values()))
    assert len(entry["timings_ms"]) > 1 and tuning.cache_path("cuda").is_file()
    assert cache.device == tuning.device_name("cuda") and " sm" in cache.device


def _block_grads(block, x, grad_out, fn):
    """fn's output and the gradients of x and of every parameter of ``block`` for upstream gradient ``grad_out``."""
    x = x.detach().clone().requires_grad_()
    block.zero_grad(set_to_none=True)
    out = fn(x)
    out.backward(grad_out)
    return out.detach(), {"x": x.grad, **{name: p.grad for name, p in block.named_parameters()}}


def test_inductor_around_the_ops():
    torch.manual_seed(0)
    block = GRKANMlp(768, 3072, groups=8, act_init="gelu").cuda().bfloat16()
    x = torch.randn(2, 197, 768, device="cuda", dtype=torch.bfloat16)
    grad_out = torch.randn(2, 197, 768, device="cuda", dtype=torch.bfloat16)
    out, grads = _block_grads(block, x, grad_out, torch.compile(block, fullgraph=True))
    with checker.kernels_disabled():
        ref, expected = _block_grads(block, x, grad_out, block)
    torch.testing.assert_close(out, ref, atol=5e-2, rtol=5e-2)
    assert set(grads) == {"x", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"} | {
        f"{fc}.rational.{c}" for fc in ("fc1", "fc2") for c in ("numerator", "denominator")
    }
    for name, grad in grads.items():  # bf16 storage, fp32 sums over 394 rows and up to 3072 products
        assert grad is not None and torch.isfinite(grad).all(), name
        assert rel_error(grad, expected[name]) < 2e-2, (name, rel_error(grad, expected[name]))
