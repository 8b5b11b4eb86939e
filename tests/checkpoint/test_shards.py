"""The tensor-by-tensor safetensors writer and the lazy reader: round trips, shard splits, refusals."""

import json
import os
import struct
import threading

import pytest
import torch
from safetensors.torch import load_file

from kanc.checkpoint import shards
from kanc.checkpoint.shards import INDEX_FILE, SINGLE_FILE, CheckpointReader, ShardWriter, parse_size
from kanc.errors import KancError


def _tensors():
    gen = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(45, 65, generator=gen),
        "bf16": torch.randn(7, 3, generator=gen).bfloat16(),
        "f16": torch.randn(11, generator=gen).half(),
        "f64": torch.randn(2, 2, generator=gen).double(),
        "i64": torch.arange(9).reshape(3, 3),
        "u8": torch.arange(5, dtype=torch.uint8),
        "u32": torch.arange(5).to(torch.uint32),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "transposed": torch.randn(3, 5, generator=gen).t(),  # not contiguous
        "f8": torch.randn(6, generator=gen).to(torch.float8_e4m3fn),
    }


def test_round_trip_through_safetensors_and_the_reader(tmp_path):
    tensors = _tensors()
    writer = ShardWriter(tmp_path, 10**9)
    for name, t in tensors.items():
        writer.add(name, t)
    assert writer.finish() == dict.fromkeys(tensors, SINGLE_FILE)
    assert sorted(p.name for p in tmp_path.iterdir()) == [SINGLE_FILE]
    loaded = load_file(tmp_path / SINGLE_FILE)
    reader = CheckpointReader(tmp_path)
    read = reader.read(reader.keys())
    for name, t in tensors.items():
        for got in (loaded[name], read[name]):
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name
    assert reader.nbytes() == sum(t.numel() * t.element_size() for t in tensors.values())


def test_shards_split_at_the_size_limit_and_the_index_lists_them(tmp_path):
    writer = ShardWriter(tmp_path, 1000)
    sizes = {"a": 200, "b": 200, "c": 50, "big": 600, "d": 10}  # float32 elements
    for name, n in sizes.items():
        writer.add(name, torch.full((n,), float(n)))
    weight_map = writer.finish()
    names = ["model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors"]
    names += ["model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors"]
    # a: 800 B; b would pass 1000; b + c = 1000 fits; big (2400 B) alone, over the limit; d after it
    assert weight_map == {"a": names[0], "b": names[1], "c": names[1], "big": names[2], "d": names[3]}
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index == {"metadata": {"total_size": 4240}, "weight_map": dict(sorted(weight_map.items()))}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names, INDEX_FILE])
    reader = CheckpointReader(tmp_path)
    assert {k: float(v[0]) for k, v in reader.read(["d", "big"]).items()} == {"d": 10.0, "big": 600.0}


def test_a_full_header_starts_a_new_shard(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "HEADER_SPACE", 400)
    writer = ShardWriter(tmp_path, 10**9)
    for i in range(12):
        writer.add(f"layer.{i}.weight", torch.ones(2))
    weight_map = writer.finish()
    assert len(set(weight_map.values())) > 1
    for file in set(weight_map.values()):
        raw = (tmp_path / file).read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        assert length == 400 and raw[8:9] == b"{" and raw[8 + length - 1 : 8 + length] == b" "
        assert set(load_file(tmp_path / file)) == {k for k, f in weight_map.items() if f == file}


@pytest.mark.parametrize(
    ("name", "tensor", "message"),
    [
        ("", torch.ones(1), "bad tensor name"),
        ("__metadata__", torch.ones(1), "bad tensor name"),
        ("m", torch.ones(1, device="meta"), "a meta tensor"),
        ("s", torch.ones(2).to_sparse(), "layout"),
        ("c", torch.ones(2, dtype=torch.complex64), "cannot store"),
    ],
)
def test_tensors_it_cannot_write_are_named(tmp_path, name, tensor, message):
    with pytest.raises(KancError, match=message):
        ShardWriter(tmp_path).add(name, tensor)


def test_a_name_written_twice_is_an_error(tmp_path):
    writer = ShardWriter(tmp_path)
    writer.add("x", torch.ones(1))
    with pytest.raises(KancError, match="written twice"):
        writer.add("x", torch.ones(1))
    writer.abort()


@pytest.mark.parametrize(
    ("size", "value"), [(1234, 1234), ("5GB", 5 * 10**9), ("500MiB", 500 * 2**20), ("40KB", 40_000), ("1.5kb", 1500)]
)
def test_sizes_read_like_save_pretrained(size, value):
    assert parse_size(size) == value


@pytest.mark.parametrize("size", ["lots", "5 parsecs", 0, "-1GB", True])
def test_bad_sizes_are_refused(size):
    with pytest.raises(KancError, match="bad size"):
        parse_size(size)


def test_the_reader_checks_the_index_against_the_shards(tmp_path):
    writer = ShardWriter(tmp_path, 10)
    writer.add("a", torch.ones(4))
    writer.add("b", torch.ones(4))
    writer.finish()
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    index["weight_map"]["a"] = index["weight_map"]["b"]
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(KancError, match="lists tensors its shards do not hold: a"):
        CheckpointReader(tmp_path)
    index["weight_map"]["a"] = "missing.safetensors"
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(KancError, match="names a shard that does not exist"):
        CheckpointReader(tmp_path)


@pytest.mark.parametrize("raw", [b"", b"\x01\x02", struct.pack("<Q", 10**6) + b"{}", struct.pack("<Q", 2) + b"[]"])
def test_files_that_are_not_safetensors_are_refused(tmp_path, raw):
    (tmp_path / SINGLE_FILE).write_bytes(raw)
    with pytest.raises(KancError, match="is not a safetensors file"):
        CheckpointReader(tmp_path)


class _GatedFile:
    """A file whose data writes wait for ``gate`` (a disk that is slower than the conversion), recording them."""

    def __init__(self, f, gate, log):
        self.f, self.gate, self.log = f, gate, log

    def write(self, data):
        if len(data) > 1000:  # tensor data, not the header space
            assert self.gate.wait(10)
            self.log.append(len(data))
        return self.f.write(data)

    def seek(self, *a):
        return self.f.seek(*a)

    def flush(self):
        return self.f.flush()

    def fileno(self):
        return self.f.fileno()

    def close(self):
        return self.f.close()


def test_writes_run_behind_the_caller_with_at_most_in_flight_bytes_queued(tmp_path, monkeypatch):
    import threading

    gate, log = threading.Event(), []
    real_open = ShardWriter._open_file

    def gated_open(self, path):
        real_open(self, path)
        self._file = _GatedFile(self._file, gate, log)

    monkeypatch.setattr(ShardWriter, "_open_file", gated_open)
    writer = ShardWriter(tmp_path, 10**9, in_flight=10_000)
    tensors = {f"t{i}": torch.full((1000,), float(i)) for i in range(5)}  # 4,000 bytes each
    names = list(tensors)
    for name in names[:2]:  # the disk is blocked: both return at once, queued
        writer.add(name, tensors[name])
    assert writer._queued == 8000 and log == []
    third = threading.Thread(target=writer.add, args=(names[2], tensors[names[2]]))
    third.start()
    third.join(0.3)
    assert third.is_alive()  # 12,000 bytes would be queued: it waits for the disk
    gate.set()
    third.join(10)
    assert not third.is_alive() and writer._queued <= 10_000
    for name in names[3:]:
        writer.add(name, tensors[name])
        assert writer._queued <= 10_000
    writer.finish()
    assert log[:5] == [4000] * 5
    loaded = load_file(tmp_path / SINGLE_FILE)
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())


def test_a_failed_background_write_is_raised_and_abort_closes_the_file(tmp_path, monkeypatch):
    import errno

    def full_disk(data):
        raise OSError(errno.ENOSPC, "No space left on device")

    real_open = ShardWriter._open_file

    def failing_open(self, path):
        real_open(self, path)
        monkeypatch.setattr(self._file, "write", full_disk)

    monkeypatch.setattr(ShardWriter, "_open_file", failing_open)
    writer = ShardWriter(tmp_path, 10**9)
    writer.add("a", torch.ones(10))
    with pytest.raises(OSError, match="No space left"):
        writer.finish()
    writer.abort()
    assert writer._file is None


def write_two_shards(folder) -> dict:
    """Eight 4,000-byte tensors through a writer whose shards hold five: two shards; the tensors."""
    writer = ShardWriter(folder, 20_000)
    tensors = {f"t{i}": torch.full((1000,), float(i)) for i in range(8)}
    for name, t in tensors.items():
        writer.add(name, t)
    writer.finish()
    return tensors


def assert_two_shards_hold(folder, tensors: dict) -> None:
    merged = {
        **load_file(folder / "model-00001-of-00002.safetensors"),
        **load_file(folder / "model-00002-of-00002.safetensors"),
    }
    assert merged.keys() == tensors.keys()
    assert all(torch.equal(merged[n], t) for n, t in tensors.items())


def test_shards_are_flushed_to_disk_as_they_grow_and_when_closed(tmp_path, monkeypatch):
    """The writer thread fdatasyncs every SYNC_EVERY bytes and fsyncs each shard it closes, so kanc.writing's fsync
    before publishing finds little left to write."""
    from kanc.checkpoint import shards

    synced = []
    monkeypatch.setattr(shards, "SYNC_EVERY", 10_000)
    monkeypatch.setattr(shards.os, "fdatasync", lambda fd: synced.append(("data", fd)))
    monkeypatch.setattr(shards.os, "fsync", lambda fd: synced.append(("all", fd)))
    tensors = write_two_shards(tmp_path)
    kinds = [k for k, _ in synced]
    # shard 1 (five tensors) passes 10,000 unsynced bytes at its third, shard 2 (three) at its third; each closes
    assert kinds == ["data", "all", "data", "all"]
    assert_two_shards_hold(tmp_path, tensors)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise on this platform")
def test_bytes_on_disk_are_dropped_from_the_page_cache_once_synced(tmp_path, monkeypatch):
    """Each fdatasync is followed by dropping the range it made durable, and each closed shard by dropping the whole
    file: the ranges follow each other from the end of the header, and the files read back intact."""
    from kanc.checkpoint import shards

    calls = []
    monkeypatch.setattr(shards, "SYNC_EVERY", 10_000)
    monkeypatch.setattr(shards, "DROP_WRITTEN", True)
    real_sync = shards.os.fdatasync
    monkeypatch.setattr(shards.os, "fdatasync", lambda fd: (calls.append(("sync", fd)), real_sync(fd)))
    monkeypatch.setattr(
        shards.os, "posix_fadvise", lambda fd, start, length, advice: calls.append(("drop", start, length, advice))
    )
    tensors = write_two_shards(tmp_path)
    head = 8 + shards.HEADER_SPACE
    drops = [c[1:] for c in calls if c[0] == "drop"]
    advice = shards.os.POSIX_FADV_DONTNEED
    # shard 1: synced after its third tensor (12,000 bytes), closed after its fifth; shard 2 likewise after its third
    assert drops == [(head, 12_000, advice), (0, 0, advice), (head, 12_000, advice), (0, 0, advice)]
    assert [c[0] for c in calls].count("sync") == 2
    assert_two_shards_hold(tmp_path, tensors)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise on this platform")
def test_a_file_system_that_refuses_the_drop_still_gets_every_byte(tmp_path, monkeypatch):
    from kanc.checkpoint import shards

    asked = []

    def refuse(fd, start, length, advice):
        asked.append(start)
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(shards, "SYNC_EVERY", 10_000)
    monkeypatch.setattr(shards, "DROP_WRITTEN", True)
    monkeypatch.setattr(shards.os, "posix_fadvise", refuse)
    tensors = write_two_shards(tmp_path)
    assert len(asked) == 1  # asked once, then not again
    assert_two_shards_hold(tmp_path, tensors)


# ---- ReadAhead: the next layer's tensors read on a thread ------------------------------------------------------------


def _layers_folder(tmp_path):
    writer = ShardWriter(tmp_path, 10**9)
    gen = torch.Generator().manual_seed(1)
    want = {}
    for layer in range(3):
        for name in ("w", "b"):
            want[f"{layer}.{name}"] = torch.randn(300, 70, generator=gen).bfloat16()
            writer.add(f"{layer}.{name}", want[f"{layer}.{name}"])
    writer.finish()
    reader = CheckpointReader(tmp_path)
    threads = []

    def read(layer):
        threads.append((layer, threading.current_thread().name))
        return reader.read([f"{layer}.w", f"{layer}.b"])

    return want, read, threads


def test_read_ahead_gives_each_layer_its_tensors_and_reads_the_next_on_its_thread(tmp_path):
    want, read, threads = _layers_folder(tmp_path)
    ahead = shards.ReadAhead(read)
    try:
        for layer in range(3):
            got = ahead.take(str(layer), str(layer + 1) if layer < 2 else None)
            assert {k: torch.equal(v, want[k]) for k, v in got.items()} == {f"{layer}.w": True, f"{layer}.b": True}
    finally:
        ahead.close()
    assert threads[0] == ("0", threading.current_thread().name)  # the first layer: nothing was read ahead
    assert [layer for layer, _ in threads] == ["0", "1", "2"]  # each layer read once
    assert all(name.startswith("kanc-read-ahead") for _, name in threads[1:])


def test_a_layer_out_of_order_is_read_then_and_the_read_ahead_dropped(tmp_path):
    want, read, threads = _layers_folder(tmp_path)
    ahead = shards.ReadAhead(read)
    try:
        ahead.take("0", "1")
        got = ahead.take("2", None)  # the model ran layer 2 before layer 1
        assert torch.equal(got["2.w"], want["2.w"])
        assert torch.equal(ahead.take("1", None)["1.b"], want["1.b"])
    finally:
        ahead.close()


def test_an_error_reading_ahead_is_raised_by_the_take_of_that_layer(tmp_path):
    _, read, _ = _layers_folder(tmp_path)

    def failing(layer):
        if layer == "1":
            raise KancError("shard 1 is truncated")
        return read(layer)

    ahead = shards.ReadAhead(failing)
    try:
        ahead.take("0", "1")  # the failed read ahead does not surface here
        with pytest.raises(KancError, match="truncated"):
            ahead.take("1", None)
    finally:
        ahead.close()


def test_touching_pages_changes_nothing():
    t = torch.randn(5000, 3)
    before = t.clone()
    shards.touch_pages(t)
    shards.touch_pages(t.t())  # not contiguous: left alone
    shards.touch_pages(torch.zeros(0))
    assert torch.equal(t, before)
