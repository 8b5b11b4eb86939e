"""Environment variables read on the kernel-call hot path (KANC_KERNELS, TRITON_INTERPRET, KANC_AUTOTUNE, ...).

``os.environ.get`` of a variable that is not set raises and catches a KeyError inside ``os._Environ``: about 4 us a
read on a loaded machine, and each kernel call reads half a dozen of them. :func:`getenv` answers the same from
the mapping's own store without the exception; it sees every change made through ``os.environ`` (which is how
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
