"""Discovery on a recorded run, and the least invasive code edits it allows (attribute swap, call-site rewrite)."""

import copy
import json
import pickle

import pytest
import torch
import zoo
from torch import nn

import kanc
from kanc.errors import KancError
from kanc.frontend.recording import record_execution
from kanc.passes import find_mlp_blocks
from kanc.passes.callsite import PatchedMethod
from kanc.passes.layers import KeepsDtype
from kanc.testing import rel_error


def test_recording_has_modules_functions_and_call_sites():
    model, x = zoo.ControlFlowMlp().eval(), torch.randn(4, 8)
    with torch.no_grad():
        gm = record_execution(model, lambda: model(x)).graph_module
    calls = [(n.op, n.target) for n in gm.graph.nodes if n.op in ("call_module", "call_function")]
    assert calls[-3:] == [("call_module", "fc1"), ("call_function", torch.nn.functional.gelu), ("call_module", "fc2")]
    site = next(n for n in gm.graph.nodes if n.target is torch.nn.functional.gelu).meta["call_site"]
    assert site.filename.endswith("zoo.py") and site.function == "forward" and site.owner is model


def test_control_flow_blocks_need_inputs_and_convert_by_call_site():
    model, x = zoo.ControlFlowMlp().eval(), torch.randn(4, 8)
    assert find_mlp_blocks(model).blocks == []  # symbolic tracing alone cannot see it
    assert [b.name for b in find_mlp_blocks(model, inputs=x).blocks] == ["<root>"]
    converted = kanc.compile(model, "grkan", example_inputs=x)
    report = kanc.report(converted)
    assert [c["mode"] for c in report.converted] == ["call site"] and not report.failed_checks
    assert isinstance(converted.__dict__["forward"], PatchedMethod) and "forward" not in model.__dict__
    with torch.no_grad():
        assert rel_error(converted(x), model(x)) < 1e-2
        assert rel_error(converted(x, scale=2.0), model(x, scale=2.0)) < 1e-2  # the other branch is kept
        for twin in (copy.deepcopy(converted), pickle.loads(pickle.dumps(converted))):
            assert torch.equal(twin(x), converted(x))


def test_call_site_conversion_saves_and_loads(tmp_path):
    model, x = zoo.ControlFlowMlp().eval(), torch.randn(4, 8)
    converted = kanc.compile(model, "grkan", example_inputs=x)
    with torch.no_grad():
        for p in converted.parameters():
            p.add_(0.01)  # as if trained
    kanc.save(converted, tmp_path / "m.pt", arch="zoo:ControlFlowMlp")
    loaded = kanc.load(tmp_path / "m.pt", arch="zoo:ControlFlowMlp")
    with torch.no_grad():
        assert torch.equal(loaded(x), converted(x))


@pytest.mark.parametrize(
    "spec",
    [
        {"shape": [1 << 20, 1 << 20], "dtype": "float32"},  # 4 TB of inputs
        {"shape": [4, 8], "dtype": "load"},  # not a dtype: an attribute of torch
        {"shape": [4, -8], "dtype": "float32"},
        {"tuple": [{"value": {"x": 1}}]},
        "float32",
    ],
)
def test_recorded_discovery_inputs_are_untrusted_data(tmp_path, spec):
    model, x = zoo.ControlFlowMlp().eval(), torch.randn(4, 8)
    kanc.save(kanc.compile(model, "grkan", example_inputs=x), tmp_path / "m.pt", arch="zoo:ControlFlowMlp")
    mpath = tmp_path / "m.pt.kanc.json"
    manifest = json.loads(mpath.read_text())
    assert manifest["options"]["discovery_inputs"] == {"shape": [4, 8], "dtype": "float32"}
    manifest["options"]["discovery_inputs"] = spec
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(KancError, match="discovery_inputs is not a valid input description"):
        kanc.load(tmp_path / "m.pt", arch="zoo:ControlFlowMlp")


@pytest.mark.parametrize("target", ["grkan", "snnk"])
def test_function_attribute_is_swapped(target):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, activation="gelu", batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    converted = kanc.compile(layer, target, example_inputs=x)
    report = kanc.report(converted)
    assert [c["mode"] for c in report.converted] == ["attribute"] and not report.failed_checks
    assert isinstance(converted.activation, nn.Module) and layer.activation is torch.nn.functional.gelu
    assert report.skipped == []  # the attention's projections ran: examined, not near misses


def test_snnk_skips_a_block_whose_weight_values_are_read_elsewhere():
    model, x = zoo.ReadsWeightValues().eval(), torch.randn(4, 8)
    report = kanc.report(kanc.compile(model, "snnk", example_inputs=x))
    assert report.converted == []
    (skip,) = report.skipped
    assert skip["code"] == "weights_read" and "fc1.weight is read at" in skip["message"] and "zoo.py" in skip["message"]
    assert len(kanc.report(kanc.compile(model, "grkan", example_inputs=x)).converted) == 1  # GR-KAN keeps fc1.weight


@pytest.mark.parametrize("cls", [zoo.ReadsWeightDtype, zoo.CastsToFc2Dtype])
def test_snnk_keeps_the_dtype_other_code_reads(cls):
    """open_clip reads mlp.c_fc.weight.dtype, T5 casts to wo.weight.dtype: SNNK converts, a KeepsDtype standing
    where the read layer was (its dtype follows the model's .to())."""
    torch.manual_seed(0)
    model, x = cls().eval(), torch.randn(4, 8)
    converted = kanc.compile(model, "snnk", example_inputs=x)
    report = kanc.report(converted)
    assert len(report.converted) == 1 and report.skipped == [] and not report.failed_checks
    stand_ins = [m for m in converted.modules() if isinstance(m, KeepsDtype)]
    assert len(stand_ins) == 1 and all(v.numel() for v in converted.state_dict().values())  # not saved
    with torch.no_grad():
        assert rel_error(converted(x), model(x)) < 1.0  # SNNK's random features: finite and in range
        assert stand_ins[0].weight.dtype == torch.float32
        assert converted.double()(x.double()).dtype == torch.float64 and stand_ins[0].weight.dtype == torch.float64
    if cls is zoo.CastsToFc2Dtype:  # it traces: found symbolically too, without inputs (a traced graph's route)
        assert len(kanc.report(kanc.compile(model, "snnk")).converted) == 1
