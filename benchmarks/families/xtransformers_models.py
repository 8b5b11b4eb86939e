"""x-transformers (Encoder / Decoder, with and without ff_glu) and vit-pytorch (ViT, SimpleViT).

x-transformers' GLU is ``up * act(gate) * mult_bias``: a Python float 1. by default (issue 11's scalar factor
after the gated product), a per-channel parameter with ``ff_glu_mult_bias=True``.
"""

from __future__ import annotations

import torch

from families.base import Built, Registry, check_count, instances, require, seeded

REGISTRY = Registry()
VOCAB, SEQ, DIM, DEPTH = 100, 8, 32, 2


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


def _xt(kind: str, glu: bool, mult_bias: bool = False) -> Built:
    xt = require("x_transformers")
    seeded()
    layers = getattr(xt, kind)(dim=DIM, depth=DEPTH, heads=2, ff_glu=glu, ff_glu_mult_bias=mult_bias)
    model = xt.TransformerWrapper(num_tokens=VOCAB, max_seq_len=16, attn_layers=layers)
    found = instances(model, xt.x_transformers.FeedForward, "gelu")
    return Built(model, (_ids(),), check_count(found, DEPTH, "depth (one feed-forward per layer)"))


REGISTRY.add("xt_encoder", "x-transformers")(lambda: _xt("Encoder", False))
REGISTRY.add("xt_encoder_glu", "x-transformers")(lambda: _xt("Encoder", True))
REGISTRY.add("xt_decoder", "x-transformers")(lambda: _xt("Decoder", False))
REGISTRY.add("xt_decoder_glu", "x-transformers")(lambda: _xt("Decoder", True))
REGISTRY.add("xt_encoder_glu_mult_bias", "x-transformers", named=False)(lambda: _xt("Encoder", True, True))


def _vit_pytorch(simple: bool) -> Built:
    vp = require("vit_pytorch")
    seeded()
    cls, module = (vp.SimpleViT, vp.simple_vit) if simple else (vp.ViT, vp.vit)
    model = cls(image_size=32, patch_size=8, num_classes=10, dim=32, depth=DEPTH, heads=2, mlp_dim=64)
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    found = instances(model, module.FeedForward, "gelu")
    return Built(model, (image,), check_count(found, DEPTH, "depth"))


REGISTRY.add("vit_pytorch_vit", "vit-pytorch")(lambda: _vit_pytorch(False))
REGISTRY.add("vit_pytorch_simple_vit", "vit-pytorch")(lambda: _vit_pytorch(True))
