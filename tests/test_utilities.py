"""The one home of each cross-cutting utility: environment (kanc.env), wall-clock timing (kanc.timing), text layout
(kanc.text) and the first line of an exception (kanc.errors.first_line)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kanc import env, text, timing
from kanc.errors import first_line, one_line


@pytest.mark.parametrize(
    ("value", "level"), [(None, 0), ("", 0), ("  ", 0), ("0", 0), ("2", 2), (" 3 ", 3), ("yes", 1), ("true", 1)]
)
def test_debug_level_reads_a_non_number_as_a_request_for_debugging(monkeypatch, value, level):
    if value is None:
        monkeypatch.delenv("KANC_DEBUG", raising=False)
    else:
        monkeypatch.setenv("KANC_DEBUG", value)
    assert env.debug_level() == level


@pytest.mark.parametrize(("value", "expected"), [(None, False), ("0", False), ("1", True), ("true", False)])
def test_interpreting_is_triton_interpret_1(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", value)
    assert env.interpreting() is expected


def test_getenv_sees_changes_made_through_os_environ(monkeypatch):
    monkeypatch.delenv("KANC_TEST_VARIABLE", raising=False)
    assert env.getenv("KANC_TEST_VARIABLE", "unset") == "unset"
    monkeypatch.setenv("KANC_TEST_VARIABLE", "set")
    assert env.getenv("KANC_TEST_VARIABLE") == "set"


def test_wall_times_run_warmup_then_reps_and_sync_after_each():
    events = []
    times = timing.wall_times_ms(lambda: events.append("call"), reps=4, warmup=2, sync=lambda: events.append("sync"))
    assert events == ["call", "call", "sync"] + ["call", "sync"] * 4
    assert len(times) == 4 and all(t >= 0 for t in times)
    calls = []
    assert timing.median_ms(lambda: calls.append(1), reps=5) >= 0 and len(calls) == 6  # one warm-up by default


def test_interleaved_times_alternate_the_cases_after_warming_each():
    events = []
    times = timing.interleaved_times_ms({"a": lambda: events.append("a"), "b": lambda: events.append("b")}, 3, 1)
    assert events == ["a", "b"] * 4 and {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert timing.percentiles([4.0]) == (4.0, 4.0, 4.0)
    median, p20, p80 = timing.percentiles([float(t) for t in range(1, 11)])
    assert median == 5.5 and p20 < median < p80


def test_table_aligns_columns_without_trailing_blanks():
    lines = text.table([["a", 1], ["bbb", 22]], ["x", "y"])
    assert lines == ["x    y", "a    1", "bbb  22"]
    assert text.table([], ["only", "header"]) == ["only  header"]


def test_ellipsize_keeps_the_end_or_the_start():
    assert text.ellipsize("blocks.0.mlp.fc1", 8) == "...p.fc1"
    assert text.ellipsize("a long message", 8, keep="start") == "a lon..."
    assert text.ellipsize("short", 8) == "short"


@pytest.mark.parametrize(
    ("error", "limit", "expected"),
    [
        (ValueError(""), None, "ValueError"),
        (ValueError("\n  first \nsecond"), None, "first"),
        (ValueError("a\x1b[31mb"), None, "a\\x1b[31mb"),  # a terminal escape stays printable text
        (RuntimeError("x" * 300), 200, "x" * 197 + "..."),
        ("", None, "no output"),
        ("cc: warning\ncc: error", None, "cc: warning"),
    ],
)
def test_first_line(error, limit, expected):
    assert first_line(error, limit) == expected


def test_first_line_prefers_the_line_that_names_the_error():
    """A compiler's stderr: warnings first, the error after (kanc/codegen/cpu/build.py reports the error)."""
    assert first_line("x.c:1: warning: w\nx.c:2: Error: e\n", prefer="error") == "x.c:2: Error: e"
    assert first_line("x.c:1: warning: w\n", prefer="error") == "x.c:1: warning: w"
    assert first_line("", prefer="error") == "no output"


def test_one_line_names_the_class_of_a_foreign_error():
    assert one_line(ValueError("boom\nmore")) == "ValueError: boom"
    assert one_line(ValueError()) == "ValueError"


def test_json_safe_gives_strict_json():
    """One JSON-safe conversion for the conversion report, the profile report and the coverage JSON: NaN/inf never
    reach json.dumps (it would write the invalid tokens NaN and Infinity)."""
    value = {1: (float("nan"), float("inf"), 2.5), "dtype": torch.float16, "set": {3}, "path": Path("a/b"), "n": None}
    assert text.json_safe(value) == {"1": [None, None, 2.5], "dtype": "float16", "set": [3], "path": "a/b", "n": None}
    assert text.json_safe([float("-inf")], nonfinite=str) == ["-inf"]
    json.dumps(text.json_safe(value), allow_nan=False)
