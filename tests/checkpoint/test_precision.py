"""LayerGemms: a layer walk's GEMMs, half-precision ones on the CPU as fp32 GEMMs rounded to their dtype (each weight
cast once), and each one computed once per layer (GemmMemo)."""

import threading

import pytest
import torch
import torch.nn.functional as F

from kanc.checkpoint.precision import GemmMemo, LayerGemms


def _operands(dtype):
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=gen).to(dtype) for shape in ((6, 64), (48, 64), (48,)))
    return x, w, b


def test_half_linears_are_fp32_gemms_rounded_to_their_dtype():
    for dtype in (torch.bfloat16, torch.float16):
        x, w, b = _operands(dtype)
        with LayerGemms():
            got = F.linear(x, w, b)
        want = F.linear(x.float(), w.float(), b.float()).to(dtype)
        assert got.dtype == dtype and torch.equal(got, want)
        native = F.linear(x, w, b)  # the CPU's own half GEMM accumulates in fp32 too: equal up to the sums' order
        assert (got.float() - native.float()).abs().max() <= 2 * native.float().abs().max() * 2**-7


def test_each_weight_is_cast_once_per_layer_and_other_dtypes_pass_through():
    x, w, b = _operands(torch.bfloat16)
    layer = torch.nn.Linear(64, 48).to(torch.bfloat16)
    with torch.no_grad(), LayerGemms() as gemm:
        first, again = layer(x), layer(x)
        assert torch.equal(first, again) and len(gemm._casts) == 1
        gemm.clear()
        assert gemm._casts == {}
        x32, w32, b32 = _operands(torch.float32)
        assert torch.equal(F.linear(x32, w32, b32), torch.addmm(b32, x32, w32.t())) and gemm._casts == {}


def test_the_walk_computes_half_gemms_in_fp32_only_for_half_precision_models():
    """Every walk runs in its LayerGemms (the memo); only a half-precision model's GEMMs become fp32 ones."""
    from torch.overrides import _get_current_function_mode

    from kanc.checkpoint.walk import LayerWalk

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4)])

        def forward(self, x):
            return self.layers[0](x)

    class Seen(LayerWalk):
        def before(self, name, layer, inputs):
            self.mode = _get_current_function_mode()

    for dtype, want in ((torch.float32, False), (torch.bfloat16, True)):
        walk = Seen(Model().to(dtype))
        walk.walk({"x": torch.ones(2, 4, dtype=dtype)})
        assert isinstance(walk.mode, LayerGemms) and walk.mode.half is want


def test_the_rational_fit_bypasses_the_walks_mode_with_the_same_result():
    """The fit's thousands of small fp64 ops skip a caller's TorchFunctionMode (LayerGemms in a walk)."""
    from torch.overrides import TorchFunctionMode

    from kanc.nn.fit import rational_coefficients
    from kanc.passes.ratfit import fit_to_samples

    class Count(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    samples = 0.1 * torch.randn(4000, generator=torch.Generator().manual_seed(0))
    start = rational_coefficients("gelu", (5, 4))
    alone = fit_to_samples(F.gelu, start, samples)
    with Count():
        inside = fit_to_samples(F.gelu, start, samples)
    assert all(torch.equal(a, b) for a, b in zip(alone, inside))
    assert 0 < Count.calls < 1000  # the set-up only (~200); with the L-BFGS loop, ~11000


# ---- GemmMemo: each GEMM of a layer once --------------------------------------------------------------------------


def _rows(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_a_repeated_gemm_is_recalled_and_anything_else_computed():
    memo = GemmMemo()
    x, w, b = _rows(2, 5, 64), _rows(48, 64, seed=1), _rows(48, seed=2)
    first = memo.gemm(x, w, b)
    again = memo.gemm(x.clone().reshape(10, 64), w, b)  # equal rows, another shape: recalled as that shape
    assert (memo.hits, memo.misses) == (1, 1)
    assert again.shape == (10, 48) and torch.equal(again, first.reshape(10, 48))
    again.add_(1)  # the caller owns what it gets: the memo's copy is untouched
    assert torch.equal(memo.gemm(x, w, b), first) and memo.hits == 2
    other = x.clone()
    other[1, 4, 63] += 1e-6  # one element differs: computed
    assert torch.equal(memo.gemm(other, w, b), F.linear(other, w, b)) and memo.misses == 2
    assert torch.equal(memo.gemm(x, w, None), F.linear(x, w)) and memo.misses == 3  # no bias: another GEMM
    w.mul_(2)  # written in place (an optimizer step, a fusion): its old results are stale
    assert torch.equal(memo.gemm(x, w, b), F.linear(x, w, b)) and memo.misses == 4
    b.add_(1)
    assert torch.equal(memo.gemm(x, w, b), F.linear(x, w, b)) and memo.misses == 5


def test_nan_inputs_are_computed_every_time_and_stay_nan():
    memo = GemmMemo()
    x, w = _rows(3, 16), _rows(8, 16, seed=1)
    x[0, 0] = float("nan")
    for _ in range(2):
        out = memo.gemm(x, w, None)
        assert torch.isnan(out[0]).all() and torch.isfinite(out[1:]).all()
    assert (memo.hits, memo.misses) == (0, 2)


def test_views_of_a_weight_are_the_weight_and_a_dead_weight_matches_nothing():
    memo = GemmMemo()
    x, w = _rows(4, 16), _rows(8, 16, seed=1)
    memo.gemm(x, w, None)
    memo.gemm(x, w.t().t(), None)  # another object, the same memory, shape and strides
    assert memo.hits == 1
    # GPT-2's Conv1D: addmm(b, x, W) with W (in, out) is its own kind of GEMM
    wt, b = _rows(16, 8, seed=2), _rows(8, seed=3)
    want = torch.addmm(b, x, wt)
    assert torch.equal(memo.gemm(x, wt, b, transposed=True), want)
    assert torch.equal(memo.gemm(x, wt, b, transposed=True), want) and memo.hits == 2
    key_count = len(memo._guards)
    del w
    fresh = _rows(8, 16, seed=4)  # may land where w was: the weak reference says w is gone
    assert torch.equal(memo.gemm(x, fresh, None), F.linear(x, fresh)) and len(memo._guards) >= key_count


@pytest.mark.parametrize("transposed", [False, True])
def test_a_recalled_gemm_has_the_gemms_gradients(transposed):
    memo = GemmMemo()
    x0, b0 = _rows(3, 4, 16), _rows(8, seed=2)
    w0 = _rows(16, 8, seed=1) if transposed else _rows(8, 16, seed=1)
    with torch.no_grad():
        memo.gemm(x0.reshape(12, 16) if transposed else x0, w0, b0, transposed)
    x, w, b = (t.clone().requires_grad_() for t in (x0.reshape(12, 16) if transposed else x0, w0, b0))
    refs = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    w.data, b.data = w0, b0  # the memo's weight and bias (same memory), now leaves that need gradients
    got = memo.gemm(x, w, b, transposed)
    assert memo.hits == 1 and got.grad_fn is not None
    want = torch.addmm(refs[2], refs[0], refs[1]) if transposed else F.linear(*refs)
    assert torch.equal(got, want)
    upstream = _rows(*want.shape, seed=5)
    got.backward(upstream)
    want.backward(upstream)
    for mine, theirs in zip((x, w, b), refs):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-6)


def test_the_budget_bounds_what_the_memo_keeps():
    x, w = _rows(64, 32), _rows(32, 32, seed=1)
    memo = GemmMemo(budget=x.numel() * 4 * 2 - 1)  # one input and result do not fit
    memo.gemm(x, w, None)
    memo.gemm(x, w, None)
    assert (memo.hits, memo.misses) == (0, 2) and memo._bytes == 0


def test_the_walks_memo_serves_its_own_thread_only():
    """A walk's second thread (the drift) runs other inputs: it neither reads nor fills the memo."""
    x, w = _rows(4, 16), _rows(8, 16, seed=1)
    gemms = LayerGemms(half=False)
    with torch.no_grad(), gemms:
        F.linear(x, w)
        F.linear(x, w)
    assert (gemms.memo.hits, gemms.memo.misses) == (1, 1)

    def elsewhere():
        with torch.no_grad(), gemms:
            out.append(F.linear(x, w))

    out = []
    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    assert torch.equal(out[0], F.linear(x, w)) and (gemms.memo.hits, gemms.memo.misses) == (1, 1)
    gemms.clear()
    assert gemms.memo._bytes == 0 and not gemms.memo._guards


def test_a_run_of_an_earlier_inputs_rows_gets_those_rows_of_its_result():
    """A fit keeps 80% of the rows a capture saw: their GEMM is the capture's, row for row."""
    memo = GemmMemo()
    x, w, b = _rows(32, 64), _rows(48, 64, seed=1), _rows(48, seed=2)
    full = memo.gemm(x, w, b)
    for start, stop in ((0, 25), (7, 32), (3, 5)):
        got = memo.gemm(x[start:stop].clone(), w, b)
        assert torch.equal(got, full[start:stop])
        torch.testing.assert_close(got, F.linear(x[start:stop], w, b))  # a GEMM of fewer rows may sum otherwise
    assert memo.hits == 3
    shuffled = x[torch.tensor([0, 2, 1])]  # rows of it, not a run: computed
    assert torch.equal(memo.gemm(shuffled, w, b), F.linear(shuffled, w, b)) and memo.misses == 2


def test_a_linear_on_a_transposed_view_is_the_addmm_of_the_weight():
    """GPT-2's Conv1D runs addmm(b, x, W) with W (in, out); a block reference reads it as the view W.T."""
    memo = GemmMemo()
    x, w, b = _rows(8, 16), _rows(16, 24, seed=1), _rows(24, seed=2)
    first = memo.gemm(x, w, b, transposed=True)
    again = memo.gemm(x, w.T, b)
    assert memo.hits == 1 and torch.equal(again, first) and torch.equal(again, F.linear(x, w.T, b))


def test_results_of_a_changed_weight_give_their_room_back():
    x, w = _rows(64, 32), _rows(32, 32, seed=1)
    memo = GemmMemo(budget=x.numel() * 4 * 2)  # room for one input and its result
    memo.gemm(x, w, None)
    with torch.no_grad():
        w.add_(1)  # the entry is stale: a new GEMM of the same weight takes its place
    memo.gemm(x, w, None)
    assert memo._bytes == x.numel() * 4 * 2 and len(memo._entries[next(iter(memo._entries))]) == 1
    assert torch.equal(memo.gemm(x, w, None), F.linear(x, w)) and memo.hits == 1
