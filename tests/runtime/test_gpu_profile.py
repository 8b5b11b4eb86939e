"""GPU paths of the profiler (skipped without CUDA): CUDA-event layer times, torch.profiler kernel times, the peak
table, and the stall collection with whatever this machine has (Nsight Compute, proton, or neither)."""

import json

import pytest
import torch

import kanc
from kanc.runtime import devices, validate

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_profile_on_cuda(kan_model, tmp_path):
    x = torch.randn(8, 197, 16)
    report = kanc.profile(kan_model, x, train=True, warmup=2, iters=5, device="cuda", dtype=torch.bfloat16)
    assert report.run["timer"] == "cuda-events" and report.run["device"] == "cuda"
    assert report.peaks.name and report.peaks.memory_gbps > 0
    assert devices.lookup(torch.cuda.get_device_name()) is None or report.peaks.source == "table"
    rows = {(r.name, r.direction): r for r in report.layers}
    rational = rows[("1.mlp.fc2.rational", "backward")]
    assert rational.time_ms > 0 and rational.rates.bound == "memory"
    if report.kernels:  # kanc's kernels present: each has a GPU time from torch.profiler
        assert all(k.time_source == "cuda (torch.profiler)" for k in report.kernels)
        assert report.stalls.tool in ("ncu", "proton", None) and report.stalls.note
    assert report.other_kernels  # cuBLAS & co. from the profiler pass
    out = report.write(tmp_path / "prof")
    assert validate(json.loads((out / "report.json").read_text())) == []


def test_measured_peaks_for_the_gpu():
    peaks = devices._measure_cuda(torch.device("cuda"), "test GPU")
    assert peaks.source == "measured" and peaks.memory_gbps > 10 and peaks.matmul_tflops["bf16"] > 0.1
