"""Placeholder; replaced by its owner."""

import click


@click.command("export")
def export() -> None:
    """(not yet implemented)"""
    raise click.ClickException("not implemented yet")
