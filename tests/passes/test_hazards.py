"""Library hazards handled by name, and the fidelity checks that catch a model changed in silence."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zoo
from torch import nn
from torch.nn import functional as F

import kanc
from kanc.errors import KancError
from kanc.passes import hazards
from kanc.passes.hazards import check_copy, copy_model
from kanc.passes.verify import run_outputs
from kanc.testing import rel_error


def _encoder_layer(**kw) -> nn.Module:
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, **kw).eval()


def test_rel_error_keeps_nan_inf_and_zero_references():
    e = torch.tensor([1.0, 2.0, 3.0])
    assert rel_error(torch.tensor([1.0, float("nan"), 3.0]), e) == float("inf")
    assert rel_error(torch.tensor([1.0, float("inf"), 3.0]), e) == float("inf")
    both = torch.tensor([1.0, float("nan"), float("inf")])
    assert rel_error(both, both.clone()) == 0.0
    assert rel_error(torch.tensor([1.0, 2.0, float("-inf")]), both) == float("inf")
    assert rel_error(torch.zeros(3), torch.zeros(3)) == 0.0
    assert rel_error(torch.full((3,), 1e-9), torch.zeros(3)) == float("inf")


@pytest.mark.parametrize("target", ["grkan", "snnk"])
def test_encoder_layer_never_takes_the_fast_path_after_conversion(target):
    """In eval + no_grad the fused path reads linear1.weight and applies its own GELU: kanc turns it off."""
    layer = _encoder_layer(activation=nn.GELU())
    x = torch.randn(2, 5, 16)
    converted = kanc.compile(layer, target, example_inputs=x)
    assert converted.activation_relu_or_gelu == 0 and layer.activation_relu_or_gelu == 2
    report = kanc.report(converted)
    assert report.converted and not report.failed_checks
    assert report.fidelity["outputs"]["output"] == pytest.approx(report.fidelity["outputs_grad"]["output"], rel=1e-3)
    with torch.no_grad():  # scaling the rationals/readout must change the no_grad output too
        no_grad_before = converted(x)
        for p in converted.parameters():
            p.mul_(1.5)
        assert rel_error(converted(x), no_grad_before) > 1e-2


def test_a_bypassed_conversion_is_a_failed_check(monkeypatch):
    monkeypatch.setattr("kanc.passes.pipeline.guard_fast_paths", lambda model: [])
    layer = _encoder_layer(activation=nn.GELU())
    report = kanc.report(kanc.compile(layer, "grkan", example_inputs=torch.randn(2, 5, 16)))
    assert report.failed_checks and "between no_grad and grad mode" in report.failed_checks[0]
    assert "FAILED CHECKS" in str(report)


def test_encoder_stack_keeps_nested_tensors_off():
    encoder = nn.TransformerEncoder(_encoder_layer(activation="relu"), 2, enable_nested_tensor=False).eval()
    encoder.use_nested_tensor = True
    encoder.layers[0].linear1 = kanc.nn.GRKANLinear(16, 32, groups=4)
    assert hazards.guard_fast_paths(encoder) == ["", "layers.0"]
    assert not encoder.use_nested_tensor and encoder.layers[1].activation_relu_or_gelu == 1


def test_decoder_layer_copy_keeps_its_activation():
    """TransformerDecoderLayer.__setstate__ puts F.relu back over an activation module when deep-copied."""
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, activation=nn.GELU(), batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    expected = run_outputs(layer, (x, x), "no_grad")
    assert copy.deepcopy(layer).__dict__.get("activation") is F.relu  # the hazard itself
    with pytest.raises(KancError, match="deep copy of the model computes another function"):
        check_copy(copy.deepcopy(layer), (x, x), expected)
    twin = copy_model(layer)
    assert "activation" not in twin.__dict__ and isinstance(twin.activation, nn.GELU)
    check_copy(twin, (x, x), expected)
    report = kanc.report(kanc.compile(layer, "grkan", example_inputs=(x, x)))
    assert len(report.converted) == 1 and report.fidelity["outputs"]["output"] < 1e-2


def _cli(*args):
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(Path(zoo.__file__).parent)])}
    proc = subprocess.run([sys.executable, "-m", "kanc", *args], capture_output=True, text=True, env=env, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def test_cli_exits_1_on_a_failed_check_unless_kept(tmp_path):
    torch.manual_seed(0)
    torch.save(zoo.ReadsWeights(), tmp_path / "m.pt")
    torch.save(torch.randn(4, 8), tmp_path / "x.pt")
    args = ["convert", str(tmp_path / "m.pt"), "--trust-pickle", "-t", "grkan", "--inputs", str(tmp_path / "x.pt")]
    code, _, err = _cli(*args, "-o", str(tmp_path / "out.pt"))
    assert code == 1 and "--keep-failed" in err.splitlines()[-1] and not (tmp_path / "out.pt").exists(), err
    code, out, err = _cli(*args, "-o", str(tmp_path / "out.pt"), "--keep-failed")
    assert code == 0 and (tmp_path / "out.pt").exists() and "FAILED CHECKS" in out, err
