"""The reading policy: no file runs code unless trusted (kanc.frontend.loading, kanc.frontend.pt2, kanc.saving).

Every hostile input of hostile.py is refused by ``kanc.load`` in one line and its payload (a marker file) never runs;
the trust flag is the only thing that opens the door; clean files of the same kinds still load.
"""

import json

import hostile
import pytest
import torch
from trust_support import run_subprocess

import kanc
from kanc.errors import KancError
from kanc.frontend.pt2 import check_program


@pytest.mark.parametrize("name", sorted(hostile.BUILDERS))
def test_hostile_files_are_refused_and_their_payload_never_runs(tmp_path, name):
    case = hostile.build(name, tmp_path)
    with pytest.raises(KancError) as info:
        kanc.load(case.model)
    message = str(info.value)
    assert case.says in message and "\n" not in message, message
    assert hostile.markers(case.model.parent) == []


def test_trust_is_what_opens_the_door(tmp_path):
    """With trust_pickle=True a pickled .pt2 part is torch's to load: the payload runs (that is what trust means)."""
    case = hostile.build("pt2_pickled_sample_inputs", tmp_path)
    with pytest.raises(KancError):
        kanc.load(case.model)
    assert hostile.markers(tmp_path) == []
    with pytest.raises(KancError):  # the payload is no valid sample_inputs: the load fails after running it
        kanc.load(case.model, trust_pickle=True)
    assert hostile.markers(tmp_path) != []


def test_a_manifest_architecture_is_built_when_the_user_names_it(tmp_path):
    """The manifest's arch is imported only when arch= names the same one (or the file is trusted)."""
    model = hostile.mlp()
    converted = kanc.compile(model, "grkan", verify=False)
    arch = f"{hostile.__file__}:Mlp"
    kanc.save(converted, tmp_path / "m.pt", arch=arch)
    with pytest.raises(KancError, match="names the architecture .*pass --arch"):
        kanc.load(tmp_path / "m.pt")
    x = torch.randn(3, 8)
    for loaded in (kanc.load(tmp_path / "m.pt", arch=arch), kanc.load(tmp_path / "m.pt", trust_pickle=True)):
        torch.testing.assert_close(loaded.eval()(x), converted.eval()(x))


def test_a_manifest_names_only_transformers_model_classes(tmp_path):
    path = hostile.manifest_subprocess(tmp_path, tmp_path / hostile.MARKER)
    manifest = json.loads((tmp_path / "model.pt.kanc.json").read_text())
    for hf in ({"class": "pipeline", "config": {}}, {"class": "GPT2Model", "config": {"auto_map": {"x": "y"}}}):
        manifest.update(arch=None, hf=hf)
        (tmp_path / "model.pt.kanc.json").write_text(json.dumps(manifest))
        with pytest.raises(KancError, match="no model class 'pipeline'|auto_map"):
            kanc.load(path)
    assert hostile.markers(tmp_path) == []


TAMPERED = {
    "not json": ("{", "bad JSON"),
    "a list": ([1, 2], "not a kanc manifest"),
    "blocks not a list": ({"blocks": 5}, "blocks must be a list"),
    "blocks of numbers": ({"blocks": [1]}, "blocks must be a list"),
    "options a list": ({"options": []}, "options must be a JSON object"),
    "huge degrees": ({"options": {"degrees": [100000, 4]}}, "options.degrees"),
    "degrees of strings": ({"options": {"degrees": ["5", "4"]}}, "options.degrees"),
    "huge groups": ({"options": {"groups": 10**12}}, "options.groups"),
    "unknown option": ({"options": {"frobnicate": 1}}, "unknown option 'frobnicate'"),
    "unknown format": ({"format": "exe"}, "format must be one of"),
    "unknown target": ({"target": "mlp"}, "no known target"),
    "newer version": ({"kanc": {"manifest": 99}}, "newer than this kanc"),
    "arch a number": ({"arch": 7}, "arch must be a string"),
    "arch_kwargs a list": ({"arch_kwargs": [1]}, "arch_kwargs must be a JSON object"),
    "report of junk": ({"report": {"bad": 1}}, "report"),
    "report a string": ({"report": "x"}, "report must be a JSON object"),
    "control characters": ({"arch": "os:system\x1b[2J\nrm"}, "os:system\\x1b[2J\\nrm"),
}


@pytest.mark.parametrize("name", sorted(TAMPERED))
def test_tampered_manifests_are_one_line_errors(tmp_path, name):
    change, says = TAMPERED[name]
    model = hostile.mlp()
    converted = kanc.compile(model, "grkan", verify=False)
    arch = f"{hostile.__file__}:Mlp"
    kanc.save(converted, tmp_path / "m.pt", arch=arch)
    mpath = tmp_path / "m.pt.kanc.json"
    if isinstance(change, dict):
        manifest = json.loads(mpath.read_text())
        manifest.update(change)
        mpath.write_text(json.dumps(manifest))
    else:
        mpath.write_text(change if isinstance(change, str) else json.dumps(change))
    with pytest.raises(KancError) as info:
        kanc.load(tmp_path / "m.pt", arch=arch if name != "control characters" else None)
    assert says in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_special_files_never_block(tmp_path):
    """A FIFO where a model or its manifest should be would block a reader forever: refused at once."""
    import os

    os.mkfifo(tmp_path / "model.pt")
    with pytest.raises(KancError, match="not a regular file"):
        kanc.load(tmp_path / "model.pt")
    torch.save(hostile.mlp().state_dict(), tmp_path / "w.pt")
    os.mkfifo(tmp_path / "w.pt.kanc.json")
    with pytest.raises(KancError, match="not a regular file"):
        kanc.load(tmp_path / "w.pt", arch=f"{hostile.__file__}:Mlp")


def test_weights_that_do_not_fit_name_the_mismatch(tmp_path):
    torch.save({"fc1.weight": torch.zeros(3, 3)}, tmp_path / "w.pt")
    with pytest.raises(KancError) as info:
        kanc.load(tmp_path / "w.pt", arch=f"{hostile.__file__}:Mlp")
    message = str(info.value)
    assert "size mismatch for fc1.weight" in message and "\n" not in message, message


def test_clean_pt2_files_load_without_trust(tmp_path):
    """What torch.export writes passes the checks: dynamic and derived dims, guards, a Hugging Face model."""
    batch = torch.export.Dim("batch", min=2, max=64)

    class Reshaping(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = hostile.mlp()

        def forward(self, x):
            y = self.mlp(x)
            return y.reshape(y.shape[0] * y.shape[1] // 2, -1)

    dims = ({0: 2 * batch, 1: torch.export.Dim.STATIC},)
    ep = torch.export.export(Reshaping(), (torch.randn(4, 3, 8),), dynamic_shapes=dims)
    torch.export.save(ep, tmp_path / "derived.pt2")
    module = kanc.load(tmp_path / "derived.pt2")
    assert module(torch.randn(8, 3, 8)).shape == (12, 16)
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32, use_cache=False)
    gpt2 = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 50, (2, 8))
    dims = {"input_ids": {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}}
    torch.export.save(torch.export.export(gpt2, (), {"input_ids": ids}, dynamic_shapes=dims), tmp_path / "gpt2.pt2")
    loaded = kanc.load(tmp_path / "gpt2.pt2")
    torch.testing.assert_close(loaded(input_ids=ids).logits, gpt2(input_ids=ids).logits)


def test_a_converted_pt2_round_trips_without_trust(tmp_path):
    path = hostile.save_pt2(tmp_path / "m.pt2")
    converted = kanc.compile(kanc.load(path), "grkan")
    kanc.save(converted, tmp_path / "out.pt2")
    again = kanc.load(tmp_path / "out.pt2")
    x = torch.randn(5, 8)
    torch.testing.assert_close(again(x), converted(x))
    again.train()
    again.eval()  # ExportedProgram.module() makes these raise; kanc gives them back (the flags only)


@pytest.mark.parametrize(
    "text, ok",
    [
        ("Symbol('s77', positive=True, integer=True)", True),
        ("Mul(Integer(2), Min(Integer(4), Mul(Integer(4), Symbol('s27', positive=True, integer=True))))", True),
        ("FloorDiv(s0, 2) + Mod(s1, 3) <= 64", True),
        ("__import__('os').system('x')", False),
        ("Symbol('s0').__class__", False),
        ("Symbol('__class__')", False),
        ("(lambda: 1)()", False),
        ("open('x')", False),
        ("s0 if True else s1", False),
    ],
)
def test_shape_expressions_pass_only_as_formulas(text, ok):
    doc = {"sizes": [{"as_expr": {"expr_str": text, "hint": None}}]}
    if ok:
        check_program(doc)
    else:
        with pytest.raises(ValueError, match="not a plain formula"):
            check_program(doc)


@pytest.mark.parametrize(
    "text, ok",
    [
        ("L['x'].size()[0] >= 2", True),
        ("((L['x'].size()[1]*L['x'].size()[0]) // 2) != L['x'].size()[0]", True),
        ("math.isnan(L['y'])", True),
        ("L['x'].device == 'cuda:0'", True),
        ("L['x'].__class__", False),
        ("getattr(L, 'x')", False),
        ('L[\'x\'] == \'") or __import__("os").system("x") or ("\'', False),
        ("1 # comment", False),
    ],
)
def test_guards_pass_only_as_shape_checks(text, ok):
    doc = {"guards_code": [text]}
    if ok:
        check_program(doc)
    else:
        with pytest.raises(ValueError, match="not a plain shape check"):
            check_program(doc)


def test_names_that_become_code_must_be_identifiers():
    check_program({"inputs": [{"as_tensor": {"name": "x_1"}}], "parameter_name": "blocks.block-1.weight"})
    for bad in ({"name": "x=1"}, {"name": "x y"}, {"parameter_name": 'a")'}, {"fqn": "a\nb"}):
        with pytest.raises(ValueError):
            check_program(bad)
    with pytest.raises(ValueError, match="not a torch op"):
        check_program({"target": "builtins.exec"})
    check_program({"target": "torch.ops.aten.__and__.Tensor"})


def test_inputs_files_never_unpickle(tmp_path):
    from kanc.frontend.loading import read_inputs

    (tmp_path / "x.pt").write_bytes(hostile.pickled_payload(tmp_path / hostile.MARKER))
    with pytest.raises(KancError, match="pickled objects"):
        read_inputs(tmp_path / "x.pt")
    assert hostile.markers(tmp_path) == []


def test_hf_folder_with_remote_code_is_refused_without_a_prompt(tmp_path):
    """transformers would ask "Do you wish to run the custom code? [y/N]" on stdout and read stdin: never."""
    folder = hostile.build("hf_remote_code", tmp_path).model
    proc = run_subprocess("inspect", folder, "--json", stdin="y\ny\n")
    assert proc.returncode == 1 and proc.stdout == "", proc.stdout
    assert "auto_map" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert hostile.markers(tmp_path) == []
