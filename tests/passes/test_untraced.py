"""Modules that torch.fx cannot trace (Hugging Face attention behind a ``(*args, **kwargs)`` decorator): reported
only where linear layers stayed unexamined, once per class, with the reason and the forward's file:line."""

import pytest
import torch
import transformers
import zoo

import kanc
from kanc.api import inspect
from kanc.passes import find_mlp_blocks

SMALL = {
    "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 64,
}  # fmt: skip
T5 = {"vocab_size": 100, "d_model": 32, "d_ff": 64, "num_layers": 2, "num_heads": 4, "d_kv": 8}

MODELS = {
    "gpt2": zoo.gpt2,
    "llama": zoo.llama,
    "bert": zoo.bert,
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**SMALL)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL)),
    "t5": lambda: transformers.T5EncoderModel(transformers.T5Config(**T5)),
}


def _ids(seed: int = 0) -> dict:
    return {"input_ids": torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(seed))}


@pytest.mark.parametrize("name", MODELS)
def test_a_recorded_run_leaves_no_untraced_noise(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    found = find_mlp_blocks(model, inputs=_ids())
    assert len(found.blocks) == 2
    assert not [s for s in found.skipped if s.code == "not_traced"]
    assert found.as_dict()["not_traced"] == {}
    assert not any("not_traced" in k for k in found.counters)
    assert found.trace.failures  # the attention modules still do not trace: the report is quiet, not blind
    listed = find_mlp_blocks(model, inputs=_ids(), near_misses=True)
    notes = {s.name: s for s in listed.skipped if s.code == "not_traced"}
    attention = [f.path for f in found.trace.failures if "ttention" in f.type_name]
    assert attention and set(attention) <= set(notes)  # shown when asked, saying why they hide nothing
    why = [notes[p].message.rpartition("; ")[2] for p in attention]
    assert all(w.endswith("ran in the recorded run") or w.startswith("it has no linear layer") for w in why)
    assert any(w.endswith("ran in the recorded run") for w in why)
    assert listed.counters == found.counters  # notes are never counted


def test_untraced_attention_is_reported_once_per_class_with_its_forward():
    model = zoo.llama(layers=3)
    found = find_mlp_blocks(model)  # no inputs: nothing examined q/k/v/o, an MLP could hide there
    skips = [s for s in found.skipped if s.code == "not_traced" and "LlamaAttention" in s.message]
    assert len(skips) == 1
    skip = skips[0]
    assert skip.name == "model.layers.*.self_attn"
    assert "3 LlamaAttention modules did not trace" in skip.message and "model.layers.2.self_attn" in skip.message
    assert "decorator at transformers/utils/deprecation.py" in skip.message  # why fx failed, not only its ValueError
    assert skip.site.startswith("transformers/models/llama/modeling_llama.py:")  # the forward under the decorator
    assert skip.site.endswith("(LlamaAttention.forward)")
    paths = {f"model.layers.{i}.self_attn" for i in range(3)}
    assert paths <= set(found.as_dict()["not_traced"])  # the JSON still names every module not examined


def test_compile_report_of_a_hugging_face_model_lists_nothing_untraced():
    torch.manual_seed(0)
    model = zoo.llama().eval()
    converted = kanc.compile(model, "grkan")  # default inputs: token ids, recorded
    report = kanc.report(converted)
    assert report.blocks == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert report.not_traced == {} and report.as_dict()["not_traced"] == {} and report.skipped == []
    assert inspect(model).as_dict()["not_traced"] == {}


def test_calibration_without_verification_still_records_a_run():
    torch.manual_seed(0)
    layer = zoo.llama().eval().model.layers[0]
    hidden = torch.randn(2, 8, 64)
    cos, sin = torch.ones(1, 8, 32), torch.zeros(1, 8, 32)
    inputs = {"hidden_states": hidden, "position_embeddings": (cos, sin)}
    converted = kanc.compile(layer, "grkan", calibration=inputs, verify=False)
    report = kanc.report(converted)
    assert report.blocks == ["mlp"] and report.skipped == [] and report.not_traced == {}
    assert report.options["discovery_inputs"]["dict"]["hidden_states"]["shape"] == [2, 8, 64]


def test_an_encoder_decoder_converts_on_its_default_inputs():
    """T5 runs its decoder only on decoder ids: the default inputs carry them, so inspect and compile run as-is."""
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**T5)).eval()
    converted = kanc.compile(model, "grkan")
    report = kanc.report(converted)
    assert len(report.blocks) == 4 and report.not_traced == {} and report.skipped == []
    assert report.fidelity["failures"] == [] and max(report.fidelity["outputs"].values()) < 1e-2


def test_untraced_modules_are_named_by_place_with_stars_only_where_indices_differ():
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**T5))
    names = {s.name for s in find_mlp_blocks(model).skipped if s.code == "not_traced"}  # no inputs: nothing ran
    attention = {
        "encoder.block.*.layer.0.SelfAttention", "decoder.block.*.layer.0.SelfAttention",
        "decoder.block.*.layer.1.EncDecAttention",
    }  # fmt: skip
    assert names == {"<root>", *attention}  # the root's lm_head, and each place's modules once
