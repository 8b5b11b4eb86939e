"""The writing policy (kanc.writing): atomic, exclusive, umask-respecting, never into/over/above/below an input,
replacing only with force and only once every new file is complete, stale temporaries cleaned up."""

import errno
import fcntl
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import hostile
import pytest

from kanc import writing
from kanc.errors import KancError
from kanc.writing import Output, write_dir, write_file, write_outputs, write_text


def _names(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_writes_atomically_with_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write_text(tmp_path / "a.json", "{}")
        write_dir(tmp_path / "d", lambda tmp: (tmp / "x").write_text("1"))
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").read_text() == "{}" and (tmp_path / "d" / "x").read_text() == "1"
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o750
    assert _names(tmp_path) == {"a.json", "d"}  # no lock or temporary left


def test_a_failing_writer_leaves_nothing_and_its_error_as_is(tmp_path):
    def fail(tmp: Path) -> None:
        (tmp / "a.txt" if tmp.is_dir() else tmp).write_text("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_file(tmp_path / "out.json", fail)
    with pytest.raises(RuntimeError, match="boom"):
        write_dir(tmp_path / "out_dir", fail)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_needs_force_and_the_same_kind(tmp_path):
    write_text(tmp_path / "a", "1")
    with pytest.raises(KancError, match="exists: pass --force"):
        write_text(tmp_path / "a", "2")
    write_text(tmp_path / "a", "2", force=True)
    assert (tmp_path / "a").read_text() == "2"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep")
    with pytest.raises(KancError, match="not a file"):
        write_text(tmp_path / "mine", "x", force=True)
    with pytest.raises(KancError, match="did not write .*even with --force"):
        write_dir(tmp_path / "mine", lambda tmp: None, force=True)
    write_dir(tmp_path / "mine", lambda tmp: (tmp / "n").write_text("1"), force=True, replaceable=lambda p: True)
    assert _names(tmp_path / "mine") == {"n"}
    (tmp_path / "empty").mkdir()
    write_dir(tmp_path / "empty", lambda tmp: (tmp / "n").write_text("1"))  # nothing to lose: no force needed
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(KancError, match="not a file"):
        write_text(tmp_path / "fifo", "x", force=True)


@pytest.mark.parametrize("path", [".", "..", "/", "sub/.."])
def test_outputs_need_a_file_name(path):
    with pytest.raises(KancError, match="not a file name"):
        write_text(path, "x")


def test_the_output_directory_must_exist(tmp_path):
    with pytest.raises(KancError, match="output directory .* does not exist"):
        write_text(tmp_path / "missing" / "a", "x")


def _inputs(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "in" / "hf"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    model = tmp_path / "in" / "model.pt"
    model.write_bytes(b"weights")
    return folder, model


def test_never_into_over_above_or_below_an_input(tmp_path):
    folder, model = _inputs(tmp_path)
    (tmp_path / "link_to_folder").symlink_to(folder)
    (tmp_path / "link_to_model").symlink_to(model)
    os.link(model, tmp_path / "hardlink.pt")
    before = hostile.snapshot(tmp_path)
    refused = {
        model: "is the input",
        folder: "is the input",
        tmp_path / "in": "holds the input",
        tmp_path: "holds the input",
        folder / "out.pt": "is inside the input",
        tmp_path / "link_to_folder": "is the input",
        tmp_path / "link_to_folder" / "x.pt": "is inside the input",
        tmp_path / "link_to_model": "is the input",
        tmp_path / "hardlink.pt": "is the input",
    }
    for out, says in refused.items():
        for directory in (False, True):
            with pytest.raises(KancError, match=says):
                write_outputs([Output(out, lambda tmp: None, directory)], inputs=[model, folder], force=True)
    assert hostile.snapshot(tmp_path) == before


def test_a_model_named_like_a_manifest_is_never_replaced(tmp_path):
    """-o model --force writes model and model.kanc.json: an input called model.kanc.json must survive."""
    import kanc

    source = tmp_path / "model.kanc.json"
    source.write_bytes(b"the user's model")
    model = kanc.compile(hostile.mlp(), "grkan", verify=False)
    with pytest.raises(KancError, match="model.kanc.json: it is the input"):
        kanc.save(model, tmp_path / "model", force=True, protect=[source])
    assert _names(tmp_path) == {"model.kanc.json"} and source.read_bytes() == b"the user's model"


def test_old_outputs_stay_until_every_new_file_is_complete(tmp_path):
    write_text(tmp_path / "m.pt", "old model")
    write_text(tmp_path / "m.pt.kanc.json", "old manifest")

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    outputs = [
        Output(tmp_path / "m.pt", lambda tmp: tmp.write_text("new model")),
        Output(tmp_path / "m.pt.kanc.json", fail),
    ]
    with pytest.raises(KancError, match="no space left on the device"):
        write_outputs(outputs, force=True)
    assert (tmp_path / "m.pt").read_text() == "old model" and (
        tmp_path / "m.pt.kanc.json"
    ).read_text() == "old manifest"
    assert _names(tmp_path) == {"m.pt", "m.pt.kanc.json"}


@pytest.mark.parametrize("exchange", [True, False])
def test_a_failure_while_publishing_puts_back_what_was_replaced(tmp_path, monkeypatch, exchange):
    if not exchange:  # the fallback for file systems without renameat2: move the old one aside, then back
        monkeypatch.setattr(writing, "_renameat2", lambda *a: False)
    write_text(tmp_path / "a", "old a")
    write_text(tmp_path / "b", "old b")
    real = writing._publish

    def publish(t):
        if t.entry.name == "b":
            raise KancError("cannot write b: simulated")
        real(t)

    monkeypatch.setattr(writing, "_publish", publish)
    outputs = [Output(tmp_path / n, lambda tmp: tmp.write_text("new")) for n in ("a", "b")]
    with pytest.raises(KancError, match="simulated"):
        write_outputs(outputs, force=True)
    assert (tmp_path / "a").read_text() == "old a" and (tmp_path / "b").read_text() == "old b"
    assert _names(tmp_path) == {"a", "b"}


def test_without_renameat2_outputs_are_still_exclusive_and_replaced_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(writing, "_renameat2", lambda *a: False)
    write_text(tmp_path / "a", "1")
    write_text(tmp_path / "a", "2", force=True)
    write_dir(tmp_path / "d", lambda tmp: (tmp / "f").write_text("1"))
    write_dir(tmp_path / "d", lambda tmp: (tmp / "g").write_text("2"), force=True, replaceable=lambda p: True)
    assert (tmp_path / "a").read_text() == "2" and _names(tmp_path / "d") == {"g"}
    assert _names(tmp_path) == {"a", "d"}


def _slow_writer(path: str, text: str, started, result) -> None:
    def fill(tmp: Path) -> None:
        started.set()
        time.sleep(1.0)
        tmp.write_text(text)

    try:
        write_file(path, fill)
        result.put((text, "wrote"))
    except KancError as e:
        result.put((text, str(e)))


def test_a_concurrent_writer_loses_cleanly(tmp_path):
    ctx = multiprocessing.get_context("fork")
    started, result = ctx.Event(), ctx.Queue()
    first = ctx.Process(target=_slow_writer, args=(str(tmp_path / "out"), "first", started, result))
    first.start()
    assert started.wait(30)
    _slow_writer(str(tmp_path / "out"), "second", ctx.Event(), result)
    first.join(30)
    outcomes = dict(result.get(timeout=5) for _ in range(2))
    assert outcomes["first"] == "wrote"
    assert "being written by another kanc process" in outcomes["second"] and f"pid {first.pid}" in outcomes["second"]
    assert (tmp_path / "out").read_text() == "first" and _names(tmp_path) == {"out"}
    with pytest.raises(KancError, match="exists: pass --force"):  # after the first finished
        write_text(tmp_path / "out", "third")


def test_a_stale_lock_or_temporary_of_a_dead_process_is_cleaned_up(tmp_path):
    pid = _dead_pid()
    (tmp_path / f".out.kanc-tmp-{pid}-0a1b2c3d").write_text("partial")
    (tmp_path / f".out.kanc-tmp-{pid}-0a1b2c3e.pt").mkdir()
    (tmp_path / ".out.kanc-lock").write_text(f"{pid}\n")
    (tmp_path / f".out.kanc-tmp-{os.getppid()}-00000000").write_text("a live process's")
    (tmp_path / f".other.kanc-tmp-{pid}-00000000").write_text("another output's")
    write_text(tmp_path / "out", "new")
    assert _names(tmp_path) == {"out", f".out.kanc-tmp-{os.getppid()}-00000000", f".other.kanc-tmp-{pid}-00000000"}


def test_a_killed_replace_is_put_back(tmp_path):
    """Killed between moving the old output aside and moving the new one in: the next write restores the old one."""
    pid = _dead_pid()
    (tmp_path / f".out.kanc-old-{pid}-0a1b2c3d").write_text("the only copy")
    with pytest.raises(KancError, match="exists"):
        write_text(tmp_path / "out", "new")
    assert (tmp_path / "out").read_text() == "the only copy" and _names(tmp_path) == {"out"}


_CHILD = """
import sys, time
from pathlib import Path
from kanc.writing import write_file

def fill(tmp):
    tmp.write_text("partial")
    Path(sys.argv[2]).write_text("started")
    time.sleep(60)

write_file(sys.argv[1], fill)
"""


def _start_child(tmp_path: Path) -> subprocess.Popen:
    flag = tmp_path / "started"
    # preexec_fn: SIGINT deliverable even when the test run was started with it ignored (a background job)
    argv = [sys.executable, "-c", _CHILD, str(tmp_path / "out" / "model.pt"), str(flag)]
    proc = subprocess.Popen(argv, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not flag.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert flag.exists(), "the child did not start writing"
    return proc


def test_sigkill_mid_write_leaves_a_temporary_the_next_write_removes(tmp_path):
    (tmp_path / "out").mkdir()
    proc = _start_child(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = _names(tmp_path / "out")
    assert any(".kanc-tmp-" in n for n in left) and "model.pt" not in left
    write_text(tmp_path / "out" / "model.pt", "complete")
    assert _names(tmp_path / "out") == {"model.pt"}


def test_sigint_mid_write_leaves_nothing(tmp_path):
    (tmp_path / "out").mkdir()
    proc = _start_child(tmp_path)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) != 0
    assert _names(tmp_path / "out") == set()


def test_read_only_directory_is_one_line(tmp_path, monkeypatch):
    real = os.open

    def refuse(path, flags, *args, **kwargs):
        if str(path).startswith(str(tmp_path)) and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(KancError, match=r"cannot write .*out: permission denied"):
        write_text(tmp_path / "out", "x")
    assert _names(tmp_path) == set()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory_for_real(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(KancError, match="permission denied"):
        write_text(tmp_path / "ro" / "out", "x")


@pytest.mark.parametrize("name", ["new\nline.pt", "ünïcødé.pt", "x" * 250, "-rf", " space "])
def test_odd_names(tmp_path, name):
    write_text(tmp_path / name, "1")
    with pytest.raises(KancError) as info:
        write_text(tmp_path / name, "2")
    assert "\n" not in str(info.value)
    assert _names(tmp_path) == {name} and (tmp_path / name).read_text() == "1"


def test_a_held_lock_refuses_with_the_holder(tmp_path):
    lock = tmp_path / ".out.kanc-lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    os.write(fd, b"4242\n")
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(KancError, match=r"being written by another kanc process \(pid 4242\)"):
            write_text(tmp_path / "out", "x")
    finally:
        os.close(fd)
    assert not (tmp_path / "out").exists()
