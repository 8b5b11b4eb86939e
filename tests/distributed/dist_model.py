"""The model, loss and step the distributed tests and their single-process reference share."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "passes"))
import zoo  # noqa: E402

import kanc  # noqa: E402

DIM = 32
LR = 0.1


def build(target: str, seed: int = 0) -> nn.Module:
    """A two-block stack (a plain GELU MLP, a SwiGLU) converted by kanc.compile; the head has 5 rows (uneven shards)."""
    torch.manual_seed(seed)
    model = zoo.Stack(DIM, [zoo.Mlp(DIM, 96), zoo.SwiGLU(DIM, 64)])
    return kanc.compile(model, target, inplace=True, verify=False).train()


def loss(out: Tensor, target: Tensor) -> Tensor:
    return (out - target).square().mean()


def batch(seed: int = 0) -> tuple[Tensor, Tensor]:
    """8 sequences of 6 tokens (4 per rank) and regression targets."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(8, 6, DIM, generator=gen), torch.randn(8, 6, 5, generator=gen)
