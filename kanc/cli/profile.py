"""Placeholder; replaced by its owner."""

import click


@click.command("profile")
def profile_cmd() -> None:
    """(not yet implemented)"""
    raise click.ClickException("not implemented yet")


@click.command("tune")
def tune_cmd() -> None:
    """(not yet implemented)"""
    raise click.ClickException("not implemented yet")
