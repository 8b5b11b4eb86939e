"""Hugging Face transformers: the families of benchmarks/convert_zoo.py (built by its own builders) and a few more
that neither issue 11 nor the zoo names.

Expected blocks per family, from transformers' modeling classes: the MLP module class (``GPT2MLP``,
``LlamaMLP``, ...), or the layer whose forward holds the MLP inline (``fc1``/``fc2`` of OPT, BART, Whisper), or
the split intermediate/output pair of BERT-like layers; Mixtral's stacked experts count one block per expert.
The count is checked against the config (layers x blocks per layer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from families.base import Built, Expected, Registry, check_count, require
from families.tvshim import import_torchvision

REGISTRY = Registry()
SPLIT = ("intermediate", "output")
INLINE = ("fc1", "activation_fn", "fc2")


@dataclass(frozen=True)
class Spec:
    """Where a family's MLP blocks live: instances of ``classes`` (their ``attrs`` when the class is a layer that
    holds the MLP inline), and how many the config says there are."""

    classes: tuple[str, ...]
    attrs: tuple[str, ...] = ()
    count: Callable = lambda c: c.num_hidden_layers
    experts: bool = False


SPECS = {
    "gpt2": Spec(("GPT2MLP",)),
    "gpt_neo": Spec(("GPTNeoMLP",)),
    "gptj": Spec(("GPTJMLP",)),
    "gpt_neox": Spec(("GPTNeoXMLP",)),
    "opt": Spec(("OPTDecoderLayer",), INLINE),
    "bloom": Spec(("BloomMLP",)),
    "falcon": Spec(("FalconMLP",)),
    "phi": Spec(("PhiMLP",)),
    "llama": Spec(("LlamaMLP",)),
    "mistral": Spec(("MistralMLP",)),
    "qwen2": Spec(("Qwen2MLP",)),
    "gemma": Spec(("GemmaMLP",)),
    "mixtral": Spec(("MixtralExperts",), count=lambda c: c.num_hidden_layers * c.num_local_experts, experts=True),
    "bert": Spec(("BertLayer",), SPLIT),
    "roberta": Spec(("RobertaLayer",), SPLIT),
    "albert": Spec(("AlbertLayer",), ("ffn", "activation", "ffn_output"), lambda c: c.num_hidden_groups),
    "electra": Spec(("ElectraLayer",), SPLIT),
    "deberta_v2": Spec(("DebertaV2Layer",), SPLIT),
    "distilbert": Spec(("FFN",)),
    "mpnet": Spec(("MPNetLayer",), SPLIT),
    "esm": Spec(("EsmLayer",), SPLIT),
    "t5": Spec(("T5DenseActDense",)),
    "t5_gated": Spec(("T5DenseGatedActDense",)),
    "bart": Spec(("BartEncoderLayer", "BartDecoderLayer"), INLINE, lambda c: c.encoder_layers + c.decoder_layers),
    "whisper_encoder": Spec(("WhisperEncoderLayer",), INLINE, lambda c: c.encoder_layers),
    "clip_text": Spec(("CLIPMLP",)),
    "vit": Spec(("ViTMLP",)),
    "dinov2": Spec(("Dinov2MLP",)),
    "dinov2_swiglu": Spec(("Dinov2SwiGLUFFN",)),
    # the attention-pooling head ends in a SiglipMLP of its own
    "siglip_vision": Spec(("SiglipMLP",), count=lambda c: c.num_hidden_layers + int(c.vision_use_head)),
    "swin": Spec(("SwinMLP",), count=lambda c: sum(c.depths)),
    "convnext": Spec(("ConvNextLayer",), ("pwconv1", "act", "pwconv2"), lambda c: sum(c.depths)),
    # dense1 -> depthwise conv -> act -> dense2
    "segformer": Spec(("SegformerMixMLP",), count=lambda c: sum(c.depths)),
    "wav2vec2": Spec(("Wav2Vec2FeedForward",)),
    # not in convert_zoo.py
    "gpt_bigcode": Spec(("GPTBigCodeMLP",)),
    "codegen": Spec(("CodeGenMLP",)),
    "qwen3": Spec(("Qwen3MLP",)),
    "stablelm": Spec(("StableLmMLP",)),
    "mpt": Spec(("MptMLP",)),
    "hf_beit": Spec(("BeitMLP",)),
    "xglm": Spec(("XGLMDecoderLayer",), INLINE),
}

# (name, model class, config kwargs, input kind, submodule picker), as convert_zoo's table
EXTRA = [
    ("gpt_bigcode", "GPTBigCodeModel", {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 100}, "ids", None),
    ("codegen", "CodeGenModel", {"n_layer": 2, "n_embd": 64, "n_head": 4, "rotary_dim": 8, "vocab_size": 100}, "ids",
     None),
    ("qwen3", "Qwen3Model", {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}, "ids", None),
    ("stablelm", "StableLmModel", {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                                   "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}, "ids", None),
    ("mpt", "MptModel", {"n_layers": 2, "d_model": 64, "n_heads": 4, "vocab_size": 100}, "ids", None),
    ("hf_beit", "BeitModel", {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                              "num_attention_heads": 2, "image_size": 32, "patch_size": 8}, "img", None),
    ("xglm", "XGLMModel", {"num_layers": 2, "d_model": 64, "ffn_dim": 128, "attention_heads": 2, "vocab_size": 100},
     "ids", None),
]  # fmt: skip

ACT_KEYS = ("hidden_act", "activation_function", "hidden_activation", "feed_forward_proj", "activation")


def config_activation(config) -> str:
    """The activation a transformers config names ("gelu" where the modeling code hard-codes it: ESM, BLOOM, MPT)."""
    for key in ACT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, str):
            value = value.replace("gated-", "").lower()
            if "gelu" in value:
                return "gelu"
            return {"swish": "silu"}.get(value, value)
    return "gelu"


def expected_blocks(model: nn.Module, spec: Spec, activation: str) -> list[Expected]:
    found = []
    for path, module in model.named_modules():
        if type(module).__name__ not in spec.classes:
            continue
        if spec.experts:  # one block per expert of a stacked expert module
            experts = next(p for p in module.parameters() if p.ndim == 3).shape[0]
            found += [Expected(f"{path}.{i}", (f"{path}.{i}",), activation) for i in range(experts)]
        elif spec.attrs:
            found.append(Expected(path, tuple(f"{path}.{a}" for a in spec.attrs), activation))
        else:
            found.append(Expected(path, (path,), activation))
    return found


def _zoo():
    import convert_zoo  # benchmarks/ is on sys.path (coverage.py and the tests put it there)

    return convert_zoo


def _build_family(entry: tuple) -> Built:
    import_torchvision()  # transformers imports an installed torchvision
    transformers = require("transformers")
    transformers.logging.set_verbosity_error()
    zoo = _zoo()
    name, cls_name, kwargs, kind, pick = entry
    if not hasattr(transformers, cls_name):
        raise RuntimeError(f"transformers {transformers.__version__} has no {cls_name}")
    model = zoo._build(transformers, cls_name, kwargs, pick)
    config = model.config
    spec = SPECS[name]
    found = expected_blocks(model, spec, config_activation(config))
    found = check_count(found, spec.count(config), f"{cls_name} config")
    return Built(model, zoo._inputs(kind), found)


def _register() -> None:
    for entry in _zoo()._families():
        REGISTRY.add(f"hf_{entry[0]}", "transformers")(lambda e=entry: _build_family(e))
    for entry in EXTRA:
        REGISTRY.add(f"hf_{entry[0]}".replace("hf_hf_", "hf_"), "transformers", named=False)(
            lambda e=entry: _build_family(e)
        )


_register()
