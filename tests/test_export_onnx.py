"""kanc.export_onnx: GR-KAN / SNNK models export to standard ONNX ops and onnxruntime matches PyTorch at two shapes."""

import sys
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from kanc.errors import KancError
from kanc.export import export_onnx
from kanc.nn import GRKANMlp, SNNKMlp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from digits_vit import ViT  # noqa: E402

STANDARD_OPS = {"Abs", "Add", "Div", "MatMul", "Mul", "Reshape", "Clip", "Relu", "Exp", "Cos", "Sin", "Concat"}


def _op_types(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


class _Logits(nn.Module):
    """GPT-2 returning only the logits tensor (no cache, no ModelOutput)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids, use_cache=False).logits


def _gpt2_grkan() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=64)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    for block in model.transformer.h:  # converted by hand until kanc.compile lands: same shapes, GR-KAN blocks
        block.mlp = GRKANMlp(64, 256, 64, groups=8, act_init="gelu")
    return _Logits(model).eval()


def test_gpt2_grkan_exports_and_matches_at_two_shapes(tmp_path):
    out = tmp_path / "gpt2.onnx"
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    result = export_onnx(_gpt2_grkan(), ids, out)
    assert out.is_file()
    assert [c["shapes"] for c in result.checks] == [[[2, 16]], [[3, 15]]]
    assert result.worst < 1e-4
    assert {"Abs", "Div"} <= _op_types(out)  # the rational is decomposed, no custom domain
    assert all(n.domain in ("", "ai.onnx") for n in onnx.load(str(out)).graph.node)


def test_vit_grkan_and_mlp_export_with_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    for kind in ("grkan", "mlp"):
        out = tmp_path / f"vit_{kind}.onnx"
        model = ViT(dim=32, depth=2, heads=4, mlp=kind)
        result = export_onnx(model, torch.randn(2, 1, 8, 8), out, dynamic=("batch",))
        assert [c["shapes"] for c in result.checks] == [[[2, 1, 8, 8]], [[3, 1, 8, 8]]]
        assert result.worst < 1e-4, kind


def test_snnk_block_exports_with_standard_ops(tmp_path):
    torch.manual_seed(0)
    w1, w2 = torch.randn(64, 16) / 4, torch.randn(16, 64) / 8
    model = nn.Sequential(nn.LayerNorm(16), SNNKMlp.from_mlp(w1, torch.zeros(64), w2, None, "gelu", 32, seed=3))
    out = tmp_path / "snnk.onnx"
    result = export_onnx(model, torch.randn(2, 5, 16), out)
    assert [c["shapes"] for c in result.checks] == [[[2, 5, 16]], [[3, 4, 16]]]
    assert result.worst < 1e-4
    assert _op_types(out) - {"LayerNormalization", "Shape", "Gather", "Unsqueeze"} <= STANDARD_OPS


def test_static_export_checks_one_shape(tmp_path):
    result = export_onnx(GRKANMlp(16, 32, 16), torch.randn(3, 16), tmp_path / "m.onnx", dynamic=None)
    assert len(result.checks) == 1 and result.dynamic == ()


def test_bad_shape_is_one_line_error_and_leaves_nothing(tmp_path):
    out = tmp_path / "bad.onnx"
    with pytest.raises(KancError, match="does not run on inputs"):
        export_onnx(GRKANMlp(16, 32, 16), torch.randn(2, 7), out)
    assert list(tmp_path.iterdir()) == []


def test_unknown_axis_rejected(tmp_path):
    with pytest.raises(KancError, match="unknown dynamic axis 'time'"):
        export_onnx(GRKANMlp(16, 32, 16), torch.randn(2, 16), tmp_path / "m.onnx", dynamic=("time",))


class _NotExportable(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum() > 0 else x  # data-dependent Python control flow: torch.export rejects it


def test_model_that_does_not_export_leaves_nothing(tmp_path):
    out = tmp_path / "x.onnx"
    with pytest.raises(KancError, match="does not export to ONNX"):
        export_onnx(_NotExportable(), torch.randn(2, 4), out)
    assert list(tmp_path.iterdir()) == []


def test_ort_mismatch_fails_and_leaves_nothing(tmp_path, monkeypatch):
    import kanc.export as kexport

    real = kexport._compare
    monkeypatch.setattr(kexport, "_compare", lambda m, i, f: {k: v + 1.0 for k, v in real(m, i, f).items()})
    out = tmp_path / "m.onnx"
    with pytest.raises(KancError, match="onnxruntime differs from PyTorch by 1"):
        export_onnx(GRKANMlp(16, 32, 16), torch.randn(2, 16), out)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target", ["grkan", "snnk"])
def test_compiled_gpt2_exports(tmp_path, target):
    """Once kanc.compile lands: the compiled GPT-2-tiny exports and matches onnxruntime at two shapes."""
    pytest.importorskip("kanc.api")
    transformers = pytest.importorskip("transformers")
    import kanc

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=64)
    model = _Logits(kanc.compile(transformers.GPT2LMHeadModel(cfg).eval(), target=target)).eval()
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    result = export_onnx(model, ids, tmp_path / f"gpt2_{target}.onnx")
    assert [c["shapes"] for c in result.checks] == [[[2, 16]], [[3, 15]]]
    assert result.worst < 1e-4


def test_hf_model_with_its_kv_cache_on_exports(tmp_path):
    """A Hugging Face causal LM as users have it (use_cache=True) exports: the cache is off during export only."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    assert model.config.use_cache
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    result = export_onnx(model, ids, tmp_path / "gpt2.onnx")
    assert result.worst < 1e-4 and model.config.use_cache  # restored


def test_export_errors_name_the_cause():
    from kanc.export import _exporter_cause

    text = "Failed to export the model with torch.export. This is step 1/3.\n## Exception summary\n\n"
    text += "<class 'torch._dynamo.exc.Unsupported'>: Data-dependent branching\n\nmore"
    assert _exporter_cause(RuntimeError(text)) == "Unsupported: Data-dependent branching"
    assert _exporter_cause(ValueError("plain\nsecond")) == "plain"


@pytest.mark.parametrize("target", ["grkan", "snnk"])
def test_compiled_vit_exports_with_dynamic_batch(tmp_path, target):
    """A timm-style ViT (kanc.nn.Mlp blocks) converted by kanc.compile exports and matches at two batch sizes."""
    import kanc

    torch.manual_seed(0)
    images = torch.randn(4, 1, 8, 8)
    converted = kanc.compile(ViT(dim=32, depth=2, heads=4, mlp="mlp").eval(), target=target, calibration=images)
    assert len(kanc.report(converted).converted) == 2
    result = export_onnx(converted, images[:2], tmp_path / f"vit_{target}.onnx", dynamic=("batch",))
    assert [c["shapes"] for c in result.checks] == [[[2, 1, 8, 8]], [[3, 1, 8, 8]]]
    assert result.worst < 1e-4


def _tiny_llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def test_converted_llama_exports_dynamic_from_a_batch_of_one(tmp_path):
    """torch.export specializes a size-1 example dim; exported as it was, the batch-1 LLaMA's graph broadcast wrong
    at batch 2 in onnxruntime. The export runs at size >= 2 and is checked at the user's shape and another."""
    import kanc

    converted = kanc.compile(_tiny_llama(), "grkan")
    assert kanc.report(converted).blocks == ["model.layers.0.mlp"]
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(2))
    out = tmp_path / "llama.onnx"
    result = export_onnx(converted, ids, out)
    assert result.note is None and result.dynamic == ("batch", "seq")
    assert [c["shapes"] for c in result.checks] == [[[1, 6]], [[2, 5]]]
    assert result.worst < 1e-4
    inputs = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param for d in inputs)  # both axes symbolic in the file


class _ShapeBranch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.shape[0] == 2 else x - 1  # a branch on the batch size: no dynamic batch possible


def test_a_model_that_cannot_be_dynamic_falls_back_to_static_shapes_saying_so(tmp_path):
    out = tmp_path / "m.onnx"
    result = export_onnx(_ShapeBranch(), torch.randn(2, 5, 4), out)
    assert result.dynamic == () and [c["shapes"] for c in result.checks] == [[[2, 5, 4]]] and result.worst == 0.0
    assert result.note.startswith("the export with dynamic batch/seq failed (model does not export to ONNX: ")
    assert "static shape of 2 for dimension inputs['x'].shape[0]" in result.note  # the line after torch's "...:"
    assert result.note.endswith("exported with static shapes [2, 5, 4]") and "\n" not in result.note
    assert [d.dim_value for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim] == [2, 5, 4]


def test_bf16_without_onnxruntime_kernels_fails_once_with_a_hint_and_leaves_nothing(tmp_path, monkeypatch):
    import kanc.export as kexport

    calls = []
    real = kexport._export
    monkeypatch.setattr(kexport, "_export", lambda *a: calls.append(a[3]) or real(*a))
    model = nn.Linear(16, 16).to(torch.bfloat16)
    with pytest.raises(KancError, match="lack bfloat16: export a float32 copy"):
        export_onnx(model, torch.randn(2, 5, 16).to(torch.bfloat16), tmp_path / "m.onnx")
    assert calls == [("batch", "seq")]  # no static retry: other shapes need the same kernels
    assert list(tmp_path.iterdir()) == []
