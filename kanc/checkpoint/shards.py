"""Safetensors checkpoints read and written tensor by tensor: a whole shard is never held in memory.

``CheckpointReader`` reads the tensors a ``save_pretrained`` folder holds (one ``model.safetensors``, or shards
listed by ``model.safetensors.index.json``), a few at a time, through safetensors' lazy ``safe_open``: a tensor
is a view of the mapped file, its pages read when first touched and let go with the tensor, so what stays resident
is the tensors in use, not the shard.

``ShardWriter`` writes tensors into shards as they come: each shard file starts with a fixed space for its header
(the format allows the JSON header to be padded with spaces), the tensor bytes are written after it, and the header
is filled in when the shard closes. The file operations run in order on one background thread, so the caller
computes the next layer while the last one is written; at most ``in_flight`` bytes wait to be written (what the
writer holds beyond the caller's own tensors). Disk: each byte written once.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import sys
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from kanc.errors import KancError, first_line
from kanc.text import first_names as _names

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HEADER_SPACE = 256 * 2**10  # bytes reserved per shard for its JSON header (~2,000 tensor entries)
DEFAULT_SHARD_SIZE = "5GB"
IN_FLIGHT = 512 * 2**20  # bytes queued for the background writes at most
SYNC_EVERY = 128 * 2**20  # bytes written between two fdatasyncs of a shard (ShardWriter._write)
# Written bytes on disk are dropped from the page cache (ShardWriter._write): the next ones then reuse those pages.
# Measured on this project's CPU machine (a VM, 24 GB, most of it free), 3 GB written in 26 MB pieces, fdatasync
# every 128 MB: 7.1 s (5.8 s of it the kernel copying into new page-cache pages) kept, 2.1 s dropped (0.9 s).
DROP_WRITTEN = hasattr(os, "posix_fadvise")

DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip
_ITEMSIZE = {code: torch.empty(0, dtype=dt).element_size() for dt, code in DTYPES.items()}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes from ``5_000_000``, ``"5GB"``, ``"500MiB"`` (the units ``save_pretrained`` takes); KancError if bad."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
        if match is None or match.group(2).upper() not in _UNITS:
            raise KancError(f"bad size {size!r}: use bytes or a number with a unit (e.g. '5GB', '500MiB')")
        value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value < 1:
        raise KancError(f"bad size {size!r}: must be at least 1 byte")
    return value


# ---- reading ----------------------------------------------------------------------------------------------------


class CheckpointReader:
    """The safetensors weights of a ``save_pretrained`` folder, read a few tensors at a time.

    Construction reads only the index and the shard headers, and checks them: every shard the index names is a
    plain file inside the folder, and holds the tensors the index says it does.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.shard_of = _weight_map(self.folder)
        self.files = sorted(set(self.shard_of.values()))
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for name in self.files:
            self._read_header(name)
        missing = [k for k, f in self.shard_of.items() if k not in self.shapes]
        if missing:
            raise KancError(f"{self.folder / INDEX_FILE} lists tensors its shards do not hold: {_names(missing)}")

    def keys(self) -> list[str]:
        return list(self.shard_of)

    def nbytes(self, names: Iterable[str] | None = None) -> int:
        """Bytes the tensors ``names`` (default: all) take on disk."""
        names = self.keys() if names is None else names
        return sum(math.prod(self.shapes[n]) * _ITEMSIZE[self.dtypes[n]] for n in names)

    def largest_shard(self) -> int:
        return max((self.folder / f).stat().st_size for f in self.files)

    def read(self, names: Iterable[str]) -> dict[str, Tensor]:
        """The tensors ``names`` (on the CPU, in their stored dtype), each shard opened once and closed after."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self.shard_of:
                raise KancError(f"{self.folder} has no tensor {name!r}")
            by_file.setdefault(self.shard_of[name], []).append(name)
        out: dict[str, Tensor] = {}
        for file, wanted in by_file.items():
            out.update(self._read_file(file, wanted))
        return out

    def read_under(self, prefix: str, skip: Iterable[str] = ()) -> dict[str, Tensor]:
        """The tensors named ``prefix.*`` (a layer's), keyed by the rest of their names; those in ``skip`` left out."""
        start, skip = f"{prefix}.", set(skip)
        keys = [k for k in self.keys() if k.startswith(start) and k not in skip]
        return {k[len(start) :]: t for k, t in self.read(keys).items()}

    def _read_file(self, file: str, names: list[str]) -> dict[str, Tensor]:
        from safetensors import safe_open

        path = self.folder / file
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {name: f.get_tensor(name) for name in names}
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise KancError(f"{path} is truncated or corrupt ({first_line(e)})") from None

    def _read_header(self, file: str) -> None:
        path = self.folder / file
        header = read_header(path)
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if not isinstance(entry, dict) or entry.get("dtype") not in _ITEMSIZE or "shape" not in entry:
                raise KancError(f"{path} has a bad header entry for {name!r}")
            if self.shard_of.get(name) == file:
                self.shapes[name] = tuple(int(s) for s in entry["shape"])
                self.dtypes[name] = entry["dtype"]


class ReadAhead:
    """The next layer's tensors read, and their pages brought in, on a thread while the current layer computes.

    safetensors maps a shard lazily: a tensor's pages are read (from the page cache or the disk) when they are first
    touched, a fault per page. A 7B bf16 decoder layer's first touch took 0.25-0.33 s on this project's 2-core CPU
    machine, time its GEMMs wait for; on the thread it overlaps them. ``take(name, following)`` returns layer
    ``name``'s tensors (read ahead when ``name`` was the layer announced last, read now otherwise) and starts reading
    ``following``. An error reading ahead is raised by the ``take`` of that layer, as a read then would have.
    Memory: one more layer's pages, resident until that layer is taken and dropped.
    """

    def __init__(self, read: Callable[[str], dict[str, Tensor]]) -> None:
        self._read = read
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kanc-read-ahead")
        self._ahead: tuple[str, Future] | None = None

    def take(self, name: str, following: str | None) -> dict[str, Tensor]:
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == name:
            tensors = ahead[1].result()
        else:
            if ahead is not None:  # the model ran its layers in another order: that read is dropped
                ahead[1].cancel()
            tensors = self._read(name)
        if following is not None:
            self._ahead = (following, self._thread.submit(self._paged_in, following))
        return tensors

    def _paged_in(self, name: str) -> dict[str, Tensor]:
        tensors = self._read(name)
        for t in tensors.values():
            touch_pages(t)
        return tensors

    def close(self) -> None:
        """Drop what was read ahead; wait for the thread."""
        if self._ahead is not None:
            self._ahead[1].cancel()
            self._ahead = None
        self._thread.shutdown(wait=True)


def touch_pages(tensor: Tensor, page: int = 4096) -> None:
    """Read one byte of every memory page of a contiguous CPU tensor (a mapped tensor's pages come in)."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.numel() == 0:
        return
    flat = tensor.detach().reshape(-1).view(torch.uint8)
    flat[::page].sum()  # torch releases the GIL while it reads


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file; KancError when the file is not one."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = path.stat().st_size
            if len(head) < 8:
                raise ValueError("shorter than a header")
            (length,) = struct.unpack("<Q", head)
            if length > min(size - 8, 100 * 2**20):
                raise ValueError("header length past the end of the file")
            header = json.loads(f.read(length))
    except (OSError, ValueError) as e:
        raise KancError(f"{path} is not a safetensors file ({first_line(e)})") from None
    if not isinstance(header, dict):
        raise KancError(f"{path} is not a safetensors file (its header is not a JSON object)")
    return header


def _weight_map(folder: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from the index or the single weights file; shard names checked."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise KancError(f"{index} is not a safetensors index ({first_line(e)})") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise KancError(f"{index} has an empty or bad weight_map")
        for file in set(weight_map.values()):
            _check_shard_name(folder, file)
        return {str(k): str(v) for k, v in weight_map.items()}
    if (folder / SINGLE_FILE).is_file():
        header = read_header(folder / SINGLE_FILE)
        return {k: SINGLE_FILE for k in header if k != "__metadata__"}
    if any(folder.glob("pytorch_model*.bin")):
        raise KancError(
            f"{folder} holds pytorch_model*.bin weights: streaming conversion reads safetensors; re-save the model "
            "with save_pretrained(..., safe_serialization=True)"
        )
    raise KancError(f"{folder} has no safetensors weights ({SINGLE_FILE} or {INDEX_FILE})")


def _check_shard_name(folder: Path, file: object) -> None:
    """A shard named by an index must be a plain file directly inside ``folder`` (no paths, no links out)."""
    if not isinstance(file, str) or not file or Path(file).name != file or file in (".", ".."):
        raise KancError(f"{folder / INDEX_FILE} names a shard outside the folder: {file!r}")
    path = folder / file
    if not path.is_file():
        raise KancError(f"{folder / INDEX_FILE} names a shard that does not exist: {file}")


# ---- writing ----------------------------------------------------------------------------------------------------


class ShardWriter:
    """Write tensors into safetensors shards of at most ``max_shard_size`` bytes, one tensor at a time.

    ``add`` queues a tensor's bytes (the tensor must not change in place until ``finish``); ``finish`` waits for the
    writes, closes the last shard, names the shards like ``save_pretrained`` does (``model.safetensors``, or
    ``model-00001-of-00003.safetensors`` plus the index) and returns the weight map. A tensor larger than the shard
    size gets a shard of its own. A failed write is raised by the next ``add`` or by ``finish``; ``abort`` stops.
    """

    def __init__(
        self, folder: str | os.PathLike, max_shard_size: int | str = DEFAULT_SHARD_SIZE, in_flight: int = IN_FLIGHT
    ) -> None:
        if sys.byteorder != "little":
            raise KancError("safetensors files are little-endian: writing them on this machine is not supported")
        self.folder = Path(folder)
        self.max_bytes = parse_size(max_shard_size)
        self.in_flight = in_flight
        self.shards: list[dict[str, dict]] = []  # per shard: name -> header entry
        self.total = 0
        self._file = None  # used by the background thread only
        self._unsynced = 0  # bytes written to ``_file`` since its last fdatasync (background thread only)
        self._synced = 0  # bytes of ``_file`` on disk (from the start; background thread only)
        self._dropping = True  # whether the file system takes DROP_WRITTEN's advice (background thread only)
        self._is_open = False
        self._offset = 0
        self._header_bytes = 0
        self._names: set[str] = set()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kanc-shards")
        self._pending: deque[tuple[Future, int]] = deque()
        self._queued = 0

    def add(self, name: str, tensor: Tensor) -> None:
        """Append ``tensor`` under ``name`` (a new shard first when this one would pass the size limit)."""
        entry = self._entry(name, tensor)
        nbytes = entry["data_offsets"][1]
        grow = len(json.dumps({name: entry})) + 8  # the entry with its final offsets, a comma and some slack
        if self._is_open and self._offset > 0:
            if self._offset + nbytes > self.max_bytes or self._header_bytes + grow > HEADER_SPACE:
                self._close()
        if not self._is_open:
            self._open()
        entry["data_offsets"] = [self._offset, self._offset + nbytes]
        data = _raw_bytes(tensor)  # holds the tensor until it is written
        self._submit(lambda: self._write(data), nbytes)
        self.shards[-1][name] = entry
        self._names.add(name)
        self._offset += nbytes
        self._header_bytes += grow
        self.total += nbytes

    def finish(self) -> dict[str, str]:
        """Close the last shard, give the shards their final names, write the index; tensor name -> file name."""
        self._close()
        self._drain(0)
        self._pool.shutdown()
        if not self.shards:
            raise KancError("no tensors were written")
        count = len(self.shards)
        names = [SINGLE_FILE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        weight_map = {}
        for i, (shard, final) in enumerate(zip(self.shards, names)):
            os.replace(self._part(i), self.folder / final)
            weight_map.update(dict.fromkeys(shard, final))
        if count > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return weight_map

    def abort(self) -> None:
        """Stop: drop the queued writes, wait for the one running, close the open file (the caller removes the
        folder). Safe to call after ``finish``."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()
        self._queued = 0
        if self._file is not None:
            self._file.close()
            self._file = None
        self._is_open = False

    def _submit(self, job: Callable[[], object], nbytes: int = 0) -> None:
        """Queue a file operation (they run in order); first wait until the queue holds room for ``nbytes``."""
        self._drain(max(self.in_flight - nbytes, 0))
        self._pending.append((self._pool.submit(job), nbytes))
        self._queued += nbytes

    def _drain(self, limit: int) -> None:
        """Wait for the oldest queued operations until at most ``limit`` bytes wait; raise the first failure."""
        while self._pending and (self._queued > limit or self._pending[0][0].done()):
            future, nbytes = self._pending.popleft()
            self._queued -= nbytes
            future.result()

    def _entry(self, name: str, tensor: Tensor) -> dict:
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise KancError(f"bad tensor name {name!r}")
        if name in self._names:
            raise KancError(f"tensor {name!r} written twice")
        if not isinstance(tensor, Tensor) or tensor.is_meta or tensor.layout != torch.strided:
            raise KancError(f"tensor {name!r} has no data to write ({_describe(tensor)})")
        if tensor.dtype not in DTYPES:
            raise KancError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
        nbytes = tensor.numel() * tensor.element_size()
        return {"dtype": DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [0, nbytes]}

    def _part(self, i: int) -> Path:
        return self.folder / f"model-{i + 1:05d}.safetensors.part"

    def _open(self) -> None:
        self.shards.append({})
        path = self._part(len(self.shards) - 1)
        self._submit(lambda: self._open_file(path))
        self._is_open = True
        self._offset = 0
        self._header_bytes = len(json.dumps({"__metadata__": {"format": "pt"}}))

    def _open_file(self, path: Path) -> None:
        self._file = open(path, "wb")  # noqa: SIM115 - closed in _close_file
        self._file.write(b"\0" * (8 + HEADER_SPACE))
        self._unsynced, self._synced = 0, 8 + HEADER_SPACE  # the header is written (and dropped) at the close

    def _close(self) -> None:
        if not self._is_open:
            return
        header = {"__metadata__": {"format": "pt"}, **self.shards[-1]}
        text = json.dumps(header, separators=(",", ":")).encode()
        if len(text) > HEADER_SPACE:  # _header_bytes over-estimates the entries, so this cannot happen
            raise KancError(f"internal error: a shard header of {len(text)} bytes does not fit its reserved space")
        self._submit(lambda: self._close_file(struct.pack("<Q", HEADER_SPACE) + text.ljust(HEADER_SPACE, b" ")))
        self._is_open = False

    def _write(self, data: memoryview) -> None:
        """Append ``data``; every SYNC_EVERY bytes, flush the file to disk and drop what is on disk from the page
        cache. kanc.writing fsyncs the finished folder before publishing it; flushing as the shards grow, in this
        thread, overlaps that disk time with the conversion instead of paying it all at the end (1.7 s of a 1.4 GB
        GPT-2 medium's 15 s). Dropping the flushed pages (clean by then) lets the next writes reuse them instead of
        filling memory with an output nobody reads back during the run (DROP_WRITTEN)."""
        self._file.write(data)
        self._unsynced += len(data)
        if self._unsynced >= SYNC_EVERY:
            self._file.flush()
            os.fdatasync(self._file.fileno())
            self._drop(self._synced, self._unsynced)
            self._synced += self._unsynced
            self._unsynced = 0

    def _drop(self, start: int, length: int) -> None:
        """Drop bytes ``start`` to ``start + length`` of the open file, on disk by now, from the page cache. Advice
        only: a file system that refuses it (an error) is not asked again, and the bytes stay written."""
        if DROP_WRITTEN and self._dropping:
            try:
                os.posix_fadvise(self._file.fileno(), start, length, os.POSIX_FADV_DONTNEED)
            except OSError:
                self._dropping = False

    def _close_file(self, head: bytes) -> None:
        self._file.seek(0)
        self._file.write(head)
        self._file.flush()
        os.fsync(self._file.fileno())  # a finished shard: on disk while the next ones are converted
        self._drop(0, 0)  # the whole shard (0: to its end)
        self._file.close()
        self._file = None
        self._unsynced = self._synced = 0


def _raw_bytes(tensor: Tensor) -> memoryview:
    """The tensor's bytes in row-major order (a view when it is already contiguous on the CPU)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _describe(tensor: object) -> str:
    if not isinstance(tensor, Tensor):
        return type(tensor).__name__
    return "a meta tensor" if tensor.is_meta else f"layout {tensor.layout}"
