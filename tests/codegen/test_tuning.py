"""Tuning cache: cached choice first, timing on a miss when autotuning is on, default otherwise; JSON per device."""

import json

import pytest

from kanc.codegen import tuning
from kanc.codegen.launches import Launch, record, recording

CANDIDATES = [{"BLOCK": 64}, {"BLOCK": 128}, {"BLOCK": 256}]
TIMES = {64: 3.0, 128: 1.0, 256: 2.0}


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KANC_CACHE_DIR", str(tmp_path))
    tuning.clear_memory_caches()
    yield
    tuning.set_autotune(None)
    tuning.clear_memory_caches()


def _bench(calls):
    def bench(config):
        calls.append(config["BLOCK"])
        return TIMES[config["BLOCK"]]

    return bench


def test_off_takes_the_first_candidate_and_times_nothing():
    calls = []
    with tuning.autotuning("0"):
        assert tuning.pick_config("k", (10, "fp32"), CANDIDATES, _bench(calls), "cpu") == {"BLOCK": 64}
    assert calls == []
    assert not tuning.cache_path("cpu").exists()


def test_miss_times_every_candidate_then_the_cache_answers(tmp_path):
    calls = []
    with tuning.autotuning("1"):
        assert tuning.pick_config("k", (10, "fp32"), CANDIDATES, _bench(calls), "cpu") == {"BLOCK": 128}
        assert tuning.pick_config("k", (10, "fp32"), CANDIDATES, _bench(calls), "cpu") == {"BLOCK": 128}
    assert calls == [64, 128, 256]  # timed once
    data = json.loads(tuning.cache_path("cpu").read_text())
    assert data["version"] == tuning.CACHE_VERSION and data["device"] == "cpu-interpreter"
    assert data["kernels"]["k"]["10,fp32"] == {"config": {"BLOCK": 128}, "timings_ms": [3.0, 1.0, 2.0]}


def test_a_second_process_starts_tuned():
    with tuning.autotuning("1"):
        tuning.pick_config("k", (7,), CANDIDATES, _bench([]), "cpu")
    tuning.clear_memory_caches()  # as a new process would
    calls = []
    with tuning.autotuning("0"):  # even with timing off, the cached choice is used
        assert tuning.pick_config("k", (7,), CANDIDATES, _bench(calls), "cpu") == {"BLOCK": 128}
    assert calls == []


def test_force_retimes_and_failing_configs_are_skipped():
    with tuning.autotuning("1"):
        tuning.pick_config("k", (7,), CANDIDATES, _bench([]), "cpu")

    def bench(config):
        if config["BLOCK"] == 128:
            raise RuntimeError("out of resources")
        return TIMES[config["BLOCK"]]

    with tuning.autotuning("force"):
        assert tuning.pick_config("k", (7,), CANDIDATES, bench, "cpu") == {"BLOCK": 256}
    with tuning.autotuning("force"), pytest.raises(RuntimeError, match="no candidate"):
        tuning.pick_config("k", (8,), CANDIDATES, lambda c: 1 / 0, "cpu")


def test_corrupt_cache_is_replaced_not_fatal():
    path = tuning.cache_path("cpu")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with tuning.autotuning("1"):
        assert tuning.pick_config("k", (1,), CANDIDATES, _bench([]), "cpu") == {"BLOCK": 128}
    assert json.loads(path.read_text())["kernels"]["k"]["1"]["config"] == {"BLOCK": 128}


def test_mode_from_environment(monkeypatch):
    monkeypatch.setenv("KANC_AUTOTUNE", "force")
    assert tuning.autotune_mode() == "force"
    monkeypatch.setenv("KANC_AUTOTUNE", "sometimes")
    with pytest.raises(ValueError, match="KANC_AUTOTUNE"):
        tuning.autotune_mode()
    monkeypatch.delenv("KANC_AUTOTUNE")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tuning.autotune_mode() == "0"


def test_launch_recording_only_while_listening():
    launch = Launch("kanc::x", "_x_kernel", (3, 2), {"BLOCK": 64}, atomics=6)
    record(launch)  # nobody listens: dropped
    with recording() as outer:
        with recording() as inner:
            record(launch)
        record(launch)
    assert inner == [launch] and outer == [launch, launch]
    assert launch.programs == 6


def test_recording_hears_other_threads():
    """Autograd runs CUDA backward on worker threads: their launches must reach the caller's recording."""
    import threading

    launch = Launch("kanc::x", "_x_kernel", (1,), {})
    with recording() as seen:
        worker = threading.Thread(target=record, args=(launch,))
        worker.start()
        worker.join()
    assert seen == [launch]


def test_forced_config_wins_and_restores():
    calls = []
    with tuning.autotuning("1"):
        with tuning.forced_config("k", {"BLOCK": 256}):
            assert tuning.pick_config("k", (3,), CANDIDATES, _bench(calls), "cpu") == {"BLOCK": 256}
            with tuning.forced_config("k", {"BLOCK": 64}):
                assert tuning.pick_config("k", (3,), CANDIDATES, _bench(calls), "cpu") == {"BLOCK": 64}
            assert tuning.pick_config("k", (3,), CANDIDATES, _bench(calls), "cpu") == {"BLOCK": 256}
        assert calls == [] and not tuning.cache_path("cpu").exists()  # forced: nothing timed, nothing cached
        assert tuning.pick_config("k", (3,), CANDIDATES, _bench(calls), "cpu") == {"BLOCK": 128}


def test_a_cached_config_with_other_fields_is_stale():
    """A kernel that gained a tuning dimension (ROWS_PER_PROGRAM) must not launch with a config cached before it."""
    with tuning.autotuning("1"):
        tuning.pick_config("k", (5,), CANDIDATES, _bench([]), "cpu")
    grown = [{**c, "ROWS": 2} for c in CANDIDATES]
    with tuning.autotuning("0"):
        assert tuning.pick_config("k", (5,), grown, None, "cpu") == {"BLOCK": 64, "ROWS": 2}
    calls = []
    with tuning.autotuning("1"):
        assert tuning.pick_config("k", (5,), grown, _bench(calls), "cpu") == {"BLOCK": 128, "ROWS": 2}
    assert calls == [64, 128, 256]
