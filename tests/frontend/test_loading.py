"""Model files: each format recognised from its contents, loaded or refused with a one-line reason."""

import textwrap

import pytest
import torch
from torch import nn

from kanc.errors import KancError
from kanc.frontend.loading import build_arch, detect_format, load_model


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))


@pytest.fixture
def files(tmp_path):
    model = _mlp()
    paths = {
        "pickle": tmp_path / "full.pt",
        "state_dict": tmp_path / "sd.pt",
        "checkpoint": tmp_path / "ckpt.pth",
        "legacy": tmp_path / "legacy.bin",
        "torchscript": tmp_path / "ts.pt",
        "pt2": tmp_path / "m.pt2",
    }
    torch.save(model, paths["pickle"])
    torch.save(model.state_dict(), paths["state_dict"])
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, paths["checkpoint"])
    torch.save(model.state_dict(), paths["legacy"], _use_new_zipfile_serialization=False)
    torch.jit.save(torch.jit.script(model), paths["torchscript"])
    torch.export.save(torch.export.export(model, (torch.randn(2, 4),)), paths["pt2"])
    return model, paths


ARCH = "torch.nn:Sequential"


def _arch_file(tmp_path) -> str:
    src = tmp_path / "my_arch.py"
    src.write_text(
        textwrap.dedent(
            """
            from torch import nn

            class Net(nn.Sequential):
                def __init__(self, width=8):
                    super().__init__(nn.Linear(4, width), nn.GELU(), nn.Linear(width, 4))
            """
        )
    )
    return f"{src}:Net"


def test_formats_are_detected_from_contents(files):
    _, paths = files
    expected = {"pickle": "state_dict", "checkpoint": "state_dict", "legacy": "state_dict"}  # pickle told on load
    for name, path in paths.items():
        assert detect_format(path) == expected.get(name, name), name


def test_whole_module_pickle_needs_trust(files):
    model, paths = files
    with pytest.raises(KancError, match="runs code.*--trust-pickle"):
        load_model(paths["pickle"])
    loaded = load_model(paths["pickle"], trust_pickle=True)
    assert loaded.format == "pickle"
    x = torch.randn(3, 4)
    torch.testing.assert_close(loaded.module(x), model(x))


@pytest.mark.parametrize("name", ["state_dict", "checkpoint", "legacy"])
def test_weights_need_an_architecture(files, tmp_path, name):
    model, paths = files
    with pytest.raises(KancError, match="holds only weights.*--arch"):
        load_model(paths[name])
    loaded = load_model(paths[name], arch=_arch_file(tmp_path), arch_kwargs='{"width": 8}')
    assert loaded.format == "state_dict" and loaded.arch_kwargs == {"width": 8}
    x = torch.randn(3, 4)
    torch.testing.assert_close(loaded.module(x), model(x))


def test_weights_that_do_not_fit_say_which(files, tmp_path):
    _, paths = files
    with pytest.raises(KancError, match=r"do not fit .*size mismatch for 0.weight"):
        load_model(paths["state_dict"], arch=_arch_file(tmp_path), arch_kwargs={"width": 16})
    with pytest.raises(KancError, match=r"do not fit torch.nn:Linear: missing weight, bias; unexpected 0.weight"):
        load_model(paths["state_dict"], arch="torch.nn:Linear", arch_kwargs={"in_features": 4, "out_features": 8})


def test_torchscript_is_refused_with_the_reason(files):
    with pytest.raises(KancError, match="TorchScript.*no Python module"):
        load_model(files[1]["torchscript"])


def test_pt2_loads_as_an_aten_graph(files):
    model, paths = files
    loaded = load_model(paths["pt2"])
    assert loaded.format == "pt2" and loaded.exported is not None
    assert isinstance(loaded.module, torch.fx.GraphModule)
    x = torch.randn(2, 4)
    torch.testing.assert_close(loaded.module(x), model(x))


def test_safetensors_with_arch(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    model = _mlp()
    path = tmp_path / "w.safetensors"
    safetensors.save_file(model.state_dict(), str(path))
    assert detect_format(path) == "safetensors"
    loaded = load_model(path, arch=_arch_file(tmp_path))
    x = torch.randn(2, 4)
    torch.testing.assert_close(loaded.module(x), model(x))


def test_hugging_face_folder_loads_offline(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(tmp_path / "gpt2")
    assert detect_format(tmp_path / "gpt2") == "hf_dir"
    loaded = load_model(tmp_path / "gpt2")
    assert type(loaded.module).__name__ == "GPT2LMHeadModel"
    ids = torch.randint(0, 50, (1, 5))
    torch.testing.assert_close(loaded.module(ids).logits, model(ids).logits)
    (tmp_path / "gpt2" / "model.safetensors").unlink()
    with pytest.raises(KancError, match="no weights"):
        load_model(tmp_path / "gpt2")


def test_hugging_face_class_from_arch_kwargs():
    pytest.importorskip("transformers")
    model = build_arch("transformers:GPT2Model", {"n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 50})
    assert type(model).__name__ == "GPT2Model" and len(model.h) == 1


@pytest.mark.parametrize(
    "content,match",
    [
        (b"", "is empty"),
        (b"hello world, not a model", "not a PyTorch model file"),
        (b'{"a": 1}', "JSON"),
        (b"PK\x03\x04" + b"\0" * 40, "truncated or corrupt"),
    ],
)
def test_foreign_and_broken_files(tmp_path, content, match):
    path = tmp_path / "m.pt"
    path.write_bytes(content)
    with pytest.raises(KancError, match=match):
        load_model(path)


def test_truncated_archives(files, tmp_path):
    for name in ("pickle", "legacy", "pt2"):
        data = files[1][name].read_bytes()
        cut = tmp_path / f"cut_{name}"
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(KancError, match="truncated or corrupt"):
            load_model(cut, trust_pickle=True)


def test_non_model_objects(tmp_path):
    torch.save(torch.randn(3), tmp_path / "t.pt")
    torch.save({"lr": 0.1, "steps": [1, 2]}, tmp_path / "d.pt")
    with pytest.raises(KancError, match="holds a Tensor"):
        load_model(tmp_path / "t.pt")
    with pytest.raises(KancError, match="without model weights.*'lr'"):
        load_model(tmp_path / "d.pt")


@pytest.mark.parametrize(
    "arch,match",
    [
        ("no_colon", "must look like"),
        ("nosuch_pkg_xyz.mod:X", "cannot import"),
        ("torch.nn:NoSuchLayer", "has no attribute"),
        ("missing_file.py:Net", "file not found"),
        ("torch.nn:Linear", "cannot build"),  # missing required arguments
        ("math:pi", "not a class or a function"),
    ],
)
def test_bad_arch(arch, match):
    with pytest.raises(KancError, match=match):
        build_arch(arch)


def test_bad_arch_kwargs(files):
    with pytest.raises(KancError, match="not valid JSON"):
        load_model(files[1]["state_dict"], arch=ARCH, arch_kwargs="{width: 8")
