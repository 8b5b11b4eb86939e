"""``kanc profile`` and ``kanc tune``: files and tables on success, one-line errors and no partial output on failure."""

import json

import pytest
import torch

from kanc.cli import main
from kanc.codegen import tuning
from kanc.nn import GRKANMlp
from kanc.runtime import validate


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.fixture
def model_file(tmp_path, kan_model):
    path = tmp_path / "vit_kan.pt"
    torch.save(kan_model, path)
    return path


def test_profile_writes_the_report_directory(model_file, tmp_path, capsys):
    out_dir = tmp_path / "prof"
    argv = ["profile", str(model_file), "--trust-pickle", "--input-shape", "2,12,16", "--train", "--iters", "2",
            "--warmup", "1", "-o", str(out_dir)]  # fmt: skip
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["report.html", "report.json", "trace.json"]
    document = json.loads((out_dir / "report.json").read_text())
    assert validate(document) == [] and document["model"]["name"] == "vit_kan"
    assert document["model"]["source"] == str(model_file)
    assert out.startswith("kanc profile: vit_kan train step on cpu") and "GB/s" in out
    assert "profiling" in err and f"wrote {out_dir}/report.json" in err


def test_profile_json_on_stdout(model_file, capsys):
    argv = ["profile", str(model_file), "--trust-pickle", "--input-shape", "2x12x16", "--iters", "1", "--json"]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    payload = json.loads(out)
    assert payload["output"] is None and validate(payload["report"]) == []
    assert payload["report"]["run"]["inputs"] == [{"name": "0", "shape": [2, 12, 16], "dtype": "float32"}]


def test_profile_inputs_file_and_state_dict_with_arch(tmp_path, capsys):
    torch.manual_seed(0)
    model = GRKANMlp(16, 32, 16, groups=4)
    weights = tmp_path / "mlp_weights.pt"
    torch.save(model.state_dict(), weights)
    inputs = tmp_path / "x.pt"
    torch.save((torch.randn(3, 16),), inputs)
    arch_kwargs = json.dumps({"in_features": 16, "hidden_features": 32, "groups": 4})
    argv = ["profile", str(weights), "--arch", "kanc.nn:GRKANMlp", "--arch-kwargs", arch_kwargs, "--inputs",
            str(inputs), "--iters", "1", "--dtype", "float32", "--json"]  # fmt: skip
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    layers = {(row["name"], row["direction"]) for row in json.loads(out)["report"]["layers"]}
    assert {("fc1", "forward"), ("fc2", "forward")} <= layers


@pytest.mark.parametrize(
    "extra, code, message",
    [
        (["--input-shape", "2,12,16", "--inputs", "x.pt"], 2, "either --input-shape or --inputs"),
        ([], 2, "give the example input"),
        (["--input-shape", "2,a"], 1, "Error: bad --input-shape '2,a'"),
        (["--input-shape", "2,0"], 1, "dimensions must be positive"),
        (["--input-shape", "2,12,15"], 1, "Error: the model failed on the example inputs: RuntimeError"),
        (["--inputs", "missing.pt"], 1, "Error: inputs file not found"),
    ],
)
def test_profile_bad_input_is_one_line_and_writes_nothing(model_file, tmp_path, capsys, extra, code, message):
    out_dir = tmp_path / "prof"
    argv = ["profile", str(model_file), "--trust-pickle", "--iters", "1", "-o", str(out_dir), *extra]
    got, out, err = _run(argv, capsys)
    assert got == code and message in err, err
    if code == 1:  # progress lines may precede it; the error is one line, the last
        lines = err.strip().splitlines()
        assert lines[-1].startswith("Error: ") and sum(line.startswith("Error") for line in lines) == 1
    assert not out_dir.exists()


def test_profile_refuses_untrusted_pickles_missing_files_and_foreign_output(model_file, tmp_path, capsys):
    code, _, err = _run(["profile", str(model_file), "--input-shape", "2,12,16"], capsys)
    assert code == 1 and "--trust-pickle" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(["profile", str(tmp_path / "nope.pt"), "--input-shape", "2,12,16"], capsys)
    assert code == 1 and "model file not found" in err
    garbage = tmp_path / "x.pt"
    garbage.write_text("not a tensor file")
    code, _, err = _run(["profile", str(model_file), "--trust-pickle", "--inputs", str(garbage)], capsys)
    assert code == 1 and "cannot read inputs" in err
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    argv = [
        "profile",
        str(model_file),
        "--trust-pickle",
        "--input-shape",
        "2,12,16",
        "--iters",
        "1",
        "-o",
        str(foreign),
    ]
    code, _, err = _run(argv, capsys)
    assert code == 1 and "not empty" in err
    assert [p.name for p in foreign.iterdir()] == ["thesis.tex"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu(model_file, capsys):
    code, _, err = _run(["profile", str(model_file), "--trust-pickle", "--input-shape", "2,12,16", "--device",
                         "cuda"], capsys)  # fmt: skip
    assert code == 1 and "no CUDA GPU" in err


def test_tune_reports_configs_and_writes_the_cache(tmp_path, tunable_layer, cache_dir, capsys):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), tunable_layer())
    path = tmp_path / "tunable.pt"
    torch.save(model, path)
    code, out, err = _run(["tune", str(path), "--trust-pickle", "--input-shape", "5,8", "--iters", "1"], capsys)
    assert code == 0, err
    assert "_tuned_bwd_kernel" in out and "BLOCK=128" in out and "train step:" in out
    assert tuning.cache_path("cpu").is_file()
    code, out, err = _run(["tune", str(path), "--trust-pickle", "--input-shape", "5,8", "--iters", "1", "--json",
                           "--no-train"], capsys)  # fmt: skip
    assert code == 0, err
    assert [e["kernel"] for e in json.loads(out)["entries"]] == ["_tuned_fwd_kernel"]


def test_tune_without_kernels_fails_with_the_reason(model_file, cache_dir, capsys):
    code, out, err = _run(["tune", str(model_file), "--trust-pickle", "--input-shape", "2,12,16", "--iters", "1"],
                          capsys)  # fmt: skip
    assert code == 1 and out == ""
    assert err.strip().splitlines()[-1].startswith("Error: no tunable kanc kernel ran on cpu: nothing to tune")
