"""The epilogue placement of a GR-KAN MLP block (fc2's rational in fc1's epilogue) against its references: the
linear-then-rational kernel alone, the block op's forward and all nine gradients in fp32/fp16/bf16 on ragged tiles
and straddling groups, what it launches and holds, custom-op checks, torch.compile / export, and the choice between
placements (explicit, "auto" from the tuning cache, dropout, the CPU)."""

import pytest
import torch
import torch.nn.functional as F

from kanc.codegen import (
    forced_config,
    grkan_mlp_epilogue,
    grkan_mlp_ref,
    kernels_disabled,
    rational_ref,
    recording,
    tuning,
)
from kanc.codegen.grkan_mlp import PLACEMENT_KERNEL, _placement_bench, choose_placement, linear_rational_ref
from kanc.errors import KancError
from kanc.nn import GRKANLinear, GRKANMlp, GRKANPair
from kanc.testing import assert_equivalent

EPI, RAT, DX = "_linear_rational_fwd_kernel", "_rational_fwd_kernel", "_grkan_linear_dx_kernel"
PRO_FWD, PRO_DW = "_grkan_linear_fwd_kernel", "_grkan_linear_dw_kernel"
EPILOGUE_LAUNCHES = [RAT, EPI, DX, DX]  # F1(x), fc1 + F2, then the two dx epilogues (fc2's, fc1's)


def _block(c, hidden, n_out, g1, g2, dtype, device, bias=True, rows=(3, 15)):
    """(x, num1, den1, w1, b1, num2, den2, w2, b2) with x of shape (*rows, c); biases None without ``bias``."""
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen)
    x = 2 * rnd(*rows, c)
    num1, den1, num2, den2 = 0.3 * rnd(g1, 6), rnd(g1, 4), 0.3 * rnd(g2, 6), rnd(g2, 4)
    w1, w2 = rnd(hidden, c) / c**0.5, rnd(n_out, hidden) / hidden**0.5
    b1, b2 = rnd(hidden), rnd(n_out)
    io = [x, w1, b1, w2, b2]
    out = [x, num1, den1, w1, b1, num2, den2, w2, b2]
    tensors = [t.to(device, dtype) if any(t is i for i in io) else t.to(device) for t in out]
    if not bias:
        tensors[4] = tensors[8] = None
    return [t.requires_grad_() if t is not None else None for t in tensors]


def _rounded(t, dtype):
    """t's value rounded to ``dtype`` (as the kernels store it), its gradient passed through unrounded (fp32
    accumulators in the backward kernels)."""
    return t + (t.to(dtype).float() - t).detach()


def _oracle(x, num1, den1, w1, b1, num2, den2, w2, b2):
    """grkan_mlp_ref's math in fp32, rounding x1 = F1(x), h and u = F2(h) to x's dtype where the kernels store them."""
    f32 = lambda t: t.float() if t is not None else None
    x1 = _rounded(rational_ref(x.float(), num1, den1), x.dtype)
    h = _rounded(F.linear(x1, f32(w1), f32(b1)), x.dtype)
    u = _rounded(rational_ref(h, num2, den2), x.dtype)
    return F.linear(u, f32(w2), f32(b2)).to(x.dtype)


def _tiles(bm, bn, bk, rpp=1):
    """Forced configs: the epilogue kernel's (BLOCK_M, BLOCK_N, BLOCK_K) and the dx kernel's alike."""
    cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 2, "num_warps": 4, "num_stages": 1}
    dx = {**cfg, "BLOCK_K": bn, "BLOCK_N": bk, "ROWS_PER_PROGRAM": rpp}  # (M, K) tiles, N reduced
    return forced_config(EPI, cfg), forced_config(DX, dx)


def _on_present(fn, inputs):
    """fn as a function of the inputs that are not None (assert_equivalent takes tensors only)."""

    def call(*present):
        it = iter(present)
        return fn(*[next(it) if t is not None else None for t in inputs])

    return call


def _check(inputs, **tol):
    present = [t for t in inputs if t is not None]
    with recording() as launches:
        assert_equivalent(_on_present(grkan_mlp_epilogue, inputs), _on_present(_oracle, inputs), present, **tol)
    assert [launch.kernel for launch in launches] == EPILOGUE_LAUNCHES
    return launches


def test_fp32_oracle_is_the_reference():
    inputs = _block(16, 24, 8, 2, 4, torch.float32, "cpu")
    torch.testing.assert_close(_oracle(*inputs), grkan_mlp_ref(*inputs), atol=0, rtol=0)
    fc1 = grkan_mlp_ref(*inputs[:5], torch.zeros(4, 6), torch.zeros(4, 4), torch.eye(8, 24), None)
    torch.testing.assert_close(fc1, torch.zeros(3, 15, 8))  # F2 = 0: the block is fc2 of zeros


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("c,hidden,g2,bias", [(24, 48, 3, True), (32, 64, 2, False)])
def test_matches_reference_ragged(c, hidden, g2, bias, dtype, device):
    """45 rows, N = 19, 16/32 tiles: every dimension ragged. hidden 48, G2 = 3: F2's groups (D = 16) meet 32-wide
    output tiles of fc1 at unequal offsets (per-column coefficients); hidden 64, G2 = 2: each tile in one group,
    and no biases."""
    a, b = _tiles(16, 32, 16, rpp=2)
    with a, b:
        _check(_block(c, hidden, 19, 4, g2, dtype, device, bias))


def test_groups_narrower_than_a_tile(device):
    """D = 3 for F2: a 16-wide output tile of fc1 spans up to 7 groups."""
    a, b = _tiles(16, 16, 16)
    with a, b:
        _check(_block(16, 24, 11, 2, 8, torch.float32, device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_configs(dtype, device):
    _check(_block(64, 256, 64, 8, 8, dtype, device))


@pytest.mark.parametrize("store_h", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_linear_rational_kernel(store_h, dtype, device):
    """The kernel alone: u = F(x W^T + b) as the reference (h rounded to the I/O dtype first), h written only when
    asked. A transposed-storage weight and a strided bias."""
    from kanc.codegen.kernels.linear_rational import linear_rational_forward

    x, _, _, w, b, num, den, _, _ = _block(24, 48, 8, 1, 3, dtype, device)
    wt = w.detach().t().contiguous().t()
    bias = torch.randn(96, device=device).to(dtype)[::2]
    with torch.no_grad(), forced_config(EPI, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2}):
        h, u = linear_rational_forward(x.detach(), wt, bias, num, den, store_h)
        expected = linear_rational_ref(x.float(), w.float(), bias.float(), num, den).to(dtype)
        ref_h = F.linear(x.float(), w.float(), bias.float()).to(dtype)
    tol = {} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(u, expected, **tol)
    if store_h:
        torch.testing.assert_close(h, ref_h, **tol)
        assert torch.equal(u, rational_ref(h, num, den))  # F read h exactly as stored
    else:
        assert h.shape == (0, 48)


def test_linear_rational_plans_once_per_geometry_and_keys_the_fp32_precision(device, monkeypatch):
    """The epilogue launcher plans once per operand geometry (repeated calls only launch, with the same result); its
    tuning key names fp32's dot precision ("float32-ieee", another kernel than TF32's), as the other dot kernels do."""
    from kanc.codegen.kernels.linear_rational import linear_rational_forward

    keys = []
    pick = tuning.pick_config
    monkeypatch.setattr(tuning, "pick_config", lambda k, key, *a, **kw: keys.append(key) or pick(k, key, *a, **kw))
    x, _, _, w, b, num, den, _, _ = _block(24, 48, 8, 1, 3, torch.float32, device)
    with torch.no_grad():
        first = [linear_rational_forward(x, w, b, num, den, True) for _ in range(3)]
        linear_rational_forward(x, w, None, num, den, True)
    assert len(keys) == 2 and keys[0][6] == "float32-ieee"
    for h, u in first[1:]:
        assert torch.equal(h, first[0][0]) and torch.equal(u, first[0][1])


def test_non_finite_inputs(device):
    inputs = _block(16, 32, 8, 2, 4, torch.float32, device)
    with torch.no_grad():
        inputs[0][0, 2, 3], inputs[0][1, 7, 9], inputs[0][2, 0, 0] = float("nan"), float("inf"), -40.0
    _check(inputs)


def test_atomics_counted_and_recorded(device, count_atomics):
    a, b = _tiles(16, 16, 16, rpp=2)
    with a, b, count_atomics() as counted:
        launches = _check(_block(32, 48, 8, 2, 3, torch.float32, device))
    dx = [launch for launch in launches if launch.kernel == DX]
    assert counted[0] == sum(launch.atomics for launch in launches) == sum(launch.atomics for launch in dx) > 0
    assert launches[1].extra["placement"] == "epilogue" and launches[1].config["BLOCK_N"] == 16


def test_holds_h_only_for_a_backward(device):
    """No grad: h is neither written nor held (the op returns an empty h); with grad, the op returns h, x1 and u."""
    inputs = _block(16, 32, 8, 2, 4, torch.float32, device)
    args = [t.detach() if t is not None else None for t in inputs]
    with torch.no_grad():
        y, x1, h, u = torch.ops.kanc.grkan_mlp_epilogue(*args, False)
    assert h.shape == (0, 32) and x1.shape == (3, 15, 16) and u.shape == (3, 15, 32)
    y2, _, h2, _ = torch.ops.kanc.grkan_mlp_epilogue(*args, True)
    assert h2.shape == (3, 15, 32) and torch.equal(y, y2)
    torch.testing.assert_close(h2, F.linear(x1, args[3], args[4]))
    with torch.no_grad():
        assert torch.equal(grkan_mlp_epilogue(*inputs), y)


def test_shared_numerator_and_zero_denominator(device):
    """KAT's layout (one numerator row expanded over the groups) and b = 0 (the identity init of fc1): the epilogue
    path's d|b|/db is +1 there, so the denominator learns, as on the reference."""
    torch.manual_seed(0)
    block = GRKANMlp(16, 32, groups=4, act_init="gelu", placement="epilogue").to(device)
    block.fc1.rational.numerator = torch.nn.Parameter(block.fc1.rational.numerator[:1].detach().clone())
    block.fc1.rational.shared_numerator = True
    x = torch.randn(2, 9, 16, device=device)
    with recording() as launches:
        block(x).square().sum().backward()
    assert [launch.kernel for launch in launches] == EPILOGUE_LAUNCHES
    grads = [p.grad.clone() for p in block.parameters()]
    assert torch.count_nonzero(block.fc1.rational.denominator.grad) == block.fc1.rational.denominator.numel()
    block.zero_grad()
    with kernels_disabled():
        block(x).square().sum().backward()
    for got, p in zip(grads, block.parameters()):
        torch.testing.assert_close(got, p.grad, atol=1e-4, rtol=1e-4)


def test_autocast_casts_operands_not_coefficients(device):
    inputs = _block(16, 32, 8, 2, 4, torch.float32, device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16), recording() as launches:
        out = grkan_mlp_epilogue(*inputs)
    assert out.dtype == torch.bfloat16 and {launch.dtype for launch in launches} == {"bfloat16"}
    cast = [t.bfloat16() if i in (0, 3, 4, 7, 8) else t for i, t in enumerate(inputs)]
    torch.testing.assert_close(out, _oracle(*cast), atol=3e-2, rtol=3e-2)
    out.float().sum().backward()
    assert inputs[1].grad.dtype == torch.float32 and inputs[3].grad.dtype == torch.float32


def test_double_backward_through_the_reference(device):
    inputs = _block(8, 16, 4, 2, 2, torch.float32, device)

    def penalty(fn):
        (gx,) = torch.autograd.grad(fn(*inputs).square().sum(), inputs[0], create_graph=True)
        return torch.autograd.grad(gx.square().sum(), [t for t in inputs[1:] if t is not None])

    for got, want in zip(penalty(grkan_mlp_epilogue), penalty(grkan_mlp_ref)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(bias, device):
    block = _block(8, 16, 4, 2, 2, torch.float32, device, bias, rows=(2, 3))
    inputs = [t.detach() if t is not None else None for t in block]
    x, num1, den1, w1, b1, num2, den2, w2, b2 = inputs
    save = bias  # one call each way: h kept (with biases), h not written (without)
    torch.library.opcheck(torch.ops.kanc.grkan_mlp_epilogue.default, (x.requires_grad_(save), *inputs[1:], save))
    _, x1, h, u = torch.ops.kanc.grkan_mlp_epilogue(*inputs, True)
    grad = torch.randn(2, 3, 4, device=device)
    args = (grad, x.detach(), x1, h, u, num1, den1, w1, b1, num2, den2, w2, b2)
    torch.library.opcheck(torch.ops.kanc.grkan_mlp_epilogue_backward.default, args)


def test_compiled_block_holds_the_epilogue_op(device, compile_capture):
    torch.manual_seed(0)
    block = GRKANMlp(16, 32, groups=4, act_init="gelu", placement="epilogue").to(device)
    compiled, graphs = compile_capture(block)
    x = torch.randn(2, 9, 16, device=device, requires_grad=True)
    out = compiled(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in block.parameters()] + [x.grad.clone()]
    block.zero_grad()
    x.grad = None
    with kernels_disabled():
        ref = block(x)
        ref.square().sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for got, want in zip(grads, [p.grad for p in block.parameters()] + [x.grad]):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
    forward, backward = graphs.targets("forward"), graphs.targets("backward")
    assert "kanc.grkan_mlp_epilogue.default" in forward and "kanc.grkan_mlp_epilogue_backward.default" in backward
    assert not {"kanc.grkan_linear.default", "aten.mm.default", "aten.addmm.default", "aten.abs.default"} & forward


def test_torch_export_keeps_one_op(device):
    block = GRKANMlp(16, 32, groups=4, placement="epilogue").to(device)
    exported = torch.export.export(block, (torch.randn(3, 16, device=device),))
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert targets.count("kanc.grkan_mlp_epilogue.default") == 1 and "kanc.grkan_linear.default" not in targets


# ------------------------------------------------------------------------------------------- choosing a placement


def _kernels(block, x, train=True):
    with recording() as launches:
        out = block(x)
        if train:
            out.sum().backward()
    return [launch.kernel for launch in launches]


PROLOGUE_LAUNCHES = [PRO_FWD, PRO_FWD, PRO_DW, DX, PRO_DW, DX]


def test_placements_agree_and_launch_what_they_say(device):
    torch.manual_seed(0)
    block = GRKANMlp(16, 32, groups=4, act_init="gelu").to(device)
    x = torch.randn(5, 16, device=device)
    outs = {}
    for placement, kernels in (("prologue", PROLOGUE_LAUNCHES), ("epilogue", EPILOGUE_LAUNCHES)):
        block.placement = placement
        assert _kernels(block, x) == kernels
        outs[placement] = block(x)
    torch.testing.assert_close(outs["prologue"], outs["epilogue"], atol=1e-5, rtol=1e-5)


def test_auto_keeps_the_prologue_on_the_cpu_unless_measured(device):
    """Under the interpreter nothing is timed (KANC_AUTOTUNE defaults to 0): auto takes the cached choice, and with
    none the prologue. A cached "epilogue" for the block's key (as a GPU measurement writes it) is followed."""
    torch.manual_seed(0)
    block = GRKANMlp(16, 32, groups=4, placement="auto").to(device)
    x = torch.randn(5, 16, device=device)
    assert _kernels(block, x) == PROLOGUE_LAUNCHES
    from kanc.codegen.grkan_mlp import placement_key

    key = placement_key(torch.float32, True, 16, 32, 16, 4, 4, 5, 4, 5, 4)
    tuning.get_cache(device).put(PLACEMENT_KERNEL, key, {"placement": "epilogue"})
    assert _kernels(block, x) == EPILOGUE_LAUNCHES
    with torch.no_grad():  # inference is its own key: not measured, so the prologue
        assert _kernels(block, x, train=False) == [PRO_FWD, PRO_FWD]


def test_auto_asks_the_tuning_cache_once_per_shape(device, monkeypatch):
    """placement="auto" looks its choice up once per block shape (not per call), and sees a new cached choice."""
    from kanc.codegen import grkan_mlp

    asked = []
    pick = tuning.pick_config
    monkeypatch.setattr(grkan_mlp, "_chosen", {}, raising=False)
    monkeypatch.setattr(tuning, "pick_config", lambda kernel, *a, **k: asked.append(kernel) or pick(kernel, *a, **k))
    args = _block(16, 32, 16, 4, 4, torch.float32, device)
    assert [choose_placement(*args) for _ in range(3)] == ["prologue"] * 3
    assert asked == [PLACEMENT_KERNEL]
    dims = grkan_mlp._block_dims(*args[1:4], *args[5:8])
    key = grkan_mlp.placement_key(torch.float32, grkan_mlp.needs_backward(*args), *dims)
    tuning.get_cache(device).put(PLACEMENT_KERNEL, key, {"placement": "epilogue"})
    assert [choose_placement(*args) for _ in range(2)] == ["epilogue"] * 2
    assert asked == [PLACEMENT_KERNEL] * 2


def test_auto_under_compile_takes_the_cached_choice(device, compile_capture):
    torch.manual_seed(0)
    block = GRKANMlp(16, 32, groups=4, placement="auto").to(device)
    with forced_config(PLACEMENT_KERNEL, {"placement": "epilogue"}):
        compiled, graphs = compile_capture(block)
        compiled(torch.randn(5, 16, device=device, requires_grad=True)).sum().backward()
    assert "kanc.grkan_mlp_epilogue.default" in graphs.targets("forward")
    compiled, graphs = compile_capture(block)
    compiled(torch.randn(5, 16, device=device, requires_grad=True)).sum().backward()
    assert "kanc.grkan_linear.default" in graphs.targets("forward")


def test_the_compile_constant_marker_is_torchs():
    """_cached_placement is marked as torch.compiler.assume_constant_result marks a function (without importing
    torch._dynamo at kanc's import): if torch changes its marker, this fails before a trace silently breaks."""
    from kanc.codegen.grkan_mlp import _cached_placement

    marked = torch.compiler.assume_constant_result(lambda: None)
    assert vars(marked) == {"_dynamo_marked_constant": True}
    assert _cached_placement._dynamo_marked_constant is True


def test_dropout_between_the_layers(device):
    with pytest.raises(KancError, match="epilogue"):
        GRKANMlp(16, 32, groups=4, drop=0.1, placement="epilogue")
    block = GRKANMlp(16, 32, groups=4, drop=0.1, placement="auto").to(device)
    x = torch.randn(5, 16, device=device)
    with forced_config(PLACEMENT_KERNEL, {"placement": "epilogue"}):
        assert _kernels(block, x) == PROLOGUE_LAUNCHES  # dropout active: F2 cannot move before it
        block.eval()
        assert _kernels(block, x, train=False) == [RAT, EPI]  # eval: dropout is the identity


def test_kernels_off_run_the_layers_on_the_reference(device):
    torch.manual_seed(0)
    block = GRKANMlp(16, 32, groups=4, placement="epilogue").to(device)
    x = torch.randn(5, 16, device=device)
    with kernels_disabled():
        assert _kernels(block, x) == []
        assert choose_placement(x, *block.fc1.rational.coefficients(), block.fc1.weight, None,
                                *block.fc2.rational.coefficients(), block.fc2.weight, None) == "prologue"  # fmt: skip


def test_placement_bench_times_both_placements(device):
    """The measurement auto runs on a GPU (training: forward and backward), here with the interpreter's wall clock:
    each placement's own launchers, a warm-up call then the timed ones."""
    block = _block(16, 32, 8, 2, 4, torch.float32, device, rows=(5,))
    bench = _placement_bench(tuple(t.detach() if t is not None else None for t in block), training=True)
    for placement, kernels in (("prologue", PROLOGUE_LAUNCHES), ("epilogue", EPILOGUE_LAUNCHES)):
        with recording() as launches:
            ms = bench({"placement": placement})
        names = [launch.kernel for launch in launches]
        assert ms > 0 and len(names) >= 2 * len(kernels) and names == kernels * (len(names) // len(kernels))


def test_pair_is_a_view_over_layers_owned_elsewhere(device):
    """GRKANPair registers nothing: a parent keeps its keys, parameters and device moves."""
    parent = torch.nn.Module()
    parent.fc1, parent.fc2 = GRKANLinear(16, 32, groups=4), GRKANLinear(32, 8, groups=4, act_init="gelu")
    keys = set(parent.state_dict())
    parent.pair = GRKANPair(parent.fc1, parent.fc2, placement="epilogue")
    assert set(parent.state_dict()) == keys and len(list(parent.pair.parameters())) == 0
    parent.to(device)
    x = torch.randn(4, 16, device=device)
    with recording() as launches:
        out = parent.pair(x)
    assert [launch.kernel for launch in launches] == [RAT, EPI]
    torch.testing.assert_close(out, parent.fc2(parent.fc1(x)), atol=1e-5, rtol=1e-5)
    assert "placement='epilogue'" in repr(parent.pair)


def test_pair_contract_errors():
    fc1, fc2 = GRKANLinear(16, 32, groups=4), GRKANLinear(32, 8, groups=4)
    with pytest.raises(KancError, match="placement must be one of"):
        GRKANPair(fc1, fc2, placement="middle")
    with pytest.raises(KancError, match="writes 32 features but fc2 reads 16"):
        GRKANPair(fc1, GRKANLinear(16, 8, groups=4))
    with pytest.raises(KancError, match="two GRKANLinear"):
        GRKANPair(fc1, torch.nn.Linear(32, 8))


def test_profile_reports_the_placement_that_ran(tmp_path, device):
    """kanc.profile: each kernel row names its placement, and the block run as one op is counted as its two fused
    layers are when they run one by one (the same FLOPs), so its rates are not blank."""
    import kanc
    from kanc.runtime import validate

    torch.manual_seed(0)
    model = torch.nn.Sequential(GRKANMlp(16, 32, groups=4, placement="epilogue")).to(device)
    x = torch.randn(5, 16, device=device)
    epilogue = kanc.profile(model, x, train=True, warmup=1, iters=1)
    assert {k.placement for k in epilogue.kernels if k.kernel in (EPI, PRO_FWD)} == {"epilogue"}
    assert (
        validate(epilogue.to_json()) == []
        and "placement=epilogue" in (epilogue.write(tmp_path) / "report.html").read_text()
    )
    model[0].placement = "prologue"
    prologue = kanc.profile(model, x, train=True, warmup=1, iters=1)
    assert {k.placement for k in prologue.kernels if k.kernel in (EPI, PRO_FWD)} == {"prologue"}
    for direction in ("forward", "backward"):
        block = next(r for r in epilogue.layers if r.name == "0" and r.direction == direction)
        layers = [r for r in prologue.layers if r.name in ("0.fc1", "0.fc2") and r.direction == direction]
        assert block.path == "kernel" and block.flops == sum(r.flops for r in layers) > 0
        assert next(r for r in prologue.layers if r.name == "0" and r.direction == direction).flops in (0, None)
