"""Memory-stall counters of kanc's kernels: Nsight Compute (``ncu``) when present, Triton's proton otherwise.

ncu runs the model in a child process (``python -m kanc.runtime.ncu_child SPEC``) limited to kanc's kernels by
name, after one warm-up step (``--profile-from-start off``; the child opens the profiled range around one step).
It collects, per kernel launch, the metrics below, from the sections that hold them; the raw page is exported as
CSV and parsed here. Metrics a GPU or ncu version does not offer come back empty and are reported as missing.

proton (``triton.profiler``) gives each Triton kernel's time and launch count, not stall reasons.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kanc.codegen import triton_tools

# report field -> ncu metric (ncu's documented names, Nsight Compute "Kernel Profiling Guide").
NCU_METRICS = {
    "duration_ns": "gpu__time_duration.sum",
    "dram_throughput_pct": "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "l2_throughput_pct": "lts__throughput.avg.pct_of_peak_sustained_elapsed",
    "sm_throughput_pct": "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "achieved_occupancy_pct": "sm__warps_active.avg.pct_of_peak_sustained_active",
    "dram_read_bytes": "dram__bytes_read.sum",
    "dram_write_bytes": "dram__bytes_write.sum",
    "samples_total": "smsp__pcsamp_sample_count",
    "long_scoreboard_samples": "smsp__pcsamp_warps_issue_stalled_long_scoreboard",
    "lg_throttle_samples": "smsp__pcsamp_warps_issue_stalled_lg_throttle",
}
# Sections that collect those metrics (the stall samples come from the SourceCounters PC sampling).
NCU_SECTIONS = ("SpeedOfLight", "MemoryWorkloadAnalysis", "Occupancy", "WarpStateStats", "SourceCounters")
# Fields summed over launches; the others are averaged, weighted by duration.
_SUMMED = {
    "duration_ns",
    "dram_read_bytes",
    "dram_write_bytes",
    "samples_total",
    "long_scoreboard_samples",
    "lg_throttle_samples",
}


@dataclass
class KernelStalls:
    """Counters of one kernel, over all its profiled launches (percentages duration-weighted)."""

    kernel: str
    launches: int
    duration_ms: float | None = None
    dram_throughput_pct: float | None = None
    l2_throughput_pct: float | None = None
    sm_throughput_pct: float | None = None
    achieved_occupancy_pct: float | None = None
    dram_read_bytes: float | None = None
    dram_write_bytes: float | None = None
    samples_total: float | None = None
    long_scoreboard_samples: float | None = None
    lg_throttle_samples: float | None = None

    @property
    def long_scoreboard_fraction(self) -> float | None:
        return _ratio(self.long_scoreboard_samples, self.samples_total)

    @property
    def lg_throttle_fraction(self) -> float | None:
        return _ratio(self.lg_throttle_samples, self.samples_total)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["long_scoreboard_fraction"] = self.long_scoreboard_fraction
        data["lg_throttle_fraction"] = self.lg_throttle_fraction
        return data


@dataclass
class StallReport:
    """What the stall collection found: ``tool`` is "ncu", "proton" or None (then ``note`` says why)."""

    tool: str | None
    note: str
    kernels: list[KernelStalls]

    def to_json(self) -> dict[str, Any]:
        return {
            "tool": self.tool,
            "available": self.tool is not None,
            "note": self.note,
            "kernels": [k.to_json() for k in self.kernels],
        }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# ------------------------------------------------------------------------------------------------ ncu CSV
def kernel_base_name(name: str) -> str:
    """``void _rational_fwd_kernel<...>(float*, ...)`` -> ``_rational_fwd_kernel``."""
    name = name.strip()
    name = re.sub(r"^(void|auto)\s+", "", name)
    name = re.split(r"[(<]", name, maxsplit=1)[0]
    return name.split("::")[-1].strip()


def _number(text: str) -> float | None:
    """ncu values: "1,234.5", "n/a", "" (missing), "12.3%"; thousands separators are commas."""
    text = (text or "").strip().strip('"').replace(",", "").rstrip("%")
    if not text or text.lower() in ("n/a", "nan", "-"):
        return None
    try:
        return float(text)
    except ValueError:
        return None


def parse_ncu_csv(text: str) -> list[dict[str, Any]]:
    """One dict per profiled launch: ``{"id", "kernel", "block", "grid", "metrics": {ncu metric: value}}``.

    Reads both of ncu's CSV layouts: ``--page raw`` (one row per launch, one column per metric, then a units row)
    and ``--page details`` (one row per metric, with "Metric Name" / "Metric Unit" / "Metric Value"). Lines before
    the header (``==PROF==`` messages, the program's own output) are skipped.
    """
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"') or line.startswith("ID,")), None)
    if start is None:
        return []
    rows = list(csv.reader(io.StringIO("\n".join(lines[start:]))))
    header = rows[0]
    if "Metric Name" in header and "Metric Value" in header:
        return _parse_details(header, rows[1:])
    return _parse_raw(header, rows[1:])


def _launch(row: dict[str, str]) -> dict[str, Any]:
    return {
        "id": row.get("ID", ""),
        "kernel": kernel_base_name(row.get("Kernel Name", "")),
        "block": row.get("Block Size", ""),
        "grid": row.get("Grid Size", ""),
        "metrics": {},
    }


def _parse_raw(header: list[str], rows: list[list[str]]) -> list[dict[str, Any]]:
    launches = []
    for values in rows:
        if len(values) != len(header):
            continue
        row = dict(zip(header, values))
        if not row.get("ID", "").strip() or not row.get("Kernel Name", "").strip():
            continue  # the units row, or a blank one
        launch = _launch(row)
        for name, value in row.items():
            if "__" in name:  # metric columns look like unit__counter.rollup
                launch["metrics"][name] = _number(value)
        launches.append(launch)
    return launches


def _parse_details(header: list[str], rows: list[list[str]]) -> list[dict[str, Any]]:
    by_id: dict[str, dict[str, Any]] = {}
    for values in rows:
        if len(values) != len(header):
            continue
        row = dict(zip(header, values))
        key = row.get("ID", "")
        launch = by_id.setdefault(key, _launch(row))
        value = _number(row.get("Metric Value", ""))
        unit = (row.get("Metric Unit") or "").strip()
        launch["metrics"][row.get("Metric Name", "")] = _to_base(value, unit)
    return list(by_id.values())


_UNIT_SCALE = {
    "nsecond": 1.0,
    "usecond": 1e3,
    "msecond": 1e6,
    "second": 1e9,
    "ns": 1.0,
    "us": 1e3,
    "ms": 1e6,
    "byte": 1.0,
    "Kbyte": 1e3,
    "Mbyte": 1e6,
    "Gbyte": 1e9,
    "KB": 1e3,
    "MB": 1e6,
    "GB": 1e9,
}


def _to_base(value: float | None, unit: str) -> float | None:
    """Details pages print human units (usecond, Mbyte); raw pages with ``--print-units base`` do not need this."""
    return value * _UNIT_SCALE.get(unit, 1.0) if value is not None else None


def summarise_ncu(launches: list[dict[str, Any]], kernels: set[str] | None = None) -> list[KernelStalls]:
    """Per-kernel totals (counts summed, percentages weighted by duration) of ``parse_ncu_csv``'s launches."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for launch in launches:
        if kernels is None or launch["kernel"] in kernels:
            groups[launch["kernel"]].append(launch)
    return [_summarise_kernel(name, group) for name, group in groups.items()]


def _summarise_kernel(name: str, launches: list[dict[str, Any]]) -> KernelStalls:
    out = KernelStalls(name, len(launches))
    weights = [launch["metrics"].get(NCU_METRICS["duration_ns"]) or 1.0 for launch in launches]
    for field_name, metric in NCU_METRICS.items():
        values = [(launch["metrics"].get(metric), w) for launch, w in zip(launches, weights)]
        values = [(v, w) for v, w in values if v is not None]
        if not values:
            continue
        if field_name in _SUMMED:
            total = sum(v for v, _ in values)
        else:
            total = sum(v * w for v, w in values) / sum(w for _, w in values)
        if field_name == "duration_ns":
            out.duration_ms = total / 1e6
        else:
            setattr(out, field_name, total)
    return out


# ------------------------------------------------------------------------------------------------ ncu runs
def ncu_path() -> str | None:
    """The ncu executable: ``KANC_NCU``, else ``ncu`` on PATH."""
    env = os.environ.get("KANC_NCU")
    if env:
        return env if Path(env).exists() else None
    return shutil.which("ncu")


def ncu_command(ncu: str, kernels: list[str], child: list[str], report: Path, metrics: bool = True) -> list[str]:
    """ncu's command line: kanc's kernels only, the profiled range the child opens, the sections and metrics."""
    regex = "|".join(re.escape(k) for k in sorted(set(kernels)))
    cmd = [
        ncu,
        "--profile-from-start",
        "off",
        "--target-processes",
        "all",
        "--kernel-name-base",
        "function",
        "-k",
        f"regex:^({regex})$",
        "--export",
        str(report),
        "--force-overwrite",
    ]
    for section in NCU_SECTIONS:
        cmd += ["--section", section]
    if metrics:
        cmd += ["--metrics", ",".join(NCU_METRICS.values())]
    return cmd + child


def ncu_import_command(ncu: str, report: Path) -> list[str]:
    return [
        ncu,
        "--import",
        str(report),
        "--csv",
        "--page",
        "raw",
        "--print-units",
        "base",
        "--print-kernel-base",
        "function",
    ]


def collect_ncu(
    spec: dict[str, Any], kernels: list[str], workdir: Path, timeout: float = 900.0, ncu: str | None = None
) -> StallReport:
    """Run the model described by ``spec`` (see ``ncu_child``) under ncu; parse the per-kernel counters."""
    ncu = ncu or ncu_path()
    if ncu is None:
        return StallReport(None, "Nsight Compute (ncu) not found on PATH (set KANC_NCU to its path)", [])
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    child = [sys.executable, "-m", "kanc.runtime.ncu_child", str(spec_path)]
    report = workdir / "kanc_ncu"
    env = _child_env()
    errors = []
    for with_metrics in (True, False):  # explicit metrics first; sections only if this ncu rejects one of them
        run = _run([*ncu_command(ncu, kernels, child, report, with_metrics)], timeout, env)
        if run.returncode == 0:
            break
        errors.append(_last_line(run.stderr or run.stdout))
    else:
        return StallReport(None, f"ncu failed: {errors[-1]}", [])
    exported = _run(ncu_import_command(ncu, report.with_suffix(".ncu-rep")), timeout, env)
    if exported.returncode != 0:
        return StallReport(None, f"ncu --import failed: {_last_line(exported.stderr)}", [])
    found = summarise_ncu(parse_ncu_csv(exported.stdout), set(kernels))
    if not found:
        return StallReport("ncu", "ncu ran but profiled none of kanc's kernels", [])
    note = "ncu: " + ("sections and metrics" if not errors else "sections only (a metric was rejected)")
    return StallReport("ncu", note + f", {sum(k.launches for k in found)} launches of {len(found)} kernels", found)


def _child_env() -> dict[str, str]:
    """The child imports this very kanc, and never times configs under the profiler's kernel replays."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "KANC_AUTOTUNE": "0"}


def _run(cmd: list[str], timeout: float, env: dict[str, str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 124, "", f"timed out after {timeout:.0f} s")
    except OSError as e:
        return subprocess.CompletedProcess(cmd, 127, "", str(e))


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def write_child_inputs(model: Any, args: tuple, kwargs: dict, workdir: Path) -> dict[str, Any]:
    """Pickle the model and inputs for the child (kanc wrote these files itself, so the child trusts them).

    Pickles name classes by module, so the child gets this process's ``sys.path``; a class defined in ``__main__``
    (a script) cannot be found by another process and is refused with a ValueError saying so.
    """
    import torch

    local = sorted({type(m).__qualname__ for m in model.modules() if type(m).__module__ == "__main__"})
    if local:
        raise ValueError(f"{local[0]} is defined in the __main__ script; move it into an importable module")
    model_path, inputs_path = workdir / "model.pt", workdir / "inputs.pt"
    torch.save(model, model_path)
    torch.save({"args": args, "kwargs": kwargs}, inputs_path)
    return {"model": str(model_path), "inputs": str(inputs_path), "sys_path": [p for p in sys.path if p]}


def new_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="kanc-stalls-"))


# ------------------------------------------------------------------------------------------------- proton
def proton_available() -> bool:
    """Whether Triton's proton profiler imports here (kanc.codegen asks triton)."""
    return triton_tools.proton() is not None


def parse_proton(tree: Any, kernels: set[str] | None = None) -> list[KernelStalls]:
    """Per-kernel launch counts and times from a proton ``.hatchet`` file (a JSON list: the call tree, then device
    info). Kernel frames are the nodes whose metrics name a device; their ``time (ns)`` and ``count`` add up."""
    roots = tree if isinstance(tree, list) else [tree]
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    stack = [r for r in roots[:1] if isinstance(r, dict)]
    while stack:
        node = stack.pop()
        metrics = node.get("metrics", {})
        name = kernel_base_name(node.get("frame", {}).get("name", ""))
        if "device_id" in metrics and (kernels is None or name in kernels):
            totals[name][0] += float(metrics.get("count", 0))
            totals[name][1] += float(metrics.get("time (ns)", 0))
        stack.extend(node.get("children", []))
    return [KernelStalls(name, int(count), duration_ms=ns / 1e6) for name, (count, ns) in totals.items()]


def collect_proton(run_step: Any, kernels: set[str], workdir: Path) -> StallReport:
    """Run ``run_step()`` once under proton (Triton launch hook) and read back each kanc kernel's time."""
    proton = triton_tools.proton()
    if proton is None:
        return StallReport(None, "Triton's proton (triton.profiler) is not importable", [])
    name = str(workdir / "kanc_proton")
    try:
        proton.start(name, hook="triton")
        try:
            run_step()
        finally:
            proton.finalize()
        tree = json.loads(Path(name + ".hatchet").read_text())
    except Exception as e:  # noqa: BLE001 - proton needs a working GPU driver and CUPTI
        return StallReport(None, f"proton failed: {_last_line(str(e))}", [])
    found = parse_proton(tree, kernels)
    note = "proton: kernel times and launch counts only (no stall reasons; install Nsight Compute for those)"
    return StallReport("proton", note, found)
