"""Kernel-to-reference fallbacks are visible: counted per layer (which layer, which op, why), listed by
kanc.report, said once per layer and reason on stderr with KANC_DEBUG=1, and once per model when no layer has a
kernel on this device."""

import pytest
import torch
from torch import nn

import kanc
from kanc.codegen import fallbacks
from kanc.nn import GRKANMlp, GroupRational, Mlp, SNNKMlp

SNNK_CPU = ("kanc::snnk_block", "no cpu kernel for this op")


@pytest.fixture(autouse=True)
def _fresh_counts():
    fallbacks.reset()
    yield
    fallbacks.reset()


def _snnk_model(blocks: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Sequential(nn.LayerNorm(16), SNNKMlp(16, 16, 8)) for _ in range(blocks)))


def test_counted_per_layer_op_and_reason():
    """fp64 rationals run the reference (dtype); an SNNK block has no CPU kernel: its count is charged to the block,
    not to the nn.Linear holding its readout weight; fp32 rationals run the C kernel and count nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(
        GroupRational(16, 4), nn.Sequential(GroupRational(16, 4)), SNNKMlp(16, 16, 8), GRKANMlp(16, 32)
    )
    x = torch.randn(3, 16)
    for _ in range(3):
        model(x)
    assert fallbacks.of_model(model) == [fallbacks.Fallback("2", "SNNKMlp", *SNNK_CPU, 3)]
    model.double()
    before = fallbacks.snapshot()
    model(x.double())
    rows = fallbacks.of_model(model, since=before)
    assert [(r.layer, r.op, r.reason, r.calls) for r in rows] == [
        ("0", "kanc::group_rational", "dtype", 1),
        ("1.0", "kanc::group_rational", "dtype", 1),
        ("2", "kanc::snnk_block", "dtype", 1),  # the first condition that fails is the reason
        ("3.fc1", "kanc::grkan_linear", "dtype", 1),
        ("3.fc2", "kanc::grkan_linear", "dtype", 1),
    ]
    totals = [(r.layer, r.reason, r.calls) for r in fallbacks.of_model(model) if r.layer == "2"]
    assert totals == [("2", "dtype", 1), ("2", SNNK_CPU[1], 3)] and "fp32, fp16, bf16" in rows[0].text


def test_debug_says_it_once_per_layer_and_reason(monkeypatch, capfd):
    monkeypatch.setenv("KANC_DEBUG", "1")
    torch.manual_seed(0)
    model = nn.Sequential(GroupRational(16, 4), nn.GELU(), GroupRational(16, 4)).double()
    for _ in range(3):
        model(torch.randn(2, 16, dtype=torch.float64))
    lines = [line for line in capfd.readouterr().err.splitlines() if "runs the PyTorch reference" in line]
    assert lines == [
        "[kanc] 0 (GroupRational): kanc::group_rational runs the PyTorch reference: dtype not supported by the kernels"
        " (fp32, fp16, bf16)",
        "[kanc] 2 (GroupRational): kanc::group_rational runs the PyTorch reference: dtype not supported by the kernels"
        " (fp32, fp16, bf16)",
    ]
    snnk = _snnk_model(4)  # a reason that holds for every layer here: one line for all of them, once
    for _ in range(2):
        snnk(torch.randn(2, 16))
    lines = [line for line in capfd.readouterr().err.splitlines() if "runs the PyTorch reference" in line]
    assert lines == [
        "[kanc] kanc::snnk_block runs the PyTorch reference in every layer: no CPU kernel for this op (its kernel runs"
        " on CUDA, or under TRITON_INTERPRET=1)"
    ]


def test_report_says_a_model_without_kernels_once():
    torch.manual_seed(0)
    source = nn.Sequential(*(nn.Sequential(nn.LayerNorm(16), Mlp(16, 32)) for _ in range(5)))
    model = kanc.compile(source, target="snnk", num_features=8)
    model(torch.randn(2, 16))
    report = kanc.report(model)
    (line,) = report.fallbacks
    assert line.startswith("5 layers (0.1.snnk, 1.1.snnk, ...): kanc::snnk_block ran the PyTorch reference (")
    assert line.endswith("calls): no CPU kernel for this op (its kernel runs on CUDA, or under TRITON_INTERPRET=1)")
    assert "kernel fallbacks (calls so far, per layer):\n  5 layers" in str(report)
    assert report.as_dict()["fallbacks"] == [line]


def test_report_lists_each_layer_and_nothing_for_kernels():
    torch.manual_seed(0)
    model = kanc.compile(nn.Sequential(Mlp(16, 32)), target="grkan")
    model(torch.randn(2, 16))  # fp32 on the CPU: the C kernel, no fallback
    assert kanc.report(model).fallbacks == [] and "kernel fallbacks" not in str(kanc.report(model))
    model.double()(torch.randn(2, 16, dtype=torch.float64))
    lines = kanc.report(model).fallbacks
    assert [line.split(":")[0] for line in lines] == ["0.fc1", "0.fc2"]
    assert all("kanc::grkan_linear ran the PyTorch reference (1 calls): dtype" in line for line in lines)
