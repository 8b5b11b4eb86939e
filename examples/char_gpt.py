"""A small character-level GPT and its corpus: the Python standard library's own source files.

The model is a GPT with pre-norm blocks (``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``) whose MLPs use timm's
attribute names (``blocks[i].mlp.fc1/act/fc2``) so ``kanc.compile`` finds them; ``mlp="grkan"`` builds the same
GPT with ``kanc.nn.GRKANMlp`` blocks (KAT's variance-preserving init) for training from scratch.

The corpus needs nothing downloaded: the top-level ``*.py`` files of ``sysconfig.get_paths()["stdlib"]``, in sorted
order, split into train and validation BY FILE (a file goes to validation when the SHA-256 of its name falls in
the validation fraction), so no validation text is ever seen in training. Characters map to a fixed vocabulary
(printable ASCII, newline, tab, one token for anything else), so the encoding depends on nothing but the text.
"""

from __future__ import annotations

import hashlib
import math
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from kanc.nn import GRKANMlp, Mlp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_vit import Attention  # noqa: E402  (the ViT's attention, causal)

VOCAB = "\t\n" + "".join(chr(c) for c in range(32, 127))
OTHER = len(VOCAB)  # every character outside VOCAB
VOCAB_SIZE = len(VOCAB) + 1
_CODES = {ch: i for i, ch in enumerate(VOCAB)}


# ---- corpus --------------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """Encoded train / validation text and the file lists they came from."""

    train: Tensor  # (N,) int64 character codes
    val: Tensor
    train_files: list[str]
    val_files: list[str]
    root: str

    def describe(self) -> dict:
        """What the JSON records: where the text came from, the list's hash, sizes."""
        names = self.train_files + self.val_files
        return {
            "root": self.root,
            "files": len(names),
            "file_list_sha256": list_hash(sorted(names)),
            "val_files_sha256": list_hash(self.val_files),
            "train_chars": len(self.train),
            "val_chars": len(self.val),
            "val_files": self.val_files,
        }


def list_hash(names: list[str]) -> str:
    """SHA-256 of the newline-joined names (the identity of a file list)."""
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def encode(text: str) -> Tensor:
    """Character codes under the fixed vocabulary."""
    return torch.tensor([_CODES.get(ch, OTHER) for ch in text], dtype=torch.long)


def decode(codes: Tensor) -> str:
    return "".join(VOCAB[c] if c < OTHER else "?" for c in codes.tolist())


def stdlib_files(root: str | Path | None = None) -> tuple[Path, list[str]]:
    """(root, sorted names of the top-level ``*.py`` files of the standard library)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    names = sorted(p.name for p in root.glob("*.py") if p.is_file())
    if not names:
        raise SystemExit(f"no *.py files in the standard library folder {root}")
    return root, names


def is_validation(name: str, val_fraction: float) -> bool:
    """A file's split, from its name alone (stable when files are added or removed)."""
    digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    return digest < val_fraction * 2**64


def load_corpus(root: str | Path | None = None, val_fraction: float = 0.1, max_chars: int | None = None) -> Corpus:
    """Read, split by file and encode the standard library's top-level sources (files joined by a blank line).

    ``max_chars`` keeps only the first characters of each split (for tests).
    """
    root, names = stdlib_files(root)
    val_files = [n for n in names if is_validation(n, val_fraction)]
    train_files = [n for n in names if not is_validation(n, val_fraction)]
    if not val_files or not train_files:
        raise SystemExit(f"cannot split {len(names)} files of {root} into train and validation")

    def read(files: list[str]) -> Tensor:
        text = "\n\n".join((root / n).read_text(encoding="utf-8", errors="replace") for n in files)
        return encode(text[:max_chars] if max_chars else text)

    return Corpus(read(train_files), read(val_files), train_files, val_files, str(root))


def random_windows(data: Tensor, batch: int, context: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``batch`` random windows (inputs, next-character targets), each (batch, context)."""
    starts = torch.randint(0, len(data) - context - 1, (batch,), generator=gen)
    rows = torch.stack([data[s : s + context + 1] for s in starts.tolist()])
    return rows[:, :-1], rows[:, 1:]


def fixed_windows(data: Tensor, count: int, context: int) -> tuple[Tensor, Tensor]:
    """``count`` evenly spaced windows: the same validation set for every model and seed."""
    starts = torch.linspace(0, len(data) - context - 2, count).long()
    rows = torch.stack([data[s : s + context + 1] for s in starts.tolist()])
    return rows[:, :-1], rows[:, 1:]


# ---- model ---------------------------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, dim: int, heads: int, hidden: int, mlp: str, groups: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, causal=True)
        self.ln2 = nn.LayerNorm(dim)
        if mlp == "mlp":
            self.mlp = Mlp(dim, hidden, dim, act="gelu")
        elif mlp == "grkan":
            self.mlp = GRKANMlp(dim, hidden, dim, groups=groups, act_init="gelu", init="variance")
        else:
            raise ValueError(f"mlp must be 'mlp' or 'grkan', got {mlp!r}")

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


@dataclass(frozen=True)
class GPTConfig:
    """Sizes of the character GPT."""

    context: int = 128
    dim: int = 96
    depth: int = 3
    heads: int = 4
    hidden: int = 384
    groups: int = 8
    vocab: int = VOCAB_SIZE


class CharGPT(nn.Module):
    """Character-level GPT: token + learned position embeddings, pre-norm blocks, final norm, tied output head.

    Init as GPT-2: weights N(0, 0.02), residual output projections N(0, 0.02 / sqrt(2 depth)), biases zero; a
    GR-KAN MLP keeps its own variance-preserving init.
    """

    def __init__(self, config: GPTConfig, mlp: str = "mlp") -> None:
        super().__init__()
        self.config = config
        self.tok = nn.Embedding(config.vocab, config.dim)
        self.pos = nn.Parameter(torch.zeros(1, config.context, config.dim))
        self.blocks = nn.Sequential(
            *(Block(config.dim, config.heads, config.hidden, mlp, config.groups) for _ in range(config.depth))
        )
        self.ln_f = nn.LayerNorm(config.dim)
        self._init_gpt2()

    def _init_gpt2(self) -> None:
        std_out = 0.02 / math.sqrt(2 * self.config.depth)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        for name, module in self.named_modules():
            if type(module) is nn.Linear:  # GR-KAN layers are not nn.Linear: they keep their own init
                out = name.endswith("attn.proj") or name.endswith("mlp.fc2")
                nn.init.normal_(module.weight, std=std_out if out else 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor) -> Tensor:
        """Logits (batch, time, vocab) for character codes ``idx`` (batch, time), time <= context."""
        x = self.tok(idx) + self.pos[:, : idx.shape[1]]
        return self.ln_f(self.blocks(x)) @ self.tok.weight.T
