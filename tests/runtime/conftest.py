"""Models for the runtime tests (as fixtures): a small GR-KAN / SNNK model built from kanc.nn, and layers that
record kernel launches the way kanc's launchers do (``kanc.codegen.launches.record``), so that launch attribution
is tested on the CPU without Triton."""

import pytest
import torch
from torch import nn

from kanc.codegen import tuning
from kanc.codegen.launches import Launch, record
from kanc.nn import GRKANMlp, GroupRational, SNNKMlp


class Block(nn.Module):
    """Pre-norm residual MLP block, as in a ViT."""

    def __init__(self, dim: int, mlp: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


def small_kan_model(dim: int = 32) -> nn.Module:
    """A hand-converted model: embedding layer, a GR-KAN block (KAT's), an MLP block whose activation is a
    standalone group rational (module "2.mlp.1"), an SNNK block (module "3.mlp"), a head."""
    torch.manual_seed(0)
    rational_mlp = nn.Sequential(nn.Linear(dim, 2 * dim), GroupRational(2 * dim, groups=8, init="gelu"),
                                 nn.Linear(2 * dim, dim))  # fmt: skip
    return nn.Sequential(
        nn.Linear(16, dim),
        Block(dim, GRKANMlp(dim, 2 * dim, dim, groups=8)),
        Block(dim, rational_mlp),
        Block(dim, SNNKMlp(dim, dim, 64, kind="relu")),
        nn.Linear(dim, 10),
    )


class _FakeKernel(torch.autograd.Function):
    """Doubles x; 'launches' one forward kernel, and a backward kernel issuing 10 atomics per element."""

    @staticmethod
    def forward(ctx, x):
        record(Launch("kanc::fake", "_fake_fwd_kernel", (4,), {"BLOCK": 64}, 0, (tuple(x.shape),), str(x.dtype)))
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        atomics = 10 * grad.numel()
        extra = {"direction": "backward"}
        record(
            Launch("kanc::fake", "_fake_bwd_kernel", (4, 2), {"BLOCK": 32}, atomics, (tuple(grad.shape),), "", extra)
        )
        return grad * 2


class FakeKernelLayer(nn.Module):
    """Uncounted layer that launches the fake kernels."""

    def forward(self, x):
        return _FakeKernel.apply(x)


class AtomicRational(GroupRational):
    """A counted layer (a group rational) whose backward also launches the many-atomics fake kernel."""

    def forward(self, x):
        return _FakeKernel.apply(super().forward(x))


CANDIDATES = [{"BLOCK": 64}, {"BLOCK": 128}, {"BLOCK": 256}]
FAKE_MS = {64: 3.0, 128: 1.0, 256: 2.0}  # what the stand-in benchmark reports per config


class _Tunable(torch.autograd.Function):
    """A stand-in launcher: asks the tuning cache for its config (as kanc's launchers do) and records the launch."""

    @staticmethod
    def forward(ctx, x):
        _launch("_tuned_fwd_kernel", x)
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        _launch("_tuned_bwd_kernel", grad)
        return grad * 2


def _launch(kernel, x):
    key = (x.numel(), str(x.dtype))
    config = tuning.pick_config(kernel, key, CANDIDATES, lambda c: FAKE_MS[c["BLOCK"]], x.device)
    record(Launch("kanc::tunable", kernel, (x.numel() // config["BLOCK"] + 1,), config, 0, (tuple(x.shape),), ""))
    return config


class TunableLayer(nn.Module):
    def forward(self, x):
        return _Tunable.apply(x)


@pytest.fixture
def tunable_layer():
    return TunableLayer


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """An empty kanc cache (tuned configs) for the test."""
    monkeypatch.setenv("KANC_CACHE_DIR", str(tmp_path / "cache"))
    tuning.clear_memory_caches()
    yield tmp_path / "cache"
    tuning.set_autotune(None)
    tuning.clear_memory_caches()


@pytest.fixture
def kan_model():
    return small_kan_model()


@pytest.fixture
def make_kan_model():
    return small_kan_model


@pytest.fixture
def fake_kernel_layer():
    return FakeKernelLayer


@pytest.fixture
def atomic_rational():
    return AtomicRational
