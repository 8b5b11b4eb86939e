"""Errors kanc raises on purpose; the CLI prints them as one line and exits 1."""


class KancError(Exception):
    """A user-facing failure with a one-line reason (bad file, bad option, unsupported model)."""

    exit_code = 1


class CheckFailedError(KancError):
    """A check of the result failed (the fidelity of a conversion): exit 1."""

    exit_code = 1


class NoMLPFoundError(KancError):
    """The model has no MLP block kanc can convert (a soft failure: exit code 3)."""

    exit_code = 3
