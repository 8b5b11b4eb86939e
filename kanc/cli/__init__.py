"""The ``kanc`` command line: convert, inspect, profile, tune, export.

Exit codes, the same in every command (kanc.errors.EXIT_CODES): 0 ok; 1 bad input or failed check (a one-line
reason on stderr); 2 usage; 3 nothing to convert; 130 interrupted (SIGINT), 143 terminated (SIGTERM).
Progress goes to stderr; ``--json`` puts machine-readable output on stdout. Tracebacks with KANC_DEBUG=1 (or --debug).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import sys
import traceback
import warnings

import click

from kanc import __version__
from kanc.errors import EXIT_INTERRUPTED, EXIT_OK, exit_code, one_line

# command name -> "module:attribute"; each command lives in its own module and loads on use.
_COMMANDS = {
    "convert": "kanc.cli.convert:convert",
    "inspect": "kanc.cli.convert:inspect_cmd",
    "profile": "kanc.cli.profile:profile_cmd",
    "tune": "kanc.cli.profile:tune_cmd",
    "export": "kanc.cli.export:export",
}


class _LazyGroup(click.Group):
    """Loads each subcommand's module only when it is called (keeps ``kanc --help`` fast)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = _COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(
    cls=_LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
)
@click.version_option(__version__, prog_name="kanc")
@click.option("--debug", is_flag=True, help="Show full tracebacks and library warnings (as KANC_DEBUG=1).")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """kanc: rewrite the MLP blocks of a PyTorch model into Kolmogorov-Arnold layers."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def main(argv: list[str] | None = None) -> None:
    """Console entry point: the failing policy (kanc.errors): one line on stderr, the exit code of its class."""
    args = list(argv if argv is not None else sys.argv[1:])
    debug = "--debug" in args or _debug_level() > 0
    if not sys.stderr.isatty():  # logs and pipes: no progress bars, ours or the libraries' (read when they import)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    with _quiet_libraries(debug), _terminate_as_exception():
        code = _run(args, debug)
    sys.exit(code)


def _run(args: list[str], debug: bool) -> int:
    try:
        cli.main(args=args, prog_name="kanc", standalone_mode=False)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:  # usage errors (exit 2) and click's own file errors
        e.show()
        return e.exit_code
    except (click.Abort, KeyboardInterrupt, _Terminated, Exception) as e:  # noqa: BLE001 - every failure is one line
        if debug:
            traceback.print_exc()
        click.echo(f"Error: {_reason(e)}", err=True)
        return _exit_code(e)
    return EXIT_OK


def _reason(e: BaseException) -> str:
    if isinstance(e, click.Abort):
        return "interrupted"
    return "terminated" if isinstance(e, _Terminated) else one_line(e)


def _exit_code(e: BaseException) -> int:
    if isinstance(e, _Terminated):
        return 128 + signal.SIGTERM
    return EXIT_INTERRUPTED if isinstance(e, click.Abort) else exit_code(e)


def _debug_level() -> int:
    try:
        return int(os.environ.get("KANC_DEBUG", "0") or 0)
    except ValueError:
        return 1


class _Terminated(BaseException):
    """SIGTERM, raised where the process is so that every write cleans up (kanc.writing)."""


@contextlib.contextmanager
def _terminate_as_exception():
    def handler(signum, frame):
        raise _Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _quiet_libraries(debug: bool):
    """Library warnings and log lines on stderr only with KANC_DEBUG: a failure must read as one line."""
    if debug:
        yield
        return
    loggers = [logging.getLogger(name) for name in ("torch", "transformers", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)
