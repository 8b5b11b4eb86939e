"""Kernel configs keyed on shapes, chosen by measurement and cached as JSON per device.

Each launcher asks :func:`pick_config` for a config of one kernel at one key (the shape bucket and
dtype it launches at). The answer is, in order:

1. the cached choice for (device, kernel, key), unless re-tuning is forced or it is stale (its fields are not
   those of the candidates: the kernel's tuning dimensions changed since it was cached);
2. when autotuning is on: every candidate timed with ``bench`` (CUDA: ``triton.testing.do_bench``;
   under ``TRITON_INTERPRET=1``: a CPU wall-clock timer), the fastest kept and written to the cache;
3. otherwise the first candidate (the launcher's heuristic default).

This replaces ``triton.autotune`` for kanc's kernels because its choices must persist across runs
(a second run starts tuned), be inspectable (``kanc tune`` reports them) and work under the
interpreter, where ``triton.autotune`` with several configs needs a GPU benchmarker.

A :func:`forced_config` block pins one kernel's config whatever the cache says (tests of ragged tiles,
benchmarks comparing configs).

Modes (``KANC_AUTOTUNE``): ``0`` never time, ``1`` time on a cache miss (default on CUDA), ``force``
re-time every key met (what ``kanc tune`` uses). Under the interpreter the default is ``0``: a run of
the interpreter costs ~1.5 ms per program, so timing there is only for tests of this module.
The cache lives in ``$KANC_CACHE_DIR/tuning/<device>.json`` (default ``~/.cache/kanc``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from kanc.env import getenv, interpreting
from kanc.timing import median_ms

CACHE_VERSION = 2  # 2: backward kernels gained ROWS_PER_PROGRAM; configs cached by version 1 lack it
MODES = ("0", "1", "force")
Config = dict[str, Any]
Key = tuple[Any, ...]

_mode_override: str | None = None
_forced: dict[str, Config] = {}
_caches: dict[str, TuningCache] = {}
_by_device: dict[tuple, TuningCache] = {}  # (device, KANC_CACHE_DIR, HOME) -> its cache: the per-launch lookup
_lock = threading.Lock()
_generation = 0  # bumped whenever a choice may change (mode, forced configs, cache contents): see :func:`state`


def cache_dir() -> Path:
    """Root of kanc's on-disk caches (``KANC_CACHE_DIR`` or ``~/.cache/kanc``)."""
    return Path(os.environ.get("KANC_CACHE_DIR") or Path.home() / ".cache" / "kanc")


def device_name(device: torch.device | str | None = None) -> str:
    """A stable name of the device a kernel runs on: the GPU's name and capability, or the CPU interpreter."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} sm{major}{minor}"
    return "cpu-interpreter"


def cache_path(device: torch.device | str | None = None) -> Path:
    """The JSON file holding the tuned configs of one device."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", device_name(device)).strip("_")
    return cache_dir() / "tuning" / f"{slug}.json"


def autotune_mode() -> str:
    """The active mode: ``set_autotune`` / :func:`autotuning` first, then ``KANC_AUTOTUNE``, then the default."""
    if _mode_override is not None:
        return _mode_override
    env = getenv("KANC_AUTOTUNE")
    if env is not None:
        if env not in MODES:
            raise ValueError(f"KANC_AUTOTUNE must be one of {', '.join(MODES)}, got {env!r}")
        return env
    return "0" if interpreting() else "1"


def set_autotune(mode: str | None) -> None:
    """Set the mode for this process (``None`` goes back to the environment)."""
    global _mode_override
    if mode is not None and mode not in MODES:
        raise ValueError(f"autotune mode must be one of {', '.join(MODES)}, got {mode!r}")
    _mode_override = mode
    _changed()


def _changed() -> None:
    global _generation
    _generation += 1


def state(environment: tuple) -> tuple | None:
    """What :func:`pick_config`'s answers depend on besides (kernel, key, candidates), given ``environment`` (a
    snapshot, ``env.snapshot``, that starts with STATE_VARIABLES): launchers that cache their launch plans per shape
    key them on it. None in ``force`` mode, where every call re-times (nothing to cache).

    The generation counts every change made through this module (mode, :func:`forced_config`, a new cached choice,
    :func:`clear_memory_caches`); the environment variables that choose the mode and the cache file are in the
    snapshot (a bad KANC_AUTOTUNE is reported when a plan is built, by :func:`autotune_mode`).
    """
    mode = _mode_override if _mode_override is not None else environment[0]
    if mode == "force":
        return None
    return _generation, _mode_override


STATE_VARIABLES = ("KANC_AUTOTUNE", "KANC_CACHE_DIR", "HOME", "TRITON_INTERPRET")


@contextlib.contextmanager
def autotuning(mode: str = "force") -> Iterator[None]:
    """Run a block with the given autotune mode, restoring the previous one after."""
    global _mode_override
    previous = _mode_override
    set_autotune(mode)
    try:
        yield
    finally:
        _mode_override = previous
        _changed()


@contextlib.contextmanager
def forced_config(kernel: str, config: Config) -> Iterator[None]:
    """Launch ``kernel`` with ``config`` inside the block (no timing, no cache write), restoring after."""
    previous = _forced.get(kernel)
    _forced[kernel] = dict(config)
    _changed()
    try:
        yield
    finally:
        if previous is None:
            del _forced[kernel]
        else:
            _forced[kernel] = previous
        _changed()


class TuningCache:
    """The tuned configs of one device: ``{kernel: {key: {"config": {...}, "timings_ms": [...]}}}`` on disk."""

    def __init__(self, path: Path, device: str) -> None:
        self.path, self.device = path, device
        self.entries: dict[str, dict[str, dict[str, Any]]] = {}
        self._hits: dict[tuple, Config | None] = {}  # (kernel, key, fields) -> usable cached config: per-launch lookup
        self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return  # no cache yet, or an unreadable one: start empty, the next save replaces it
        if isinstance(data, dict) and data.get("version") == CACHE_VERSION and isinstance(data.get("kernels"), dict):
            self.entries = data["kernels"]

    def get(self, kernel: str, key: Key) -> Config | None:
        entry = self.entries.get(kernel, {}).get(_key_text(key))
        return dict(entry["config"]) if entry else None

    def usable(self, kernel: str, key: Key, fields: Sequence[str]) -> Config | None:
        """The cached config of ``kernel`` at ``key`` if it has exactly ``fields`` (else it is stale: a miss);
        memoised until the next :meth:`put`."""
        memo = (kernel, key, tuple(fields))
        if memo not in self._hits:
            cached = self.get(kernel, key)
            self._hits[memo] = cached if cached is not None and set(cached) == set(fields) else None
        found = self._hits[memo]
        return dict(found) if found is not None else None

    def put(self, kernel: str, key: Key, config: Config, timings_ms: Sequence[float] | None = None) -> None:
        self._hits.clear()
        _changed()
        record: dict[str, Any] = {"config": dict(config)}
        if timings_ms is not None:
            record["timings_ms"] = [float(t) for t in timings_ms]
        self.entries.setdefault(kernel, {})[_key_text(key)] = record

    def save(self) -> None:
        """Write through kanc.writing (atomic; locked, so a concurrent tuner of the same device waits, and the entries
        it saved meanwhile are merged in rather than lost)."""
        from kanc.writing import write_file

        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_file(self.path, self._write_merged, force=True, wait=30.0)

    def _write_merged(self, tmp: Path) -> None:
        saved = TuningCache(self.path, self.device)  # read under the writer's lock: saved by others since our load
        for kernel, entries in saved.entries.items():
            self.entries[kernel] = {**entries, **self.entries.get(kernel, {})}
        payload = {"version": CACHE_VERSION, "device": self.device, "kernels": self.entries}
        tmp.write_text(json.dumps(payload, indent=1, sort_keys=True), encoding="utf-8")


def get_cache(device: torch.device | str | None = None) -> TuningCache:
    """The (process-wide, lazily loaded) cache of one device.

    Looked up per launch: a dict hit keyed by the device and the environment that names the file (no path built,
    no device query), the file path resolved on a miss only.
    """
    key = (_device_key(device), getenv("KANC_CACHE_DIR"), getenv("HOME"))
    cache = _by_device.get(key)
    if cache is None:
        path = cache_path(device)
        with _lock:
            cache = _caches.get(str(path))
            if cache is None:
                cache = _caches[str(path)] = TuningCache(path, device_name(device))
            _by_device[key] = cache
    return cache


def _device_key(device: torch.device | str | None) -> tuple:
    if isinstance(device, torch.device):
        return (device.type, device.index)
    return (device,)


def clear_memory_caches() -> None:
    """Forget the loaded caches (the next lookup reads the files again); for tests and ``kanc tune``."""
    with _lock:
        _caches.clear()
        _by_device.clear()
        _changed()


def pick_config(
    kernel: str,
    key: Key,
    candidates: Sequence[Config],
    bench: Callable[[Config], float] | None,
    device: torch.device | str | None = None,
) -> Config:
    """The config to launch ``kernel`` with at ``key`` (see the module docstring for the order of choice).

    ``bench(config)`` returns a time in ms for one config, or raises for a config that does not fit the device
    (too many registers or too much shared memory): such configs are skipped.
    """
    if kernel in _forced:
        return dict(_forced[kernel])
    if not candidates:
        raise ValueError(f"no candidate configs for kernel {kernel!r}")
    mode = autotune_mode()
    cache = get_cache(device)
    if mode != "force":
        cached = cache.usable(kernel, key, candidates[0])  # other fields: the tuning dimensions changed, a miss
        if cached is not None:
            return cached
    if mode == "0" or bench is None:
        return dict(candidates[0])
    best, timings = _time_candidates(candidates, bench)
    with _lock:
        cache.put(kernel, key, best, timings)
        cache.save()
    return dict(best)


def _time_candidates(candidates: Sequence[Config], bench: Callable[[Config], float]) -> tuple[Config, list[float]]:
    timings = []
    for config in candidates:
        try:
            timings.append(float(bench(config)))
        except Exception:  # noqa: BLE001 - out of resources / compile failure: this config cannot run here
            timings.append(float("inf"))
    best = min(range(len(candidates)), key=timings.__getitem__)
    if timings[best] == float("inf"):
        raise RuntimeError("no candidate config could run on this device")
    return dict(candidates[best]), timings


def cpu_bench(fn: Callable[[], Any], warmup: int = 1, reps: int = 3) -> float:
    """Median wall-clock time of ``fn()`` in ms: the benchmarker under the interpreter (no GPU events)."""
    return median_ms(fn, reps=reps, warmup=warmup)


def _key_text(key: Key) -> str:
    """JSON object keys are strings: ``(1024, 768, 'torch.bfloat16')`` -> ``"1024,768,torch.bfloat16"``."""
    return ",".join(str(k) for k in key)
