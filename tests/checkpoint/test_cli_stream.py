"""`kanc convert DIR` on a save_pretrained folder streams it (kanc.convert_checkpoint); the folder it writes reloads
converted with kanc.load and the CLI's other commands."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ids

import kanc
import kanc.testing
from kanc.cli import common
from kanc.errors import EXIT_FAILED, EXIT_OK

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trust"))
from trust_support import run_cli  # noqa: E402


@pytest.fixture
def never_whole(monkeypatch):
    """The whole-model path of `kanc convert` fails if taken."""

    def whole(*args, **kwargs):
        raise AssertionError("the model was loaded whole")

    monkeypatch.setattr("kanc.cli.convert.load_model_file", whole)
    return monkeypatch


def test_convert_streams_a_save_pretrained_folder_that_reloads_converted(llama_dir, tmp_path, capsys, never_whole):
    src, original = llama_dir
    out = tmp_path / "out"
    code, stdout, err = run_cli(["convert", src, "-t", "grkan", "-o", out, "--groups", "4", "--json", "-q"], capsys)
    assert code == EXIT_OK, err
    payload = json.loads(stdout)
    assert payload["format"] == "hf_dir" and payload["manifest"] == str(out / "kanc.json")
    assert [c["name"] for c in payload["report"]["converted"]] == [f"model.layers.{i}.mlp" for i in range(3)]
    manifest = json.loads((out / "kanc.json").read_text())
    assert manifest["options"]["groups"] == 4 and len(manifest["stream"]["layers"]) == 3
    back = kanc.load(out)
    assert type(back.model.layers[2].mlp.act_fn).__name__ == "GroupRational"
    x = ids(7)
    with torch.no_grad():
        got, want = back(input_ids=x).logits, original(input_ids=x).logits
    assert torch.isfinite(got).all() and kanc.testing.rel_error(got, want) < 1e-3
    never_whole.undo()  # the other commands load the converted folder whole, converted
    code, stdout, _ = run_cli(["inspect", out], capsys)
    assert code == EXIT_OK and "already converted: GroupRational x3" in stdout
    code, stdout, _ = run_cli(["convert", out, "-t", "grkan", "-o", tmp_path / "again"], capsys)
    assert code == EXIT_OK and "already converted" in stdout and not (tmp_path / "again").exists()


def test_options_that_need_the_whole_model_take_the_whole_model_path(llama_dir, tmp_path, capsys, monkeypatch):
    src, _ = llama_dir
    taken = []
    monkeypatch.setattr("kanc.cli.convert.load_model_file", lambda *a: taken.append(a) or common.load_model_file(*a))
    argv = ["convert", src, "-t", "grkan", "-o", tmp_path / "out", "--include", "model.layers.1.*", "-q"]
    code, stdout, err = run_cli(argv, capsys)
    assert code == EXIT_OK, err
    assert "the whole model loaded, not streamed layer by layer: --include needs it" in stdout  # which path ran
    manifest = json.loads((tmp_path / "out" / "kanc.json").read_text())
    assert taken and manifest["blocks"] == ["model.layers.1.mlp"] and "stream" not in manifest


def test_a_failed_streamed_convert_is_one_line_and_leaves_nothing(llama_dir, tmp_path, capsys, never_whole):
    src = tmp_path / "src"
    src.mkdir()
    for f in llama_dir[0].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    code, stdout, err = run_cli(["convert", src, "-t", "grkan", "-o", tmp_path / "out", "-q"], capsys)
    assert code == EXIT_FAILED and stdout == ""
    assert err.startswith("Error: ") and err.count("\n") == 1 and "truncated or corrupt" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("sig, code, says", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_a_signal_while_streaming_exits_at_once_and_leaves_nothing(llama_dir, tmp_path, sig, code, says):
    """Stopped mid-walk, with the read-ahead and writer threads alive: the process exits 128 + signal with one line,
    soon, and no output or temporary folder is left."""
    src, _ = llama_dir
    script = (
        "import sys, time, kanc.checkpoint.stream as s; real = s._Stream.after\n"
        "def slow(self, name, *a):\n"
        "    out = real(self, name, *a)\n"
        "    if name.endswith('.1'):\n        open(sys.argv[1], 'w').close(); time.sleep(60)\n"
        "    return out\n"
        "s._Stream.after = slow\nfrom kanc.cli import main; main(sys.argv[2:])"
    )
    flag, parent = tmp_path / "converting", tmp_path / "parent"
    parent.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(kanc.__file__).parents[1])}
    argv = [sys.executable, "-c", script, flag, "convert", src, "-t", "grkan", "-o", parent / "out"]
    # SIGINT back to its default in the child: a background job's shell ignores it (see tests/trust)
    proc = subprocess.Popen(
        list(map(str, argv)), stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not flag.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert flag.exists(), proc.communicate()[1]
    start = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code and err.strip().splitlines()[-1] == f"Error: {says}", err
    assert time.monotonic() - start < 30
    assert os.listdir(parent) == []
