"""GR-KAN as activation substitution plus a fusion pass: what lies between fc1, the activation and fc2 (norms, a
LeViT BatchNorm over flattened tokens, a depthwise conv, a concatenation, a scale) no longer stops a conversion;
the rational joins a linear layer only where that layer is plain and read by nothing else. SNNK converts the same
blocks or says why."""

import pytest
import torch
import zoo
from torch import nn

import kanc
from kanc.nn import GRKANLinear, GroupRational, SNNKMlp
from kanc.passes import find_mlp_blocks
from kanc.testing import rel_error


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _compile(model, target, x, **options):
    converted = kanc.compile(model, target, example_inputs=x, **options)
    report = kanc.report(converted)
    assert not report.failed_checks
    return converted, report


def _close(converted, model, x, bound=1e-2):
    with torch.no_grad():
        assert rel_error(converted(x), model(x)) < bound


def test_fusion_is_a_pass_of_its_own():
    model, x = zoo.sequential_mlp(16, 64).eval(), torch.randn(4, 16)
    converted, report = _compile(model, "grkan", x)
    names = [p["name"] for p in report.passes]
    assert names.index("rewrite_to_grkan") < names.index("fuse_rationals") < names.index("verify_equivalence")
    fuse = next(p for p in report.passes if p["name"] == "fuse_rationals")
    assert fuse["counters"] == {"fused:prologue": 2}
    assert isinstance(converted[0], GRKANLinear) and isinstance(converted[3], GRKANLinear)
    assert converted[0].rational.init == "identity" and isinstance(converted[1], nn.Identity)


def test_weights_read_elsewhere_keep_fc1_unfused():
    model, x = zoo.ReadsWeightValues().eval(), torch.randn(4, 8)
    converted, report = _compile(model, "grkan", x)
    assert type(converted.fc1) is nn.Linear and isinstance(converted.fc2, GRKANLinear)  # fc1.weight's values read
    (block,) = report.converted
    assert any("fc1 kept as it is" in n and "fc1.weight is read at" in n for n in block["notes"])
    fuse = next(p for p in report.passes if p["name"] == "fuse_rationals")
    assert fuse["counters"] == {"fused:prologue": 1, "unfused:weights_read": 1}
    _close(converted, model, x)
    dtype_only = kanc.compile(zoo.ReadsWeightDtype().eval(), "grkan", example_inputs=x)
    assert isinstance(dtype_only.fc1, GRKANLinear)  # reading fc1.weight.dtype is no obstacle: the layer keeps it


def test_norm_between_fc1_and_the_activation():
    model, x = zoo.NormBeforeAct(layer_norm=True).eval(), torch.randn(2, 5, 8)
    converted, report = _compile(model, "grkan", x)
    assert isinstance(converted.fc1, GRKANLinear) and converted.fc1.rational.init == "identity"
    assert isinstance(converted.norm, nn.LayerNorm) and isinstance(converted.act, nn.Identity)
    assert isinstance(converted.fc2, GRKANLinear) and converted.fc2.rational.init == "gelu"
    assert report.fidelity["blocks"]["<root>"] < 1e-2
    _close(converted, model, x)
    snnk, snnk_report = _compile(model, "snnk", x, num_features=64)
    assert len(snnk_report.converted) == 1
    _close(snnk, model, x, 0.5)


def test_levit_batchnorm_over_flattened_tokens():
    model, x = zoo.NormBeforeAct(layer_norm=False).eval(), torch.randn(2, 5, 8)
    (block,) = find_mlp_blocks(model, inputs=x).blocks
    assert block.chain and block.chain_rowwise and [p.path for p in block.pre if p.kind == "norm"] == ["fc1.bn"]
    converted, report = _compile(model, "grkan", x)
    assert isinstance(converted.fc1.linear, GRKANLinear) and isinstance(converted.fc1.bn, nn.BatchNorm1d)
    assert isinstance(converted.fc2, GRKANLinear) and converted.fc2.rational.init.startswith("Hardswish")
    assert report.fidelity["blocks"]["<root>"] < 2.5e-2  # from the block's input: the chain is per token
    _close(converted, model, x, 2.5e-2)
    snnk, snnk_report = _compile(model, "snnk", x, num_features=64)
    assert len(snnk_report.converted) == 1
    _close(snnk, model, x, 0.5)


def test_depthwise_conv_between_fc1_and_the_activation():
    model, x = zoo.DepthwiseMlp().eval(), torch.randn(2, 6, 8)
    converted, report = _compile(model, "grkan", x)
    assert isinstance(converted.fc1, GRKANLinear) and isinstance(converted.dwconv.dwconv, nn.Conv2d)
    assert isinstance(converted.fc2, GRKANLinear) and isinstance(converted.act, nn.Identity)
    (block,) = report.converted
    assert "activation's input" in block["error_inputs"] or block["name"] in report.fidelity["blocks"]
    assert any("shipped range" in n for n in block["notes"])  # no rows of the activation's input to fit on
    _close(converted, model, x, 2e-2)
    _, snnk_report = _compile(model, "snnk", x)
    assert snnk_report.converted == [] and [s["code"] for s in snnk_report.skipped] == ["not_per_token"]


def test_concatenated_hidden_features():
    model, x = zoo.ConcatMlp().eval(), torch.randn(2, 5, 8)
    converted, report = _compile(model, "grkan", x)
    assert isinstance(converted.act_mlp, GroupRational) and type(converted.proj_out) is nn.Linear
    assert isinstance(converted.proj_mlp, GRKANLinear) and report.converted[0]["error"] is None
    _close(converted, model, x)
    _, snnk_report = _compile(model, "snnk", x)
    assert snnk_report.converted == [] and [s["code"] for s in snnk_report.skipped] == ["concat"]


@pytest.mark.parametrize("per_channel", [False, True])
def test_scale_after_the_gated_product(per_channel):
    model, x = zoo.ScaledGlu(per_channel=per_channel).eval(), torch.randn(2, 5, 8)
    (block,) = find_mlp_blocks(model, inputs=x).blocks
    assert [p.kind for p in block.between] == ["scale"]
    rows = torch.randn(16, 8, dtype=torch.float64)
    with torch.no_grad():  # the block's reference (what SNNK fits, what blocks are measured against) has the scale
        torch.testing.assert_close(block.reference()(rows), model.double()(rows))
    model.float()
    converted, report = _compile(model, "grkan", x)
    assert [c["pattern"] for c in report.converted] == ["glu_chunk"]
    _close(converted, model, x)
    snnk, report = _compile(model, "snnk", x)
    assert [c["pattern"] for c in report.converted] == ["glu_chunk"]
    _close(snnk, model, x, 1.0)


def test_star_relu_is_one_activation():
    model = nn.Sequential(nn.Linear(8, 32), zoo.StarReLU(), nn.Dropout(0.0), nn.Linear(32, 8)).eval()
    x = torch.randn(4, 8)
    converted, report = _compile(model, "grkan", x)
    assert report.converted[0]["activation"].startswith("StarReLU")
    assert isinstance(converted[1], nn.Identity) and isinstance(converted[3], GRKANLinear)
    _close(converted, model, x, 2.5e-2)


def test_geglu_in_code_that_does_not_trace():
    model, x = zoo.GegluFeedForward(norm=True).eval(), torch.randn(2, 5, 8)
    converted, report = _compile(model, "grkan", x)
    assert [(c["pattern"], c["mode"]) for c in report.converted] == [("glu_chunk", "call site")]
    assert isinstance(converted.net[2], zoo.LibLayerNorm)  # a library's LayerNorm is one step of the block
    _close(converted, model, x)
    snnk, snnk_report = _compile(model, "snnk", x, num_features=64)  # GEGLU returns the gated product: swapped
    assert len(snnk_report.converted) == 1 and isinstance(snnk.net[0], SNNKMlp)
    assert isinstance(snnk.net[2], nn.Identity) and isinstance(snnk.net[3], nn.Identity)
    _close(snnk, model, x, 1.0)


@pytest.mark.parametrize("target", ["grkan", "snnk"])
def test_a_block_called_twice_converts_once(target):
    model, x = zoo.CalledTwice().eval(), torch.randn(2, 5, 8)
    converted, report = _compile(model, target, x, **({"num_features": 32} if target == "snnk" else {}))
    assert [c["name"] for c in report.converted] == ["mlp"]
    (skip,) = report.skipped
    assert skip["code"] == "shared_module" and "fc1 is called 2 times, the block runs 1" in skip["message"]
    _close(converted, model, x, 1e-2 if target == "grkan" else 1.0)


def _lora(model, targets):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    return peft.get_peft_model(model, config).eval()


def test_lora_layers_are_converted_through():
    model = _lora(zoo.Stack(16, [zoo.Mlp(16, 64)]), ["fc1", "fc2"])
    x = torch.randn(2, 5, 16)
    converted, report = _compile(model, "grkan", x)
    mlp = converted.base_model.model.blocks[0].mlp
    assert isinstance(mlp.act, GroupRational) and type(mlp.fc1).__module__.startswith("peft.")  # adapters kept
    assert len(report.converted) == 1 and any("lora layer, not a plain" in n for n in report.converted[0]["notes"])
    _close(converted, model, x)
    _, snnk_report = _compile(model, "snnk", x)
    (skip,) = snnk_report.skipped
    assert skip["code"] == "lora" and "merge_and_unload()" in skip["message"]


def test_lora_on_a_gated_mlp():
    model, x = _lora(zoo.llama(layers=1), ["gate_proj", "up_proj", "down_proj"]), zoo._ids()
    converted, report = _compile(model, "grkan", x)
    assert [c["pattern"] for c in report.converted] == ["gated"]
    assert isinstance(converted.base_model.model.model.layers[0].mlp.act_fn, GroupRational)
    with torch.no_grad():
        assert rel_error(converted(**x).logits, model(**x).logits) < 1e-2


def test_symbolic_graphs_see_through_shape_reads():
    (block,) = find_mlp_blocks(zoo.DepthwiseMlp()).blocks  # no inputs: fx's graph has x.shape reads in the chain
    assert [n.target for n in block.chain if n.op == "call_module"] == ["dwconv.dwconv"]


def test_a_block_only_the_run_shows_replaces_the_symbolic_skip():
    model, x = zoo.ShapeScaledMlp().eval(), torch.randn(2, 5, 8)
    symbolic = find_mlp_blocks(model)  # the scale is a graph of shape reads there
    assert symbolic.blocks == [] and len(symbolic.skipped) == 1
    found = find_mlp_blocks(model, inputs=x)  # on a run it is a number
    assert [b.name for b in found.blocks] == ["<root>"] and found.skipped == []
    converted, _ = _compile(model, "grkan", x)
    _close(converted, model, x)
