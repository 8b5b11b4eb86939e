"""kanc.load of a converted checkpoint folder builds the model on the meta device and assigns the saved tensors: the
peak memory stays near the folder's size and every tensor keeps the dtype it was saved in."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import kanc
from kanc.checkpoint.shards import CheckpointReader

# A child process: imports first, then the peak RSS (VmHWM) reset, then kanc.load alone; prints the peak's growth.
CHILD = """
import sys
import kanc, torch, transformers
from transformers.models.llama import modeling_llama  # noqa: F401 - imported before the measurement

def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024

try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS
except OSError:
    print("cannot reset the peak RSS")
    sys.exit(0)
before = peak()
model = kanc.load(sys.argv[1])
print(peak() - before)
"""


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    """A streamed GR-KAN conversion of a bf16 LLaMA whose size is mostly its embeddings (cheap to convert)."""
    config = transformers.LlamaConfig(
        hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8,
        vocab_size=32000, max_position_embeddings=64,
    )  # fmt: skip
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    work = tmp_path_factory.mktemp("bf16")
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(work / "src")
    kanc.convert_checkpoint(work / "src", work / "out", "grkan")
    return work / "out"


def test_loading_a_converted_folder_peaks_near_its_size(bf16_folder):
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    size = sum(f.stat().st_size for f in bf16_folder.glob("*.safetensors"))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(bf16_folder)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if "cannot reset" in proc.stdout:
        pytest.skip("this system does not let a process reset its peak RSS (/proc/self/clear_refs)")
    grown = int(proc.stdout.split()[-1])
    # building the fp32 model and copying the weights in took about 4.5x the folder (340 MB for 76 MB)
    assert grown < 1.5 * size, f"kanc.load grew the peak RSS by {grown / 1e6:.0f} MB for a {size / 1e6:.0f} MB folder"


def test_a_loaded_folder_holds_the_saved_tensors_in_their_dtypes(bf16_folder):
    model = kanc.load(bf16_folder)
    saved = CheckpointReader(bf16_folder)
    state = model.state_dict()
    assert set(saved.keys()) <= set(state)
    for key, tensor in saved.read(saved.keys()).items():
        assert state[key].dtype == tensor.dtype and torch.equal(state[key], tensor), key
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    rationals = ("numerator", "denominator")  # stored in fp32, as kanc.compile makes them
    assert {p.dtype for n, p in model.named_parameters() if not n.endswith(rationals)} == {torch.bfloat16}
    out = model(input_ids=torch.randint(0, 32000, (1, 8), generator=torch.Generator().manual_seed(0))).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
