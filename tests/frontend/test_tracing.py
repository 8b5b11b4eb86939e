"""Hierarchical fx tracing, leaves, activation specs, and the dataflow read from a parent's source."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from kanc.frontend.activations import function_activation, module_activation
from kanc.frontend.dataflow import Flow, child_flows, dataflow_graph, to_dot, write_graph
from kanc.frontend.leaves import is_leaf, linear_kind, linear_weights
from kanc.frontend.tracing import trace_hierarchical, trace_module
from kanc.nn import GRKANLinear, SNNKMlp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "passes"))
import zoo  # noqa: E402


def test_whole_model_traces_as_one_part():
    trace = trace_hierarchical(zoo.Stack(16, [zoo.Mlp(16, 32)]))
    assert [p.path for p in trace.parts] == [""]
    assert trace.failures == []
    targets = [n.target for n in trace.parts[0].graph_module.graph.nodes if n.op == "call_module"]
    assert targets == ["blocks.0.norm", "blocks.0.mlp.fc1", "blocks.0.mlp.act", "blocks.0.mlp.drop1",
                       "blocks.0.mlp.norm", "blocks.0.mlp.fc2", "blocks.0.mlp.drop2", "head"]  # fmt: skip


def test_data_dependent_control_flow_falls_back_to_children_with_the_reason():
    trace = trace_hierarchical(zoo.Branchy(16))
    assert [p.path for p in trace.parts] == ["a", "b", "c"]  # norm is a leaf: not traced on its own
    (failure,) = trace.failures
    assert failure.path == "" and failure.type_name == "Branchy"
    assert "TraceError" in failure.reason and "control flow" in failure.reason
    assert trace.reasons() == {"": failure.reason}


def test_hf_gpt2_is_traced_block_by_block():
    model = zoo.gpt2()
    trace = trace_hierarchical(model)
    assert [p.path for p in trace.parts] == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    reasons = trace.reasons()
    assert set(reasons) == {"", "transformer", "transformer.h.0", "transformer.h.0.attn", "transformer.h.1",
                            "transformer.h.1.attn"}  # fmt: skip
    assert [f.path for f in trace.failures if f.container] == ["transformer.h"]  # ModuleList: no forward
    mlp = trace.parts[0].graph_module
    assert [n.target for n in mlp.graph.nodes if n.op == "call_module"] == ["c_fc", "act", "c_proj", "dropout"]


def test_leaves_linear_like_activation_and_kanc_layers():
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D(8, 4)
    assert linear_kind(nn.Linear(4, 8)) == "linear"
    assert linear_kind(conv1d) == "conv1d"
    assert linear_kind(nn.Conv2d(4, 8, 1)) == "conv1x1"
    assert linear_kind(nn.Conv2d(4, 8, 3)) is None and linear_kind(nn.Conv2d(4, 8, 1, stride=2)) is None
    torch.testing.assert_close(linear_weights(conv1d).weight, conv1d.weight.T)  # (in, out) stored transposed
    from transformers.activations import NewGELUActivation

    for leaf in (nn.GELU(), NewGELUActivation(), GRKANLinear(8, 8), SNNKMlp(8, 8, 4), conv1d):
        assert is_leaf(leaf), type(leaf).__name__
    assert not is_leaf(nn.Sequential(nn.Linear(2, 2))) and not is_leaf(nn.LayerNorm((4, 4)))
    assert is_leaf(nn.LayerNorm(4)) and is_leaf(nn.RMSNorm(4))  # a token norm is one step of a block


def test_leaf_check_does_not_break_tracing_of_conv1d_blocks():
    """Conv1D's weight must be read without going through fx's parameter proxies."""
    graph = trace_module(zoo.gpt2().transformer.h[0].mlp).graph
    assert sum(n.op == "call_module" for n in graph.nodes) == 4


def _node(fn, *args, **kwargs) -> fx.Node:
    graph = fx.Graph()
    x = graph.placeholder("x")
    return graph.call_function(fn, (x, *args), kwargs)


def test_activation_specs_for_modules_functions_methods_and_aten():
    assert module_activation(nn.GELU()).name == "gelu"
    assert module_activation(nn.GELU(approximate="tanh")).name == "gelu_tanh"
    from transformers.activations import ACT2FN

    assert module_activation(ACT2FN["gelu_new"]).name == "gelu_tanh"
    assert module_activation(ACT2FN["silu"]).name == "silu"
    quick = module_activation(ACT2FN["quick_gelu"])
    assert not quick.shipped
    x = torch.linspace(-3, 3, 7, dtype=torch.float64)
    torch.testing.assert_close(quick.fn(x), x * torch.sigmoid(1.702 * x))
    assert function_activation(_node(F.gelu, approximate="tanh")).name == "gelu_tanh"
    assert function_activation(_node(torch.ops.aten.gelu.default)).name == "gelu"
    assert function_activation(_node(torch.ops.aten.silu.default)).name == "silu"
    leaky = function_activation(_node(F.leaky_relu, 0.2))
    torch.testing.assert_close(leaky.fn(x), F.leaky_relu(x, 0.2))
    assert leaky.key != function_activation(_node(F.leaky_relu, 0.1)).key
    graph = fx.Graph()
    assert function_activation(graph.call_method("relu", (graph.placeholder("x"),))).name == "relu"
    assert function_activation(_node(torch.add, 1.0)) is None
    assert module_activation(nn.Softmax(-1)) is None and module_activation(nn.PReLU(4)) is None


def test_bert_flow_intermediate_to_output_is_read_from_source():
    layer = zoo.bert().encoder.layer[0]
    assert Flow("intermediate", "output", 0) in child_flows(layer)


class _TwoUses(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        h = self.a(x)
        return self.b(h) + h  # h is read twice: no sole flow a -> b


class _Direct(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x, y):
        return self.b(y, self.a(x))


def test_flows_need_a_single_use_and_a_single_call():
    assert child_flows(_TwoUses()) == ()
    assert child_flows(_Direct()) == (Flow("a", "b", 1),)


def test_dataflow_graph_joins_parts_and_exports(tmp_path):
    trace = trace_hierarchical(zoo.bert(layers=1))
    g = dataflow_graph(trace)
    edge = ("encoder.layer.0.intermediate::output", "encoder.layer.0.output::hidden_states")
    assert g.edges[edge]["kind"] == "module"
    assert g.nodes["encoder.layer.0.output::dense"]["module_type"] == "Linear"
    write_graph(g, str(tmp_path / "g.graphml"))
    write_graph(g, str(tmp_path / "g.dot"))
    assert (tmp_path / "g.graphml").read_text().startswith("<?xml")
    dot = to_dot(g)
    assert dot.startswith("digraph kanc {") and "style=dashed" in dot
    with pytest.raises(ValueError, match="graphml or .dot"):
        write_graph(g, str(tmp_path / "g.png"))
