"""benchmarks/coverage.py's own measurements, on hand-built models and stand-in converters (no kanc.compile): a
bypassed layer, NaN outputs, a zero reference, a conversion that changes the original, a block neither converted
nor listed, modes that disagree, a copy that changes the function, crashes, and the count cross-check."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from families.base import Built, Expected, Family
from families.measure import (
    assign,
    failures,
    kanc_layers,
    measure_family,
    redraw_weights,
    rel_error,
    silent_changes,
    totals,
)
from torch import nn

from kanc.nn import GRKANLinear

ROOT = Path(__file__).resolve().parents[2]
MLP_SCOPE = Expected("mlp", ("mlp",), "gelu")


class Toy(nn.Module):
    """An embedding and one residual MLP block, ``mlp`` = Linear, GELU, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

    def forward(self, x):
        x = self.embed(x)
        return x + self.mlp(x)


def toy_family(model_fn=Toy, expected=(MLP_SCOPE,), inputs=None) -> Family:
    def build() -> Built:
        torch.manual_seed(0)
        x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1))
        return Built(model_fn(), inputs if inputs is not None else (x,), list(expected))

    return Family("toy", "test", build)


def grkan_copy(linear: nn.Linear) -> GRKANLinear:
    """A kanc layer computing exactly what ``linear`` does (identity rational)."""
    layer = GRKANLinear(linear.in_features, linear.out_features, groups=1)
    with torch.no_grad():
        layer.weight.copy_(linear.weight)
        layer.bias.copy_(linear.bias)
    return layer


def converter(edit, converted=("mlp",), skipped=()):
    """(convert, report) stand-ins for kanc.compile / kanc.report: ``edit(model) -> converted model``."""
    reports = {}

    def convert(model, target, inputs):
        out = edit(model)
        reports[id(out)] = SimpleNamespace(
            converted=[{"name": n} for n in converted],
            skipped=[{"name": n, "code": "test", "message": "listed"} for n in skipped],
            fidelity=None,
        )
        return out

    return convert, lambda m: reports[id(m)]


def swap_mlp(model):
    out = copy.deepcopy(model)
    out.mlp[0], out.mlp[2] = grkan_copy(out.mlp[0]), grkan_copy(out.mlp[2])
    return out


def measure(family, edit, targets=("grkan",), **kw) -> dict:
    convert, report = converter(edit, **kw)
    return measure_family(family, targets, convert=convert, report=report)


# ---- rel_error -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "actual, reference, expected",
    [
        ([torch.ones(3)], [torch.ones(3)], 0.0),
        ([torch.zeros(3)], [torch.zeros(3)], 0.0),
        ([torch.ones(3)], [torch.zeros(3)], math.inf),  # a zero reference is not zero error
        ([torch.tensor([1.0, math.nan])], [torch.ones(2)], math.inf),  # NaN is never dropped
        ([torch.tensor([1.0, math.inf])], [torch.ones(2)], math.inf),
        ([torch.ones(2, 2)], [torch.ones(4)], math.inf),  # reshaped
        ([torch.ones(2)], [torch.ones(2), torch.ones(2)], math.inf),  # an output missing
        ([torch.tensor([1.0, math.inf])], [torch.tensor([2.0, math.inf])], 0.5),  # the reference's own inf kept
        ([torch.tensor([1.0, 0.0])], [torch.tensor([2.0, math.inf])], math.inf),
    ],
)
def test_rel_error_is_never_optimistic(actual, reference, expected):
    assert rel_error(actual, reference) == pytest.approx(expected)


def test_rel_error_takes_the_worst_output():
    ref = [torch.ones(4), torch.full((4,), 2.0)]
    assert rel_error([torch.ones(4), torch.full((4,), 2.2)], ref) == pytest.approx(0.1)


# ---- whole measurements with stand-in converters --------------------------------------------------------------


def test_faithful_conversion_passes():
    row = measure(toy_family(), swap_mlp)
    grkan = row["targets"]["grkan"]
    assert grkan["converted"] == 1 and grkan["kanc_layers"] == ["mlp.0", "mlp.2"]
    assert grkan["error_no_grad"] < 1e-6 and grkan["error_grad"] < 1e-6
    assert failures(row) == []


def test_layer_bypassed_by_a_fast_path_is_silent():
    """PyTorch's encoder layer in eval/no_grad reads linear1/linear2's weights and never calls them. A per-layer
    forward hook would turn that fast path off (and hide the bypass); the harness must still see it."""

    def build() -> Built:
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, activation=nn.GELU(), batch_first=True)
        scope = Expected("", ("linear1", "activation", "dropout", "linear2"), "gelu")
        return Built(layer, (torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1)),), [scope])

    def edit(model):
        out = copy.deepcopy(model)
        out.linear1, out.linear2 = grkan_copy(out.linear1), grkan_copy(out.linear2)
        return out

    row = measure(Family("encoder", "test", build), edit, converted=("",))
    silent = silent_changes(row)
    assert "grkan: kanc layer linear1 is never called in eval/no_grad" in silent
    assert not any("eval/grad" in s or "train/" in s for s in silent), silent


def test_nan_output_fails():
    def edit(model):
        out = swap_mlp(model)
        with torch.no_grad():
            out.mlp[2].bias[0] = math.nan
        return out

    row = measure(toy_family(), edit)
    assert row["targets"]["grkan"]["error_no_grad"] == math.inf
    assert any("output error (no_grad) inf" in f for f in failures(row))


class Zero(Toy):
    def forward(self, x):
        return 0 * super().forward(x)


def test_zero_reference_is_not_a_measurement():
    row = measure(toy_family(Zero), swap_mlp)
    assert row["status"] == "build_failed" and "all zeros" in row["error"]


def _change_weight(model):
    with torch.no_grad():
        model.mlp[0].weight.add_(1e-3)
    return swap_mlp(model)


def _swap_in_original(model):
    model.mlp[1] = nn.ReLU()
    return swap_mlp(model)


def _leave_hook(model):
    model.mlp.register_forward_hook(lambda *a: None)
    return swap_mlp(model)


def _convert_in_place(model):
    model.mlp[0], model.mlp[2] = grkan_copy(model.mlp[0]), grkan_copy(model.mlp[2])
    return model


@pytest.mark.parametrize(
    "edit, change",
    [
        (_change_weight, "tensor mlp.0.weight changed"),
        (_swap_in_original, "module tree changed"),
        (_leave_hook, "attributes of mlp changed: _forward_hooks"),
        (_convert_in_place, "module tree changed"),
    ],
)
def test_conversion_that_modifies_the_original_is_flagged(edit, change):
    row = measure(toy_family(), edit)
    assert any(change in c for c in row["original_changed"]), row["original_changed"]
    assert silent_changes(row)


@pytest.mark.parametrize(
    "skipped, silent",
    [((), True), (("embed",), True), (("mlp",), False), (("mlp.0",), False), (("m*p",), False), (("e*d",), True)],
)  # a glob names one not_traced skip for many modules of a class (model.layers.*.self_attn)
def test_unconverted_block_must_be_listed(skipped, silent):
    row = measure(toy_family(), copy.deepcopy, converted=(), skipped=skipped)
    flagged = "grkan: mlp neither converted nor listed as a skip" in silent_changes(row)
    assert flagged == silent


def test_copy_that_changes_the_function_is_silent():
    """nn.TransformerDecoderLayer's __setstate__ puts F.relu back on a deep copy: nothing converted, output changed."""

    def edit(model):
        out = copy.deepcopy(model)
        out.mlp[1] = nn.ReLU()
        return out

    row = measure(toy_family(), edit, converted=(), skipped=("mlp",))
    assert any("though no kanc layer is in the model" in s for s in silent_changes(row))


class GradSensitive(nn.Module):
    def forward(self, x):
        return x + 1e-2 * float(torch.is_grad_enabled())


def test_modes_that_disagree_are_silent():
    def edit(model):
        out = swap_mlp(model)
        out.mlp.append(GradSensitive())
        return out

    row = measure(toy_family(), edit)
    assert any("no_grad and grad outputs of the converted model differ" in s for s in silent_changes(row))


def test_crash_is_that_targets_failure_and_the_run_goes_on():
    def edit(model):
        raise RuntimeError("boom")

    convert_ok, report_ok = converter(swap_mlp)
    convert_bad, _ = converter(edit)
    row = measure_family(
        toy_family(), ("grkan", "snnk"),
        convert=lambda m, t, x: convert_ok(m, t, x) if t == "grkan" else convert_bad(m, t, x), report=report_ok,
    )  # fmt: skip
    assert row["targets"]["grkan"]["status"] == "ok"
    snnk = row["targets"]["snnk"]
    assert snnk["status"] == "crashed" and snnk["error"] == "RuntimeError: boom"
    assert any("snnk crashed" in f for f in failures(row))


def test_build_failure_is_recorded():
    def build():
        raise ValueError("no such config")

    row = measure_family(Family("bad", "test", build), ("grkan",))
    assert row["status"] == "build_failed" and row["error"] == "ValueError: no such config"
    assert failures(row)


@pytest.mark.parametrize(
    "edit, claimed, disagreement",
    [
        (copy.deepcopy, ("mlp",), "converted in the report only ['mlp'], in the model only []"),
        (swap_mlp, (), "converted in the report only [], in the model only ['mlp']"),
        (swap_mlp, ("mlp.0",), None),  # an entry naming a part of the block is about the block
    ],
)
def test_report_and_model_must_agree_on_what_was_converted(edit, claimed, disagreement):
    found = [f for f in failures(measure(toy_family(), edit, converted=claimed)) if "disagree" in f]
    assert found == ([f"grkan: the report and the model disagree: {disagreement}"] if disagreement else [])


# ---- pieces ----------------------------------------------------------------------------------------------------


def test_assign_kanc_layers_to_blocks():
    blocks = [
        Expected("layers.0", ("layers.0.linear1", "layers.0.activation", "layers.0.linear2"), "gelu"),
        Expected("layers.1.mlp", ("layers.1.mlp",), "gelu"),
        *(Expected(f"moe.experts.{i}", (f"moe.experts.{i}",), "silu") for i in range(2)),
    ]
    paths = ["layers.0.linear1", "layers.0.kanc_act", "layers.1.mlp.snnk", "moe.experts", "head.rational"]
    owned, unassigned = assign(paths, blocks)
    assert owned == {
        "layers.0": ["layers.0.linear1", "layers.0.kanc_act"],  # in scope; beside the block's modules
        "layers.1.mlp": ["layers.1.mlp.snnk"],
        "moe.experts.0": ["moe.experts"],  # one module replacing both experts
        "moe.experts.1": ["moe.experts"],
    }
    assert unassigned == ["head.rational"]


def test_kanc_layers_are_the_outermost_kanc_modules():
    model = nn.Sequential(nn.Linear(4, 4), GRKANLinear(4, 4, groups=1))
    assert list(kanc_layers(model)) == ["1"]  # not its rational "1.rational"


def test_redraw_weights_wakes_zero_heads_and_layer_scales_and_keeps_buffers():
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))
    nn.init.zeros_(model[2].weight)
    gamma = nn.Parameter(torch.full((8,), 1e-5))
    model.register_parameter("gamma", gamma)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    redraw_weights(model)
    assert model[2].weight.abs().min() > 0 and model.gamma.abs().max() > 1e-3
    assert model[0].weight.std().item() == pytest.approx(8**-0.5, rel=0.5)
    assert all(torch.equal(v, dict(model.named_buffers())[k]) for k, v in buffers.items())


def test_totals_count_named_families_apart():
    def row(name, named, expected, converted):
        return {"family": name, "library": "test", "named": named, "status": "ok", "expected": expected,
                "original_changed": [],
                "threshold": 1e-2, "targets": {"grkan": {"status": "ok", "converted": converted, "silent": [],
                "error_no_grad": 0.0, "error_grad": 0.0, "converted_blocks": [], "reported_blocks": []}}}  # fmt: skip

    summary = totals([row("a", True, 4, 3), row("b", False, 2, 0)], ["grkan"])
    assert summary["named"]["grkan"] == {"converted": 3, "fraction": 0.75}
    assert summary["all"]["grkan"] == {"converted": 3, "fraction": 0.5}
    assert summary["by_library"] == {"test": {"expected": 6, "grkan": 3}}


def test_torchvision_shim_restores_register_fake():
    from families.tvshim import import_torchvision

    real = torch.library.register_fake
    tv = import_torchvision()
    assert torch.library.register_fake is real
    assert hasattr(tv.models, "VisionTransformer") and hasattr(tv.ops.misc, "MLP")


# ---- the script ------------------------------------------------------------------------------------------------


def _script(*args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KANC_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "coverage.py"), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)


def test_script_writes_the_table_and_json(tmp_path):
    out = tmp_path / "coverage.json"
    done = _script("--family", "nn_encoder_gelu_bf", "--target", "grkan", "--out", str(out), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "nn_encoder_gelu_bf" in done.stdout and "issue 11's families (1): grkan" in done.stdout
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and data["targets"] == ["grkan"] and "coverage.py" in data["command"]
    assert data["versions"]["torch"] and data["versions"]["timm"] and data["versions"]["kanc"]
    assert [r["family"] for r in data["families"]] == ["nn_encoder_gelu_bf"]
    assert data["totals"]["named"]["expected"] == 1


def test_script_refuses_an_unknown_family(tmp_path):
    done = _script("--family", "no_such_family", "--out", str(tmp_path / "x.json"), tmp_path=tmp_path)
    assert done.returncode != 0 and "no family matches" in done.stderr
    assert not (tmp_path / "x.json").exists()
