"""kanc.checkpoint.patterns: a layer's blocks found in full once per kind of layer, later ones by their trace."""

import torch
from torch import nn

import kanc
from kanc.checkpoint.patterns import Patterns
from kanc.passes import find
from kanc.passes.pipeline import run_pipeline


def test_only_the_first_layer_of_a_kind_runs_recorded(llama_dir, tmp_path, monkeypatch):
    recorded = []
    real = find._recorded_part
    monkeypatch.setattr(find, "_recorded_part", lambda model, inputs: recorded.append(model) or real(model, inputs))
    report = kanc.convert_checkpoint(llama_dir[0], tmp_path / "out", "grkan", max_shard_size="40KB")
    assert len(recorded) == 1  # of 3 layers: the others were found by their trace alone
    assert report.blocks == [f"model.layers.{i}.mlp" for i in range(3)]
    assert report.skipped == [] and report.not_traced == {}  # examined on layer 0's recorded run, and so noted
    assert any("model.layers.0's recorded run" in n and "self_attn" in n for n in report.notes)


class Layer(nn.Module):
    """The same class, submodules and shapes for every layer; ``plain`` (not a module) changes what forward does."""

    def __init__(self, plain: bool) -> None:
        super().__init__()
        self.fc1, self.fc2, self.plain = nn.Linear(8, 32), nn.Linear(32, 8), plain

    def forward(self, x):
        if self.plain:
            return x + self.fc2(torch.relu(self.fc1(x)))
        return x + self.fc2(self.fc1(x))  # no activation: no MLP block


def _found(patterns, name, layer, inputs):
    found = patterns.find(name, layer)
    if found is None:
        found = run_pipeline(layer, "grkan", calibration=inputs, discovery_inputs=inputs, measure=False).found
        patterns.learn(found)
        return "full", found
    return "traced", found


def test_a_later_layer_whose_trace_differs_is_found_in_full():
    inputs = {"x": torch.randn(4, 8)}
    patterns = Patterns()
    first, same, other = Layer(True), Layer(True), Layer(False)
    assert _found(patterns, "0", first, inputs)[0] == "full"
    how, found = _found(patterns, "1", same, inputs)
    assert how == "traced" and [b.name for b in found.blocks] == ["<root>"]
    how, found = _found(patterns, "2", other, inputs)  # same signature, another graph: not vouched for
    assert how == "full" and found.blocks == []
    # another kind (other dtypes): examined in full as the first of its kind
    assert _found(patterns, "3", Layer(True).to(torch.float64), {"x": inputs["x"].double()})[0] == "full"
