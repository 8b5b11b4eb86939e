"""`SMOKE=1 make gpu-check`: the GPU check's dry run (tiny shapes, CPU, Triton interpreter) runs every step and writes
the JSON the GPU run will write: its schema, every figure present and finite beside its target, labelled as a smoke
run and never as GPU figures. No figure's value is checked: the interpreter measures nothing."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
STEPS = ["tests", "rational", "mlp_block", "snnk", "memory", "host", "determinism", "grkan_linear"]
# every figure issue 17 asks for, with the target it is held to (None: reported without one)
FIGURES = {
    "gpu_tests_failed": ("==", 0),
    "gpu_tests_passed": None,  # a target (>= 1) on a GPU only
    **{f"rational_{a}_fwd_bwd_pct_of_hbm_peak": (">=", 75) for a in ("act1", "act2")},
    **{f"rational_{a}_fwd_bwd_speedup_vs_flashkat": (">=", 1.5) for a in ("act1", "act2")},
    "mlp_block_fwd_bwd_vs_mlp_compiled": ("<=", 1.15),
    "mlp_block_inference_vs_mlp_compiled": ("<=", 1.1),
    **{f"mlp_block_{p}_{k}_vs_mlp_compiled": None for p in ("prologue", "epilogue") for k in ("fwd_bwd", "inference")},
    **{f"mlp_block_{k}_auto_vs_faster_placement": ("<=", 1.05) for k in ("fwd_bwd", "inference")},
    **{f"snnk_m_hidden_over_{f}_{k}_vs_mlp_compiled": ("<", 1.0) for f in (4, 8) for k in ("fwd_bwd", "forward")},
    "peak_memory_vs_mlp_compiled": ("<=", 1.1),
    **{f"peak_memory_{p}_vs_mlp_compiled": None for p in ("prologue", "epilogue")},
    "host_overhead_grkan_block_batch8": ("<=", 0.8),
    "host_overhead_mlp_batch8": None,
    **{f"deterministic_backward_{n}": ("==", 1) for n in ("rational", "grkan_block_prologue", "grkan_block_epilogue")},
    "deterministic_backward_snnk": ("==", 1),
    **{f"grkan_linear_{fc}_fwd_bwd_vs_plain_linear": None for fc in ("fc1", "fc2")},
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """(completed `SMOKE=1 make gpu-check`, its JSON), run once for the module."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    tmp = tmp_path_factory.mktemp("gpu_check")
    out = tmp / "gpu_check.json"
    env = {**os.environ, "SMOKE": "1", "KANC_CACHE_DIR": str(tmp / "cache"), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    # -o: take the venv as built (this interpreter runs the check, whatever made it)
    cmd = [
        "make",
        "-s",
        "-o",
        ".venv/.kanc-installed",
        "gpu-check",
        f"PY={sys.executable}",
        f"GPU_CHECK_ARGS=--out {out}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    return proc, out


def test_every_step_runs_and_the_json_is_written(smoke):
    proc, out = smoke
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "SMOKE RUN" in proc.stdout and f"wrote {out}" in proc.stdout
    data = json.loads(out.read_text())
    assert list(data["steps"]) == STEPS
    assert all(s["status"] == "ok" and s["seconds"] >= 0 for s in data["steps"].values()), data["steps"]


def test_labelled_a_smoke_run_not_gpu_figures(smoke):
    data = json.loads(smoke[1].read_text())
    assert data["benchmark"] == "gpu_check" and data["smoke"] is True and data["gpu_figures"] is False
    assert data["label"].startswith("SMOKE RUN") and data["interpreter"] is True
    assert data["device"] == "cpu (triton interpreter)" and data["dtype"] == "float32"
    assert data["command"].startswith("SMOKE=1 ") and "gpu_check.py" in data["command"]
    assert data["versions"]["torch"] == torch.__version__ and data["versions"]["triton"]
    assert data["peaks"]["source"] == "measured" and data["shapes"]["tokens"] < 100  # tiny shapes, no datasheet


def test_every_figure_is_present_finite_and_held_to_its_target(smoke):
    data = json.loads(smoke[1].read_text())
    figures = {f["name"]: f for f in data["figures"]}
    assert set(figures) == set(FIGURES)
    for name, target in FIGURES.items():
        f = figures[name]
        assert set(f) == {"name", "value", "unit", "target", "passed", "step", "note"} and f["unit"], f
        assert isinstance(f["value"], float) and math.isfinite(f["value"]), f
        assert f["step"] in STEPS, f
        if target is None:
            assert f["target"] is None and f["passed"] is None, f
        else:
            assert (f["target"]["op"], f["target"]["value"]) == target and isinstance(f["passed"], bool), f
    summary = data["summary"]
    assert summary["figures"] == len(FIGURES) and summary["with_target"] == sum(t is not None for t in FIGURES.values())


def test_the_cases_behind_the_figures(smoke):
    """The raw benchmark cases are saved; the GPU tests ran (all skipped on the CPU) with tuning off; the
    interpreter measures no placement, so "auto" keeps the prologue; the determinism runs are bitwise equal."""
    data = json.loads(smoke[1].read_text())
    cases = data["cases"]
    assert cases["tests"]["exit_code"] in (0, 5) and cases["tests"]["counts"].get("failed", 0) == 0
    assert "-m gpu" in cases["tests"]["command"] and cases["tests"]["counts"].get("skipped", 0) > 0
    assert [c["name"] for c in cases["rational"]] == ["smoke_act1", "smoke_act2"]
    assert data["choices"]["auto_placement"] == {"forward+backward": "prologue", "inference": "prologue"}
    assert {"_linear_rational_fwd_kernel", "_grkan_linear_fwd_kernel"} <= set(cases["mlp_block"]["kanc_kernels"])
    assert [c["shapes"]["projection"][0] for c in cases["snnk"]] == [48 // 4, 48 // 8]
    assert all(v > 0 for v in cases["memory"]["peak_bytes"].values())
    assert all(f["value"] == 1.0 for f in data["figures"] if f["step"] == "determinism")
