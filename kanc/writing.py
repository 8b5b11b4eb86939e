"""The writing policy: every file kanc writes goes through :func:`write_outputs` (or its one-output forms).

What it guarantees, for a set of outputs written together (a model and its manifest, a report folder, ...):

- never into, over, above or below an input: each output is compared with every input after resolving symlinks (the
  output's own link target included) and hard links, and refused when it is an input, holds one or sits inside one;
- exclusive: each output is locked (``.NAME.kanc-lock``, an flock that dies with its process) while it is written; a
  second writer of the same output fails at once with the holder's pid (or waits up to ``wait`` seconds);
- an existing output is replaced only with ``force``, only by the same kind (file by file, folder by folder; a folder
  only when empty or ``replaceable`` says it is kanc's), and only once every new file is complete: each output is
  written in full to a temporary sibling first, then all are published (an atomic exchange where the OS has one),
  and a failure while publishing puts back what was already replaced;
- atomic and durable: temporaries are renamed into place after an fsync; on any failure, SIGINT or SIGTERM included,
  nothing is left behind; files get the usual permissions (0666 and 0777 less the umask);
- temporaries are named ``.NAME.kanc-tmp-PID-XXXX`` (and ``.NAME.kanc-old-PID-XXXX`` while replacing): ones whose
  process is gone (SIGKILL, power loss) are removed by the next write of NAME, or put back when NAME went missing.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kanc.errors import KancError, os_error, printable

TMP_TAG = ".kanc-tmp-"
OLD_TAG = ".kanc-old-"
LOCK_TAG = ".kanc-lock"
_STALE = re.compile(r"^(\d+)-[0-9a-f]+")
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


@dataclass
class Output:
    """One file (or folder, ``directory=True``) to write: ``fill(tmp)`` writes it at the temporary path it is given.

    ``replaceable(path)`` says whether an existing folder at ``path`` may be replaced with ``force`` (default: only
    an empty one).
    """

    path: Path
    fill: Callable[[Path], None] | None = None  # None: only checked (check_outputs)
    directory: bool = False
    replaceable: Callable[[Path], bool] | None = None


def write_file(path: str | os.PathLike, fill: Callable[[Path], None], **policy) -> Path:
    """Write one file through :func:`write_outputs` (``fill(tmp)`` writes it); returns ``path``."""
    return write_outputs([Output(Path(path), fill)], **policy)[0]


def write_text(path: str | os.PathLike, text: str, **policy) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`write_outputs`."""
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), **policy)


def write_dir(path: str | os.PathLike, fill: Callable[[Path], None], replaceable=None, **policy) -> Path:
    """Write one folder through :func:`write_outputs` (``fill(tmp)`` fills the empty folder ``tmp``)."""
    return write_outputs([Output(Path(path), fill, True, replaceable)], **policy)[0]


def write_outputs(
    outputs: Sequence[Output], *, inputs: Iterable[str | os.PathLike] = (), force: bool = False, wait: float = 0.0
) -> list[Path]:
    """Write ``outputs`` together under the policy of this module; returns their paths.

    ``inputs``: every path the command read (never written, replaced, or written above or below); ``force``: replace
    existing outputs; ``wait``: seconds to wait for another writer of the same output before failing.
    """
    targets = _plan(outputs, list(inputs), force)
    with contextlib.ExitStack() as stack:
        for target in sorted(targets, key=lambda t: str(t.entry)):
            stack.enter_context(_locked(target, wait))
        for target in targets:
            _remove_stale(target)  # may put back an old output a killed writer had moved aside
            _check_existing(target, force)  # again, under the lock: another writer may have finished meanwhile
        _publish_all(_filled(targets, stack))
    return [t.output.path for t in targets]


def check_outputs(outputs: Sequence[Output], *, inputs: Iterable[str | os.PathLike] = (), force: bool = False) -> None:
    """The checks :func:`write_outputs` makes first, without writing: call it before long work to fail early."""
    _plan(outputs, list(inputs), force)


# ---- planning: where each output goes, and whether it may ------------------------------------------------------


@dataclass
class _Target:
    output: Output
    entry: Path  # the directory entry that will be replaced: resolved parent / name
    stem: str  # the name used in temporary and lock names
    tmp: Path | None = None
    published: str = ""  # "", "new" or "exchanged" / "moved" (then ``tmp`` or ``old`` holds the old content)
    old: Path | None = None
    may_replace: bool = False  # the existing output checked replaceable (_check_existing)


def _plan(outputs: Sequence[Output], inputs: list, force: bool) -> list[_Target]:
    targets = [_target(o) for o in outputs]
    seen: dict[Path, Path] = {}
    for t in targets:
        if t.entry in seen:
            raise KancError(f"{_show(t.output.path)} is written twice by this command ({_show(seen[t.entry])})")
        seen[t.entry] = t.output.path
        _check_inputs(t, inputs)
        _check_existing(t, force)
    return targets


def _target(output: Output) -> _Target:
    path = Path(output.path)
    name = path.name
    if name in ("", ".", ".."):
        raise KancError(f"{_show(path)} is not a file name: give the output's own name")
    parent = path.parent
    if not parent.is_dir():
        what = "does not exist" if not os.path.lexists(parent) else "is not a directory"
        raise KancError(f"output directory {_show(parent)} {what}")
    return _Target(output, Path(os.path.realpath(parent)) / name, _stem(name))


def _stem(name: str) -> str:
    if len(name) <= 120:
        return name
    return name[:100] + "-" + hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def _check_inputs(target: _Target, inputs: list) -> None:
    """Refuse an output that is an input, holds one (a folder above it) or sits inside one (symlinks resolved)."""
    candidates = {target.entry}
    if os.path.lexists(target.entry):
        candidates.add(Path(os.path.realpath(target.entry)))
    for given in inputs:
        if not os.path.lexists(given):
            continue
        real = Path(os.path.realpath(given))
        for cand in candidates:
            relation = _relation(cand, real)
            if relation:
                raise KancError(
                    f"refusing to write {_show(target.output.path)}: it {relation} the input {_show(given)}; "
                    "choose another output"
                )
        if os.path.exists(target.entry) and _same_file(target.entry, real):
            raise KancError(f"refusing to write {_show(target.output.path)}: it is the input {_show(given)} (a link)")


def _relation(output: Path, given: Path) -> str:
    if output == given:
        return "is"
    if output in given.parents:
        return "holds"
    if given in output.parents:
        return "is inside"
    return ""


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_existing(target: _Target, force: bool) -> None:
    """An existing output may be replaced only by the same kind, a non-empty folder only if kanc's, only with force."""
    entry, path, out = target.entry, target.output.path, target.output
    target.may_replace = False
    if not os.path.lexists(entry):
        return
    if not os.path.islink(entry):  # a link is replaced itself, never what it points to
        mode = os.lstat(entry).st_mode
        if out.directory and not stat.S_ISDIR(mode):
            raise KancError(f"{_show(path)} exists and is not a folder: kanc replaces a folder only with a folder")
        if not out.directory and not stat.S_ISREG(mode):
            raise KancError(f"{_show(path)} exists and is not a file: kanc replaces a file only with a file")
        if out.directory and any(entry.iterdir()) and not (out.replaceable and out.replaceable(entry)):
            raise KancError(
                f"{_show(path)} is a folder kanc did not write (not empty): refusing to replace it, even with --force"
            )
        if out.directory and not any(entry.iterdir()):
            target.may_replace = True  # an empty folder: nothing to lose
            return
    if not force:
        raise KancError(f"{_show(path)} exists: pass --force to replace it")
    target.may_replace = True


# ---- locking ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(target: _Target, wait: float):
    """Hold ``.NAME.kanc-lock`` beside the output (an flock: released by the kernel if this process dies)."""
    lock = target.entry.parent / f".{target.stem}{LOCK_TAG}"
    deadline = time.monotonic() + wait
    while True:
        fd = _open_lock(lock, target)
        if _try_flock(fd) and _is_current(fd, lock):
            break
        holder = _read_pid(fd)
        os.close(fd)
        if time.monotonic() >= deadline:
            by = f" (pid {holder})" if holder else ""
            raise KancError(f"{_show(target.output.path)} is being written by another kanc process{by}: try again")
        time.sleep(0.05)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)  # before unlocking: a waiter that opened it sees a stale inode and retries
        os.close(fd)


def _open_lock(lock: Path, target: _Target) -> int:
    try:
        return os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as e:
        raise os_error(e, target.output.path, "cannot write") from None


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _is_current(fd: int, lock: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(lock).st_ino
    except FileNotFoundError:
        return False


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


# ---- stale temporaries ------------------------------------------------------------------------------------------


def _remove_stale(target: _Target) -> None:
    """Temporaries of this output left by a process that is gone: remove them (or put back an old output)."""
    parent = target.entry.parent
    with contextlib.suppress(OSError), os.scandir(parent) as entries:
        found = [e.name for e in entries if e.name.startswith(f".{target.stem}.kanc-")]
    for name in found:
        for tag in (TMP_TAG, OLD_TAG):
            head = f".{target.stem}{tag}"
            match = _STALE.match(name[len(head) :]) if name.startswith(head) else None
            if match and not _alive(int(match.group(1))):
                _drop_stale(parent / name, target.entry, restore=tag == OLD_TAG)


def _drop_stale(path: Path, entry: Path, restore: bool) -> None:
    if restore and not os.path.lexists(entry):
        os.rename(path, entry)  # killed between moving the old output away and moving the new one in
    else:
        _remove(path)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- filling and publishing -------------------------------------------------------------------------------------


def _filled(targets: list[_Target], stack: contextlib.ExitStack) -> list[_Target]:
    """Write every output to its temporary; the stack removes the temporaries and undoes publishing on failure."""
    stack.callback(_discard, targets)
    for t in targets:
        t.tmp = _new_tmp(t)
        _fill(t)
    return targets


def _new_tmp(target: _Target) -> Path:
    suffix = Path(target.entry.name).suffix
    suffix = suffix if len(suffix) <= 16 and suffix.isprintable() else ""
    tmp = target.entry.parent / f".{target.stem}{TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}{suffix}"
    try:
        if target.output.directory:
            os.mkdir(tmp, 0o777)
        else:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))
    except OSError as e:
        raise os_error(e, target.output.path, "cannot write") from None
    return tmp


def _fill(target: _Target) -> None:
    try:
        target.output.fill(target.tmp)
        _sync(target.tmp)
    except KancError:
        raise
    except Exception as e:
        cause = _write_failure(e, target.tmp)
        if cause is None:
            raise
        raise KancError(f"cannot write {_show(target.output.path)}: {cause}") from e
    expected = os.path.isdir if target.output.directory else os.path.isfile
    if not expected(target.tmp) or os.path.islink(target.tmp):
        raise KancError(f"cannot write {_show(target.output.path)}: the writer did not produce it")


def _write_failure(e: Exception, tmp: Path) -> str | None:
    """The real cause of a failed write, when the writer hid it (torch reports a full disk as "unexpected pos")."""
    from kanc.errors import os_cause

    if isinstance(e, OSError) and e.errno is not None:
        return os_cause(e)
    limit = _fsize_limit()
    if limit is not None and _size(tmp) >= limit - 4096:
        return os_cause(OSError(errno.EFBIG, ""))
    try:
        vfs = os.statvfs(tmp.parent)
    except OSError:
        return None
    if vfs.f_bavail * vfs.f_frsize < 4 * 2**20:
        return os_cause(OSError(errno.ENOSPC, ""))
    return None


def _fsize_limit() -> int | None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return max((p.stat().st_size for p in path.rglob("*") if p.is_file()), default=0)


def _sync(path: Path) -> None:
    """fsync a written file, or every file of a written folder and the folder itself."""
    files = [path] if not path.is_dir() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    for f in [*files, *([path] if path.is_dir() else [])]:
        fd = os.open(f, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _publish_all(targets: list[_Target]) -> None:
    """Move every complete temporary into place; the old content of replaced outputs is removed only at the end."""
    for t in targets:
        _publish(t)
    olds = [t.tmp if t.published == "exchanged" else t.old for t in targets]
    for t in targets:
        t.published, t.tmp, t.old = "", None, None  # done: nothing to undo from here on
    for old in olds:
        with contextlib.suppress(OSError):
            _remove(old)
    for parent in {t.entry.parent for t in targets}:
        _sync_dir(parent)


def _publish(t: _Target) -> None:
    try:
        if not os.path.lexists(t.entry):
            _create(t)
        elif t.may_replace:
            _replace(t)
        else:
            raise FileExistsError(t.entry)
    except FileExistsError:
        raise KancError(f"{_show(t.output.path)} appeared while kanc was writing it: nothing replaced") from None
    except OSError as e:
        raise os_error(e, t.output.path, "cannot write") from None


def _create(t: _Target) -> None:
    """Move the temporary to a name that must not exist (never replacing what another program put there)."""
    if not _renameat2(t.tmp, t.entry, _RENAME_NOREPLACE):
        if t.output.directory:
            if os.path.lexists(t.entry):
                raise FileExistsError(t.entry)
            os.rename(t.tmp, t.entry)
        else:
            os.link(t.tmp, t.entry)  # fails if the name exists
            os.unlink(t.tmp)
    t.published, t.tmp = "new", None


def _replace(t: _Target) -> None:
    """Swap the temporary with the existing output; the temporary then holds the old content until the end."""
    if _renameat2(t.tmp, t.entry, _RENAME_EXCHANGE):
        t.published = "exchanged"
        return
    t.old = t.entry.parent / f".{t.stem}{OLD_TAG}{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(t.entry, t.old)
    try:
        os.rename(t.tmp, t.entry)
    except BaseException:
        os.rename(t.old, t.entry)
        raise
    t.published, t.tmp = "moved", None


def _discard(targets: list[_Target]) -> None:
    """Undo a failed write: put back what was replaced, remove what was created and every temporary."""
    for t in reversed(targets):
        with contextlib.suppress(OSError):
            if t.published == "exchanged":
                _renameat2(t.tmp, t.entry, _RENAME_EXCHANGE)
            elif t.published == "moved":
                _remove(t.entry)
                os.rename(t.old, t.entry)
            elif t.published == "new":
                _remove(t.entry)
            if t.tmp is not None:
                _remove(t.tmp)


def _remove(path: Path | None) -> None:
    if path is None or not os.path.lexists(path):
        return
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _sync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_libc = None


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2: True when done; False where the call or the flag is not supported (then fall back)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(_libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), ctypes.c_uint(flags)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _show(path: str | os.PathLike) -> str:
    return printable(os.fspath(path))
