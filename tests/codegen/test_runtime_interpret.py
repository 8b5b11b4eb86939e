"""kanc.profile under TRITON_INTERPRET=1: kanc's kernels run (in Triton's CPU interpreter), their launches are
recorded and charged to the layers, and the report says the times are the interpreter's."""

import os

import pytest
import torch
from torch import nn

import kanc
from kanc.nn import GroupRational
from kanc.runtime import validate

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


def test_profile_records_interpreted_kernel_launches(tmp_path):
    torch.manual_seed(0)
    # one program per launch under the interpreter is ~1.5 ms: keep the shapes tiny
    model = nn.Sequential(nn.Linear(16, 32), GroupRational(32, groups=4, init="gelu"), nn.Linear(32, 8))
    report = kanc.profile(model, torch.randn(4, 16), train=True, warmup=1, iters=1)
    rows = {row.direction: row for row in report.layers if row.name == "1"}
    assert report.kernels, "no kanc kernel launch was recorded under TRITON_INTERPRET=1"
    assert report.run["interpreter"] and "Triton interpreter" in report.run["timer"]
    assert rows["forward"].path == "kernel" and rows["forward"].launches >= 1
    assert rows["backward"].path == "kernel" and rows["backward"].launches >= 1
    kernels = {(k.layer, k.direction) for k in report.kernels}
    assert {("1", "forward"), ("1", "backward")} <= kernels
    assert all(k.programs >= 1 and k.time_ms is not None for k in report.kernels)
    assert any("Triton-interpreter times" in f.text for f in report.findings)
    out = report.write(tmp_path / "prof")
    assert validate(report.to_json()) == [] and (out / "report.html").is_file()
