"""open_clip CLIP (gelu and quick_gelu), sentence-transformers over a tiny BERT, and peft LoRA on LLaMA's MLP."""

from __future__ import annotations

import os
import tempfile

import torch

from families.base import Built, Registry, act_name, by_class_name, check_count, members, require, seeded
from families.tvshim import import_torchvision

REGISTRY = Registry()
VOCAB = 100


def _ids(batch: int = 2, seq: int = 8, low: int = 0) -> torch.Tensor:
    return torch.randint(low, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def _clip(quick_gelu: bool) -> Built:
    import_torchvision()  # open_clip imports torchvision
    open_clip = require("open_clip")
    seeded()
    vision = open_clip.model.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32)
    text = open_clip.model.CLIPTextCfg(context_length=8, vocab_size=VOCAB, width=32, heads=2, layers=1)
    model = open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text, quick_gelu=quick_gelu)
    # every residual attention block: mlp = c_fc, gelu (nn.GELU or QuickGELU), c_proj
    block = open_clip.transformer.ResidualAttentionBlock
    found = members(model, block, ("mlp",), lambda b: act_name(b.mlp.gelu))
    found = check_count(found, vision.layers + text.layers, "vision + text layers")
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    return Built(model, (image, _ids()), found)


REGISTRY.add("open_clip_gelu", "open_clip")(lambda: _clip(False))
REGISTRY.add("open_clip_quick_gelu", "open_clip")(lambda: _clip(True))


@REGISTRY.add("sentence_transformers_bert", "sentence-transformers")
def _sentence_transformer() -> Built:
    """SentenceTransformer(Transformer(tiny BERT saved to a temp folder), Pooling): the library loads it itself."""
    import_torchvision()
    transformers = require("transformers")
    st = require("sentence_transformers")
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    seeded()
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    with tempfile.TemporaryDirectory(prefix="kanc-coverage-st-") as folder:
        vocab = os.path.join(folder, "vocab.txt")
        with open(vocab, "w") as f:
            f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(f"w{i}" for i in range(VOCAB - 5))]))
        transformers.BertTokenizer(vocab).save_pretrained(folder)
        transformers.BertModel(config).save_pretrained(folder)
        model = st.SentenceTransformer(modules=[Transformer(folder), Pooling(config.hidden_size)], device="cpu")
    found = check_count(by_class_name(model, ["BertLayer"], "gelu"), config.num_hidden_layers, "num_hidden_layers")
    found = [type(e)(e.name, (f"{e.name}.intermediate", f"{e.name}.output"), e.activation) for e in found]
    ids = _ids(low=5)
    features = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    return Built(model, (features,), found)


@REGISTRY.add("peft_lora_llama_mlp", "peft")
def _peft_lora() -> Built:
    """LoRA adapters (random B, so they matter) on gate/up/down of a tiny LlamaModel's MLPs."""
    import_torchvision()
    transformers = require("transformers")
    peft = require("peft")
    transformers.logging.set_verbosity_error()
    seeded()
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"], init_lora_weights=False
    )
    model = peft.get_peft_model(transformers.LlamaModel(config), lora)
    found = check_count(by_class_name(model, ["LlamaMLP"], "silu"), config.num_hidden_layers, "num_hidden_layers")
    return Built(model, {"input_ids": _ids()}, found)
