"""find_mlp_blocks: exact hit and skip counts per model, block shapes, skip reasons, include/exclude."""

import dataclasses

import pytest
import torch
import zoo
from torch import nn

from kanc.passes import PATTERNS, find_mlp_blocks
from kanc.passes.table import pattern


@pytest.mark.parametrize("case", zoo.CASES, ids=lambda c: c.name)
def test_exact_block_counts(case):
    found = find_mlp_blocks(zoo.build(case))
    assert len(found.blocks) == case.blocks
    assert {k[6:]: v for k, v in found.counters.items() if k.startswith("found:")} == case.patterns


def test_hf_counters_including_skips():
    # without inputs: the root's lm_head and, once for both layers, the attention modules' linears are unexamined
    assert find_mlp_blocks(zoo.gpt2()).counters == {"found:conv1d": 2, "skip:not_traced": 2}
    assert find_mlp_blocks(zoo.llama()).counters == {"found:gated": 2, "skip:not_traced": 2}
    bert = find_mlp_blocks(zoo.bert())
    assert bert.counters == {"found:split": 2, "skip:not_traced": 1, "skip:split_flow": 1}
    pooler = next(s for s in bert.skipped if s.code == "split_flow")
    assert pooler.name == "pooler.activation"  # dense -> tanh, consumed by no module: not an MLP


def test_block_fields():
    found = find_mlp_blocks(zoo.gpt2())
    block = found.blocks[0]
    assert (block.name, block.pattern, block.owner) == ("transformer.h.0.mlp", "conv1d", "transformer.h.0.mlp")
    assert (block.fc1.path, block.fc2.path, block.act.spec.name) == (
        "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj", "gelu_tanh")  # fmt: skip
    assert (block.in_features, block.hidden, block.out_features) == (64, 256, 64)
    llama = find_mlp_blocks(zoo.llama()).blocks[0]
    assert (llama.fc1.path, llama.up.path, llama.fc2.path) == (
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj")  # fmt: skip
    assert llama.act.spec.name == "silu" and llama.shape_text() == "64 -> 2x128 -> 64"
    bert = find_mlp_blocks(zoo.bert()).blocks[0]
    assert bert.split == ("encoder.layer.0.intermediate", "encoder.layer.0.output")
    assert bert.name == "encoder.layer.0" and bert.act.spec.name == "gelu"


def test_glu_chunk_gate_side_and_norm_between():
    found = find_mlp_blocks(zoo.case("timm_glu").build())
    assert [b.gate_index for b in found.blocks] == [1, 0]  # gate_last=True puts act on the second half
    assert [b.hidden for b in found.blocks] == [64, 64]
    swiglu = find_mlp_blocks(zoo.case("timm_swiglu").build())
    assert [p.kind for p in swiglu.blocks[1].between] == ["dropout", "norm"]


def test_names_are_owners_or_root():
    names = [b.name for b in find_mlp_blocks(zoo.Branchy(16)).blocks]
    assert names == ["a", "b", "c"]
    assert [b.name for b in find_mlp_blocks(zoo.sequential_mlp()).blocks] == ["<root>"]
    assert [b.name for b in find_mlp_blocks(zoo.SharedAct()).blocks] == ["<root>/a1", "<root>/b1"]


def test_residual_tied_and_no_mlp_are_skips_with_reasons():
    res = find_mlp_blocks(zoo.Residual())
    assert res.blocks == [] and res.counters == {"skip:fc1_reused": 1}
    assert "residual" in res.skipped[0].message
    tied = find_mlp_blocks(zoo.Tied())
    assert tied.blocks == [] and tied.counters == {"skip:shared_module": 2}
    assert find_mlp_blocks(zoo.NoMlp()).counters == {}


class _Mismatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.norm, self.fc2 = nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(12), nn.Linear(12, 8)

    def forward(self, x):
        h = self.act(self.fc1(x))
        return self.fc2(self.norm(h[..., :12]))  # the slice sits between: not an MLP block


class _Pooler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense, self.act = nn.Linear(8, 8), nn.Tanh()

    def forward(self, x):
        return self.act(self.dense(x))[:, 0]


class _AdaLN(nn.Module):
    """DiT's AdaLN modulation: linear(silu(emb)), chunked into shift and scale (not an MLP block)."""

    def __init__(self) -> None:
        super().__init__()
        self.silu, self.linear, self.norm = nn.SiLU(), nn.Linear(8, 16), nn.LayerNorm(8, elementwise_affine=False)

    def forward(self, x, emb):
        shift, scale = self.linear(self.silu(emb)).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class _SqueezeExcite(nn.Module):
    """An SE gate: x * sigmoid(fc2(relu(fc1(mean(x))))): the bottleneck is an MLP block, the gate is not."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2, self.gate = nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 8), nn.Hardsigmoid()

    def forward(self, x):
        return x * self.gate(self.fc2(self.act(self.fc1(x.mean(1, keepdim=True)))))


def test_other_skip_reasons():
    mismatch = find_mlp_blocks(_Mismatch())
    assert mismatch.counters == {"skip:no_fc2": 1}
    (skip,) = mismatch.skipped
    assert skip.site.startswith("tests/passes/test_find.py:") and "(forward)" in skip.site  # where, and why
    assert "test_find.py:" in skip.line() and "[no_fc2]" in skip.line()


def test_what_is_not_an_mlp_block_is_listed_only_when_asked():
    x, emb = torch.randn(2, 3, 8), torch.randn(2, 1, 8)
    cases = (
        (nn.Sequential(_Pooler()), x, "no_fc2"),
        (_AdaLN(), (x, emb), "no_fc1"),
        (_SqueezeExcite(), x, "gate_partner"),
    )
    for model, inputs, code in cases:
        found = find_mlp_blocks(model, inputs=inputs)
        blocks = {"found:plain": 1} if isinstance(model, _SqueezeExcite) else {}
        assert found.skipped == [] and found.counters == {f"near_miss:{code}": 1, **blocks}
        asked = find_mlp_blocks(model, inputs=inputs, near_misses=True)
        assert [s.code for s in asked.skipped] == [code] and asked.skipped[0].site is not None


def test_include_exclude_globs():
    model = zoo.Branchy(16)
    only = find_mlp_blocks(model, include=["a", "c"])
    assert [b.name for b in only.blocks] == ["a", "c"]
    assert only.counters["skip:not_included"] == 1
    without = find_mlp_blocks(model, exclude=["[ab]"])
    assert [b.name for b in without.blocks] == ["c"] and without.counters["skip:excluded"] == 2


def test_converted_model_has_no_blocks_and_says_so():
    import kanc

    converted = kanc.compile(zoo.sequential_mlp(), "grkan", verify=False)
    found = find_mlp_blocks(converted)
    assert found.blocks == [] and found.converted == {"GRKANLinear": 2, "GroupRational": 2}


def test_aten_graph_from_export():
    model = zoo.FunctionalMlp(16, 32)
    gm = torch.export.export(model, (torch.randn(2, 16),)).module()
    found = find_mlp_blocks(gm)
    assert found.counters == {"found:plain": 1}
    block = found.blocks[0]
    assert (block.fc1.kind, block.fc1.path, block.fc2.path, block.act.spec.name) == ("aten", "fc1", "fc2", "gelu_tanh")


def test_table_rows_are_data(monkeypatch):
    """The table is what finds blocks: take a row out and its shape is no longer found; put a row in front and it
    is tried first, its hits counted under its own name."""
    import kanc.passes.find as finder

    llama = zoo.llama()
    assert find_mlp_blocks(llama).counters["found:gated"] == 2
    monkeypatch.setattr(finder, "PATTERNS", tuple(p for p in PATTERNS if p.name != "gated"))
    assert not any(k.startswith("found:") for k in find_mlp_blocks(llama).counters)
    mine = dataclasses.replace(pattern("plain"), name="mine")
    monkeypatch.setattr(finder, "PATTERNS", (mine, *PATTERNS))
    assert find_mlp_blocks(zoo.sequential_mlp()).counters == {"found:mine": 1}
    assert find_mlp_blocks(zoo.gpt2()).counters["found:conv1d"] == 2  # other shapes still reach their own rows


def test_inspect_graph_marks_blocks():
    found = find_mlp_blocks(zoo.gpt2(layers=1))
    marked = {n for n, a in found.graph.nodes(data=True) if a.get("block")}
    assert marked == {f"transformer.h.0.mlp::{n}" for n in ("c_fc", "act", "c_proj")}


def test_kanc_baseline_mlp_is_found_but_kanc_layers_are_leaves():
    from kanc.nn import GRKANMlp, Mlp

    assert find_mlp_blocks(nn.Sequential(Mlp(16, 64))).counters == {"found:plain": 1}
    assert find_mlp_blocks(nn.Sequential(GRKANMlp(16, 64))).counters == {}
