"""``kanc convert`` / ``kanc inspect`` end to end, in a subprocess: outputs, manifests, JSON, every bad file kind
(one-line error, exit 1, nothing left behind), exit 3 without an MLP, --force, idempotence."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kanc

sys.path.insert(0, str(Path(__file__).resolve().parent / "passes"))
import zoo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ZOO = str(Path(zoo.__file__).resolve())


def kanc_cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests" / "passes")])}
    env.pop("KANC_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "kanc", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )
    return proc.returncode, proc.stdout, proc.stderr


def _files(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    model = zoo.Branchy(32).eval()
    torch.save(model, d / "full.pt")
    torch.save(model.state_dict(), d / "sd.pt")
    torch.save(zoo.NoMlp(), d / "nomlp.pt")
    torch.save(torch.randn(64, 32), d / "calib.pt")
    torch.save(torch.randn(4, 6, 32), d / "inputs.pt")
    torch.jit.save(torch.jit.script(zoo.sequential_mlp()), d / "script.pt")
    (d / "empty.pt").write_bytes(b"")
    (d / "truncated.pt").write_bytes((d / "full.pt").read_bytes()[:300])
    (d / "notes.json").write_text('{"not": "a model"}')
    (d / "model.onnx").write_bytes(b"\x08\x07\x12\x07pytorch")
    return d


def test_convert_pickle_then_inspect_and_load(files, tmp_path):
    out = tmp_path / "kan.pt"
    code, stdout, stderr = kanc_cli("convert", files / "full.pt", "-t", "grkan", "--trust-pickle", "-o", out,
                                    "--inputs", files / "inputs.pt")  # fmt: skip
    assert code == 0, stderr
    assert _files(tmp_path) == {"kan.pt", "kan.pt.kanc.json"}
    assert "3 block(s) converted" in stdout and f"wrote {out} (pickle)" in stdout
    assert "model outputs on input (4, 6, 32)" in stdout
    assert stderr == ""  # no progress bar without a terminal
    manifest = json.loads((tmp_path / "kan.pt.kanc.json").read_text())
    assert manifest["format"] == "pickle" and manifest["blocks"] == ["a", "b", "c"]
    code, stdout, _ = kanc_cli("inspect", out, "--trust-pickle")
    assert code == 0 and "0 MLP block(s)" in stdout and "already converted: GRKANLinear x6, GroupRational x6" in stdout


def test_convert_state_dict_snnk_with_calibration_json(files, tmp_path):
    out = tmp_path / "snnk.pt"
    code, stdout, stderr = kanc_cli("convert", files / "sd.pt", "--target", "SNNK", "--arch", f"{ZOO}:Branchy",
                                    "--arch-kwargs", '{"d": 32}', "--calibration", files / "calib.pt",
                                    "--features", "64", "-o", out, "--json")  # fmt: skip
    assert code == 0, stderr
    payload = json.loads(stdout)
    assert payload["format"] == "state_dict" and payload["output"] == str(out)
    assert [b["options"]["num_features"] for b in payload["report"]["converted"]] == [64, 64, 64]
    assert payload["report"]["converted"][0]["options"]["fitted_on"].endswith("calibration rows")
    loaded = kanc.load(out, arch=f"{ZOO}:Branchy")  # the manifest's kwargs, for the arch the user names
    assert sum(type(m).__name__ == "SNNKMlp" for m in loaded.modules()) == 3


def test_default_output_name_and_force(files, tmp_path):
    src = tmp_path / "model.pt"
    src.write_bytes((files / "full.pt").read_bytes())
    assert kanc_cli("convert", src, "-t", "grkan", "--trust-pickle")[0] == 0
    assert (tmp_path / "model_grkan.pt").is_file() and (tmp_path / "model_grkan.pt.kanc.json").is_file()
    code, _, stderr = kanc_cli("convert", src, "-t", "grkan", "--trust-pickle")
    assert code == 1 and "exists: pass --force" in stderr
    assert kanc_cli("convert", src, "-t", "grkan", "--trust-pickle", "--force")[0] == 0


def test_never_overwrites_the_input(files, tmp_path):
    src = tmp_path / "model.pt"
    data = (files / "full.pt").read_bytes()
    src.write_bytes(data)
    code, _, stderr = kanc_cli("convert", src, "-t", "grkan", "--trust-pickle", "-o", src, "--force")
    assert code == 1 and "refusing to write" in stderr and "it is the input" in stderr
    assert src.read_bytes() == data and _files(tmp_path) == {"model.pt"}


def test_converting_a_converted_model_changes_nothing(files, tmp_path):
    first = tmp_path / "once.pt"
    assert kanc_cli("convert", files / "sd.pt", "-t", "grkan", "--arch", f"{ZOO}:Branchy", "-o", first)[0] == 0
    before = _files(tmp_path)
    code, stdout, stderr = kanc_cli("convert", first, "-t", "grkan", "-o", tmp_path / "twice.pt")
    assert code == 0, stderr
    assert "already converted" in stdout and "nothing written" in stdout
    assert _files(tmp_path) == before


def test_no_mlp_exits_3(files, tmp_path):
    code, stdout, stderr = kanc_cli("convert", files / "nomlp.pt", "-t", "grkan", "--trust-pickle", "-o",
                                    tmp_path / "x.pt")  # fmt: skip
    assert code == 3 and stderr.startswith("Error: no MLP block found") and len(stderr.strip().splitlines()) == 1
    assert _files(tmp_path) == set()


BAD = {
    "missing.pt": "model file not found",
    "empty.pt": "is empty",
    "truncated.pt": "truncated or corrupt",
    "notes.json": "not a PyTorch model file (looks like JSON",
    "model.onnx": "looks like ONNX",
    "script.pt": "is TorchScript",
    "full.pt": "pass --trust-pickle",
    "sd.pt": "pass --arch",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_files_are_one_line_errors_and_leave_nothing(files, tmp_path, name):
    code, stdout, stderr = kanc_cli("convert", files / name, "-t", "grkan", "-o", tmp_path / "out.pt")
    assert code == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and BAD[name] in lines[0], stderr
    assert "Traceback" not in stderr and stdout == ""
    assert _files(tmp_path) == set()


def test_debug_shows_the_traceback(files, tmp_path):
    code, _, stderr = kanc_cli("--debug", "convert", files / "empty.pt", "-t", "grkan", "-o", tmp_path / "o.pt")
    assert code == 1 and "Traceback" in stderr and "KancError" in stderr


def test_usage_errors_exit_2(files):
    code, _, stderr = kanc_cli("convert", files / "full.pt")
    assert code == 2 and "--target" in stderr


def test_bad_option_for_target(files, tmp_path):
    code, _, stderr = kanc_cli("convert", files / "full.pt", "-t", "grkan", "--kind", "exp", "--trust-pickle",
                               "-o", tmp_path / "o.pt")  # fmt: skip
    assert code == 2 and "unknown option 'kind' for target grkan" in stderr  # an option that does not apply: usage
    assert _files(tmp_path) == set()


def test_inspect_table_json_and_graph(files, tmp_path):
    code, stdout, stderr = kanc_cli("inspect", files / "full.pt", "--trust-pickle")
    assert code == 0, stderr
    assert "3 MLP block(s), 0 skipped" in stdout and "counters: found:plain=3" in stdout
    lines = stdout.splitlines()
    assert any(line.split()[:3] == ["a", "plain", "32"] for line in lines)
    graph = tmp_path / "g.graphml"
    code, stdout, _ = kanc_cli("inspect", files / "sd.pt", "--arch", f"{ZOO}:Branchy", "--json", "--graph", graph)
    assert code == 0
    payload = json.loads(stdout)
    assert [b["name"] for b in payload["blocks"]] == ["a", "b", "c"] and payload["format"] == "state_dict"
    # the root does not trace, but its children did: it hides nothing, so it is neither a skip nor counted
    assert payload["not_traced"] == {} and payload["skipped"] == [] and payload["counters"] == {"found:plain": 3}
    assert graph.read_text().startswith("<?xml") and _files(tmp_path) == {"g.graphml"}
    code, stdout, _ = kanc_cli("inspect", files / "sd.pt", "--arch", f"{ZOO}:Branchy", "--near-misses")
    assert code == 0 and "counters: found:plain=3" in stdout
    assert "<root>: [not_traced] did not trace (" in stdout and "it has no linear layer of its own" in stdout
    code, _, stderr = kanc_cli("inspect", files / "full.pt", "--trust-pickle", "--graph", tmp_path / "g.png")
    assert code == 2 and "--graph must end in .graphml or .dot" in stderr  # a bad option value: usage


def test_pt2_file_converts_to_pt2(tmp_path):
    model = zoo.FunctionalMlp(16, 64).eval()
    ep = torch.export.export(model, (torch.randn(4, 16),), dynamic_shapes=({0: torch.export.Dim("b", max=64)},))
    torch.export.save(ep, tmp_path / "m.pt2")
    code, stdout, stderr = kanc_cli("convert", tmp_path / "m.pt2", "-t", "snnk", "--json")
    assert code == 0, stderr
    payload = json.loads(stdout)
    assert payload["format"] == "pt2"
    assert payload["report"]["fidelity"]["inputs"] == "input[0] (4, 16)"  # the program's own example inputs
    again = torch.export.load(tmp_path / "m_snnk.pt2").module()
    assert again(torch.randn(9, 16)).shape == (9, 16)
