"""kanc.compile / report / save / load: the Python interface, and every file format round trip."""

import json
import sys
from pathlib import Path

import pytest
import torch

import kanc
from kanc.errors import KancError
from kanc.frontend.loading import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent / "passes"))
import zoo  # noqa: E402

ZOO = str(Path(zoo.__file__).resolve())


def test_compile_returns_a_copy_with_a_report():
    model = zoo.Branchy(32).eval()
    x = torch.randn(2, 4, 32)
    converted = kanc.compile(model, "grkan", example_inputs=x)
    assert converted is not model and type(model.a.fc1) is torch.nn.Linear
    report = kanc.report(converted)
    assert report.target == "grkan" and report.model_type == "Branchy" and report.blocks == ["a", "b", "c"]
    assert report.params_after > report.params_before  # rationals add (m+1+n) x G per layer
    assert report.fidelity["outputs"]["output"] < 1e-2
    branch = "a" if float(model.norm(x).mean().detach()) > 0 else "b"  # data-dependent: only one of a, b ran
    assert set(report.fidelity["blocks"]) == {branch, "c"}
    passes = ["find_mlp_blocks", "rewrite_to_grkan", "fuse_rationals", "verify_equivalence"]
    assert [p["name"] for p in report.passes] == passes
    assert {s["code"] for s in report.skipped} == set()
    text = str(report)
    assert "3 block(s) converted" in text and "model outputs on input (2, 4, 32)" in text
    json.dumps(report.as_dict())  # JSON-ready


def test_compile_in_place_measures_against_a_snapshot():
    model = zoo.Branchy(32).eval()
    x = torch.randn(2, 4, 32)
    converted = kanc.compile(model, "grkan", inplace=True, example_inputs=x)
    assert converted is model and type(model.a.fc1).__name__ == "GRKANLinear"
    assert kanc.report(model).fidelity["outputs"]["output"] < 1e-2


def test_hf_models_get_default_inputs_for_fidelity():
    report = kanc.report(kanc.compile(zoo.gpt2(), "grkan"))
    assert report.fidelity["inputs"] == "input_ids (2, 16)" and report.fidelity["outputs"]["logits"] < 1e-2


def test_report_of_an_unconverted_model_is_an_error():
    with pytest.raises(KancError, match="not converted by kanc.compile"):
        kanc.report(torch.nn.Linear(2, 2))


def test_no_block_is_not_an_error_in_python():
    report = kanc.report(kanc.compile(zoo.NoMlp(), "grkan"))
    assert report.converted == [] and report.fidelity is None


def _same(a, b, x):
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["state_dict", "safetensors"])
@pytest.mark.parametrize("target", ["grkan", "snnk"])
def test_weights_formats_round_trip_through_the_manifest(tmp_path, fmt, target):
    model = zoo.Branchy(32).eval()
    converted = kanc.compile(model, target, verify=False)
    path = tmp_path / ("m.safetensors" if fmt == "safetensors" else "m.pt")
    manifest = kanc.save(converted, path, arch=f"{ZOO}:Branchy", arch_kwargs={"d": 32})
    assert manifest == tmp_path / f"{path.name}.kanc.json" and path.is_file()
    data = json.loads(manifest.read_text())
    assert data["format"] == fmt and data["target"] == target and data["blocks"] == ["a", "b", "c"]
    with pytest.raises(KancError, match="names the architecture"):  # a manifest alone never imports code
        kanc.load(path)
    loaded = kanc.load(path, arch=f"{ZOO}:Branchy")  # the same one: built with the manifest's kwargs
    _same(loaded.eval(), converted.eval(), torch.randn(3, 2, 32))
    assert kanc.report(loaded).blocks == ["a", "b", "c"]
    with pytest.raises(KancError, match="do not fit"):  # the unconverted architecture alone does not take them
        load_model(path, arch=f"{ZOO}:Branchy")


def test_root_graph_module_round_trips(tmp_path):
    converted = kanc.compile(zoo.FunctionalMlp(16, 32), "snnk", verify=False)
    assert isinstance(converted, torch.fx.GraphModule)
    kanc.save(converted, tmp_path / "f.pt", arch=f"{ZOO}:FunctionalMlp", arch_kwargs={"d": 16, "h": 32})
    _same(kanc.load(tmp_path / "f.pt", trust_pickle=True), converted, torch.randn(2, 16))


@pytest.mark.parametrize(
    "options",
    [{"degrees": (17, 4)}, {"degrees": (5, -1)}, {"degrees": (5.0, 4)}, {"groups": 0}, {"groups": 1 << 17}],
)
def test_compile_bounds_options_as_the_cli_does(options):
    """kanc.compile in Python refuses the option values the CLI and the manifest reader refuse (a degree of 10**6
    would allocate without bound), in one line, before any work, leaving the model as it was."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(KancError, match=r"^bad option '(degrees|groups)' for target grkan: must be") as info:
        kanc.compile(model, "grkan", inplace=True, example_inputs=torch.randn(4, 8), **options)
    assert "\n" not in str(info.value)
    assert isinstance(model[1], torch.nn.GELU)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_weights_without_an_arch_say_what_to_pass(tmp_path):
    converted = kanc.compile(zoo.Branchy(32), "grkan", verify=False)
    kanc.save(converted, tmp_path / "m.pt")
    with pytest.raises(KancError, match=r"pass --arch package.module:Class .*it was .*zoo:Branchy"):
        kanc.load(tmp_path / "m.pt")
    _same(kanc.load(tmp_path / "m.pt", arch=f"{ZOO}:Branchy").eval(), converted.eval(), torch.randn(1, 2, 32))


def test_pickle_round_trip_needs_trust(tmp_path):
    converted = kanc.compile(zoo.sequential_mlp(), "snnk", verify=False).eval()
    kanc.save(converted, tmp_path / "p.pt", format="pickle")
    with pytest.raises(KancError, match="trust-pickle"):
        kanc.load(tmp_path / "p.pt")
    loaded = kanc.load(tmp_path / "p.pt", trust_pickle=True)
    _same(loaded, converted, torch.randn(2, 32))
    assert kanc.report(loaded).target == "snnk"


def test_hf_state_dict_and_save_pretrained_round_trip(tmp_path):
    model = zoo.gpt2().eval()
    converted = kanc.compile(model, "grkan", verify=False)
    ids = zoo._ids()
    kanc.save(converted, tmp_path / "gpt2.pt")  # the manifest keeps the HF config: no --arch needed
    again = kanc.load(tmp_path / "gpt2.pt").eval()
    torch.testing.assert_close(again(**ids).logits, converted(**ids).logits, rtol=0, atol=0)
    folder = tmp_path / "gpt2_dir"
    kanc.save(converted, folder, format="hf_dir")
    assert (folder / "kanc.json").is_file() and (folder / "config.json").is_file()
    from_dir = kanc.load(folder).eval()
    torch.testing.assert_close(from_dir(**ids).logits, converted(**ids).logits, rtol=0, atol=0)
    assert from_dir.lm_head.weight is from_dir.transformer.wte.weight  # ties restored


def test_pt2_round_trip_keeps_dynamic_dims(tmp_path):
    model = zoo.FunctionalMlp(16, 64).eval()
    batch = torch.export.Dim("batch", min=2, max=64)
    ep = torch.export.export(model, (torch.randn(4, 16),), dynamic_shapes=({0: batch},))
    torch.export.save(ep, tmp_path / "m.pt2")
    loaded = kanc.load(tmp_path / "m.pt2")
    converted = kanc.compile(loaded, "grkan", example_inputs=(torch.randn(4, 16),))
    assert kanc.report(converted).fidelity["outputs"]["output"] < 1e-2
    kanc.save(converted, tmp_path / "out.pt2")
    again = kanc.load(tmp_path / "out.pt2")
    x = torch.randn(7, 16)  # another batch size: the batch dim stayed symbolic
    torch.testing.assert_close(again(x), converted(x))
    assert rel_error_ok(again(x), model(x))


def rel_error_ok(a, b):
    from kanc.testing import rel_error

    return rel_error(a, b) < 1e-2


def test_pt2_without_example_inputs_is_an_error(tmp_path):
    converted = kanc.compile(zoo.sequential_mlp(), "grkan", verify=False)
    with pytest.raises(KancError, match="needs example inputs"):
        kanc.save(converted, tmp_path / "x.pt2")
    assert list(tmp_path.iterdir()) == []


def test_manifest_that_does_not_match_the_architecture(tmp_path):
    converted = kanc.compile(zoo.Branchy(32), "grkan", verify=False)
    kanc.save(converted, tmp_path / "m.pt", arch=f"{ZOO}:NoMlp", arch_kwargs={"d": 32})
    with pytest.raises(KancError, match="does not match the manifest"):
        kanc.load(tmp_path / "m.pt", arch=f"{ZOO}:NoMlp")


def test_export_cli_loads_a_kanc_output(tmp_path):
    """kanc export onnx calls kanc.api.load(path, trust_pickle=..., arch=...): a converted weights file works."""
    from kanc.api import load

    converted = kanc.compile(zoo.Branchy(32), "snnk", verify=False)
    kanc.save(converted, tmp_path / "m.pt", arch=f"{ZOO}:Branchy")
    module = load(str(tmp_path / "m.pt"), trust_pickle=False, arch=f"{ZOO}:Branchy")
    assert sum(type(m).__name__ == "SNNKMlp" for m in module.modules()) == 3


def test_failed_writes_leave_nothing(tmp_path, monkeypatch):
    import kanc.manifest as manifest
    import kanc.saving as saving

    converted = kanc.compile(zoo.sequential_mlp(), "grkan", verify=False)

    def half_then_fail(model, tmp, example_inputs):
        tmp.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setitem(saving._WRITERS, "state_dict", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        kanc.save(converted, tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setattr(manifest.json, "dumps", lambda *a, **k: (_ for _ in ()).throw(ValueError("bad manifest")))
    with pytest.raises(ValueError, match="bad manifest"):
        kanc.save(converted, tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []  # the model file is removed when its manifest cannot be written


def test_progress_bar_only_on_a_terminal(monkeypatch, capsys):
    from kanc.cli.convert import _Progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    _Progress(True)("grkan a", 1, 2)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar = _Progress(True)
    bar("grkan a", 1, 2)
    bar("grkan", 2, 2)
    err = capsys.readouterr().err
    assert "[############............] 1/2" in err and err.endswith("\n")
    _Progress(False)("x", 1, 2)
    assert capsys.readouterr().err == ""


class _FailsOnThreeRows(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = zoo.sequential_mlp()

    def forward(self, x):
        if x.shape[0] == 3:
            raise ValueError("no three rows\n  a second line of detail")
        return self.mlp(x)


def test_a_model_that_fails_on_the_inputs_is_one_line():
    model = _FailsOnThreeRows()
    width = model.mlp[0].in_features
    with pytest.raises(KancError) as failed:
        kanc.compile(model, "grkan", example_inputs=torch.randn(3, width))
    assert str(failed.value) == "the model does not run on the given inputs: ValueError: no three rows"
