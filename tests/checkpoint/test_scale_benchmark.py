"""benchmarks/scale.py --smoke: a tiny 2-layer LLaMA in several shards, built tensor by tensor, converted by
streaming beside the load + save baseline, then checked layer by layer. Only the fields and the check are tested:
timings on a CPU test machine mean nothing."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_smoke_run_measures_and_checks(tmp_path):
    out = tmp_path / "scale.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--smoke", "--skip", "kanc-convert"]
    cmd += ["--workdir", str(tmp_path / "work"), "--out", str(out), "--repeat", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())["models"]
    assert row["model"] == "tiny-llama" and row["shards"] > 1 and row["params"] == 95040
    assert row["kanc-convert"] == {"skipped": "--skip"}
    for run in ("baseline", "baseline-synced", "stream"):
        assert row[run]["rc"] == 0 and row[run]["wall_s"] > 0 and 0 < row[run]["peak_rss_gb"] < 50
        walls = row[run]["walls_s"]  # two rounds: the median of both
        assert len(walls) == 2 and row[run]["wall_s"] == round((walls[0] + walls[1]) / 2, 2)
        for key in ("user_s", "sys_s"):  # the child's CPU seconds (rusage), each round's and their median
            rounds = row[run][f"{key}_rounds"]
            assert len(rounds) == 2 and min(rounds) >= 0 and row[run][key] == round((rounds[0] + rounds[1]) / 2, 2)
        assert row[run]["user_s"] > 0
    pairs = [s / b for s, b in zip(row["stream"]["walls_s"], row["baseline"]["walls_s"])]
    assert row["stream"]["paired_ratio"] == round((pairs[0] + pairs[1]) / 2, 3)
    assert row["stream"]["paired_ratio_synced"] > 0 and "paired_ratio" not in row["baseline-synced"]
    check = row["check"]
    assert 0 < check["worst_layer_error"] < 1e-3 and math.isfinite(check["final_drift"])
    assert check["worst_layer_error"] == row["stream"]["worst_layer_error"]
    assert check["outside_different"] == []
    assert set(check["manifest_seconds"]) == {"pass_through", "read", "drift", "convert", "forward", "check", "write"}
    assert not any((tmp_path / "work").iterdir())  # the checkpoints are removed
    assert "tiny-llama: " in proc.stdout and "check: worst layer error" in proc.stdout
