"""Tiny Hugging Face checkpoints in several shards, written once per session."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "passes"))
import zoo  # noqa: E402


def save(model: torch.nn.Module, folder: Path, shard: str = "40KB") -> Path:
    model.save_pretrained(folder, max_shard_size=shard)
    return folder


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """A 3-layer LLaMA (gated MLPs, untied head) in several safetensors shards, and the model itself."""
    torch.manual_seed(0)
    model = zoo.llama(layers=3).eval()
    return save(model, tmp_path_factory.mktemp("llama") / "src"), model


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    """A 2-layer GPT-2 (Conv1D MLPs, head tied to the embedding) in several shards, and the model itself."""
    torch.manual_seed(1)
    model = zoo.gpt2(layers=2).eval()
    return save(model, tmp_path_factory.mktemp("gpt2") / "src"), model


def ids(seed: int = 0) -> torch.Tensor:
    """The token ids kanc.convert_checkpoint calibrates on by default (kanc.api.default_inputs)."""
    return torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(seed))
