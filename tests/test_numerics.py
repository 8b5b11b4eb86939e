"""kanc.numerics.cast_once: one cast per weight and dtype while someone holds it, never a stale or foreign one."""

import gc
import weakref

import torch

from kanc.checkpoint.precision import Fp32Gemm
from kanc.numerics import cast_once


def test_the_same_weight_gives_the_same_cast_while_it_is_held():
    w = torch.nn.Parameter(torch.randn(6, 5, dtype=torch.bfloat16))
    a = cast_once(w, torch.float32)
    assert a.dtype == torch.float32 and not a.requires_grad
    assert torch.equal(a, w.detach().float())
    assert cast_once(w, torch.float32) is a
    assert cast_once(w, torch.float64) is not a  # per dtype


def test_an_in_place_change_makes_a_new_cast():
    w = torch.randn(4, 3, dtype=torch.bfloat16)
    a = cast_once(w, torch.float32)
    with torch.no_grad():
        w.add_(1)
    b = cast_once(w, torch.float32)
    assert b is not a and torch.equal(b, w.float())


def test_the_cache_keeps_nothing_alive_and_never_serves_another_tensor():
    w = torch.randn(4, 3, dtype=torch.float16)
    ref = weakref.ref(cast_once(w, torch.float32))
    gc.collect()
    assert ref() is None  # nobody held the cast: it is gone
    held = cast_once(w, torch.float32)
    del w
    gc.collect()
    for _ in range(50):  # new tensors, some reusing the freed id: each gets its own values
        v = torch.full((4, 3), 7.0, dtype=torch.float16)
        assert torch.equal(cast_once(v, torch.float32), torch.full((4, 3), 7.0))
    assert held.shape == (4, 3)


def test_same_dtype_is_the_weight_itself_detached():
    w = torch.nn.Parameter(torch.randn(3, 2))
    out = cast_once(w, torch.float32)
    assert out.data_ptr() == w.data_ptr() and not out.requires_grad


def test_the_walk_fp32_gemm_shares_the_references_cast():
    w = torch.nn.Parameter(torch.randn(8, 4, dtype=torch.bfloat16))
    reference = cast_once(w, torch.float32)
    gemm = Fp32Gemm()
    assert gemm._fp32(w) is reference
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    with gemm:
        out = torch.nn.functional.linear(x, w)
    torch.testing.assert_close(out, torch.nn.functional.linear(x.float(), w.float()).to(torch.bfloat16))
