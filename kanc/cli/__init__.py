"""The ``kanc`` command line: convert, inspect, profile, tune, export.

Exit codes: 0 ok; 1 error (one-line reason on stderr); 2 usage; 3 no MLP block found.
Progress goes to stderr; ``--json`` puts machine-readable output on stdout.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback

import click

from kanc import __version__

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
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """kanc: rewrite the MLP blocks of a PyTorch model into Kolmogorov-Arnold layers."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the group, turning expected failures into one-line errors."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    if not sys.stderr.isatty():  # logs and pipes: no progress bars, ours or the libraries' (read when they import)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        cli.main(args=argv, prog_name="kanc", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line unless --debug
        if debug:
            traceback.print_exc()
        code = getattr(e, "exit_code", 1)
        click.echo(f"Error: {_one_line(e)}", err=True)
        sys.exit(code if isinstance(code, int) else 1)
    sys.exit(0)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    msg = text[0] if text else type(e).__name__
    return msg if msg else type(e).__name__
