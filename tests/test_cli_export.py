"""``kanc export onnx``: exports, prints the max abs difference, exits non-zero on bad input, leaves no partial file."""

import json
import sys
import types

import pytest
import torch
from torch import nn

from kanc.cli import main
from kanc.errors import KancError
from kanc.nn import GRKANMlp


class _TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 16)
        self.mlp = GRKANMlp(16, 64, 16, groups=8, act_init="gelu")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(ids))


@pytest.fixture
def model_file(tmp_path, monkeypatch):
    """A saved model plus a stand-in ``kanc.api.load`` (torch.load of a pickled module) until kanc.api lands."""
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    torch.save(_TokenModel(), path)

    def load(p, trust_pickle=False, arch=None, arch_kwargs=None):
        if not trust_pickle:
            raise KancError(f"{p} is a pickled model; pass --trust-pickle to load it")
        return torch.load(p, weights_only=False)

    if "kanc.api" not in sys.modules or not hasattr(sys.modules["kanc.api"], "load"):
        monkeypatch.setitem(sys.modules, "kanc.api", types.SimpleNamespace(load=load))
    return path


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_export_prints_diff_at_two_shapes(model_file, tmp_path, capsys):
    out_path = tmp_path / "out.onnx"
    code, out, err = _run(["export", "onnx", str(model_file), "-o", str(out_path), "--trust-pickle"], capsys)
    assert code == 0, err
    assert out_path.is_file()
    lines = out.strip().splitlines()
    assert lines[0].startswith("shapes [[2, 16]]: max abs diff")
    assert lines[1].startswith("shapes [[3, 15]]: max abs diff")
    assert lines[2].startswith(f"wrote {out_path}")


def test_json_output(model_file, tmp_path, capsys):
    argv = ["export", "onnx", str(model_file), "-o", str(tmp_path / "o.onnx"), "--trust-pickle", "--json"]
    argv += ["--input-shape", "4,8", "--dynamic", "batch"]
    code, out, _ = _run(argv, capsys)
    assert code == 0
    payload = json.loads(out)
    assert [c["shapes"] for c in payload["checks"]] == [[[4, 8]], [[5, 8]]]
    assert payload["max_abs_diff"] < 1e-4


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--input-shape", "2,a"], "bad --input-shape"),
        (["--dtype", "float", "--input-shape", "2,16"], "does not run on inputs"),
        (["--dynamic", "time"], "unknown dynamic axis"),
        (["--atol", "-1"], "onnxruntime differs from PyTorch"),
    ],
)
def test_errors_are_one_line_exit_1_and_leave_nothing(model_file, tmp_path, capsys, extra, message):
    out_path = tmp_path / "bad.onnx"
    code, _, err = _run(["export", "onnx", str(model_file), "-o", str(out_path), "--trust-pickle", *extra], capsys)
    assert code == 1
    error_lines = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1 and message in error_lines[0]
    assert not out_path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_missing_model_file(tmp_path, capsys):
    code, _, err = _run(["export", "onnx", str(tmp_path / "nope.pt"), "-o", str(tmp_path / "o.onnx")], capsys)
    assert code == 1 and "model file not found" in err
