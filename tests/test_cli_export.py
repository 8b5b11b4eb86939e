"""``kanc export onnx``: exports, prints the max abs difference, exits non-zero on bad input, leaves no partial file."""

import json

import pytest
import torch
from torch import nn

from kanc.cli import main
from kanc.nn import GRKANMlp


class _TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 16)
        self.mlp = GRKANMlp(16, 64, 16, groups=8, act_init="gelu")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(ids))


@pytest.fixture
def model_file(tmp_path):
    """A pickled model (kanc's own loader reads it, with --trust-pickle)."""
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    torch.save(_TokenModel(), path)
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


class _ShapeBranch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.shape[0] == 2 else x - 1


def test_static_fallback_is_one_note_line_and_in_the_json(tmp_path, capsys):
    path = tmp_path / "branch.pt"
    torch.save(_ShapeBranch(), path)
    argv = ["export", "onnx", str(path), "-o", str(tmp_path / "o.onnx"), "--trust-pickle", "--input-shape", "2,3,4"]
    code, out, err = _run([*argv, "--json"], capsys)
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "exported with static shapes [2, 3, 4]" in notes[0]
    payload = json.loads(out)
    assert payload["dynamic"] == [] and payload["note"] == notes[0][len("note: ") :]
