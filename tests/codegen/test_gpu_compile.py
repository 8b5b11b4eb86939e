"""The GPU code path compiles without a GPU: every kernel, at ViT-B shapes with its default config (SNNK at m = 256, one
feature tile, and m = 768, ViT-B's default hidden / 4, in feature tiles), bound and compiled by Triton's own launch
path for sm_90 (an H100) as a launch would be (the same specialisation: 16-byte alignment, divisibility by 16, unit
strides as constants) and assembled by Triton's ptxas run (benchmarks/compile_report.py). The interpreter runs none of
this (it ignores tl.dot shape rules, layouts and register limits), so this is the CPU tier's check of it."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parents[2]
DEFAULTS_CHOSEN_WITH = "3.9.0"
KERNELS = {
    "_rational_fwd_kernel",
    "_rational_bwd_kernel",
    "_grkan_linear_fwd_kernel",
    "_grkan_linear_dw_kernel",
    "_grkan_linear_dx_kernel",
    "_linear_rational_fwd_kernel",
    "_snnk_fwd_kernel",
    "_snnk_dx_kernel",
    "_snnk_dw_kernel",
}


@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None, reason="needs triton's CUDA backend")
def test_every_kernel_compiles_for_sm90(tmp_path):
    out = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KANC_CACHE_DIR": str(tmp_path), "TRITON_DEFAULT_FP_FUSION": "1"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "compile_report.py"), "--arch", "90", "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["arch"] == 90 and report["shape"] == [128 * 197, 768, 3072, 8]
    assert {k["kernel"] for k in report["kernels"]} == KERNELS
    for name in ("_snnk_fwd_kernel", "_snnk_dx_kernel"):  # every kind, with one feature tile and with several
        variants = {(k["config"]["KIND"], k["config"]["ACCUMULATE"]) for k in report["kernels"] if k["kernel"] == name}
        assert variants == {(kind, tiled) for kind in (0, 1, 2) for tiled in (False, True)}, (name, variants)
    for name in ("_rational_bwd_kernel", "_grkan_linear_dx_kernel"):  # coefficient sums by atomics, and without
        assert {k["config"]["DETERMINISTIC"] for k in report["kernels"] if k["kernel"] == name} == {False, True}
    # bound as a launch binds: the unit column strides are constants, the pointers known 16-byte aligned
    fwd = [k["specialization"] for k in report["kernels"] if k["kernel"] == "_grkan_linear_fwd_kernel"]
    assert all({"stride_xk", "stride_wk"} <= set(s["equal_to_1"]) for s in fwd), fwd
    assert any("stride_b" in s["equal_to_1"] for s in fwd), fwd  # fc2, the launch with a bias
    assert all({"x_ptr", "w_ptr", "y_ptr", "stride_xm"} <= set(s["divisible_by_16"]) for s in fwd), fwd
    for kernel in report["kernels"]:
        assert 0 < kernel["registers"] <= 255 and kernel["shared_bytes"] <= 227 * 1024, kernel
        # the default configs were chosen spill-free with this triton (and its ptxas); another may allocate differently
        if kernel["kernel"].startswith("_rational") or triton.__version__ == DEFAULTS_CHOSEN_WITH:
            assert kernel["spill_store_bytes"] == 0, kernel
