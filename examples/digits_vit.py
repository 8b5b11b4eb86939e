"""A small timm-style ViT for 8x8 images (scikit-learn digits): patch embedding, pre-norm blocks, class token.

Blocks use timm's attribute names (``blocks[i].mlp.fc1/act/fc2``) so ``kanc.compile`` finds their MLPs; ``mlp``
picks the block: "mlp" (Linear-GELU-Linear), "grkan" (GRKANMlp with KAT's variance-preserving init).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kanc.nn import GRKANMlp, Mlp


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm layout); ``causal`` masks future tokens."""

    def __init__(self, dim: int, heads: int, causal: bool = False) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5
        if self.causal:
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        return self.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, mlp: str) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        if mlp == "mlp":
            self.mlp = Mlp(dim, hidden, dim)
        elif mlp == "grkan":
            self.mlp = GRKANMlp(dim, hidden, dim, groups=8, act_init="gelu", init="variance")
        else:
            raise ValueError(f"mlp must be 'mlp' or 'grkan', got {mlp!r}")

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """ViT classifier for (B, 1, 8, 8) images; ``patch`` must divide 8."""

    def __init__(
        self,
        image: int = 8,
        patch: int = 2,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        classes: int = 10,
        mlp: str = "mlp",
    ) -> None:
        super().__init__()
        if image % patch:
            raise ValueError(f"patch {patch} must divide image size {image}")
        tokens = (image // patch) ** 2
        self.patch_embed = nn.Conv2d(1, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio, mlp) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])
