"""Inline MLP chains read from the source of modules that do not trace (OPT/BART-style decoder layers)."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import kanc
from kanc.frontend.source import Chain, Link, inline_chains
from kanc.frontend.tracing import trace_hierarchical
from kanc.nn import GRKANLinear, SNNKMlp
from kanc.passes import find_mlp_blocks
from kanc.testing import rel_error


class _Layer(nn.Module):
    """Attention-free stand-in for a decoder layer: data-dependent control flow stops fx."""

    def __init__(self, d: int = 16, h: int = 64) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)
        self.act = nn.GELU()
        self.drop = nn.Dropout(0.1)

    def gate(self, x):
        if x.shape[-1] == 0:  # a branch on a traced value: fx cannot trace this
            raise ValueError("empty features")
        return x


class Chained(_Layer):
    def forward(self, x):
        residual = x
        x = self.gate(self.norm(x))
        x = self.fc1(x)
        x = self.act(x)
        x = F.dropout(x, p=0.1, training=self.training)
        x = self.fc2(x)
        return residual + x


class Nested(_Layer):
    def forward(self, x):
        h = self.act(self.fc1(self.gate(x)))
        h = nn.functional.dropout(h, p=0.0, training=self.training)
        return x + self.fc2(self.drop(h))


class ReadTwice(_Layer):
    def forward(self, x):
        h = self.act(self.fc1(self.gate(x)))
        return self.fc2(h) + h.mean(-1, keepdim=True)  # the activation's output is used outside the block


class ActTwice(_Layer):
    def forward(self, x):
        h = self.act(self.fc1(self.gate(x)))
        return self.fc2(h) + self.act(x)  # the activation module is called twice


class Reassigned(_Layer):
    def forward(self, x):
        h = self.act(self.fc1(self.gate(x)))
        if x.shape[0] > 1:
            h = h * 2  # h's value depends on a branch: not a certain chain
        return self.fc2(h)


class Scaled(_Layer):
    def forward(self, x):
        h = self.act(self.fc1(self.gate(x)))
        return self.fc2(h * 0.5)  # a non-passthrough op between the activation and fc2


class NormBetween(_Layer):
    def __init__(self) -> None:
        super().__init__()
        self.mid = nn.LayerNorm(64)

    def forward(self, x):
        h = self.fc1(self.gate(x))
        h = self.mid(self.act(h))
        return self.fc2(h)


@pytest.mark.parametrize(
    "cls,chain",
    [
        (Chained, Chain("fc1", (), "act", (Link(None),), "fc2")),
        (Nested, Chain("fc1", (), "act", (Link(None), Link("drop")), "fc2")),
        (NormBetween, Chain("fc1", (), "act", (Link("mid"),), "fc2")),
    ],
)
def test_chains_are_read_from_the_forward(cls, chain):
    assert inline_chains(cls()) == [chain]


@pytest.mark.parametrize("cls", [ReadTwice, ActTwice, Reassigned, Scaled])
def test_uncertain_dataflow_is_not_a_chain(cls):
    assert inline_chains(cls()) == []


def test_a_module_whose_source_is_unavailable_has_no_chain():
    layer = Chained()
    exec_ns = {}
    exec("def forward(self, x):\n    return self.fc2(self.act(self.fc1(x)))", exec_ns)  # no source file
    cls = type("NoSource", (nn.Module,), {"forward": exec_ns["forward"]})
    assert inline_chains(cls()) == [] and inline_chains(layer)


def test_source_part_is_partial_and_reported():
    model = nn.Sequential(Chained(), Nested(), ReadTwice())
    trace = trace_hierarchical(model)
    source = [p for p in trace.parts if p.source]
    assert [p.path for p in source] == ["0", "1"]
    found = find_mlp_blocks(model)
    assert [b.name for b in found.blocks] == ["0", "1"]
    assert found.counters["found:plain"] == 2
    skipped = {s.name: s for s in found.skipped}
    assert "0" not in skipped and "1" not in skipped  # their linears were read from the source
    assert skipped["2"].code == "not_traced" and "2 linear layer(s) were not examined" in skipped["2"].message


@pytest.mark.parametrize("cls", [Chained, Nested, NormBetween])
def test_grkan_swaps_keep_the_function_and_the_forward_code(cls):
    torch.manual_seed(0)
    model = nn.Sequential(cls(), cls()).eval()
    x = torch.randn(3, 5, 16)
    converted = kanc.compile(model, "grkan", example_inputs=(x,))
    report = kanc.report(converted)
    assert len(report.converted) == 2 and all(b["mode"] == "swap" for b in report.converted)
    assert all("recorded run" in " ".join(b["notes"]) for b in report.converted)  # inputs given: a run was seen
    assert type(converted[0]) is cls  # the layer's own forward still runs
    assert isinstance(converted[0].fc1, GRKANLinear)
    if cls is NormBetween:
        assert isinstance(converted[0].fc2, nn.Linear)  # a norm between: the rational replaces the activation
    else:
        assert isinstance(converted[0].act, nn.Identity) and isinstance(converted[0].fc2, GRKANLinear)
    with torch.no_grad():
        assert rel_error(converted(x), model(x)) < 1e-2


def test_snnk_swaps_and_training_still_works():
    torch.manual_seed(0)
    model = nn.Sequential(Chained(), Nested()).eval()
    x = torch.randn(4, 8, 16)
    converted = kanc.compile(model, "snnk", calibration=(x,))
    assert isinstance(converted[0].fc1, SNNKMlp) and isinstance(converted[0].fc2, nn.Identity)
    assert len(kanc.report(converted).converted) == 2
    converted.train()
    converted(x).square().mean().backward()
    assert converted[1].fc1.linear.weight.grad is not None


def test_opt_converts_block_by_block():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.OPTConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, ffn_dim=64, vocab_size=50, word_embed_proj_dim=32
    )
    torch.manual_seed(0)
    model = transformers.OPTModel(cfg).eval()
    converted = kanc.compile(model, "grkan", groups=4)
    report = kanc.report(converted)
    assert [b["name"] for b in report.converted] == ["decoder.layers.0", "decoder.layers.1"]
    assert report.skipped == []  # the run on token ids examined the attention layers that do not trace
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        err = rel_error(converted(ids).last_hidden_state, model(ids).last_hidden_state)
    assert err < 2e-2, err  # OPT's ReLU: a (5, 4) rational cannot follow the kink closer (see test_rewrite_grkan)
