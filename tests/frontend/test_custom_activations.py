"""Custom activation modules (an elementwise forward of one input) are activations; anything else is not."""

import math

import pytest
import torch
from torch import nn

import kanc
from kanc.frontend.leaves import is_activation_module, is_elementwise_module
from kanc.nn import GRKANLinear
from kanc.testing import rel_error


class NewGELU(nn.Module):  # minGPT's
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class StarReLU(nn.Module):  # MetaFormer's: learned scalar scale and bias
    def __init__(self):
        super().__init__()
        self.scale, self.bias = nn.Parameter(torch.tensor(0.8944)), nn.Parameter(torch.tensor(-0.4472))

    def forward(self, x):
        return self.scale * torch.relu(x) ** 2 + self.bias


class ChannelScale(nn.Module):  # per-channel parameter: not one function of each element
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(64))

    def forward(self, x):
        return torch.tanh(x) * self.gain


class Normalizing(nn.Module):  # a reduction: not elementwise
    def forward(self, x):
        return x / x.norm(dim=-1, keepdim=True)


class TwoInputs(nn.Module):
    def forward(self, x, y=None):
        return x if y is None else x * y


class Mlp(nn.Module):
    def __init__(self, act: nn.Module, d: int = 16, h: int = 64) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, h), act, nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize("cls", [NewGELU, QuickGELU, StarReLU])
def test_elementwise_modules_are_activations(cls):
    assert is_elementwise_module(cls()) and is_activation_module(cls())


@pytest.mark.parametrize("cls", [ChannelScale, Normalizing, TwoInputs, nn.LayerNorm, nn.Identity])
def test_other_modules_are_not(cls):
    module = cls(64) if cls is nn.LayerNorm else cls()
    assert not is_elementwise_module(module)


@pytest.mark.parametrize("cls", [NewGELU, QuickGELU, StarReLU])
def test_mlps_with_custom_activations_convert(cls):
    torch.manual_seed(0)
    model = nn.Sequential(Mlp(cls()), Mlp(cls())).eval()
    x = torch.randn(4, 7, 16)
    converted = kanc.compile(model, "grkan", example_inputs=(x,))
    assert len(kanc.report(converted).converted) == 2
    assert isinstance(converted[0].fc2, GRKANLinear) and isinstance(converted[0].act, nn.Identity)
    bound = 2e-2 if cls is StarReLU else 1e-2  # relu(x)^2 has a kink, as ReLU does (see test_rewrite_grkan)
    with torch.no_grad():
        assert rel_error(converted(x), model(x)) < bound


def test_training_mode_modules_are_judged_on_their_inference_path():
    class TrainOnlyCustom(nn.Module):
        def forward(self, x):
            if self.training:  # a Python flag, not data: fx follows the branch of the current mode
                return torch.ops.aten.gelu(x)
            return x * torch.sigmoid(1.702 * x)

    module = TrainOnlyCustom().train()
    assert is_elementwise_module(module) and module.training


# ---- activations written as arithmetic in the model's own forward (fx inlines them) ---------------------------


class InlineMlp(nn.Module):
    def __init__(self, act, d: int = 16, h: int = 64) -> None:
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(d, h), nn.Linear(h, d), act

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _erf_gelu(x):  # ESM's
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _tanh_gelu(x):  # minGPT's formula, written inline
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def _squared_tanh(x):  # a region whose inner value is read twice inside it
    t = torch.tanh(x)
    return t * t + t


@pytest.mark.parametrize(
    "fn,name",
    [(_erf_gelu, "gelu"), (_tanh_gelu, "gelu_tanh"), (_quick_gelu, "inline(mul,sigmoid,mul)"),
     (_squared_tanh, "inline(tanh,mul,add)")],
)  # fmt: skip
def test_inline_arithmetic_is_an_activation(fn, name):
    torch.manual_seed(0)
    model = InlineMlp(fn).eval()
    x = torch.randn(5, 16)
    converted = kanc.compile(model, "grkan", example_inputs=(x,))
    report = kanc.report(converted)
    assert [(b["pattern"], b["activation"]) for b in report.converted] == [("plain", name)]
    calls = [n for n in converted.graph.nodes if n.op in ("call_function", "call_method")]
    assert calls == []  # the region is gone: fc1 -> fc2, the rational lives in fc2
    with torch.no_grad():
        assert rel_error(converted(x), model(x)) < 1e-2


@pytest.mark.parametrize(
    "fn",
    [
        lambda h: h * 0.5 + 1.0,  # affine: a rescaling, not an activation
        lambda h: torch.tanh(h) * h.mean(-1, keepdim=True),  # a reduction inside
    ],
)
def test_non_activations_between_linears_are_left_alone(fn):
    model = InlineMlp(fn).eval()
    assert kanc.report(kanc.compile(model, "grkan", verify=False)).converted == []


def test_a_region_value_read_outside_is_not_absorbed():
    class Leaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(16, 64), nn.Linear(64, 16)

        def forward(self, x):
            t = torch.tanh(self.fc1(x))
            return self.fc2(t * torch.sigmoid(t)), t  # t escapes: only t * sigmoid(t) could be the activation

    converted = kanc.compile(Leaky().eval(), "grkan", verify=False)
    assert kanc.report(converted).converted == []  # fc1 feeds t, which is read outside: a residual would be crossed


def test_snnk_replaces_a_block_with_an_inline_activation():
    torch.manual_seed(0)
    model = InlineMlp(_erf_gelu).eval()
    converted = kanc.compile(model, "snnk", verify=False)
    assert [b["activation"] for b in kanc.report(converted).converted] == ["gelu"]
    assert any(type(m).__name__ == "SNNKMlp" for m in converted.modules())


def test_parts_of_an_inline_activation_are_not_reported():
    """``1 + erf(x / sqrt 2)`` inside ESM's GELU is not an activation of its own: no spurious near miss."""
    converted = kanc.compile(InlineMlp(_erf_gelu).eval(), "grkan", verify=False)
    report = kanc.report(converted)
    assert len(report.converted) == 1 and report.skipped == []
