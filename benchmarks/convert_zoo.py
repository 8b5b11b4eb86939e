"""Conversion coverage: kanc.compile on tiny random-weight configs of many Hugging Face model families.

For each family and target it prints the blocks converted (by pattern), the activations found, the skips and the
relative error of the model's main output against the original (CPU, fp32, eval mode). Nothing is downloaded:
every model is built from a config. A family whose class is missing from the installed transformers is listed
as such.

    python benchmarks/convert_zoo.py                      # grkan and snnk on every family
    python benchmarks/convert_zoo.py --target grkan --only opt,bart --json zoo.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable

import torch

IDS, IMG, WAV, MEL = "ids", "img", "wav", "mel"
V = {"vocab_size": 100}
TOK = {"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}


def _families() -> list[tuple[str, str, dict, str, Callable | None]]:
    """(name, model class, config kwargs, input kind, submodule picker)."""
    small = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2}
    decoder = {**small, "num_attention_heads": 4, "num_key_value_heads": 2, **V}
    seq2seq = {
        "encoder_layers": 1, "decoder_layers": 1, "d_model": 64, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128,
        "encoder_attention_heads": 2, "decoder_attention_heads": 2, "decoder_start_token_id": 2, **V, **TOK,
    }  # fmt: skip
    vision = {**small, "image_size": 32, "patch_size": 8}
    return [
        ("gpt2", "GPT2Model", {"n_layer": 2, "n_embd": 64, "n_head": 2, **V}, IDS, None),
        ("gpt_neo", "GPTNeoModel", {"num_layers": 2, "hidden_size": 64, "num_heads": 4,
                                     "attention_types": [[["global", "local"], 1]], **V}, IDS, None),
        ("gptj", "GPTJModel", {"n_layer": 2, "n_embd": 64, "n_head": 4, "rotary_dim": 8, **V}, IDS, None),
        ("gpt_neox", "GPTNeoXModel", {**small, **V}, IDS, None),
        ("opt", "OPTModel", {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "ffn_dim": 128,
                             "word_embed_proj_dim": 64, **V}, IDS, None),
        ("bloom", "BloomModel", {"n_layer": 2, "hidden_size": 64, "n_head": 4, **V}, IDS, None),
        ("falcon", "FalconModel", {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, **V}, IDS,
         None),
        ("phi", "PhiModel", {**small, "num_attention_heads": 4, **V}, IDS, None),
        ("llama", "LlamaModel", decoder, IDS, None),
        ("mistral", "MistralModel", decoder, IDS, None),
        ("qwen2", "Qwen2Model", decoder, IDS, None),
        ("gemma", "GemmaModel", {**decoder, "head_dim": 16}, IDS, None),
        ("mixtral", "MixtralModel", {**decoder, "num_local_experts": 4, "num_experts_per_tok": 2}, IDS, None),
        ("bert", "BertModel", {**small, **V}, IDS, None),
        ("roberta", "RobertaModel", {**small, **V}, IDS, None),
        ("albert", "AlbertModel", {**small, "embedding_size": 32, **V}, IDS, None),
        ("electra", "ElectraModel", {**small, "embedding_size": 32, **V}, IDS, None),
        ("deberta_v2", "DebertaV2Model", {**small, **V}, IDS, None),
        ("distilbert", "DistilBertModel", {"n_layers": 2, "dim": 64, "hidden_dim": 128, "n_heads": 2, **V}, IDS,
         None),
        ("mpnet", "MPNetModel", {**small, **V}, IDS, None),
        ("esm", "EsmModel", {**small, "pad_token_id": 1, **V}, IDS, None),
        ("t5", "T5EncoderModel", {"num_layers": 2, "d_model": 64, "d_ff": 128, "num_heads": 2, "d_kv": 32, **V},
         IDS, None),
        ("t5_gated", "T5EncoderModel", {"num_layers": 2, "d_model": 64, "d_ff": 128, "num_heads": 2, "d_kv": 32,
                                         "feed_forward_proj": "gated-gelu", **V}, IDS, None),
        ("bart", "BartModel", seq2seq, IDS, None),
        ("whisper_encoder", "WhisperModel", {**seq2seq, "num_mel_bins": 16, "max_source_positions": 16}, MEL,
         lambda m: m.encoder),
        ("clip_text", "CLIPTextModel", {**small, **V}, IDS, None),
        ("vit", "ViTModel", vision, IMG, None),
        ("dinov2", "Dinov2Model", {k: v for k, v in vision.items() if k != "intermediate_size"}, IMG, None),
        ("dinov2_swiglu", "Dinov2Model", {**{k: v for k, v in vision.items() if k != "intermediate_size"},
                                          "use_swiglu_ffn": True}, IMG, None),
        ("siglip_vision", "SiglipVisionModel", vision, IMG, None),
        ("swin", "SwinModel", {"image_size": 32, "patch_size": 4, "embed_dim": 16, "depths": [1, 1],
                               "num_heads": [1, 2], "window_size": 4}, IMG, None),
        ("convnext", "ConvNextModel", {"depths": [1, 1], "hidden_sizes": [16, 32], "num_stages": 2}, IMG, None),
        ("segformer", "SegformerModel", {"num_encoder_blocks": 2, "depths": [1, 1], "hidden_sizes": [16, 32],
                                          "num_attention_heads": [1, 2], "sr_ratios": [2, 1], "patch_sizes": [7, 3],
                                          "strides": [4, 2], "mlp_ratios": [4, 4]}, IMG, None),
        ("wav2vec2", "Wav2Vec2Model", {**small, "conv_dim": (16, 16), "conv_stride": (5, 2), "conv_kernel": (10, 3),
                                       "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2}, WAV, None),
    ]  # fmt: skip


def _inputs(kind: str) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1)
    if kind == IDS:
        return (torch.randint(3, 100, (2, 12), generator=gen),)
    if kind == IMG:
        return (torch.randn(2, 3, 32, 32, generator=gen),)
    if kind == WAV:
        return (torch.randn(2, 800, generator=gen),)
    return (torch.randn(2, 16, 32, generator=gen),)


def _main_output(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple | list):
        return out[0]
    return out.last_hidden_state


def _build(transformers, cls_name: str, kwargs: dict, pick: Callable | None) -> torch.nn.Module:
    cls = getattr(transformers, cls_name)
    config = cls.config_class(**kwargs)
    torch.manual_seed(0)
    model = cls(config)
    return (pick(model) if pick else model).eval()


def run_family(transformers, family: tuple, target: str) -> dict:
    import kanc
    from kanc.errors import first_line

    name, cls_name, kwargs, kind, pick = family
    row: dict = {"family": name, "class": cls_name, "target": target}
    if not hasattr(transformers, cls_name):
        return {**row, "status": "missing", "detail": f"transformers has no {cls_name}"}
    try:
        model = _build(transformers, cls_name, kwargs, pick)
    except Exception as e:  # noqa: BLE001 - a config this transformers version rejects
        return {**row, "status": "build_failed", "detail": f"{type(e).__name__}: {first_line(e, 120)}"}
    x = _inputs(kind)
    start = time.perf_counter()
    try:
        converted = kanc.compile(model, target=target, example_inputs=x)
        with torch.no_grad():
            expected, actual = _main_output(model(*x)), _main_output(converted(*x))
    except Exception as e:  # noqa: BLE001 - a conversion failure is the finding
        return {**row, "status": "failed", "detail": f"{type(e).__name__}: {first_line(e, 160)}"}
    report = kanc.report(converted)
    err = float((actual.double() - expected.double()).norm() / expected.double().norm())
    return {
        **row,
        "status": "ok",
        "blocks": len(report.converted),
        "patterns": dict(Counter(b["pattern"] for b in report.converted)),
        "activations": sorted({b["activation"] for b in report.converted}),
        "skips": dict(Counter(s["code"] for s in report.skipped)),
        "rel_error": err,
        "seconds": time.perf_counter() - start,
    }


def _line(r: dict) -> str:
    head = f"{r['family']:<16}{r['target']:<7}"
    if r["status"] != "ok":
        return f"{head}{r['status'].upper()}: {r['detail']}"
    pats = ",".join(f"{k}:{v}" for k, v in r["patterns"].items()) or "-"
    skips = ",".join(f"{k}:{v}" for k, v in r["skips"].items()) or "-"
    acts = ",".join(r["activations"]) or "-"
    return f"{head}{r['blocks']:>3}  {pats:<14}{acts:<16}{r['rel_error']:>9.2e}  {r['seconds']:>5.1f}s  skips {skips}"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="grkan,snnk", help="comma-separated targets")
    parser.add_argument("--only", default="", help="comma-separated family names")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    only = {s for s in args.only.split(",") if s}
    rows = []
    print(f"{'family':<16}{'target':<7}{'n':>3}  {'patterns':<14}{'activations':<16}{'rel err':>9}  {'time':>6}")
    for family in _families():
        if only and family[0] not in only:
            continue
        for target in args.target.split(","):
            rows.append(run_family(transformers, family, target))
            print(_line(rows[-1]), flush=True)
    if args.json:
        meta = {"torch": torch.__version__, "transformers": transformers.__version__}
        meta.update(python=platform.python_version(), command=" ".join(["python", *sys.argv]))
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
