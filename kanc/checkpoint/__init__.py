"""Big checkpoints: Hugging Face ``save_pretrained`` folders converted and checked one layer at a time.

import kanc
report = kanc.convert_checkpoint("llama-7b/", "llama-7b-grkan/", target="grkan")
kanc.checkpoint.compare_checkpoints("llama-7b/", "llama-7b-grkan/")   # per-layer errors, neither loaded whole
"""

from kanc.checkpoint.compare import compare_checkpoints
from kanc.checkpoint.stream import convert_checkpoint

__all__ = ["convert_checkpoint", "compare_checkpoints"]
