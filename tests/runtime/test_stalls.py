"""Memory-stall collection without a GPU: ncu's CSV parsed from a synthetic sample, the ncu run driven through a
stand-in ``ncu`` executable (which runs the real child process on the CPU), and proton's hatchet tree."""

import json
import os
import stat
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kanc.runtime import stalls

DATA = Path(__file__).parent / "data"
KANC_KERNELS = {"_rational_fwd_kernel", "_rational_bwd_kernel"}


def _synthetic_csv() -> str:
    return (DATA / "ncu_raw_synthetic.csv").read_text()


def test_raw_csv_parses_every_launch_past_the_preamble():
    launches = stalls.parse_ncu_csv(_synthetic_csv())
    assert [launch["kernel"] for launch in launches] == [
        "_rational_fwd_kernel",
        "_rational_bwd_kernel",
        "ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_tn",
        "_rational_fwd_kernel",
    ]
    first = launches[0]["metrics"]
    assert first["dram__bytes_read.sum"] == 19_660_800  # thousands separators
    assert first["gpu__time_duration.sum"] == 13_000
    assert launches[3]["metrics"]["sm__throughput.avg.pct_of_peak_sustained_elapsed"] is None  # "n/a"
    assert launches[1]["grid"] == "(300, 8, 1)"


def test_summary_per_kanc_kernel():
    found = {k.kernel: k for k in stalls.summarise_ncu(stalls.parse_ncu_csv(_synthetic_csv()), KANC_KERNELS)}
    assert set(found) == KANC_KERNELS  # the cuBLAS kernel is filtered out
    fwd, bwd = found["_rational_fwd_kernel"], found["_rational_bwd_kernel"]
    assert fwd.launches == 2 and fwd.duration_ms == pytest.approx(0.026)
    assert fwd.dram_throughput_pct == pytest.approx(85.0)  # duration-weighted mean of 85.5 and 84.5
    assert fwd.sm_throughput_pct == pytest.approx(20.3)  # the n/a launch does not count
    assert fwd.samples_total == 4000 and fwd.long_scoreboard_fraction == pytest.approx(2780 / 4000)
    assert bwd.lg_throttle_fraction == pytest.approx(0.3) and bwd.long_scoreboard_fraction == pytest.approx(0.4)
    assert bwd.achieved_occupancy_pct == pytest.approx(40.5) and bwd.l2_throughput_pct == pytest.approx(45.2)
    assert bwd.to_json()["lg_throttle_fraction"] == pytest.approx(0.3)


def test_details_page_layout_with_human_units():
    # ncu's default --csv page: one row per metric (synthetic, same documented metric names)
    text = textwrap.dedent("""\
        "ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
        "0","1","python","h","void _rational_bwd_kernel<float>(float*, int)","1","7","(128, 1, 1)","(300, 8, 1)","0","9.0","GPU Speed Of Light Throughput","gpu__time_duration.sum","usecond","52.00"
        "0","1","python","h","void _rational_bwd_kernel<float>(float*, int)","1","7","(128, 1, 1)","(300, 8, 1)","0","9.0","GPU Speed Of Light Throughput","dram__throughput.avg.pct_of_peak_sustained_elapsed","%","31.00"
        "0","1","python","h","void _rational_bwd_kernel<float>(float*, int)","1","7","(128, 1, 1)","(300, 8, 1)","0","9.0","Memory Workload Analysis","dram__bytes_read.sum","Mbyte","29.49"
    """)  # noqa: E501
    (launch,) = stalls.parse_ncu_csv(text)
    assert launch["kernel"] == "_rational_bwd_kernel"
    assert launch["metrics"]["gpu__time_duration.sum"] == pytest.approx(52_000)  # usecond -> ns
    assert launch["metrics"]["dram__bytes_read.sum"] == pytest.approx(29.49e6)
    (k,) = stalls.summarise_ncu([launch])
    assert k.duration_ms == pytest.approx(0.052) and k.dram_throughput_pct == 31.0


def test_garbage_is_no_launch():
    assert stalls.parse_ncu_csv("==ERROR== the application returned an error\n") == []
    assert stalls.kernel_base_name("void ns::kern<1, 2>(float const*, int)") == "kern"


def test_ncu_command_filters_kanc_kernels_and_collects_the_stall_metrics(tmp_path):
    cmd = stalls.ncu_command("ncu", ["b_kernel", "a_kernel", "a_kernel"], ["python", "child.py"], tmp_path / "r")
    text = " ".join(cmd)
    assert cmd[:3] == ["ncu", "--profile-from-start", "off"] and cmd[-2:] == ["python", "child.py"]
    assert "-k regex:^(a_kernel|b_kernel)$" in text and "--kernel-name-base function" in text
    assert "--section SourceCounters" in text and "--section WarpStateStats" in text
    metrics = cmd[cmd.index("--metrics") + 1].split(",")
    assert "smsp__pcsamp_warps_issue_stalled_long_scoreboard" in metrics
    assert "smsp__pcsamp_warps_issue_stalled_lg_throttle" in metrics
    assert "sm__warps_active.avg.pct_of_peak_sustained_active" in metrics
    assert "--metrics" not in stalls.ncu_command("ncu", ["k"], [], tmp_path / "r", metrics=False)


FAKE_NCU = """\
#!{python}
# Stand-in for Nsight Compute: runs the profiled command for real, writes a dummy report, and on --import prints
# the synthetic CSV. Logs its arguments for the test.
import json, subprocess, sys
args = sys.argv[1:]
with open({log!r}, "a") as f:
    f.write(json.dumps(args) + "\\n")
if "--import" in args:
    print(open({csv!r}).read())
    sys.exit(0)
if {reject_metrics} and "--metrics" in args:
    print("==ERROR== Failed to find metric smsp__pcsamp_sample_count", file=sys.stderr)
    sys.exit(1)
child = args[args.index("-m") - 1:]
run = subprocess.run(child, capture_output=True, text=True)
print(run.stdout, run.stderr)
open(args[args.index("--export") + 1] + ".ncu-rep", "w").write("report")
sys.exit(run.returncode)
"""


def _fake_ncu(tmp_path, reject_metrics=False):
    path = tmp_path / "ncu"
    log = tmp_path / "ncu.log"
    source = FAKE_NCU.format(python=sys.executable, log=str(log), csv=str(DATA / "ncu_raw_synthetic.csv"),
                             reject_metrics=reject_metrics)  # fmt: skip
    path.write_text(source)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path, log


def _spec(kan_model, workdir, train=True):
    x = torch.randn(2, 5, 16, requires_grad=train)
    files = stalls.write_child_inputs(kan_model, (x,), {}, workdir)
    return {**files, "device": "cpu", "train": train, "warmup": 1}


def test_collect_ncu_runs_the_child_under_ncu_and_reads_its_csv(tmp_path, kan_model):
    ncu, log = _fake_ncu(tmp_path)
    workdir = tmp_path / "work"
    workdir.mkdir()
    found = stalls.collect_ncu(_spec(kan_model, workdir), sorted(KANC_KERNELS), workdir, ncu=str(ncu))
    assert found.tool == "ncu" and {k.kernel for k in found.kernels} == KANC_KERNELS
    assert "sections and metrics" in found.note and "3 launches of 2 kernels" in found.note
    profile_args, import_args = (json.loads(line) for line in log.read_text().splitlines())
    assert "regex:^(_rational_bwd_kernel|_rational_fwd_kernel)$" in profile_args
    assert profile_args[-3:-1] == ["-m", "kanc.runtime.ncu_child"]
    assert import_args[:2] == ["--import", str(workdir / "kanc_ncu.ncu-rep")] and "raw" in import_args
    assert json.loads((workdir / "spec.json").read_text())["device"] == "cpu"


def test_collect_ncu_retries_with_sections_when_a_metric_is_rejected(tmp_path, kan_model):
    ncu, log = _fake_ncu(tmp_path, reject_metrics=True)
    workdir = tmp_path / "work"
    workdir.mkdir()
    found = stalls.collect_ncu(_spec(kan_model, workdir, train=False), sorted(KANC_KERNELS), workdir, ncu=str(ncu))
    assert found.tool == "ncu" and "sections only" in found.note
    assert len(log.read_text().splitlines()) == 3  # rejected, sections only, import


def test_collect_ncu_reports_a_failing_child(tmp_path, kan_model):
    ncu, _ = _fake_ncu(tmp_path)
    workdir = tmp_path / "work"
    workdir.mkdir()
    spec = _spec(kan_model, workdir)
    spec["inputs"] = str(workdir / "missing.pt")
    found = stalls.collect_ncu(spec, sorted(KANC_KERNELS), workdir, ncu=str(ncu))
    assert found.tool is None and found.note.startswith("ncu failed:") and not found.kernels


def test_ncu_path_honours_kanc_ncu(tmp_path, monkeypatch):
    monkeypatch.setenv("KANC_NCU", str(tmp_path / "nope"))
    assert stalls.ncu_path() is None
    ncu, _ = _fake_ncu(tmp_path)
    monkeypatch.setenv("KANC_NCU", str(ncu))
    assert stalls.ncu_path() == str(ncu)
    monkeypatch.delenv("KANC_NCU")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert stalls.ncu_path() is None
    assert "not found" in stalls.collect_ncu({}, ["k"], tmp_path).note


def test_child_process_runs_a_pickled_model(tmp_path, kan_model):
    spec = _spec(kan_model, tmp_path)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    run = subprocess.run([sys.executable, "-m", "kanc.runtime.ncu_child", str(tmp_path / "spec.json")],
                         capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "ran 1 warm-up steps and 1 profiled step on cpu" in run.stdout


def test_proton_tree_gives_kernel_times():
    # synthetic hatchet tree in proton's layout (a scope frame with kernel leaves, then device info)
    tree = [
        {
            "frame": {"name": "ROOT", "type": "function"},
            "metrics": {"count": 0, "time (ns)": 0},
            "children": [
                {
                    "frame": {"name": "step", "type": "function"},
                    "metrics": {},
                    "children": [
                        {"frame": {"name": "_rational_fwd_kernel", "type": "function"}, "children": [],
                         "metrics": {"count": 2, "device_id": "0", "device_type": "CUDA", "time (ns)": 26000}},
                        {"frame": {"name": "_rational_bwd_kernel", "type": "function"}, "children": [],
                         "metrics": {"count": 1, "device_id": "0", "device_type": "CUDA", "time (ns)": 52000}},
                        {"frame": {"name": "other_kernel", "type": "function"}, "children": [],
                         "metrics": {"count": 1, "device_id": "0", "device_type": "CUDA", "time (ns)": 1000}},
                    ],
                }
            ],
        },
        {"CUDA": {"0": {"arch": "90", "num_sms": 132}}},
    ]  # fmt: skip
    found = {k.kernel: k for k in stalls.parse_proton(tree, KANC_KERNELS)}
    assert set(found) == KANC_KERNELS
    assert found["_rational_fwd_kernel"].launches == 2 and found["_rational_fwd_kernel"].duration_ms == 0.026
    assert found["_rational_bwd_kernel"].long_scoreboard_fraction is None  # proton has no stall reasons


def test_profile_on_cpu_says_why_there_are_no_stall_counters(kan_model):
    import kanc

    report = kanc.profile(kan_model, torch.randn(2, 5, 16), warmup=1, iters=1)
    assert report.stalls.tool is None and "need a CUDA GPU" in report.stalls.note
    assert report.to_json()["stalls"] == {"tool": None, "available": False, "note": report.stalls.note, "kernels": []}
    off = kanc.profile(kan_model, torch.randn(2, 5, 16), warmup=1, iters=1, stalls="none")
    assert "switched off" in off.stalls.note


def test_a_class_from_a_script_cannot_reach_the_child(tmp_path):
    class ScriptModel(torch.nn.Linear):
        pass

    ScriptModel.__module__ = "__main__"
    with pytest.raises(ValueError, match="ScriptModel is defined in the __main__ script"):
        stalls.write_child_inputs(ScriptModel(2, 2), (), {}, tmp_path)
    assert not (tmp_path / "model.pt").exists()
