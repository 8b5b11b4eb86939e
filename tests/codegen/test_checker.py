"""Checker: a kernel only when every condition holds (Triton on CUDA or under the interpreter, kanc's C kernels on the
CPU for the ops that have one), the reference otherwise, with the reason."""

import torch

from kanc.codegen import checker


def test_cpu_needs_interpreter(monkeypatch):
    x = torch.ones(3)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert checker.use_kernel(x) is False
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert checker.use_kernel(x) is True


def test_switches_and_dtypes(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.ones(3)
    with checker.kernels_disabled():
        assert checker.use_kernel(x) is False
    assert checker.use_kernel(x) is True
    monkeypatch.setenv("KANC_KERNELS", "0")
    assert checker.use_kernel(x) is False
    monkeypatch.delenv("KANC_KERNELS")
    assert checker.use_kernel(x.double()) is False
    assert checker.use_kernel(torch.ones(0)) is False


def test_limits_bias_and_reasons(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.ones(3)
    assert checker.use_kernel(x, None) is True  # an absent bias is skipped
    assert checker.use_kernel(x, limits={"num_features": (512, 512)}) is True
    assert checker.use_kernel(x, limits={"num_features": (513, 512)}) is False
    assert checker.fallback_reason(x, limits={"num_features": (513, 512)}) == "shape limit"
    assert checker.fallback_reason(x.double()) == "dtype"
    assert checker.fallback_reason(torch.ones(0)) == "empty tensor"
    assert checker.fallback_reason(x, torch.ones(2, device="meta")) == "device"
    with checker.kernels_disabled():
        assert checker.fallback_reason(x) == "kernels disabled"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert checker.fallback_reason(x) == "no cpu kernel for this op"
    assert checker.kernel_route(x, cpu=True) == ("cpu", None)  # ops with a C kernel run it
    assert checker.kernel_route(x.double(), cpu=True) == (None, "dtype")  # fp64 stays on the reference
