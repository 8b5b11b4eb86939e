"""Models the conversion tests run on: timm-style blocks copied here (timm cannot be imported without torchvision),
plain torch models written the ways people write them, and tiny Hugging Face configs with random weights.

Every model comes with its inputs and the exact number of blocks kanc must find in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ---- timm.layers.mlp, structure copied (timm 1.0) ---------------------------------------------------------------


class Mlp(nn.Module):
    """timm.layers.Mlp: fc1, act, drop1, norm (Identity unless norm_layer), fc2, drop2."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, norm_layer=None,
                 bias=True, drop=0.0):  # fmt: skip
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = norm_layer(hidden_features) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        x = self.fc1(x)
        x = self.act(x)
        x = self.drop1(x)
        x = self.norm(x)
        x = self.fc2(x)
        x = self.drop2(x)
        return x


class GluMlp(nn.Module):
    """timm.layers.GluMlp: one fc1 producing both halves, chunked; gate on the last half by default."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.Sigmoid, norm_layer=None,
                 bias=True, drop=0.0, gate_last=True):  # fmt: skip
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        assert hidden_features % 2 == 0
        self.chunk_dim = -1
        self.gate_last = gate_last
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = norm_layer(hidden_features // 2) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_features // 2, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        x = self.fc1(x)
        x1, x2 = x.chunk(2, dim=self.chunk_dim)
        x = x1 * self.act(x2) if self.gate_last else self.act(x1) * x2
        x = self.drop1(x)
        x = self.norm(x)
        x = self.fc2(x)
        x = self.drop2(x)
        return x


class SwiGLU(nn.Module):
    """timm.layers.SwiGLU: separate gate and value projections, then norm and fc2."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.SiLU, norm_layer=None,
                 bias=True, drop=0.0):  # fmt: skip
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1_g = nn.Linear(in_features, hidden_features, bias=bias)
        self.fc1_x = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = norm_layer(hidden_features) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        x_gate = self.fc1_g(x)
        x = self.fc1_x(x)
        x = self.act(x_gate) * x
        x = self.drop1(x)
        x = self.norm(x)
        x = self.fc2(x)
        x = self.drop2(x)
        return x


class ConvMlp(nn.Module):
    """timm.layers.ConvMlp without a norm: 1x1 convs on channels-first maps (norm is an Identity before act)."""

    def __init__(self, in_features, hidden_features, act_layer=nn.ReLU):
        super().__init__()
        self.fc1 = nn.Conv2d(in_features, hidden_features, kernel_size=1, bias=True)
        self.norm = nn.Identity()
        self.act = act_layer()
        self.drop = nn.Dropout(0.0)
        self.fc2 = nn.Conv2d(hidden_features, in_features, kernel_size=1, bias=True)

    def forward(self, x):
        x = self.fc1(x)
        x = self.norm(x)
        x = self.act(x)
        x = self.drop(x)
        x = self.fc2(x)
        return x


class Block(nn.Module):
    """Pre-norm residual block around any MLP."""

    def __init__(self, dim: int, mlp: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = mlp

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.norm(x))


class Stack(nn.Module):
    """Embedding-free stack of blocks with a head (traces whole)."""

    def __init__(self, dim: int, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(Block(dim, b) for b in blocks))
        self.head = nn.Linear(dim, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(x))


# ---- plain torch models ----------------------------------------------------------------------------------------


class FunctionalMlp(nn.Module):
    """Activation as a function call in forward (F.gelu, tanh form)."""

    def __init__(self, d: int = 32, h: int = 128) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class MethodMlp(nn.Module):
    """Activation as a tensor method, with F.dropout between."""

    def __init__(self, d: int = 32, h: int = 64) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.dropout(self.fc1(x).relu(), 0.1, self.training))


class Branchy(nn.Module):
    """Data-dependent Python control flow around two MLPs: the root does not trace, its children do."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.a = Mlp(d, 4 * d)
        self.b = Mlp(d, 4 * d, act_layer=nn.SiLU)
        self.c = FunctionalMlp(d, 2 * d)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        if h.mean() > 0:  # data-dependent: fx cannot trace this
            x = x + self.a(h)
        else:
            x = x + self.b(h)
        return x + self.c(self.norm(x))


class Residual(nn.Module):
    """fc1's output also feeds a residual: converting would cross it (a skip)."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, d), nn.GELU(), nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        return self.fc2(self.act(h)) + h


class Tied(nn.Module):
    """The same fc2 used by two blocks (shared weights): both are skipped."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.up1, self.up2, self.act, self.down = nn.Linear(d, 32), nn.Linear(d, 32), nn.GELU(), nn.Linear(32, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.act(self.up1(x))) + self.down(self.act(self.up2(x)))


class SharedAct(nn.Module):
    """One activation module used by two MLPs: both convert (the activation is removed in the graph)."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.act = nn.GELU()
        self.a1, self.a2 = nn.Linear(d, 32), nn.Linear(32, d)
        self.b1, self.b2 = nn.Linear(d, 32), nn.Linear(32, d)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.a2(self.act(self.a1(x)))
        return x + self.b2(self.act(self.b1(x)))


class NoMlp(nn.Module):
    """Linear layers but no activation between them: nothing to convert."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d, 32), nn.Linear(32, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.a(x)).softmax(-1)


def sequential_mlp(d: int = 32, h: int = 128) -> nn.Module:
    return nn.Sequential(nn.Linear(d, h), nn.GELU(approximate="tanh"), nn.Dropout(0.1), nn.Linear(h, d))


# ---- Hugging Face, tiny random configs -------------------------------------------------------------------------


def gpt2(layers: int = 2, dim: int = 64) -> nn.Module:
    import transformers

    cfg = transformers.GPT2Config(n_layer=layers, n_embd=dim, n_head=2, vocab_size=100, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg)


def llama(layers: int = 2, dim: int = 64) -> nn.Module:
    import transformers

    cfg = transformers.LlamaConfig(
        num_hidden_layers=layers, hidden_size=dim, intermediate_size=2 * dim, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def bert(layers: int = 2, dim: int = 64) -> nn.Module:
    import transformers

    cfg = transformers.BertConfig(
        num_hidden_layers=layers, hidden_size=dim, intermediate_size=2 * dim, num_attention_heads=2, vocab_size=100,
        max_position_embeddings=64,
    )  # fmt: skip
    return transformers.BertModel(cfg)


# ---- the cases -------------------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    build: Any
    inputs: Any  # callable(seed) -> model inputs
    blocks: int  # blocks kanc must convert
    patterns: dict[str, int]
    output: str = "output"  # which output to compare (HF: logits / last_hidden_state)


def opt(layers: int = 2, dim: int = 64) -> nn.Module:
    """OPT: the MLP (fc1, activation_fn, fc2) is written inline in a decoder layer that does not trace."""
    import transformers

    cfg = transformers.OPTConfig(
        num_hidden_layers=layers, hidden_size=dim, num_attention_heads=2, ffn_dim=4 * dim, vocab_size=100,
        word_embed_proj_dim=dim, activation_function="gelu", max_position_embeddings=64,
    )  # fmt: skip
    return transformers.OPTForCausalLM(cfg)


def bart(dim: int = 64) -> nn.Module:
    """BART, one encoder and one decoder layer: act(fc1(x)), a functional dropout, then fc2, inline."""
    import transformers

    cfg = transformers.BartConfig(
        encoder_layers=1, decoder_layers=1, d_model=dim, encoder_ffn_dim=4 * dim, decoder_ffn_dim=4 * dim,
        encoder_attention_heads=2, decoder_attention_heads=2, vocab_size=100, max_position_embeddings=64,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
    )  # fmt: skip
    return transformers.BartModel(cfg)


def bloom(layers: int = 2, dim: int = 64) -> nn.Module:
    """BLOOM: its GELU is a custom module whose forward is arithmetic (BloomGelu)."""
    import transformers

    return transformers.BloomModel(transformers.BloomConfig(n_layer=layers, hidden_size=dim, n_head=4, vocab_size=100))


def esm(layers: int = 2, dim: int = 64) -> nn.Module:
    """ESM: a split block whose GELU is a module-level function, inlined by fx as erf arithmetic."""
    import transformers

    cfg = transformers.EsmConfig(
        num_hidden_layers=layers, hidden_size=dim, intermediate_size=4 * dim, num_attention_heads=2, vocab_size=100,
        pad_token_id=1, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.EsmModel(cfg)


def _x(*shape: int):
    return lambda seed=0: torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _ids(seed=0):
    return {"input_ids": torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(seed))}


CASES = [
    Case("timm_mlp", lambda: Stack(32, [Mlp(32, 128), Mlp(32, 96, norm_layer=nn.LayerNorm)]), _x(4, 10, 32), 2,
         {"plain": 2}),
    Case("timm_glu", lambda: Stack(32, [GluMlp(32, 128), GluMlp(32, 128, act_layer=nn.SiLU, gate_last=False)]),
         _x(4, 10, 32), 2, {"glu_chunk": 2}),
    Case("timm_swiglu", lambda: Stack(32, [SwiGLU(32, 64), SwiGLU(32, 64, norm_layer=nn.LayerNorm)]), _x(4, 10, 32),
         2, {"gated": 2}),
    Case("sequential", lambda: sequential_mlp(32, 128), _x(8, 32), 1, {"plain": 1}),
    Case("functional", lambda: FunctionalMlp(32, 128), _x(8, 32), 1, {"plain": 1}),
    Case("method", lambda: MethodMlp(32, 64), _x(8, 32), 1, {"plain": 1}),
    Case("branchy", lambda: Branchy(32), _x(4, 6, 32), 3, {"plain": 3}),
    Case("conv1x1", lambda: ConvMlp(8, 32), _x(2, 8, 5, 5), 1, {"conv1x1": 1}),
    Case("shared_act", lambda: SharedAct(16), _x(8, 16), 2, {"plain": 2}),
    Case("gpt2", lambda: gpt2(), _ids, 2, {"conv1d": 2}, "logits"),
    Case("llama", lambda: llama(), _ids, 2, {"gated": 2}, "logits"),
    Case("bert", lambda: bert(), _ids, 2, {"split": 2}, "last_hidden_state"),
    Case("opt", lambda: opt(), _ids, 2, {"plain": 2}, "logits"),
    Case("bart", lambda: bart(), _ids, 2, {"plain": 2}, "last_hidden_state"),
    Case("bloom", lambda: bloom(), _ids, 2, {"plain": 2}, "last_hidden_state"),
    Case("esm", lambda: esm(), _ids, 2, {"split": 2}, "last_hidden_state"),
]  # fmt: skip


def case(name: str) -> Case:
    return next(c for c in CASES if c.name == name)


def build(c: Case, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return c.build().eval()


def output(c: Case, out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    return getattr(out, c.output) if hasattr(out, c.output) else out[c.output]


def run(model: nn.Module, inputs: Any) -> Any:
    with torch.no_grad():
        return model(**inputs) if isinstance(inputs, dict) else model(inputs)


class ReadsWeights(nn.Module):
    """Uses its MLP's weights directly without grad (as PyTorch's fused paths do), its modules with grad."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)

    def forward(self, x):
        if torch.is_grad_enabled():
            return self.fc2(self.act(self.fc1(x)))
        hidden = F.gelu(F.linear(x, self.fc1.weight, self.fc1.bias))
        return F.linear(hidden, self.fc2.weight, self.fc2.bias)


class ControlFlowMlp(nn.Module):
    """Data-dependent control flow and an optional argument: fx cannot trace it; a recorded run sees F.gelu."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x, scale=None):
        if x.sum() > -1e9:
            h = self.fc2(F.gelu(self.fc1(x)))
        else:
            h = x
        return h if scale is None else h * scale


class ReadsWeightDtype(ControlFlowMlp):
    """Reads fc1's weight outside fc1 (as open_clip's get_weight_dtype does)."""

    def forward(self, x, scale=None):
        x = x.to(self.fc1.weight.dtype)
        h = self.fc2(F.gelu(self.fc1(x))) if x.sum() > -1e9 else x
        return h if scale is None else h * scale


class CastsToFc2Dtype(nn.Module):
    """Casts its input to fc2's weight dtype (T5's feed-forward reads ``wo.weight.dtype``); traces whole."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x.to(self.fc2.weight.dtype))))


# ---- activation substitution: what lies around the activation (tests/passes/test_substitution.py) -----------------


class LinearNorm(nn.Module):
    """LeViT's linear + BatchNorm over the flattened tokens."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.linear, self.bn = nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class NormBeforeAct(nn.Module):
    """fc1 -> norm -> act -> fc2: a LayerNorm module (``layer_norm``) or LeViT's LinearNorm as fc1 (a chain)."""

    def __init__(self, d: int = 8, h: int = 32, layer_norm: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, h) if layer_norm else LinearNorm(d, h)
        self.norm = nn.LayerNorm(h) if layer_norm else nn.Identity()
        self.act, self.fc2 = nn.Hardswish() if not layer_norm else nn.GELU(), nn.Linear(h, d)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.BatchNorm1d):
                    m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return self.fc2(self.act(self.norm(self.fc1(x))))


class DWConv(nn.Module):
    """PVTv2's / SegFormer's depthwise conv over the token grid, its size read from the input's shape."""

    def __init__(self, h: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(h, h, 3, padding=1, groups=h)

    def forward(self, x, size):
        b, n, c = x.shape
        x = x.transpose(1, 2).view(b, c, size[0], size[1])
        return self.dwconv(x).flatten(2).transpose(1, 2)


class DepthwiseMlp(nn.Module):
    """PVTv2's MLP: fc1 -> depthwise 3x3 conv -> act -> fc2 (the conv mixes tokens; fx traces it symbolically)."""

    def __init__(self, d: int = 8, h: int = 16) -> None:
        super().__init__()
        self.fc1, self.dwconv, self.act, self.fc2 = nn.Linear(d, h), DWConv(h), nn.GELU(), nn.Linear(h, d)

    def forward(self, x, size=(2, 3)):
        return self.fc2(self.act(self.dwconv(self.fc1(x), size)))


class ConcatMlp(nn.Module):
    """Flux's single-stream block: fc2 (proj_out) reads the MLP's hidden features concatenated with attention's."""

    def __init__(self, d: int = 8, h: int = 32) -> None:
        super().__init__()
        self.attn, self.proj_mlp = nn.Linear(d, d), nn.Linear(d, h)
        self.act_mlp, self.proj_out = nn.GELU(approximate="tanh"), nn.Linear(d + h, d)

    def forward(self, x):
        return x + self.proj_out(torch.cat([self.attn(x), self.act_mlp(self.proj_mlp(x))], dim=-1))


class ScaledGlu(nn.Module):
    """x-transformers' GLU: down(up(x) * act(gate) * mult_bias), mult_bias a float or a per-channel parameter."""

    def __init__(self, d: int = 8, h: int = 32, per_channel: bool = False) -> None:
        super().__init__()
        self.proj, self.down = nn.Linear(d, 2 * h), nn.Linear(h, d)
        self.mult_bias = nn.Parameter(torch.rand(h) + 0.5) if per_channel else 0.5

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return self.down(x * F.silu(gate) * self.mult_bias)


class StarReLU(nn.Module):
    """timm's StarReLU: a child nn.ReLU, then a square, a scalar scale and a scalar bias."""

    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU()
        self.scale, self.bias = nn.Parameter(torch.tensor([0.8])), nn.Parameter(torch.tensor([-0.1]))

    def forward(self, x):
        return self.scale * self.relu(x) ** 2 + self.bias


class LibLayerNorm(nn.LayerNorm):
    """A library's LayerNorm subclass (timm's), defined outside torch.nn: fx would trace into it."""

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class GegluFeedForward(nn.Module):
    """diffusers' FeedForward over GEGLU, whose gelu has an ``mps`` branch (it does not trace)."""

    class Geglu(nn.Module):
        def __init__(self, d: int, h: int) -> None:
            super().__init__()
            self.proj = nn.Linear(d, 2 * h)

        def gelu(self, gate):
            if gate.device.type == "mps":
                return F.gelu(gate.to(dtype=torch.float32)).to(dtype=gate.dtype)
            return F.gelu(gate)

        def forward(self, x, *args, **kwargs):
            x, gate = self.proj(x).chunk(2, dim=-1)
            return x * self.gelu(gate)

    def __init__(self, d: int = 8, h: int = 32, norm: bool = False) -> None:
        super().__init__()
        self.net = nn.ModuleList([self.Geglu(d, h), nn.Dropout(0.0), LibLayerNorm(h) if norm else nn.Identity()])
        self.net.append(nn.Linear(h, d))

    def forward(self, x):
        for module in self.net:
            x = module(x)
        return x


class CalledTwice(nn.Module):
    """One MLP module applied twice (shared weights), and fc1 of another MLP also used outside it."""

    def __init__(self, d: int = 8, h: int = 32) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d))
        self.fc1, self.act, self.fc2, self.head = nn.Linear(d, h), nn.GELU(), nn.Linear(h, d), nn.Linear(h, d)

    def forward(self, x):
        x = x + self.mlp(x)
        x = x + self.mlp(x)
        return x + self.fc2(self.act(self.fc1(x))) + self.head(self.fc1(x))


class ReadsWeightValues(ControlFlowMlp):
    """Computes with fc1's weight outside fc1 (a gate from its values): fc1 must keep computing what it did."""

    def forward(self, x, scale=None):
        gate = torch.sigmoid(self.fc1.weight.mean(dim=0))
        h = self.fc2(F.gelu(self.fc1(x))) if x.sum() > -1e9 else x
        return h * gate if scale is None else h * scale


class ShapeScaledMlp(nn.Module):
    """fc2(act(h) * h.shape[-1] ** -0.5): it traces, but fx keeps the scale as shape arithmetic, not a number."""

    def __init__(self, d: int = 8, h: int = 16) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(self.act(h) * h.shape[-1] ** -0.5)
