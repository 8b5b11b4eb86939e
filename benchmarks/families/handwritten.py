"""Handwritten model code: a nanoGPT-style GPT (issue 11) and stress cases written the way real code is, each
around one pattern that defeats symbolic tracing or a naive rewrite:

- data-dependent control flow around the MLP;
- ``F.gelu`` inside a nested expression of a layer's forward (with control flow, so the layer does not trace);
- the activation stored as a function attribute (``self.act = F.silu``);
- optional forward arguments;
- a norm between fc1 and the activation (LayerNorm, and BatchNorm as LeViT has it);
- a GLU with a scalar factor after the gated product;
- a block whose fc1 weight is read elsewhere in the forward (dtype and value, as open_clip and tied weights do);
- one MLP module called twice (shared weights).

Every model has an embedding and a residual stream around its blocks, so that a block is never the whole model.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from families.base import Built, Expected, Registry, check_count, instances, seeded

REGISTRY = Registry()
D, H, SEQ, BATCH = 32, 64, 6, 2


def _tokens(d: int = D) -> torch.Tensor:
    return torch.randn(BATCH, SEQ, d, generator=torch.Generator().manual_seed(1))


# ---- nanoGPT ---------------------------------------------------------------------------------------------------


class LayerNorm(nn.Module):
    """nanoGPT's LayerNorm with an optional bias."""

    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head, self.n_embd = n_head, n_embd

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln_1, self.attn = LayerNorm(n_embd, bias=True), CausalSelfAttention(n_embd, n_head)
        self.ln_2, self.mlp = LayerNorm(n_embd, bias=True), MLP(n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int = 100, block_size: int = 16, n_layer: int = 2, n_embd: int = D, n_head: int = 2):
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab, n_embd), wpe=nn.Embedding(block_size, n_embd), drop=nn.Dropout(0.1),
                h=nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)]), ln_f=LayerNorm(n_embd, bias=True),
            )
        )  # fmt: skip
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying

    def forward(self, idx, targets=None):
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


@REGISTRY.add("nanogpt", "handwritten")
def _nanogpt() -> Built:
    seeded()
    model = GPT()
    ids = torch.randint(0, 100, (BATCH, 8), generator=torch.Generator().manual_seed(1))
    return Built(model, (ids,), check_count(instances(model, MLP, "gelu"), 2, "n_layer"))


# ---- stress cases ----------------------------------------------------------------------------------------------


class Residual(nn.Module):
    """x -> x + block(norm(x)) for a stack of blocks, after a linear embedding."""

    def __init__(self, blocks: list[nn.Module], d: int = D) -> None:
        super().__init__()
        self.embed = nn.Linear(d, d)
        self.norms = nn.ModuleList([nn.LayerNorm(d) for _ in blocks])
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        x = self.embed(x)
        for norm, block in zip(self.norms, self.blocks):
            x = x + block(norm(x))
        return x


class ControlFlowMlp(nn.Module):
    """Data-dependent control flow before the MLP (fx cannot trace ``if`` on a tensor value)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(D, H), nn.GELU(), nn.Linear(H, D)

    def forward(self, x):
        if x.abs().amax() > 1e4:  # guard against runaway activations
            x = x / x.abs().amax()
        return self.fc2(self.act(self.fc1(x)))


class NestedGeluLayer(nn.Module):
    """Attention and MLP in one forward; ``F.gelu`` in a nested expression; a data-dependent branch."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.fc1, self.fc2 = nn.Linear(D, H), nn.Linear(H, D)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D), dim=-1)
        x = x + self.proj(attn @ v)
        scale = 0.5 if bool((x.mean() > 10).item()) else 1.0
        return x + scale * self.fc2(self.drop(F.gelu(self.fc1(self.norm2(x)), approximate="tanh")))


class FunctionAttrMlp(nn.Module):
    """The activation stored as a function attribute, as TransformerEncoderLayer(activation="gelu") does."""

    def __init__(self, act=F.silu) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, H), nn.Linear(H, D)
        self.act = act

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class OptionalArgsMlp(nn.Module):
    """Optional forward arguments that change the computation when given (the model never gives them)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, H), nn.Linear(H, D)

    def forward(self, x, scale: float | None = None, mask: torch.Tensor | None = None):
        h = self.fc1(x)
        if scale is not None:
            h = h * scale
        h = F.gelu(h)
        if mask is not None:
            h = h * mask
        return self.fc2(h)


class NormBetweenMlp(nn.Module):
    """fc1 -> norm over the hidden width -> activation -> fc2 (LayerNorm; or BatchNorm as LeViT's LinearNorm)."""

    def __init__(self, batch_norm: bool) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, H), nn.Linear(H, D)
        self.batch_norm = batch_norm
        self.norm = nn.BatchNorm1d(H) if batch_norm else nn.LayerNorm(H)
        self.act = nn.GELU()

    def forward(self, x):
        h = self.fc1(x)
        h = self.norm(h.flatten(0, 1)).reshape_as(h) if self.batch_norm else self.norm(h)
        return self.fc2(self.act(h))


class ScaledGlu(nn.Module):
    """down(silu(gate(x)) * up(x) * factor): a scalar factor after the gated product (x-transformers' mult_bias)."""

    def __init__(self, factor: float = 0.5) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(D, H), nn.Linear(D, H), nn.Linear(H, D)
        self.factor = factor

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x) * self.factor)


class WeightReader(nn.Module):
    """A model that reads its MLP's fc1 weight outside the MLP: its dtype (open_clip's get_weight_dtype) and its
    values (a gate computed from it)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, D))

    def forward(self, x):
        x = self.embed(x.to(self.mlp[0].weight.dtype))
        gate = torch.sigmoid(self.mlp[0].weight.mean(dim=0)[: x.shape[-1]])
        return x + gate * self.mlp(self.norm(x))


class SharedMlp(nn.Module):
    """One MLP module applied twice (shared weights): one block, called twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, D))

    def forward(self, x):
        x = x + self.mlp(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _stack(block: type, act: str, *args) -> Built:
    seeded()
    model = Residual([block(*args), block(*args)])
    return Built(model, (_tokens(),), check_count(instances(model, block, act), 2, "two blocks"))


def _inline(layer: type, act: str) -> Built:
    seeded()
    model = Residual([layer(), layer()])
    found = [Expected(p, (f"{p}.fc1", f"{p}.fc2"), act) for p, m in model.named_modules() if isinstance(m, layer)]
    return Built(model, (_tokens(),), check_count(found, 2, "two layers"))


REGISTRY.add("stress_control_flow", "handwritten", named=False)(lambda: _stack(ControlFlowMlp, "gelu"))
REGISTRY.add("stress_nested_gelu", "handwritten", named=False)(lambda: _inline(NestedGeluLayer, "gelu"))
REGISTRY.add("stress_function_attr", "handwritten", named=False)(lambda: _stack(FunctionAttrMlp, "silu"))
REGISTRY.add("stress_optional_args", "handwritten", named=False)(lambda: _stack(OptionalArgsMlp, "gelu"))
REGISTRY.add("stress_norm_between", "handwritten", named=False)(lambda: _stack(NormBetweenMlp, "gelu", False))
REGISTRY.add("stress_batchnorm_between", "handwritten", named=False)(lambda: _stack(NormBetweenMlp, "gelu", True))
REGISTRY.add("stress_glu_scalar", "handwritten", named=False)(lambda: _stack(ScaledGlu, "silu"))


@REGISTRY.add("stress_weight_read", "handwritten", named=False)
def _weight_read() -> Built:
    seeded()
    model = WeightReader()
    return Built(model, (_tokens(),), [Expected("mlp", ("mlp",), "gelu")])


@REGISTRY.add("stress_shared_mlp", "handwritten", named=False)
def _shared() -> Built:
    seeded()
    model = SharedMlp()
    return Built(model, (_tokens(),), [Expected("mlp", ("mlp",), "gelu")])
