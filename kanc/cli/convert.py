"""Placeholder; replaced by its owner."""

import click


@click.command("convert")
def convert() -> None:
    """(not yet implemented)"""
    raise click.ClickException("not implemented yet")


@click.command("inspect")
def inspect_cmd() -> None:
    """(not yet implemented)"""
    raise click.ClickException("not implemented yet")
