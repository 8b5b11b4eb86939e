"""Fixtures of the coverage tests: benchmarks/ on the path (the harness lives there), torchvision through the
shim, and every family measured once per session (both targets share one build; the tests read the rows)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.append(str(BENCHMARKS))  # appended: its script names (common, coverage) must not shadow anything


@pytest.fixture(scope="session")
def measured():
    """family -> its row of benchmarks/coverage.py (measured on first use, then cached for the session)."""
    from families.measure import measure_family
    from families.tvshim import import_torchvision

    import_torchvision()
    rows: dict[str, dict] = {}

    def get(family) -> dict:
        if family.name not in rows:
            rows[family.name] = measure_family(family)
        return rows[family.name]

    return get
