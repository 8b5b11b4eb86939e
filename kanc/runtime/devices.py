"""Peak memory bandwidth and FLOP rates of the device a profile runs on: a table of known GPUs, else measured.

Table figures are the vendors' datasheet numbers for dense math (the "with sparsity" figures halved), in GB/s
(1e9 bytes per second) and TFLOP/s (1e12). A GPU that is not in the table, and the CPU, get measured figures
instead (a large copy for bandwidth, a large matmul for FLOP rates), labelled ``source="measured"``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from kanc.timing import median_ms


@dataclass(frozen=True)
class DevicePeaks:
    """Peaks of one device. ``matmul_tflops`` by operand type ("tf32", "bf16", "fp16", "fp8"); ``vector_tflops``
    ("fp32", "fp64") for non-tensor-core math; ``memory`` says what the bandwidth is of ("HBM3", "GDDR6", ...)."""

    name: str
    memory_gbps: float
    vector_tflops: dict[str, float]
    matmul_tflops: dict[str, float]
    memory: str = "DRAM"
    source: str = "table"
    note: str = ""
    measured: dict[str, float] = field(default_factory=dict)

    def matmul_peak(self, dtype: torch.dtype) -> tuple[float, str]:
        """(TFLOP/s, label) of a matmul with operands in ``dtype`` (fp32 matmuls use TF32 when PyTorch allows it)."""
        key = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)
        if key is None and dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
            key = "tf32"
        if key is not None and key in self.matmul_tflops:
            return self.matmul_tflops[key], f"{key} tensor"
        return self.vector_peak(dtype)

    def vector_peak(self, dtype: torch.dtype) -> tuple[float, str]:
        """(TFLOP/s, label) of vector (CUDA-core) math; kanc's elementwise kernels compute in fp32 registers."""
        if dtype == torch.float64 and "fp64" in self.vector_tflops:
            return self.vector_tflops["fp64"], "fp64"
        return self.vector_tflops["fp32"], "fp32"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# fmt: off
# Sources (datasheets, dense figures; "/2" marks a sparse datasheet figure halved):
_KNOWN: list[tuple[str, DevicePeaks]] = [
    # NVIDIA H100 Tensor Core GPU datasheet: H100 NVL 94 GB, 3.9 TB/s; FP32 60; TF32 835/2; BF16/FP16 1671/2; FP8 3341/2
    (r"H100.*NVL", DevicePeaks("NVIDIA H100 NVL", 3900, {"fp32": 60, "fp64": 30},
                               {"tf32": 417.5, "bf16": 835.5, "fp16": 835.5, "fp8": 1670.5}, "HBM3")),
    # same datasheet, H100 PCIe 80 GB: 2.0 TB/s HBM2e; FP32 51; FP64 26; TF32 756/2; BF16/FP16 1513/2; FP8 3026/2
    (r"H100.*PCIe", DevicePeaks("NVIDIA H100 PCIe", 2000, {"fp32": 51, "fp64": 26},
                                {"tf32": 378, "bf16": 756.5, "fp16": 756.5, "fp8": 1513}, "HBM2e")),
    # same datasheet, H100 SXM5 80 GB ("NVIDIA H100 80GB HBM3"): 3.35 TB/s; FP32 67; FP64 34; TF32 989/2;
    # BF16/FP16 1979/2; FP8 3958/2
    (r"H100", DevicePeaks("NVIDIA H100 SXM", 3350, {"fp32": 67, "fp64": 34},
                          {"tf32": 494.5, "bf16": 989.5, "fp16": 989.5, "fp8": 1979}, "HBM3")),
    # NVIDIA H200 Tensor Core GPU datasheet, H200 NVL: 4.8 TB/s; FP32 60; FP64 30; TF32 835/2; BF16 1671/2; FP8 3341/2
    (r"(?<!G)H200.*NVL", DevicePeaks("NVIDIA H200 NVL", 4800, {"fp32": 60, "fp64": 30},
                                     {"tf32": 417.5, "bf16": 835.5, "fp16": 835.5, "fp8": 1670.5}, "HBM3e")),
    # same datasheet, H200 SXM 141 GB: 4.8 TB/s; FP32 67; FP64 34; TF32 989/2; BF16/FP16 1979/2; FP8 3958/2
    (r"(?<!G)H200", DevicePeaks("NVIDIA H200 SXM", 4800, {"fp32": 67, "fp64": 34},
                                {"tf32": 494.5, "bf16": 989.5, "fp16": 989.5, "fp8": 1979}, "HBM3e")),
    # NVIDIA A100 Tensor Core GPU datasheet: FP32 19.5; FP64 9.7; TF32 156; BF16/FP16 312 (dense).
    # Bandwidth: 80GB PCIe 1935 GB/s, 80GB SXM 2039 GB/s, 40GB (PCIe and SXM) 1555 GB/s.
    (r"A100.*(80GB.*PCIe|PCIE.*80GB)", DevicePeaks("NVIDIA A100 80GB PCIe", 1935, {"fp32": 19.5, "fp64": 9.7},
                                                   {"tf32": 156, "bf16": 312, "fp16": 312}, "HBM2e")),
    (r"A100.*80GB", DevicePeaks("NVIDIA A100 80GB SXM", 2039, {"fp32": 19.5, "fp64": 9.7},
                                {"tf32": 156, "bf16": 312, "fp16": 312}, "HBM2e")),
    (r"A100", DevicePeaks("NVIDIA A100 40GB", 1555, {"fp32": 19.5, "fp64": 9.7},
                          {"tf32": 156, "bf16": 312, "fp16": 312}, "HBM2")),
    # NVIDIA L40S datasheet: 864 GB/s GDDR6; FP32 91.6; TF32 366/2; BF16/FP16 733/2; FP8 1466/2
    (r"L40S", DevicePeaks("NVIDIA L40S", 864, {"fp32": 91.6},
                          {"tf32": 183, "bf16": 366.5, "fp16": 366.5, "fp8": 733}, "GDDR6")),
    # NVIDIA L4 datasheet: 300 GB/s GDDR6; FP32 30.3; TF32 120/2; BF16/FP16 242/2; FP8 485/2
    (r"\bL4\b", DevicePeaks("NVIDIA L4", 300, {"fp32": 30.3},
                            {"tf32": 60, "bf16": 121, "fp16": 121, "fp8": 242.5}, "GDDR6")),
    # NVIDIA A10 datasheet: 600 GB/s GDDR6; FP32 31.2; TF32 125/2; BF16/FP16 250/2
    (r"\bA10\b", DevicePeaks("NVIDIA A10", 600, {"fp32": 31.2},
                             {"tf32": 62.5, "bf16": 125, "fp16": 125}, "GDDR6")),
    # NVIDIA Ada GPU architecture whitepaper (appendix), GeForce RTX 4090: 1008 GB/s GDDR6X; FP32 82.6;
    # TF32 82.6; FP16/BF16 with FP32 accumulate 165.2 (what PyTorch matmuls use); FP8 with FP32 accumulate 330.3
    (r"RTX 4090", DevicePeaks("NVIDIA GeForce RTX 4090", 1008, {"fp32": 82.6},
                              {"tf32": 82.6, "bf16": 165.2, "fp16": 165.2, "fp8": 330.3}, "GDDR6X")),
    # NVIDIA Ampere GA102 whitepaper, GeForce RTX 3090: 936 GB/s GDDR6X; FP32 35.6; TF32 35.6;
    # FP16/BF16 with FP32 accumulate 71
    (r"RTX 3090(?! Ti)", DevicePeaks("NVIDIA GeForce RTX 3090", 936, {"fp32": 35.6},
                                     {"tf32": 35.6, "bf16": 71, "fp16": 71}, "GDDR6X")),
    # NVIDIA V100 datasheet, SXM2: 900 GB/s HBM2; FP32 15.7; FP64 7.8; FP16 tensor 125 (no BF16/TF32 on Volta)
    (r"V100", DevicePeaks("NVIDIA V100 SXM2", 900, {"fp32": 15.7, "fp64": 7.8}, {"fp16": 125}, "HBM2")),
    # NVIDIA T4 datasheet: 320 GB/s GDDR6; FP32 8.1; FP16 tensor 65
    (r"\bT4\b", DevicePeaks("NVIDIA T4", 320, {"fp32": 8.1}, {"fp16": 65}, "GDDR6")),
]
# fmt: on

_measured_cache: dict[str, DevicePeaks] = {}


def lookup(device_name: str) -> DevicePeaks | None:
    """The table entry whose pattern matches ``device_name`` (as torch.cuda.get_device_name prints it), or None."""
    for pattern, peaks in _KNOWN:
        if re.search(pattern, device_name):
            return peaks
    return None


def known_devices() -> list[str]:
    """Names of the devices in the table."""
    return [peaks.name for _, peaks in _KNOWN]


def device_peaks(device: torch.device | str) -> DevicePeaks:
    """Peaks of ``device``: the table for known GPUs, measured copy bandwidth and matmul rates otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        known = lookup(name)
        if known is not None:
            return known
        key = f"cuda:{name}"
        if key not in _measured_cache:
            _measured_cache[key] = _measure_cuda(device, name)
        return _measured_cache[key]
    if "cpu" not in _measured_cache:
        _measured_cache["cpu"] = _measure_cpu()
    return _measured_cache["cpu"]


# ---------------------------------------------------------------------------------------------- measurement
def measure_copy_gbps(device: torch.device, mib: int = 64, reps: int = 5) -> float:
    """Achieved bandwidth of a large device-to-device copy: (read + write) bytes / time, in GB/s."""
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    ms = median_ms(lambda: dst.copy_(src), reps, sync=sync)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, size: int, reps: int = 3) -> float:
    """Achieved rate of a square matmul of ``size`` in ``dtype``, in TFLOP/s."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    ms = median_ms(lambda: a @ b, reps, sync=sync)
    return 2 * size**3 / (ms * 1e-3) / 1e12


def _measure_cpu() -> DevicePeaks:
    cpu = torch.device("cpu")
    gbps = measure_copy_gbps(cpu, mib=64, reps=5)
    tflops = measure_matmul_tflops(cpu, torch.float32, 768, reps=3)
    note = (
        f"measured on this CPU ({torch.get_num_threads()} threads): a 64 MiB copy for bandwidth, a 768^3 fp32 "
        "matmul for the FLOP rate (used for every dtype and for vector math)"
    )
    measured = {"copy_gbps": gbps, "matmul_fp32_tflops": tflops}
    return DevicePeaks("cpu", gbps, {"fp32": tflops}, {}, "DRAM (measured copy)", "measured", note, measured)


def _measure_cuda(device: torch.device, name: str) -> DevicePeaks:
    gbps = measure_copy_gbps(device, mib=512, reps=10)
    with _tf32(False):
        fp32 = measure_matmul_tflops(device, torch.float32, 4096)  # SGEMM runs on the FP32 units
    with _tf32(True):
        tf32 = measure_matmul_tflops(device, torch.float32, 8192)
    bf16 = measure_matmul_tflops(device, torch.bfloat16, 8192)
    fp16 = measure_matmul_tflops(device, torch.float16, 8192)
    matmul = {"tf32": tf32, "bf16": bf16, "fp16": fp16}
    note = f"{name} is not in kanc's table: bandwidth from a 512 MiB copy, FLOP rates from 4096-8192 matmuls"
    measured = {"copy_gbps": gbps, "sgemm_tflops": fp32, **{f"{k}_tflops": v for k, v in matmul.items()}}
    return DevicePeaks(name, gbps, {"fp32": fp32}, matmul, "DRAM (measured copy)", "measured", note, measured)


class _tf32:
    """Context manager toggling TF32 for fp32 matmuls."""

    def __init__(self, on: bool) -> None:
        self.on = on

    def __enter__(self) -> None:
        self.previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high" if self.on else "highest")

    def __exit__(self, *exc: object) -> None:
        torch.set_float32_matmul_precision(self.previous)
