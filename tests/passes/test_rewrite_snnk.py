"""rewrite_to_snnk through kanc.compile: counts, structure, calibrated preserve fits (error falls with m and beats
the uncalibrated warm start), real calibration rows, options, training and round trips."""

import pytest
import torch
import zoo
from torch import fx, nn

import kanc
from kanc.nn import SNNKMlp
from kanc.passes.layers import ChannelsLast
from kanc.testing import rel_error


@pytest.mark.parametrize("case", zoo.CASES, ids=lambda c: c.name)
def test_every_block_converts(case):
    model = zoo.build(case)
    x = case.inputs()
    converted = kanc.compile(model, "snnk", example_inputs=x)
    report = kanc.report(converted)
    assert len(report.converted) == case.blocks and report.counters["converted:snnk"] == case.blocks
    out = zoo.output(case, zoo.run(converted, x))
    assert out.shape == zoo.output(case, zoo.run(model, x)).shape and torch.isfinite(out).all()
    assert sum(isinstance(m, SNNKMlp) for m in converted.modules()) == case.blocks
    for block in report.converted:
        assert block["options"]["num_features"] == max(
            1, round(int(block["shape"].split(" -> ")[1].split("x")[-1]) / 4)
        )


def _ids(seed: int, batch: int) -> dict:
    return {"input_ids": torch.randint(0, 100, (batch, 32), generator=torch.Generator().manual_seed(seed))}


def test_preserve_error_falls_with_m_and_beats_the_warm_start():
    """The fidelity table of the report: GPT-2's block errors on held-out tokens at m = h/8, h/4, h (h = 256)."""
    model = zoo.build(zoo.case("gpt2"))
    calib, held_out = _ids(1, 32), _ids(2, 4)

    def errors(m, init, calibration=calib):
        conv = kanc.compile(model, "snnk", num_features=m, init=init, calibration=calibration, example_inputs=held_out)
        return list(kanc.report(conv).fidelity["blocks"].values())

    table = {m: errors(m, "preserve") for m in (32, 64, 256)}
    warm = errors(256, "warm", None)
    for i in range(2):
        assert table[32][i] > table[64][i] > table[256][i]
        assert table[256][i] * 5 <= warm[i], (table, warm)


def test_calibration_uses_the_rows_each_block_really_sees():
    torch.manual_seed(0)
    model = zoo.Mlp(32, 128).eval()
    shifted = lambda seed: torch.randn(256, 32, generator=torch.Generator().manual_seed(seed)) + 3.0  # noqa: E731
    synth = kanc.compile(model, "snnk", num_features=128, example_inputs=shifted(2))
    real = kanc.compile(model, "snnk", num_features=128, calibration=shifted(1), example_inputs=shifted(2))
    err_synth = kanc.report(synth).fidelity["outputs"]["output"]
    err_real = kanc.report(real).fidelity["outputs"]["output"]
    assert err_real < err_synth / 4, (err_real, err_synth)  # N(0, 1) rows miss the shifted inputs
    block = kanc.report(real).converted[0]
    assert block["options"]["fitted_on"] == "1024 calibration rows"  # 204 real rows, topped up
    assert "topped up" in block["notes"][0]
    assert kanc.report(synth).converted[0]["options"]["fitted_on"] == "synthetic N(0,1) rows"


def test_structure_of_converted_models():
    gpt2 = kanc.compile(zoo.gpt2(), "snnk", verify=False)
    mlp = gpt2.transformer.h[0].mlp
    assert isinstance(mlp, fx.GraphModule) and isinstance(mlp.snnk, SNNKMlp)
    assert [n.target for n in mlp.graph.nodes if n.op == "call_module"] == ["snnk", "dropout"]
    assert type(gpt2).__name__ == "GPT2LMHeadModel"  # only the MLP module became a graph
    bert = kanc.compile(zoo.bert(), "snnk", verify=False)
    layer = bert.encoder.layer[0]
    assert isinstance(layer.intermediate.dense, SNNKMlp)  # split block: module swaps across the boundary
    assert isinstance(layer.intermediate.intermediate_act_fn, nn.Identity)
    assert isinstance(layer.output.dense, nn.Identity)
    conv = kanc.compile(zoo.ConvMlp(8, 32), "snnk", verify=False)
    assert isinstance(conv.snnk, ChannelsLast) and conv(torch.randn(2, 8, 3, 3)).shape == (2, 8, 3, 3)


def test_options():
    mlp = zoo.sequential_mlp(16, 64)
    conv = kanc.compile(mlp, "snnk", num_features=24, kind="cos", orthogonal=False, seed=5, verify=False)
    f = conv.snnk.features
    assert (f.num_features, f.kind, f.orthogonal, f.seed, conv.snnk.linear.in_features) == (24, "cos", False, 5, 48)
    ratio = kanc.compile(mlp, "snnk", feature_ratio=0.5, verify=False)
    assert ratio.snnk.features.num_features == 32
    gated = kanc.report(kanc.compile(zoo.llama(), "snnk", init="warm", verify=False))
    assert gated.converted == [] and gated.counters["skip:warm_unsupported"] == 2


def test_variance_init_gives_unit_output_variance():
    conv = kanc.compile(nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)), "snnk", init="variance",
                        num_features=128, verify=False)  # fmt: skip
    with torch.no_grad():
        y = conv(torch.randn(4096, 64))
    assert 0.8 < float(y.var()) < 1.25


def test_only_the_readout_trains_and_state_dict_round_trips():
    conv = kanc.compile(zoo.Stack(16, [zoo.Mlp(16, 64)]), "snnk", verify=False).train()
    conv(torch.randn(3, 4, 16)).square().mean().backward()
    snnk = conv.blocks[0].mlp.snnk
    assert snnk.linear.weight.grad is not None and not snnk.features.projection.requires_grad
    state = conv.state_dict()
    assert "blocks.0.mlp.snnk.features.projection" in state
    fresh = kanc.compile(zoo.Stack(16, [zoo.Mlp(16, 64)]), "snnk", init="variance", seed=9, verify=False)
    fresh.load_state_dict(state)
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(fresh.eval()(x), conv.eval()(x), rtol=0, atol=0)


def test_dtype_kept():
    model = zoo.sequential_mlp(16, 64).double().eval()
    conv = kanc.compile(model, "snnk", verify=False)
    assert conv.snnk.linear.weight.dtype == torch.float64
    x = torch.randn(4, 16, dtype=torch.float64)
    assert conv(x).dtype == torch.float64 and rel_error(conv(x), model(x)) < 1.0
