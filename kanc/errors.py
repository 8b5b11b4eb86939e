"""The failing policy: the errors kanc raises on purpose, the one exit-code table, and how a failure reads.

Every command and the Python API fail the same way: one line that names the file and a cause the user can act on,
and the exit code of its class (``EXIT_CODES``). The CLI prints ``Error: <one_line(e)>`` and exits with
``exit_code(e)``; a traceback only with ``KANC_DEBUG`` set (or ``--debug``).
"""

from __future__ import annotations

import errno
import os
import re

EXIT_OK = 0
EXIT_FAILED = 1  # bad input, a refused file, or a failed check
EXIT_USAGE = 2  # the command line itself is wrong
EXIT_NOTHING = 3  # nothing to convert
EXIT_INTERRUPTED = 130  # SIGINT (128 + 2); SIGTERM exits 143
EXIT_CODES = {
    EXIT_OK: "ok",
    EXIT_FAILED: "bad input or failed check",
    EXIT_USAGE: "usage",
    EXIT_NOTHING: "nothing to convert",
    EXIT_INTERRUPTED: "interrupted",
}


class KancError(Exception):
    """A user-facing failure with a one-line reason (bad file, bad option, unsupported model): exit 1."""

    exit_code = EXIT_FAILED


class CheckFailedError(KancError):
    """A check of the result failed (fidelity of a conversion, onnxruntime against PyTorch): exit 1."""

    exit_code = EXIT_FAILED


class UsageError(KancError):
    """The arguments contradict each other or miss something only known once the model is read: exit 2."""

    exit_code = EXIT_USAGE


class NoMLPFoundError(KancError):
    """The model has no MLP block kanc can convert (a soft failure: exit code 3)."""

    exit_code = EXIT_NOTHING


def exit_code(e: BaseException) -> int:
    """The exit code of a failure: its class's for kanc's errors, 130 for an interrupt, otherwise 1."""
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    code = getattr(e, "exit_code", EXIT_FAILED) if isinstance(e, KancError) else EXIT_FAILED
    return code if isinstance(code, int) else EXIT_FAILED


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with control characters escaped (a file name holding a newline or a terminal escape stays one line)."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), text).replace("\n", "\\n")


def one_line(e: BaseException) -> str:
    """The reason of ``e`` as one printable line: kanc's own messages whole (a file name in them may hold a newline),
    another exception's first non-empty line after its class name."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    if isinstance(e, KancError):
        return printable(str(e).strip()) or type(e).__name__
    return f"{type(e).__name__}: {first_line(e)}" if str(e).strip() else type(e).__name__


def first_line(e: BaseException | str, limit: int | None = None, prefer: str | None = None) -> str:
    """The first non-empty line of ``e`` (an exception's message, or a tool's output), stripped and printable; an
    exception with no message gives its class name, empty text ``"no output"``. Cut to ``limit`` characters.

    ``prefer``: the first line that holds this word (any case) where one does (``"error"`` skips a compiler's
    warnings)."""
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    if prefer is not None:
        lines = [s for s in lines if prefer.lower() in s.lower()] or lines
    line = printable(lines[0]) if lines else (type(e).__name__ if isinstance(e, BaseException) else "no output")
    return line if limit is None or len(line) <= limit else line[: limit - 3] + "..."


# errno -> what the user can do about it
_OS_CAUSES = {
    errno.ENOSPC: "no space left on the device: free some space or write elsewhere",
    errno.EDQUOT: "disk quota exceeded: free some space or write elsewhere",
    errno.EFBIG: "file size limit reached (ulimit -f): raise the limit or write a smaller model",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system: write elsewhere",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "a part of the path is not a directory",
    errno.EISDIR: "is a directory",
    errno.ENAMETOOLONG: "file name too long",
    errno.ELOOP: "too many levels of symbolic links",
    errno.EIO: "input/output error (a failing disk or network file system)",
}


def os_cause(e: OSError) -> str:
    """The cause of an OS error in words a user can act on."""
    return _OS_CAUSES.get(e.errno, e.strerror or type(e).__name__)


def os_error(e: OSError, path: str | os.PathLike, doing: str) -> KancError:
    """A KancError for an OS error met while ``doing`` ("cannot write", "cannot read") ``path``."""
    return KancError(f"{doing} {os.fspath(path)}: {os_cause(e)}")
