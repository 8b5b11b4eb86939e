"""What the trust tests share: the CLI run in-process or in a subprocess, and its one error line. Not a conftest.py:
pytest would register it as the module ``conftest``, and the runtime tests pickle classes their own conftest defines
under that name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """``kanc ARGV`` in this process: (exit code, stdout, stderr)."""
    from kanc.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def run_subprocess(*argv, stdin: str | None = None, env: dict | None = None, cwd=None, timeout=300):
    """``python -m kanc ARGV`` in a fresh process (what a user runs): the CompletedProcess."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT)}
    full_env.pop("KANC_DEBUG", None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "kanc", *map(str, argv)],
        input=stdin,
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
    )


def one_error_line(err: str) -> str:
    """The single ``Error:`` line of a failed command (progress lines may precede it); fails if there are more."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "Traceback" not in err, err
    return errors[0]
