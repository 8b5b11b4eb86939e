"""GPU-only checks of the epilogue placement and of "auto": block-sized shapes on CUDA in bf16/fp16/fp32 against fp32
math, the placement measured with do_bench into the tuning cache, and Inductor around a block whose placement was
chosen eagerly. Skipped without CUDA (and under the interpreter, which runs on the CPU)."""

import pytest
import torch
import torch.nn.functional as F

from kanc.codegen import checker, grkan_mlp_epilogue, rational_ref, recording, tuning
from kanc.codegen.grkan_mlp import PLACEMENT_KERNEL
from kanc.nn import GRKANMlp
from kanc.testing import assert_equivalent

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or checker.interpreting(), reason="needs a CUDA GPU"),
]


def _oracle(x, num1, den1, w1, b1, num2, den2, w2, b2):
    """fp32 math, values rounded to x's dtype where the kernels store them (x1, h, u)."""
    rounded = lambda t: t + (t.to(x.dtype).float() - t).detach()
    x1 = rounded(rational_ref(x.float(), num1, den1))
    h = rounded(F.linear(x1, w1.float(), b1.float()))
    return F.linear(rounded(rational_ref(h, num2, den2)), w2.float(), b2.float()).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_epilogue_block_shapes(dtype, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # fp32: IEEE tl.dot, as the oracle
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen)
    c, hidden = 768, 3072
    x = 2 * rnd(3, 131, c)
    w1, b1, w2, b2 = rnd(hidden, c) / c**0.5, rnd(hidden), rnd(c, hidden) / hidden**0.5, rnd(c)
    coefficients = [0.3 * rnd(8, 6), rnd(8, 4), 0.3 * rnd(8, 6), rnd(8, 4)]
    io = [t.cuda().to(dtype).requires_grad_() for t in (x, w1, b1, w2, b2)]
    num1, den1, num2, den2 = [t.cuda().requires_grad_() for t in coefficients]
    inputs = [io[0], num1, den1, io[1], io[2], num2, den2, io[3], io[4]]
    tol = {} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 5e-2}  # K up to 3072 16-bit products, twice
    with recording() as launches:
        assert_equivalent(grkan_mlp_epilogue, _oracle, inputs, **tol)
    kernels = [launch.kernel for launch in launches]
    assert kernels == ["_rational_fwd_kernel", "_linear_rational_fwd_kernel"] + ["_grkan_linear_dx_kernel"] * 2


def test_auto_measures_both_placements_once(tmp_path, monkeypatch):
    monkeypatch.setenv("KANC_CACHE_DIR", str(tmp_path))
    tuning.clear_memory_caches()
    block = GRKANMlp(768, 3072, groups=8, act_init="gelu", placement="auto").cuda().bfloat16()
    x = torch.randn(4, 197, 768, device="cuda", dtype=torch.bfloat16)
    with tuning.autotuning("1"):
        block(x).float().sum().backward()
        with torch.no_grad():
            block(x)
    entries = tuning.get_cache("cuda").entries[PLACEMENT_KERNEL]
    assert sorted(key.rsplit(",", 1)[1] for key in entries) == ["infer", "train"]
    for entry in entries.values():
        assert entry["config"]["placement"] in ("prologue", "epilogue") and len(entry["timings_ms"]) == 2
        assert all(t > 0 for t in entry["timings_ms"])


def test_inductor_around_an_auto_block(tmp_path, monkeypatch):
    """Eager first (auto measures), then torch.compile(fullgraph=True) with Inductor reads the choice."""
    monkeypatch.setenv("KANC_CACHE_DIR", str(tmp_path))
    tuning.clear_memory_caches()
    torch.manual_seed(0)
    block = GRKANMlp(768, 3072, groups=8, act_init="gelu", placement="auto").cuda().bfloat16()
    x = torch.randn(2, 197, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with tuning.autotuning("1"):
        block(x)
    out = torch.compile(block, fullgraph=True)(x)
    out.float().square().sum().backward()
    with checker.kernels_disabled():
        ref = block(x)
    torch.testing.assert_close(out, ref, atol=5e-2, rtol=5e-2)
