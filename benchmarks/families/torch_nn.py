"""torch.nn's Transformer layers: encoder layer, decoder layer and the full Transformer, each with activation
"relu", "gelu" and a module (nn.GELU()), batch_first both ways.

Each layer's MLP is ``linear2(dropout(activation(linear1(x))))``; the activation is a function attribute for the
strings and a child module otherwise. The encoder layer takes PyTorch's fused fast path in eval mode under
no_grad (batch_first), which reads ``linear1.weight`` and ``linear2.weight`` directly.
"""

from __future__ import annotations

import torch
from torch import nn

from families.base import Built, Registry, act_name, check_count, members, seeded

REGISTRY = Registry()
D, HEADS, FF, BATCH, SRC, TGT = 32, 2, 64, 2, 5, 4
MLP_ATTRS = ("linear1", "activation", "dropout", "linear2")
ACTIVATIONS = {"relu": lambda: "relu", "gelu": lambda: "gelu", "module": nn.GELU}
LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _expected(model: nn.Module, count: int, what: str) -> list:
    # the activation a layer really runs: a function in its __dict__ shadows a child module of the same name
    found = members(model, LAYERS, MLP_ATTRS, lambda layer: act_name(layer.activation))
    return check_count(found, count, what)


def _seq(length: int, batch_first: bool, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (BATCH, length, D) if batch_first else (length, BATCH, D)
    return torch.randn(shape, generator=gen)


def _encoder(act: str, batch_first: bool) -> Built:
    seeded()
    model = nn.TransformerEncoderLayer(
        D, HEADS, FF, dropout=0.1, activation=ACTIVATIONS[act](), batch_first=batch_first
    )
    return Built(model, (_seq(SRC, batch_first, 1),), _expected(model, 1, "TransformerEncoderLayer"))


def _decoder(act: str, batch_first: bool) -> Built:
    seeded()
    model = nn.TransformerDecoderLayer(
        D, HEADS, FF, dropout=0.1, activation=ACTIVATIONS[act](), batch_first=batch_first
    )
    inputs = (_seq(TGT, batch_first, 1), _seq(SRC, batch_first, 2))
    return Built(model, inputs, _expected(model, 1, "TransformerDecoderLayer"))


def _transformer(act: str, batch_first: bool) -> Built:
    seeded()
    model = nn.Transformer(
        D, HEADS, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=FF, dropout=0.1,
        activation=ACTIVATIONS[act](), batch_first=batch_first,
    )  # fmt: skip
    inputs = (_seq(SRC, batch_first, 1), _seq(TGT, batch_first, 2))
    return Built(model, inputs, _expected(model, 2, "Transformer (1 encoder + 1 decoder layer)"))


def _register() -> None:
    kinds = {"encoder": _encoder, "decoder": _decoder, "transformer": _transformer}
    for kind, build in kinds.items():
        for act in ACTIVATIONS:
            for batch_first in (True, False):
                name = f"nn_{kind}_{act}_{'bf' if batch_first else 'sf'}"
                REGISTRY.add(name, "torch.nn")(lambda b=build, a=act, f=batch_first: b(a, f))


_register()
