"""Device peaks: the table matches the names torch.cuda.get_device_name prints; the CPU's peaks are measured."""

import pytest
import torch

from kanc.runtime import devices


@pytest.mark.parametrize(
    "reported, entry",
    [
        ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM"),
        ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe"),
        ("NVIDIA H100 NVL", "NVIDIA H100 NVL"),
        ("NVIDIA H200", "NVIDIA H200 SXM"),
        ("NVIDIA H200 NVL", "NVIDIA H200 NVL"),
        ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB SXM"),
        ("NVIDIA A100 80GB PCIe", "NVIDIA A100 80GB PCIe"),
        ("NVIDIA A100-SXM4-40GB", "NVIDIA A100 40GB"),
        ("NVIDIA A100-PCIE-40GB", "NVIDIA A100 40GB"),
        ("NVIDIA L4", "NVIDIA L4"),
        ("NVIDIA L40S", "NVIDIA L40S"),
        ("NVIDIA A10", "NVIDIA A10"),
        ("NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 4090"),
        ("Tesla V100-SXM2-32GB", "NVIDIA V100 SXM2"),
        ("Tesla T4", "NVIDIA T4"),
    ],
)
def test_known_gpus(reported, entry):
    peaks = devices.lookup(reported)
    assert peaks is not None and peaks.name == entry and peaks.source == "table"
    assert peaks.memory_gbps > 100 and peaks.vector_tflops["fp32"] > 1


@pytest.mark.parametrize("reported", ["NVIDIA GH200 480GB", "NVIDIA A10G", "NVIDIA GeForce RTX 3090 Ti", "AMD MI300X"])
def test_unknown_gpus_are_measured_not_guessed(reported):
    assert devices.lookup(reported) is None


def test_h100_figures_are_the_datasheets():
    h100 = devices.lookup("NVIDIA H100 80GB HBM3")
    assert h100.memory_gbps == 3350 and h100.vector_tflops["fp32"] == 67 and h100.matmul_tflops["bf16"] == 989.5
    assert h100.matmul_peak(torch.bfloat16) == (989.5, "bf16 tensor")
    assert h100.vector_peak(torch.bfloat16) == (67, "fp32")  # kanc's elementwise math runs in fp32 registers
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert h100.matmul_peak(torch.float32) == (67, "fp32")
        torch.set_float32_matmul_precision("high")
        assert h100.matmul_peak(torch.float32) == (494.5, "tf32 tensor")
    finally:
        torch.set_float32_matmul_precision(previous)
    assert len(devices.known_devices()) >= 10


def test_cpu_peaks_are_measured_and_labelled():
    peaks = devices.device_peaks("cpu")
    assert peaks.source == "measured" and "measured" in peaks.note and peaks.memory == "DRAM (measured copy)"
    assert peaks.memory_gbps > 0.1 and peaks.vector_tflops["fp32"] > 1e-4
    assert peaks.measured["copy_gbps"] == peaks.memory_gbps
    assert devices.device_peaks("cpu") is peaks  # measured once per process


def test_rates_against_the_h100_roofline_by_hand():
    from kanc.runtime.counts import matmul_counts, rational_counts
    from kanc.runtime.report import rates

    h100 = devices.lookup("NVIDIA H100 80GB HBM3")
    # KAT-B act2 backward, bf16: 77.5M elements, 6 B each ideal; measured 0.5 ms
    n = 25_216 * 3072
    counts = rational_counts(n, 2, 8, direction="backward")
    r = rates(counts, 0.5, h100, torch.bfloat16)
    assert r.bound == "memory" and r.achieved_gbps == pytest.approx(counts.bytes / 0.5e-3 / 1e9)
    assert r.bandwidth_fraction == pytest.approx(counts.bytes / 0.5e-3 / 3.35e12)
    assert r.roofline_ms == pytest.approx(counts.bytes / 3.35e12 * 1e3) and r.roofline_fraction == pytest.approx(
        r.roofline_ms / 0.5
    )
    assert r.intensity == pytest.approx(65 / 6, rel=1e-4) and r.compute_peak == "fp32"
    # fc1 of the same block: a bf16 matmul, compute-bound on tensor cores
    mm = matmul_counts(25_216, 3072, 768, 2)
    r = rates(mm, 0.3, h100, torch.bfloat16)
    assert r.bound == "compute" and r.compute_peak == "bf16 tensor"
    assert r.compute_fraction == pytest.approx(mm.flops / 0.3e-3 / 989.5e12)
    assert rates(None, 1.0, h100, torch.float32).bound is None and rates(mm, 0.0, h100, None).bound is None
