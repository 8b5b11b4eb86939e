"""The pipeline: verify_equivalence numbers, KANC_DEBUG output, linting after each pass, the global counters."""

import copy

import pytest
import torch
import zoo
from torch import fx

from kanc.errors import KancError
from kanc.passes import counters, find_mlp_blocks, rewrite_to_grkan, run_pipeline, snapshot, verify_equivalence
from kanc.passes.pipeline import PassRecord, lint_model


def test_verify_equivalence_outputs_and_blocks():
    case = zoo.case("bert")
    model = zoo.build(case)
    original = copy.deepcopy(model)
    x = case.inputs()
    result = rewrite_to_grkan(model, find_mlp_blocks(model))
    fidelity = verify_equivalence(original, result.model, x, result)
    with torch.no_grad():
        got, want = (m(**x).last_hidden_state.double() for m in (result.model, original))
    expected = float((got - want).norm() / want.norm())  # ||a - e|| / ||e|| written out, not the helper under test
    assert expected > 0
    assert fidelity.outputs["last_hidden_state"] == pytest.approx(expected, rel=1e-6)
    assert set(fidelity.outputs) == {"last_hidden_state", "pooler_output"}
    assert set(fidelity.blocks) == {"encoder.layer.0", "encoder.layer.1"}
    assert all(0 < e < 1e-2 for e in fidelity.blocks.values())
    assert fidelity.inputs == "input_ids (2, 16)"


def test_snapshot_before_an_in_place_rewrite():
    case = zoo.case("timm_mlp")
    model = zoo.build(case)
    x = case.inputs()
    found = find_mlp_blocks(model)
    before = snapshot(model, x, found.blocks)
    assert set(before.rows) == {b.key for b in found.blocks} and before.rows[found.blocks[0].key].shape == (40, 32)
    result = rewrite_to_grkan(model, found)
    fidelity = verify_equivalence(before, result.model, x, result)
    assert set(fidelity.blocks) == {"blocks.0.mlp", "blocks.1.mlp"} and fidelity.worst_output < 1e-2


def test_kanc_debug_lists_passes_and_counts(monkeypatch, capsys):
    monkeypatch.setenv("KANC_DEBUG", "1")
    case = zoo.case("branchy")
    run_pipeline(zoo.build(case), "grkan", verify_inputs=case.inputs())
    err = capsys.readouterr().err.splitlines()
    assert [line.split()[1] for line in err] == [
        "find_mlp_blocks",
        "snapshot",
        "rewrite_to_grkan",
        "verify_equivalence",
    ]
    assert "found:plain=3" in err[0] and "converted:grkan=3" in err[2]


def test_kanc_debug_2_prints_changed_graphs(monkeypatch, capsys):
    monkeypatch.setenv("KANC_DEBUG", "2")
    run_pipeline(zoo.FunctionalMlp(16, 32), "snnk")
    err = capsys.readouterr().err
    assert "[kanc] graph of <root>:" in err and "call_module[target=snnk]" in err


def test_global_counters_accumulate():
    before = counters["rewrite_to_snnk"]["converted:snnk"]
    run_pipeline(zoo.sequential_mlp(), "snnk")
    assert counters["rewrite_to_snnk"]["converted:snnk"] == before + 1


def test_lint_failure_names_the_pass_and_those_before():
    gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
    relu = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "1")
    linear = relu.args[0]
    relu.args = (relu,)  # a node that reads itself: fx's lint rejects it
    del linear
    ran = [PassRecord("find_mlp_blocks", 0.0), PassRecord("rewrite_to_grkan", 0.0)]
    with pytest.raises(KancError, match=r"graph lint failed in <root> after pass rewrite_to_grkan \(passes run: "
                                        r"find_mlp_blocks, rewrite_to_grkan\)"):  # fmt: skip
        lint_model(gm, [""], ran)


def test_unknown_target():
    with pytest.raises(KancError, match="unknown target"):
        run_pipeline(zoo.sequential_mlp(), "kan")
