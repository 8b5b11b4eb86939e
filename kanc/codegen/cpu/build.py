"""Compile kanc's C kernels once per machine and load them with ctypes.

The shared library is cached in ``<kanc cache dir>/cpu/`` (``KANC_CACHE_DIR``, default ``~/.cache/kanc``) under a
name keyed by the source's hash, the ABI version, the compiler's identity (``--version``), the flags and the CPU
(``-march=native`` code runs only where it was built). A build is published through :mod:`kanc.writing` (compiled
into a temporary sibling, fsynced, renamed into place) under an exclusive build lock, so concurrent processes
(pytest-xdist workers, DDP ranks) neither race nor load half a file, and only one of them compiles. When the cache
dir cannot be written (read-only home, a file in the way), the library is built in a private temporary directory for
this process instead.

Compilers: ``CC`` (may hold arguments, e.g. ``ccache gcc``), else ``cc``, ``gcc`` or ``clang`` on PATH: Triton's own
launcher stubs need one, so a machine that runs Triton has one. Flags are tried from the fastest (native ISA,
OpenMP) down to plain ``-O3``; every set keeps ``-ffp-contract=off`` and no ``-ffast-math``, so the C code rounds
like the reference and propagates NaN/inf (``-fno-trapping-math`` only lets it compute both sides of a select).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kanc.errors import KancError, first_line
from kanc.writing import write_file

ABI = 1  # kanc_cpu_abi() of the source; bump with any change of an exported signature
SOURCE = Path(__file__).with_name("rational.c")
COMMON_FLAGS = ("-shared", "-fPIC", "-std=c11", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math")
FLAG_SETS = (("-O3", "-march=native", "-fopenmp"), ("-O3", "-fopenmp"), ("-O3",))
COMPILE_TIMEOUT_S = 300


class BuildError(Exception):
    """The library could not be built or loaded; the message is one line, the reason the reference runs."""


@dataclass(frozen=True)
class Library:
    """A loaded build: the ctypes handle, where it lives, and how it was built."""

    handle: ctypes.CDLL
    path: Path
    flags: tuple[str, ...]


def compiler() -> list[str]:
    """The C compiler command (``CC``, else the first of cc, gcc, clang on PATH)."""
    cc = os.environ.get("CC")
    if cc:
        return shlex.split(cc)
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    raise BuildError("no C compiler (set CC, or put cc, gcc or clang on PATH)")


def build_and_load(cache_root: Path) -> Library:
    """The library for this machine: loaded from the cache, else built there (or in a private temporary directory
    when the cache cannot be written), then loaded."""
    cc = compiler()
    identity = _compiler_identity(cc)
    errors = []
    for flags in FLAG_SETS:
        name = f"kanc_cpu_{_key(identity, flags)}.so"
        try:
            return _load_built(cc, flags, name, cache_root / "cpu")
        except BuildError as e:
            errors.append(str(e))
    raise BuildError(errors[0])


def _compiler_identity(cc: list[str]) -> str:
    try:
        done = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"C compiler {cc[0]} does not run: {e}") from None
    if done.returncode != 0:
        raise BuildError(f"C compiler {cc[0]} does not run: {first_line(done.stderr, 160, prefer='error')}")
    return done.stdout.strip()


def _key(identity: str, flags: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), str(ABI).encode(), identity.encode(), " ".join(flags + COMMON_FLAGS).encode(),
                 _cpu_identity().encode()):  # fmt: skip
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:20]


def _cpu_identity() -> str:
    """What -march=native depends on: the architecture, and on Linux the CPU model and feature flags."""
    parts = [platform.machine(), platform.system()]
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part"):
                parts.append(line)
                if len(parts) >= 4:
                    break
    return "\n".join(parts)


def _load_built(cc: list[str], flags: tuple[str, ...], name: str, cache: Path) -> Library:
    """Load ``name`` from the cache (building it there first if needed); where the cache cannot be written, or holds
    a copy that does not load, this process builds and loads its own."""
    try:
        path = _build_into(cc, flags, name, cache)
        return Library(_load(path), path, flags)
    except (OSError, KancError, BuildError) as e:
        if isinstance(e, BuildError) and not str(e).startswith("cannot load"):
            raise  # the compiler failed: a private build would fail the same way
    try:
        path = _build_into(cc, flags, name, _private_dir())
    except (OSError, KancError) as e:
        raise BuildError(f"no writable directory to build in: {first_line(e)}") from None
    return Library(_load(path), path, flags)


def _build_into(cc: list[str], flags: tuple[str, ...], name: str, directory: Path) -> Path:
    """``directory/name``, built unless present. OSError or KancError when the directory cannot be written."""
    path = directory / name
    if path.is_file():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    with _exclusive(directory / f"{name}.lock"):  # one builder; the others wait here, then load its file
        if path.is_file():  # another process built it while this one waited
            return path
        write_file(path, lambda tmp: _compile(cc, flags, tmp))  # a full file appears at ``path``, or none
    return path


def _compile(cc: list[str], flags: tuple[str, ...], out: Path) -> None:
    command = [*cc, *flags, *COMMON_FLAGS, "-o", str(out), str(SOURCE)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"{cc[0]} failed: {e}") from None
    if done.returncode != 0:
        raise BuildError(f"{cc[0]} {' '.join(flags)} failed: {first_line(done.stderr, 160, prefer='error')}")


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An exclusive lock between processes (flock; where there is none, the atomic rename alone keeps builds
    correct, only not unique)."""
    with open(lock_path, "a") as f:
        try:
            import fcntl
        except ImportError:
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_private: Path | None = None


def _private_dir() -> Path:
    """A temporary directory only this process uses (mode 0700), removed at exit."""
    global _private
    if _private is None:
        _private = Path(tempfile.mkdtemp(prefix="kanc-cpu-"))
        atexit.register(shutil.rmtree, _private, True)
    return _private


def _load(path: Path) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(str(path))
        abi = lib.kanc_cpu_abi()
    except (OSError, AttributeError) as e:
        raise BuildError(f"cannot load {path.name}: {first_line(e, 160)}") from None
    if abi != ABI:
        raise BuildError(f"{path} has ABI {abi}, kanc needs {ABI}")
    _declare(lib)
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.kanc_rational_forward.argtypes = [p, p, i64, i64, i64, i64, p, p, i32, i32, i32, i32]
    lib.kanc_rational_backward.argtypes = [p, p, p, i64, i64, i64, i64, i64, p, p, i32, i32, i32, p, p, i32]
    lib.kanc_rational_forward.restype = lib.kanc_rational_backward.restype = i32
