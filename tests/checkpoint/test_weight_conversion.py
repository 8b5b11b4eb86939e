"""Hugging Face folders whose tensors transformers converts on load, and folders that do not fill their model.

transformers 5 renames or merges some architectures' tensors in ``from_pretrained`` (GPT-NeoX's ``embed_out`` is its
``lm_head``, Mixtral's per-expert ``w1/w2/w3`` become stacked tensors) and writes them back that way in
``save_pretrained``. Streaming reads tensors by the model's names, so it cannot read those folders:
``kanc.convert_checkpoint`` says so in one line, and ``kanc convert DIR`` loads such a folder whole instead (as
``from_pretrained`` converts it) and says which path ran. A converted folder is saved under the model's own names, so
``kanc.load`` reads it back. The whole-model path refuses a folder that lacks a weight: ``from_pretrained`` would fill
it with a random init and only log a warning.
"""

import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import ids
from safetensors.torch import load_file, save_file

import kanc
from kanc.checkpoint.meta import NeedsWeightConversion
from kanc.errors import EXIT_FAILED, EXIT_NOTHING, EXIT_OK
from kanc.testing import rel_error

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trust"))
from trust_support import run_cli  # noqa: E402

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)


@pytest.fixture(scope="module")
def neox_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**SMALL)).eval()
    folder = tmp_path_factory.mktemp("neox") / "src"
    model.save_pretrained(folder)
    assert "embed_out.weight" in load_file(folder / "model.safetensors")  # the hub name, renamed on load
    return folder, model


def test_streaming_says_in_one_line_that_transformers_converts_the_tensors(neox_dir, tmp_path):
    src, _ = neox_dir
    with pytest.raises(NeedsWeightConversion) as e:
        kanc.convert_checkpoint(src, tmp_path / "out", target="grkan")
    text = str(e.value)
    assert "\n" not in text and "embed_out.weight" in text and "WeightRenaming" in text
    assert not (tmp_path / "out").exists()


def test_kanc_convert_loads_such_a_folder_whole_and_the_result_reloads(neox_dir, tmp_path, capsys):
    src, original = neox_dir
    out = tmp_path / "out"
    code, stdout, err = run_cli(["convert", src, "-t", "grkan", "-o", out], capsys)
    assert code == EXIT_OK, err
    assert "loaded whole, not streamed" in err and "transformers converts" in err
    assert stdout.strip().splitlines()[-1].startswith(f"wrote {out} (hf_dir, the whole model loaded, not streamed")
    saved = load_file(out / "model.safetensors")
    assert "lm_head.weight" in saved and "embed_out.weight" not in saved  # the model's own names
    converted = kanc.load(out).eval()
    assert kanc.report(converted).converted
    x = ids(3)
    with torch.no_grad():
        err_logits = rel_error(converted(input_ids=x).logits, original(input_ids=x).logits)
    assert err_logits < 1e-2, err_logits


def test_a_mixture_of_experts_with_stacked_expert_weights_is_reported_not_converted(tmp_path, capsys):
    torch.manual_seed(0)
    config = transformers.MixtralConfig(**SMALL, num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1)
    transformers.MixtralForCausalLM(config).eval().save_pretrained(tmp_path / "src")
    code, _, err = run_cli(["convert", tmp_path / "src", "-t", "grkan", "-o", tmp_path / "out"], capsys)
    assert code == EXIT_NOTHING, err
    assert "mixture of experts" in err
    assert not (tmp_path / "out").exists()


def test_the_whole_model_path_refuses_a_folder_that_lacks_a_weight(tmp_path, capsys):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SMALL, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(tmp_path / "src")
    weights = load_file(tmp_path / "src" / "model.safetensors")
    weights.pop("model.layers.1.mlp.down_proj.weight")
    save_file(weights, tmp_path / "src" / "model.safetensors", metadata={"format": "pt"})
    argv = ["convert", tmp_path / "src", "-t", "grkan", "--input-shape", "1,8", "-o", tmp_path / "out"]
    code, _, err = run_cli(argv, capsys)
    assert code == EXIT_FAILED
    assert err.strip().splitlines()[-1] == (
        f"Error: {tmp_path / 'src'} does not fill LlamaForCausalLM: no tensor for model.layers.1.mlp.down_proj.weight"
    )
    assert not (tmp_path / "out").exists()
