"""Every command on hostile input: one line, exit 1, the payload never runs, and no file changes (the inputs' bytes
and every other file). Then the issue's data-loss and clarity cases, command by command."""

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import hostile
import pytest
import torch
from trust_support import one_error_line, run_cli

import kanc
from kanc import writing
from kanc.errors import EXIT_CODES, EXIT_FAILED, EXIT_NOTHING, EXIT_OK, EXIT_USAGE

SHAPE = ["--input-shape", "4,8"]


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory) -> Path:
    """One cache per module, outside every test's tmp_path (tests list those folders; the CPU rational builds once)."""
    return tmp_path_factory.mktemp("kanc-cache")


@pytest.fixture(autouse=True)
def isolated_cache(module_cache, monkeypatch):
    monkeypatch.setenv("KANC_CACHE_DIR", str(module_cache))
    monkeypatch.delenv("KANC_DEBUG", raising=False)


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, hostile.Case]:
    """Every hostile input of hostile.py, built once (the commands must leave them unchanged: the tests check it)."""
    return hostile.build_all(tmp_path_factory.mktemp("hostile"))


COMMANDS = {
    "convert": lambda m, out: ["convert", m, "-t", "grkan", "-o", out / "converted", "--force"],
    "inspect": lambda m, out: ["inspect", m, "--graph", out / "g.dot", "--force"],
    "profile": lambda m, out: ["profile", m, *SHAPE, "--iters", "1", "--warmup", "0", "-o", out / "prof", "--force"],
    "tune": lambda m, out: ["tune", m, *SHAPE, "--iters", "1", "--warmup", "0"],
    "export": lambda m, out: ["export", "onnx", m, "-o", out / "m.onnx", *SHAPE, "--force"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_refuses_every_hostile_input(cases, command, tmp_path, capsys):
    root = next(iter(cases.values())).model.parent.parent
    before = hostile.snapshot(root)
    for name, case in sorted(cases.items()):
        out = tmp_path / name
        out.mkdir()
        code, stdout, err = run_cli(COMMANDS[command](case.model, out), capsys)
        if command == "convert" and name.startswith("manifest"):  # the manifest records a conversion: nothing to do
            assert code == EXIT_OK and "already converted" in stdout and "nothing written" in stdout, (name, err)
        else:
            line = one_error_line(err)
            assert code == EXIT_FAILED and case.says in line, (name, line)
        assert hostile.markers(root) == [], name
        assert hostile.snapshot(root) == before, name
        assert list(out.iterdir()) == [], name
    assert list(tmp_path.rglob(f"*{writing.TMP_TAG}*")) == []


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf") / "project" / "gpt2"
    folder.parent.mkdir()
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    (folder.parent / "notes.txt").write_text("unrelated work")
    return folder


def test_output_above_the_input_folder_is_refused(hf_dir, capsys):
    """Issue case 4: convert HF_DIR -o PARENT --force removed the parent, the input and unrelated files."""
    before = hostile.snapshot(hf_dir.parent)
    for out in (hf_dir.parent, hf_dir, hf_dir / "inside"):
        code, _, err = run_cli(["convert", hf_dir, "-t", "grkan", "-o", out, "--force"], capsys)
        assert code == EXIT_FAILED and "refusing to write" in one_error_line(err)
    assert hostile.snapshot(hf_dir.parent) == before


def test_a_folder_output_that_links_to_the_input_is_refused(hf_dir, tmp_path, capsys):
    (tmp_path / "out").symlink_to(hf_dir)
    before = hostile.snapshot(hf_dir.parent)
    code, _, err = run_cli(["convert", hf_dir, "-t", "grkan", "-o", tmp_path / "out", "--force"], capsys)
    assert code == EXIT_FAILED and "it is the input" in one_error_line(err)
    assert hostile.snapshot(hf_dir.parent) == before and (tmp_path / "out").is_symlink()


def test_convert_hf_folder_replaces_only_its_own_output(hf_dir, tmp_path, capsys):
    out = tmp_path / "kan"
    assert run_cli(["convert", hf_dir, "-t", "grkan", "-o", out], capsys)[0] == EXIT_OK
    code, _, err = run_cli(["convert", hf_dir, "-t", "grkan", "-o", out], capsys)
    assert code == EXIT_FAILED and "exists: pass --force" in one_error_line(err)
    assert run_cli(["convert", hf_dir, "-t", "snnk", "-o", out, "--force"], capsys)[0] == EXIT_OK
    assert json.loads((out / "kanc.json").read_text())["target"] == "snnk"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep")
    code, _, err = run_cli(["convert", hf_dir, "-t", "grkan", "-o", tmp_path / "mine", "--force"], capsys)
    assert code == EXIT_FAILED and "kanc did not write" in one_error_line(err)
    assert os.listdir(tmp_path / "mine") == ["thesis.tex"]


@pytest.fixture
def float_model(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(hostile.mlp().state_dict(), path)
    return path, ["--arch", f"{hostile.__file__}:Mlp"]


def test_export_never_overwrites_its_input_and_needs_force(float_model, tmp_path, capsys):
    """Issue cases 5 and 10: -o in.pt overwrote the input; no --force; float models failed on token ids."""
    path, arch = float_model
    data = path.read_bytes()
    for extra in ([], ["--force"]):
        code, _, err = run_cli(["export", "onnx", path, *arch, "-o", path, *SHAPE, *extra], capsys)
        assert code == EXIT_FAILED and "it is the input" in one_error_line(err)
    assert path.read_bytes() == data
    out = tmp_path / "m.onnx"
    code, stdout, err = run_cli(["export", "onnx", path, *arch, "-o", out, *SHAPE], capsys)
    assert code == EXIT_OK and "max abs diff" in stdout, err
    code, _, err = run_cli(["export", "onnx", path, *arch, "-o", out, *SHAPE], capsys)
    assert code == EXIT_FAILED and "exists: pass --force" in one_error_line(err)
    assert run_cli(["export", "onnx", path, *arch, "-o", out, *SHAPE, "--force"], capsys)[0] == EXIT_OK


def test_inspect_graph_never_overwrites_its_input(tmp_path, capsys):
    path = tmp_path / "model.dot"
    torch.save(hostile.mlp(), path)
    data = path.read_bytes()
    code, _, err = run_cli(["inspect", path, "--trust-pickle", "--graph", path, "--force"], capsys)
    assert code == EXIT_FAILED and "it is the input" in one_error_line(err)
    assert path.read_bytes() == data and os.listdir(tmp_path) == ["model.dot"]


def test_force_keeps_the_old_output_when_the_manifest_fails(float_model, tmp_path, capsys, monkeypatch):
    """Issue case 6: --force where the manifest write failed deleted the old output and wrote nothing."""
    path, arch = float_model
    out = tmp_path / "out.pt"
    assert run_cli(["convert", path, *arch, "-t", "grkan", "-o", out], capsys)[0] == EXIT_OK
    old = hostile.snapshot(tmp_path)
    real = kanc.saving._outputs

    def failing_manifest(*args):
        model_out, manifest_out = real(*args)

        def fill(tmp):
            raise OSError(28, "No space left on device")

        return [model_out, writing.Output(manifest_out.path, fill)]

    monkeypatch.setattr(kanc.saving, "_outputs", failing_manifest)
    code, _, err = run_cli(["convert", path, *arch, "-t", "snnk", "-o", out, "--force"], capsys)
    assert code == EXIT_FAILED and "no space left on the device" in one_error_line(err)
    assert hostile.snapshot(tmp_path) == old


def test_a_convert_while_another_writes_the_same_output_loses_cleanly(float_model, tmp_path, capsys):
    """Issue case 7: two converts to one output both printed "wrote"; the lock makes the second fail."""
    path, arch = float_model
    lock = tmp_path / ".out.pt.kanc-lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    os.write(fd, b"999999\n")
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        code, stdout, err = run_cli(["convert", path, *arch, "-t", "grkan", "-o", tmp_path / "out.pt"], capsys)
    finally:
        os.close(fd)
    assert code == EXIT_FAILED and "being written by another kanc process (pid 999999)" in one_error_line(err)
    assert "wrote" not in stdout and not (tmp_path / "out.pt").exists()


def test_outputs_respect_the_umask_and_a_manifest_named_input_survives(float_model, tmp_path, capsys):
    """Issue case 8: outputs were 0600 whatever the umask; an input called model.kanc.json was replaced."""
    path, arch = float_model
    old = os.umask(0o022)
    try:
        assert run_cli(["convert", path, *arch, "-t", "grkan", "-o", tmp_path / "a.pt"], capsys)[0] == EXIT_OK
    finally:
        os.umask(old)
    assert (tmp_path / "a.pt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "a.pt.kanc.json").stat().st_mode & 0o777 == 0o644
    named = tmp_path / "model.kanc.json"
    shutil.copy(path, named)
    data = named.read_bytes()
    code, _, err = run_cli(["convert", named, *arch, "-t", "grkan", "-o", tmp_path / "model", "--force"], capsys)
    assert code == EXIT_FAILED and "it is the input" in one_error_line(err)
    assert named.read_bytes() == data and not (tmp_path / "model").exists()


def test_pt2_models_export_and_profile(tmp_path, capsys):
    """Issue case 9: every .pt2 failed in export onnx and profile ("Calling eval() is not supported yet")."""
    path = hostile.save_pt2(tmp_path / "m.pt2")
    code, stdout, err = run_cli(["export", "onnx", path, "-o", tmp_path / "m.onnx"], capsys)
    assert code == EXIT_OK and "shapes [[4, 8]]" in stdout, err  # the program's own example inputs
    code, stdout, err = run_cli(["profile", path, "--iters", "1", "--warmup", "0", "--train"], capsys)
    assert code == EXIT_OK and "train step" in stdout, err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_profile_and_tune_keep_the_model_dtype(tmp_path, capsys, dtype):
    """Issue case 10: profile/tune failed on fp16/bf16 models unless --dtype was given."""
    path = tmp_path / "half.pt"
    torch.save(hostile.mlp().to(dtype), path)
    code, stdout, err = run_cli(["profile", path, "--trust-pickle", *SHAPE, "--iters", "1", "--json"], capsys)
    assert code == EXIT_OK, err
    assert json.loads(stdout)["report"]["run"]["inputs"][0]["dtype"] == str(dtype).replace("torch.", "")
    code, _, err = run_cli(["tune", path, "--trust-pickle", *SHAPE, "--iters", "1"], capsys)
    assert code == EXIT_FAILED and "nothing to tune" in one_error_line(err)  # no kernel on the CPU, said why


def test_convert_measures_fidelity_on_inferred_inputs(float_model, tmp_path, capsys):
    path, arch = float_model
    code, stdout, err = run_cli(["convert", path, *arch, "-t", "grkan", "-o", tmp_path / "o.pt", *SHAPE], capsys)
    assert code == EXIT_OK and "model outputs on input[0] (4, 8)" in stdout, stdout + err


def test_an_already_converted_pt2_says_so(tmp_path, capsys):
    """Issue case 11: a converted .pt2 exited 3 ("no MLP block") instead of "already converted"."""
    path = hostile.save_pt2(tmp_path / "m.pt2")
    assert run_cli(["convert", path, "-t", "grkan", "-o", tmp_path / "k.pt2"], capsys)[0] == EXIT_OK
    before = hostile.snapshot(tmp_path)
    code, stdout, err = run_cli(["convert", tmp_path / "k.pt2", "-t", "grkan", "-o", tmp_path / "k2.pt2"], capsys)
    assert code == EXIT_OK and "already converted" in stdout and "nothing written" in stdout, err
    assert hostile.snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--degrees", "100000,4"], "bad --degrees: must be two integers m in 1..16"),
        (["--degrees", "5"], "bad --degrees '5'"),
        (["--groups", "0"], "bad --groups: must be an integer in 1..65536"),
        (["--kind", "exp"], "unknown option 'kind' for target grkan"),
    ],
)
def test_bad_option_values_are_usage_errors(float_model, tmp_path, capsys, extra, says):
    path, arch = float_model
    code, _, err = run_cli(["convert", path, *arch, "-t", "grkan", "-o", tmp_path / "o.pt", *extra], capsys)
    assert code == EXIT_USAGE and says in one_error_line(err), err
    assert not (tmp_path / "o.pt").exists()


def test_unreadable_input_is_a_bad_input(tmp_path, capsys, monkeypatch):
    """Issue case 11: an unreadable input exited 2 where other bad inputs exit 1."""
    import builtins

    path = tmp_path / "model.pt"
    torch.save(hostile.mlp().state_dict(), path)
    real = builtins.open

    def refuse(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refuse)
    code, _, err = run_cli(["inspect", path], capsys)
    assert code == EXIT_FAILED and f"cannot read {path}: permission denied" in one_error_line(err)


def test_file_size_limit_reads_as_such(float_model, tmp_path):
    """Issue case 11: disk-full and file-size-limit errors read as torch internals ("unexpected pos 9792 vs 9680")."""
    path, arch = float_model
    big = tmp_path / "big.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.GELU(), torch.nn.Linear(512, 64)), big)
    script = (
        "import resource, sys; from kanc.cli import main; "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (50000, resource.RLIM_INFINITY)); main(sys.argv[1:])"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(kanc.__file__).parents[1])}
    proc = subprocess.run(
        [sys.executable, "-c", script, "convert", big, "--trust-pickle", "-t", "grkan", "-o", tmp_path / "o.pt"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == EXIT_FAILED and "file size limit reached" in one_error_line(proc.stderr), proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["big.pt", "model.pt"]


def test_exit_codes_are_one_table(float_model, tmp_path, capsys):
    assert EXIT_CODES == {
        0: "ok",
        1: "bad input or failed check",
        2: "usage",
        3: "nothing to convert",
        130: "interrupted",
    }
    path, arch = float_model
    nomlp = tmp_path / "nomlp.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(8, 8)), nomlp)
    assert (
        run_cli(["convert", nomlp, "--trust-pickle", "-t", "grkan", "-o", tmp_path / "x.pt"], capsys)[0] == EXIT_NOTHING
    )
    assert run_cli(["convert", path], capsys)[0] == EXIT_USAGE
    assert run_cli(["profile", path, *arch, "--input-shape", "4,8", "--inputs", path], capsys)[0] == EXIT_USAGE
    assert run_cli(["profile", path, *arch], capsys)[0] == EXIT_USAGE  # no shape, none to infer
    assert run_cli(["frobnicate"], capsys)[0] == EXIT_USAGE


def test_tracebacks_only_with_kanc_debug(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    code, _, err = run_cli(["inspect", empty], capsys)
    assert code == EXIT_FAILED and err == f"Error: {empty} is empty\n"
    monkeypatch.setenv("KANC_DEBUG", "1")
    code, _, err = run_cli(["inspect", empty], capsys)
    assert code == EXIT_FAILED and "Traceback" in err and "KancError" in err


def test_names_with_control_characters_stay_one_line(tmp_path, capsys):
    path = tmp_path / "evil\n\x1b[2Jname.pt"
    path.write_bytes(b"not a model at all")
    code, _, err = run_cli(["inspect", path], capsys)
    line = one_error_line(err)
    assert code == EXIT_FAILED and "\\n\\x1b[2Jname.pt" in line and "\x1b" not in err


@pytest.mark.parametrize("sig, code, says", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_a_signal_during_convert_leaves_nothing(float_model, tmp_path, sig, code, says):
    """A convert stopped while it writes (SIGINT, SIGTERM) exits 128 + signal with one line and leaves no file."""
    path, arch = float_model
    script = (
        "import sys, time, kanc.saving as s; real = s._write_state_dict\n"
        "def slow(*a):\n    real(*a); open(sys.argv[1], 'w').close(); time.sleep(60)\n"
        "s._WRITERS['state_dict'] = slow\nfrom kanc.cli import main; main(sys.argv[2:])"
    )
    flag = tmp_path / "writing"
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(kanc.__file__).parents[1])}
    argv = [sys.executable, "-c", script, flag, "convert", path, *arch, "-t", "grkan", "-o", out / "o.pt"]
    # SIGINT as a terminal delivers it: a shell starts background jobs with SIGINT ignored, and kanc (like any
    # program started under nohup) keeps it ignored; the test is about kanc's handling, not its launcher's
    proc = subprocess.Popen(
        list(map(str, argv)), stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_default_sigint
    )
    deadline = time.monotonic() + 240
    while not flag.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert flag.exists()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code and one_error_line(err) == f"Error: {says}"
    assert os.listdir(out) == []


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default, whatever the test run inherited."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
