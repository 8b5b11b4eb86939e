"""The benchmark scripts run (--smoke: tiny shapes on the interpreter) and write the JSON fields promised in
benchmarks/README.md. Timings are not checked: these runs measure nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = {
    "bench_rational.py": ("rational", {"kanc kernel", "KAT design (per-element atomics)"}),
    "bench_grkan_linear.py": ("grkan_linear", {"kanc fused (rational in prologue)", "reference eager"}),
    "bench_mlp_block.py": (
        "mlp_block",
        {f"kanc GR-KAN block, {p} placement" for p in ("prologue", "epilogue", "auto")} | {"Linear-GELU-Linear eager"},
    ),
    "bench_snnk.py": ("snnk", {"kanc fused (features on chip)", "reference eager"}),
}


def _run(script, *args, tmp_path, interpret="1"):
    env = {**os.environ, "TRITON_INTERPRET": interpret, "KANC_CACHE_DIR": str(tmp_path / "cache")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """script -> (completed process, JSON path), each script run once per module."""
    runs = {}

    def run(script):
        if script not in runs:
            tmp = tmp_path_factory.mktemp(script.removesuffix(".py"))
            out = tmp / "result.json"
            runs[script] = (_run(script, "--smoke", "--out", str(out), tmp_path=tmp), out)
        return runs[script]

    return run


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_smoke_run_writes_the_promised_json(script, smoke_run):
    proc, out = smoke_run(script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SMOKE RUN" in proc.stdout and str(out) in proc.stdout
    data = json.loads(out.read_text())
    name, must_have = SCRIPTS[script]
    assert data["benchmark"] == name and data["smoke"] is True and data["interpreter"] is True
    assert data["device"] == "cpu (triton interpreter)" and data["dtype"] == "float32"
    assert data["versions"]["torch"] == torch.__version__ and data["versions"]["triton"]
    assert script in data["command"] and "--smoke" in data["command"]
    assert data["quantiles"] == [0.5, 0.2, 0.8] and data["compile_backend"] == "aot_eager"
    assert data["cases"]
    for case in data["cases"]:
        assert case["name"] and case["shapes"] and case["kanc_kernels"], case["name"]  # the kernels ran
        impls = {r["impl"] for r in case["results"]}
        assert must_have <= impls
        assert any("torch.compile(aot_eager)" in i for i in impls)
        for r in case["results"]:
            assert r["pass"] in ("forward", "backward", "forward+backward", "inference")
            assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
            assert r.get("gbps") or r.get("tflops"), r
            if "max_abs_err" in r:
                assert r["max_abs_err"] < 1e-3, r


def test_rational_baselines_report_their_atomics(smoke_run):
    proc, out = smoke_run("bench_rational.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {(r["impl"], r["pass"]): r for r in json.loads(out.read_text())["cases"][0]["results"]}
    rows, channels, groups = 37, 48, 4
    assert results[("KAT design (per-element atomics)", "backward")]["atomics"] == rows * channels * 10
    assert results[("FlashKAT design (per-program sums)", "backward")]["atomics"] == 1 * groups * 10
    kanc = results[("kanc kernel", "backward")]
    assert 0 < kanc["atomics"] < rows * channels * 10 and kanc["max_abs_err"] < 1e-4
    for impl in ("KAT design (per-element atomics)", "FlashKAT design (per-program sums)"):
        assert results[(impl, "backward")]["max_abs_err"] < 1e-4  # the baselines compute the same gradients
    flashkat = "FlashKAT design (per-program sums)"
    assert results[(flashkat, "forward")]["max_abs_err"] < 1e-5 and results[(flashkat, "forward+backward")]["gbps"]


def test_mlp_block_times_both_placements_and_inference(smoke_run):
    """Each placement eager and compiled, three passes; "auto" is the prologue where nothing is measured."""
    proc, out = smoke_run("bench_mlp_block.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (case,) = json.loads(out.read_text())["cases"]
    assert {"_linear_rational_fwd_kernel", "_grkan_linear_fwd_kernel"} <= set(case["kanc_kernels"])
    assert case["auto_placement"] == {"forward+backward": "prologue", "inference": "prologue"}
    rows = {(r["impl"], r["pass"]): r for r in case["results"]}
    for placement in ("prologue", "epilogue", "auto"):
        for backend in ("", ", torch.compile(aot_eager)"):
            for pass_ in ("forward", "inference", "forward+backward"):
                assert rows[(f"kanc GR-KAN block, {placement} placement{backend}", pass_)]["vs_mlp_compiled"] > 0
    assert rows[("kanc GR-KAN block, epilogue placement", "forward")]["max_abs_err"] < 1e-4


def test_snnk_cases_record_the_backward_kernels(smoke_run):
    """The SNNK benchmark runs the backward under its recording: both backward kernels, the dW recomputation."""
    proc, out = smoke_run("bench_snnk.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for case in json.loads(out.read_text())["cases"]:
        assert case["kanc_kernels"] == ["_snnk_dw_kernel", "_snnk_dx_kernel", "_snnk_fwd_kernel"]
        assert case["dw_z_recomputed"] >= 1 and case["dw_splits"] >= 1 and "SPLIT_M" in case["dw_config"]
        kanc = next(r for r in case["results"] if r["impl"].startswith("kanc") and r["pass"] == "forward+backward")
        ideal = next(r for r in case["results"] if r["impl"] == "reference eager" and r["pass"] == "forward+backward")
        assert kanc["flops_executed"] > kanc["flops"] == ideal["flops"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_without_gpu_or_smoke_the_scripts_refuse_and_write_nothing(tmp_path):
    out = tmp_path / "never.json"
    proc = _run("bench_rational.py", "--out", str(out), tmp_path=tmp_path, interpret="0")
    assert proc.returncode != 0 and "no CUDA device" in proc.stderr and not out.exists()
    proc = _run("bench_rational.py", "--smoke", "--shapes", "nope", tmp_path=tmp_path)
    assert proc.returncode == 2 and "unknown shapes" in proc.stderr


def test_cpu_scripts_run_and_write_their_json(tmp_path):
    """host_overhead.py (no-op launches) and cpu_rational.py (the C kernels) run; their figures are not checked."""
    out = tmp_path / "host.json"
    proc = _run("host_overhead.py", "--calls", "20", "--warmup", "2", "--out", str(out), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert {"group_rational fwd+bwd", "grkan_linear fwd+bwd", "KAT backward wrapper"} <= set(results)
    assert all(r["median_us"] > 0 for r in results.values()) and "<= 30 us" in proc.stdout
    out = tmp_path / "cpu.json"
    proc = _run("cpu_rational.py", "--skip-vit", "--reps", "2", "--out", str(out), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["benchmark"] == "cpu_rational" and {"rational forward / GELU", "rational fwd+bwd / GELU"} <= set(
        data["ratios"]
    )
