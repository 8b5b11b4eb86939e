"""torchvision's models with MLP blocks: VisionTransformer, Swin v1 and v2, ConvNeXt, MaxVit (issue 11), and the
generic ``torchvision.ops.MLP`` (not named there). Imported through the shim (families.tvshim)."""

from __future__ import annotations

import torch
from torch import nn

from families.base import Built, Registry, check_count, instances, members, seeded
from families.tvshim import import_torchvision

REGISTRY = Registry()
CLASSES = 10


def _image(size: int = 32) -> tuple[torch.Tensor]:
    return (torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)),)


@REGISTRY.add("tv_vit", "torchvision")
def _vit() -> Built:
    vt = import_torchvision().models.vision_transformer
    seeded()
    model = vt.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=CLASSES
    )
    return Built(model, _image(), check_count(instances(model, vt.MLPBlock, "gelu"), 2, "num_layers"))


def _swin(v2: bool) -> Built:
    st = import_torchvision().models.swin_transformer
    seeded()
    extra = {"block": st.SwinTransformerBlockV2, "downsample_layer": st.PatchMergingV2} if v2 else {}
    depths = [1, 1]
    model = st.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=depths, num_heads=[1, 2], window_size=[4, 4],
        stochastic_depth_prob=0.0, num_classes=CLASSES, **extra,
    )  # fmt: skip
    found = instances(model, import_torchvision().ops.misc.MLP, "gelu")
    if v2:  # the continuous position bias of each window attention is an MLP too: Linear(2, 512), ReLU, Linear
        found += members(model, st.ShiftedWindowAttentionV2, ("cpb_mlp",), "relu")
    return Built(model, _image(), check_count(found, (2 if v2 else 1) * sum(depths), "blocks per layer x depths"))


REGISTRY.add("tv_swin", "torchvision")(lambda: _swin(False))
REGISTRY.add("tv_swin_v2", "torchvision")(lambda: _swin(True))


@REGISTRY.add("tv_convnext", "torchvision")
def _convnext() -> Built:
    cn = import_torchvision().models.convnext
    seeded()
    settings = [cn.CNBlockConfig(16, 32, 1), cn.CNBlockConfig(32, None, 1)]
    model = cn.ConvNeXt(settings, stochastic_depth_prob=0.0, num_classes=CLASSES)
    # CNBlock.block = dwconv, Permute, LayerNorm, Linear, GELU, Linear, Permute: its pointwise MLP
    found = members(model, cn.CNBlock, ("block",), "gelu")
    return Built(model, _image(), check_count(found, sum(s.num_layers for s in settings), "CNBlockConfig layers"))


@REGISTRY.add("tv_maxvit", "torchvision")
def _maxvit() -> Built:
    mv = import_torchvision().models.maxvit
    seeded()
    layers = [1, 1]
    model = mv.MaxVit(
        input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16, 32], block_layers=layers,
        head_dim=8, stochastic_depth_prob=0.0, num_classes=CLASSES,
    )  # fmt: skip
    # window and grid attention layers each end in mlp_layer (LayerNorm, Linear, GELU, Linear, Dropout); the
    # MBConv's squeeze-excitation gate is not an MLP block
    found = members(model, mv.PartitionAttentionLayer, ("mlp_layer",), "gelu")
    return Built(model, _image(), check_count(found, 2 * sum(layers), "2 x block_layers"))


@REGISTRY.add("tv_ops_mlp", "torchvision", named=False)
def _ops_mlp() -> Built:
    ops = import_torchvision().ops
    seeded()
    model = nn.Sequential(nn.LayerNorm(24), ops.MLP(24, [64, 24], activation_layer=nn.ReLU, dropout=0.1))
    x = torch.randn(2, 6, 24, generator=torch.Generator().manual_seed(1))
    return Built(model, (x,), check_count(instances(model, ops.MLP, "relu"), 1, "ops.MLP with one hidden layer"))
