"""kanc's environment variables, read in one place: ``KANC_DEBUG`` levels and Triton's interpreter switch.

``KANC_DEBUG`` levels (docs/style.md item 8): 1 lists the passes with their hit counts and says each kernel fallback
once, 2 also prints every changed graph, 3 also prints each kernel's Triton source and chosen configs.

Some of these are read on the kernel-call hot path. ``os.environ.get`` of a variable that is not set raises and
catches a KeyError inside ``os._Environ`` (about 4 us a read on a loaded machine); :func:`getenv` answers the same
from the mapping's own store without the exception, and sees every change made through ``os.environ`` (which is how
Python code and pytest's monkeypatch set variables).
"""

from __future__ import annotations

import os

_environ = os.environ
_data = getattr(_environ, "_data", None)
_encodekey = getattr(_environ, "encodekey", None)
_decodevalue = getattr(_environ, "decodevalue", None)
_encoded: dict[str, object] = {}


def getenv(name: str, default: str | None = None) -> str | None:
    """``os.environ.get(name, default)``, without the exception when ``name`` is not set."""
    if _data is None or _encodekey is None or _decodevalue is None:  # not CPython's os._Environ
        return _environ.get(name, default)
    key = _encoded.get(name)
    if key is None:
        key = _encoded[name] = _encodekey(name)
    value = _data.get(key)
    return default if value is None else _decodevalue(value)


def snapshot(names: tuple[str, ...]) -> tuple:
    """The raw values of ``names`` (None where unset), to compare with a later snapshot: one call for several
    variables (launch plans key on the variables that choose a config)."""
    if _data is None or _encodekey is None:
        return tuple(_environ.get(name) for name in names)
    keys = _encoded_keys.get(names)
    if keys is None:
        keys = _encoded_keys[names] = tuple(_encodekey(name) for name in names)
    get = _data.get
    return tuple([get(key) for key in keys])


_encoded_keys: dict[tuple[str, ...], tuple] = {}


def debug_level() -> int:
    """``KANC_DEBUG`` as a level: 0 when unset or empty, 1 for a value that is not a number.

    A value that is not a number (``KANC_DEBUG=yes``, ``=true``) was set to ask for debugging: it reads as level 1,
    the level that shows tracebacks and lists the passes, never as 0 (which would ignore the request in silence).
    """
    text = (getenv("KANC_DEBUG") or "").strip()
    if not text:
        return 0
    try:
        return int(text)
    except ValueError:
        return 1


def interpreting() -> bool:
    """Whether Triton's CPU interpreter is requested (``TRITON_INTERPRET=1``): Triton kernels then run on CPU
    tensors, slowly; it must be set before triton is first imported."""
    return getenv("TRITON_INTERPRET", "0") == "1"
