"""What trains after a conversion: the parameters a conversion adds train as the block's own linear layers do, and
a weight it copies keeps its source's requires_grad. A frozen model stays frozen (GPT-2's Conv1D weights, copied
into the fused layers, used to come out trainable), and a LoRA model still trains only its adapters."""

import pytest
import torch
import zoo
from torch import nn

import kanc
from kanc.nn import GRKANLinear, GroupRational
from kanc.testing import rel_error


def _trainable(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _frozen(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.mark.parametrize("target", ["grkan", "snnk"])
@pytest.mark.parametrize("build", [lambda: zoo.gpt2(layers=1), lambda: zoo.llama(layers=1)], ids=["gpt2", "llama"])
def test_a_frozen_model_stays_frozen_and_converts_to_the_same_numbers(build, target):
    torch.manual_seed(0)
    model = build().eval()
    x = zoo._ids()
    live = kanc.compile(model, target=target)
    frozen = kanc.compile(_frozen(model), target=target)
    assert _trainable(frozen) == []
    assert len(_trainable(live)) > 0  # the same conversion of the trainable model trains its new parameters
    with torch.no_grad():
        assert rel_error(frozen(**x).logits, live(**x).logits) == 0.0


@pytest.mark.parametrize("init", ["preserve", "variance"])
def test_a_frozen_plain_mlp_stays_frozen_with_either_init(init):
    model = _frozen(nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)).eval())
    converted = kanc.compile(model, target="grkan", init=init)
    assert any(isinstance(m, GRKANLinear) for m in converted.modules())
    assert _trainable(converted) == []


def test_each_new_parameter_follows_the_layer_it_stands_for():
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    model[0].requires_grad_(False)  # fc1 frozen, fc2 trained
    converted = kanc.compile(model, target="grkan")
    fc1, fc2 = converted[0], converted[2]
    assert isinstance(fc1, GRKANLinear) and isinstance(fc2, GRKANLinear)
    assert not fc1.weight.requires_grad and not fc1.bias.requires_grad  # the user's freeze is kept
    assert not any(p.requires_grad for p in fc1.rational.parameters())  # the identity rational in front of fc1
    assert all(p.requires_grad for p in fc2.parameters())  # the fitted rational: the block trains (fc2 does)


def test_a_lora_model_trains_only_its_adapters():
    peft = pytest.importorskip("peft")  # installed with the "zoo" extra that make test installs
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"])
    model = peft.get_peft_model(zoo.llama(layers=1), config).eval()
    before = _trainable(model)
    assert before and all("lora_" in n for n in before)
    converted = kanc.compile(model, target="grkan", example_inputs=zoo._ids())
    assert any(isinstance(m, GroupRational) for m in converted.modules())
    assert _trainable(converted) == before
