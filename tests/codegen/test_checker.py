"""Checker: kernel only when every condition holds, reference otherwise."""

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
