"""kanc.numerics.cast_once: one cast per weight and dtype while someone holds it, never a stale or foreign one."""

import gc
import threading
import weakref

import torch

from kanc.checkpoint.precision import LayerGemms
from kanc.numerics import CastPool, cast_once


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
    gemm = LayerGemms()
    assert gemm._fp32(w) is reference
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    with gemm:
        out = torch.nn.functional.linear(x, w)
    torch.testing.assert_close(out, torch.nn.functional.linear(x.float(), w.float()).to(torch.bfloat16))


# ---- CastPool: the memory of casts nobody holds, used again ----------------------------------------------------------


def _layer(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 5, generator=g).to(torch.bfloat16), torch.randn(6, generator=g).to(torch.bfloat16)]


def test_a_pooled_cast_is_the_plain_cast_and_reuses_memory_nobody_holds():
    pool = CastPool()
    first = [pool.cast(t, torch.float32) for t in _layer(0)]
    ptrs = {c.data_ptr() for c in first}
    assert all(torch.equal(c, t.float()) for c, t in zip(first, _layer(0), strict=True))
    del first
    pool.trim()
    second = [pool.cast(t, torch.float32) for t in _layer(1)]
    assert {c.data_ptr() for c in second} == ptrs  # the first layer's memory
    assert all(torch.equal(c, t.float()) for c, t in zip(second, _layer(1), strict=True))
    assert pool.nbytes() == (30 + 6) * 4


def test_a_cast_still_held_in_any_form_is_never_overwritten():
    pool = CastPool()
    a, b, c = (pool.cast(t, torch.float32) for t in (_layer(0)[0], _layer(1)[0], _layer(2)[0]))
    view = b.t()  # a view keeps b's memory
    w = torch.randn(6, 6, requires_grad=True)
    graph = (w @ c).sum()  # an autograd graph saved c
    want = [a.clone(), b.clone(), c.clone()]
    del b, c
    pool.trim()
    fresh = [pool.cast(t, torch.float32) for t in (_layer(3)[0], _layer(4)[0], _layer(5)[0])]
    assert torch.equal(a, want[0]) and torch.equal(view.t(), want[1])
    graph.backward()
    assert torch.equal(w.grad, want[2].sum(1).unsqueeze(0).expand(6, 6))  # what the graph saved is intact
    sources = (_layer(3)[0], _layer(4)[0], _layer(5)[0])
    assert all(torch.equal(f, t.float()) for f, t in zip(fresh, sources, strict=True))
    assert len({f.data_ptr() for f in fresh} | {a.data_ptr(), view.data_ptr()}) == 5


def test_trim_lets_go_of_memory_no_cast_used_since_the_last_trim():
    pool = CastPool()
    casts = [pool.cast(t, torch.float32) for t in _layer(0)]
    del casts
    pool.trim()
    assert pool.nbytes() == (30 + 6) * 4  # kept for the next layer
    pool.trim()
    assert pool.nbytes() == 0  # a layer of other shapes used none of it


def test_what_the_pool_cannot_hold_is_cast_as_usual():
    pool = CastPool()
    t = torch.randn(5, 6).to(torch.float16).t()  # not contiguous
    out = pool.cast(t, torch.float32)
    assert torch.equal(out, t.float()) and out.stride() == t.float().stride()
    assert pool.nbytes() == 0


def test_the_walk_fp32_gemm_gives_each_layer_the_last_layers_memory():
    gemm = LayerGemms()
    x = torch.randn(3, 5, dtype=torch.bfloat16)
    ptrs = []
    for seed in range(3):
        w, b = _layer(seed)
        with gemm:
            out = torch.nn.functional.linear(x, w, b)
        ptrs.append(gemm._fp32(w).data_ptr())
        torch.testing.assert_close(out, torch.nn.functional.linear(x.float(), w.float(), b.float()).to(torch.bfloat16))
        gemm.clear()
    assert ptrs[0] == ptrs[1] == ptrs[2]


def test_two_threads_casting_from_one_pool_never_share_a_storage():
    """The layer walk casts on two threads (the drift's beside the conversion): each cast gets storage of its own."""
    pool = CastPool()
    first = [pool.cast(t, torch.float32) for t in _layer(0) * 8]
    del first
    pool.trim()  # 16 free storages of two sizes
    got: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {0: [], 1: []}
    start = threading.Barrier(2)

    def work(k: int) -> None:
        start.wait()
        for seed in range(8):
            for t in _layer(10 * k + seed):
                got[k].append((t, pool.cast(t, torch.float32)))

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    casts = got[0] + got[1]
    assert len({c.data_ptr() for _, c in casts}) == len(casts) == 32
    assert all(torch.equal(c, t.float()) for t, c in casts)
