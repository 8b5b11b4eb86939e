"""timm: the families issue 11 names (vit, deit, swin, convnext with and without conv_mlp, mixer, resmlp,
poolformer v1/v2, efficientformer, levit, eva02 GluMlp, Eva SwiGLU + scale_mlp, coatnet) and a few it does not
(beit, cait, pvt_v2, mobilevit). Built from the model classes with tiny arguments; the expected blocks are the
instances of timm's MLP classes, checked against depth x blocks per layer."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from families.base import Built, Registry, act_name, check_count, instances, require, seeded
from families.tvshim import import_torchvision

REGISTRY = Registry()
CLASSES = 10


def _timm():
    import_torchvision()  # timm imports torchvision
    return require("timm")


def _image(size: int = 32) -> tuple[torch.Tensor]:
    return (torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)),)


def _mlps(model: nn.Module, count: int, what: str, classes: tuple | None = None) -> list:
    layers = require("timm.layers")
    classes = classes or (layers.Mlp, layers.GluMlp, layers.SwiGLU, layers.ConvMlp, layers.GlobalResponseNormMlp)
    found = instances(model, classes, lambda m: act_name(getattr(m, "act", None)))
    return check_count(found, count, what)


@REGISTRY.add("timm_vit", "timm")
def _vit() -> Built:
    vit = _timm().models.vision_transformer
    seeded()
    model = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=CLASSES)
    return Built(model, _image(), _mlps(model, 2, "depth"))


@REGISTRY.add("timm_deit", "timm")
def _deit() -> Built:
    deit = _timm().models.deit
    seeded()
    model = deit.VisionTransformerDistilled(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=CLASSES
    )
    return Built(model, _image(), _mlps(model, 2, "depth"))


@REGISTRY.add("timm_swin", "timm")
def _swin() -> Built:
    swin = _timm().models.swin_transformer
    seeded()
    depths = (1, 1)
    model = swin.SwinTransformer(
        img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=depths, num_heads=(1, 2), num_classes=CLASSES
    )
    return Built(model, _image(), _mlps(model, sum(depths), "sum(depths)"))


def _convnext(conv_mlp: bool) -> Built:
    convnext = _timm().models.convnext
    seeded()
    depths = (1, 1, 1, 1)
    model = convnext.ConvNeXt(depths=depths, dims=(8, 16, 16, 32), conv_mlp=conv_mlp, num_classes=CLASSES)
    return Built(model, _image(), _mlps(model, sum(depths), "sum(depths)"))


REGISTRY.add("timm_convnext", "timm")(lambda: _convnext(False))
REGISTRY.add("timm_convnext_conv_mlp", "timm")(lambda: _convnext(True))


@REGISTRY.add("timm_mixer", "timm")
def _mixer() -> Built:
    mixer = _timm().models.mlp_mixer
    seeded()
    model = mixer.MlpMixer(img_size=32, patch_size=8, num_blocks=2, embed_dim=32, num_classes=CLASSES)
    return Built(model, _image(), _mlps(model, 2 * 2, "num_blocks x (token + channel MLP)"))


@REGISTRY.add("timm_resmlp", "timm")
def _resmlp() -> Built:
    mixer = _timm().models.mlp_mixer
    seeded()
    model = mixer.MlpMixer(
        img_size=32, patch_size=8, num_blocks=2, embed_dim=32, mlp_ratio=4, block_layer=mixer.ResBlock,
        norm_layer=mixer.Affine, num_classes=CLASSES,
    )  # fmt: skip
    return Built(model, _image(), _mlps(model, 2, "num_blocks (channel MLP; the token mixer is one linear)"))


def _poolformer(v2: bool) -> Built:
    timm = _timm()
    mf = timm.models.metaformer
    seeded()
    depths = (1, 1, 1, 1)
    if v2:  # poolformerv2_s12's arguments, tiny: StarReLU MLPs
        kw = {"norm_layers": mf.GroupNorm1NoBias}
    else:  # poolformer_s12's arguments, tiny: GELU MLPs
        kw = {
            "downsample_norm": None, "mlp_act": nn.GELU, "mlp_bias": True, "norm_layers": mf.GroupNorm1,
            "layer_scale_init_values": 1e-5, "res_scale_init_values": None,
        }  # fmt: skip
    model = mf.MetaFormer(depths=depths, dims=(16, 16, 32, 32), use_mlp_head=False, num_classes=CLASSES, **kw)
    return Built(model, _image(), _mlps(model, sum(depths), "sum(depths)"))


REGISTRY.add("timm_poolformer", "timm")(lambda: _poolformer(False))
REGISTRY.add("timm_poolformer_v2", "timm")(lambda: _poolformer(True))


@REGISTRY.add("timm_efficientformer", "timm")
def _efficientformer() -> Built:
    timm = _timm()
    ef = timm.models.efficientformer
    seeded()
    depths = (1, 1, 1, 2)
    model = ef.EfficientFormer(depths=depths, embed_dims=(16, 16, 32, 32), num_vit=1, num_classes=CLASSES)
    classes = (ef.ConvMlpWithNorm, timm.layers.Mlp)  # Meta4D blocks (conv, norm, act, conv, norm), Meta3D (Mlp)
    # its attention bias is fixed at 7 x 7 tokens in the last stage: 224 x 224 inputs
    return Built(model, _image(224), _mlps(model, sum(depths), "sum(depths)", classes))


@REGISTRY.add("timm_levit", "timm")
def _levit() -> Built:
    levit = _timm().models.levit
    seeded()
    depth = (1, 1, 1)
    model = levit.Levit(
        img_size=64, embed_dim=(32, 48, 64), key_dim=8, num_heads=(2, 2, 2), depth=depth, num_classes=CLASSES
    )
    # one LevitMlp per block and one in each downsample between stages (linear + BatchNorm, hardswish)
    found = check_count(instances(model, levit.LevitMlp, "hardswish"), sum(depth) + len(depth) - 1, "depth + downs")
    return Built(model, _image(64), found)


def _eva(scale_mlp: bool) -> Built:
    eva = _timm().models.eva
    seeded()
    model = eva.Eva(
        img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4 * 2 / 3, swiglu_mlp=True,
        scale_mlp=scale_mlp, use_rot_pos_emb=True, ref_feat_shape=(2, 2), num_classes=CLASSES,
    )  # fmt: skip
    return Built(model, _image(28), _mlps(model, 2, "depth"))


REGISTRY.add("timm_eva02_glumlp", "timm")(lambda: _eva(False))
REGISTRY.add("timm_eva_swiglu_scale_mlp", "timm")(lambda: _eva(True))


@REGISTRY.add("timm_coatnet", "timm")
def _coatnet() -> Built:
    mx = _timm().models.maxxvit
    seeded()
    base = mx.model_cfgs["coatnet_nano_rw"]
    cfg = dataclasses.replace(
        base, embed_dim=(16, 16, 32, 32), depths=(1, 1, 1, 1), stem_width=(8, 16),
        transformer_cfg=dataclasses.replace(base.transformer_cfg, dim_head=8),
    )  # fmt: skip
    model = mx.MaxxVit(cfg, img_size=64, num_classes=CLASSES)
    transformer_stages = sum(d for d, kind in zip(cfg.depths, cfg.block_type) if kind == "T")
    found = _mlps(model, transformer_stages, "depths of the 'T' stages", (require("timm.layers").ConvMlp,))
    return Built(model, _image(64), found)


# ---- not named in issue 11 -------------------------------------------------------------------------------------


@REGISTRY.add("timm_beit", "timm", named=False)
def _beit() -> Built:
    beit = _timm().models.beit
    seeded()
    model = beit.Beit(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=CLASSES)
    return Built(model, _image(), _mlps(model, 2, "depth"))


@REGISTRY.add("timm_cait", "timm", named=False)
def _cait() -> Built:
    cait = _timm().models.cait
    seeded()
    model = cait.Cait(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, depth_token_only=1, num_classes=CLASSES
    )
    return Built(model, _image(), _mlps(model, 2 + 1, "depth + depth_token_only"))


@REGISTRY.add("timm_pvt_v2", "timm", named=False)
def _pvt_v2() -> Built:
    pvt = _timm().models.pvt_v2
    seeded()
    depths = (1, 1, 1, 1)
    model = pvt.PyramidVisionTransformerV2(
        depths=depths, embed_dims=(16, 16, 32, 32), num_heads=(1, 1, 2, 2), mlp_ratios=(2, 2, 2, 2),
        num_classes=CLASSES,
    )  # fmt: skip
    # fc1 -> depthwise conv -> act -> fc2: an MLP whose activation a GR-KAN rational can replace
    found = _mlps(model, sum(depths), "sum(depths)", (pvt.MlpWithDepthwiseConv,))
    return Built(model, _image(64), found)


@REGISTRY.add("timm_mobilevit", "timm", named=False)
def _mobilevit() -> Built:
    timm = _timm()
    seeded()
    model = timm.create_model("mobilevit_xxs", pretrained=False, num_classes=CLASSES)
    stages = timm.models.mobilevit.model_cfgs["mobilevit_xxs"].blocks
    cfgs = [b for stage in stages for b in (stage if isinstance(stage, tuple) else (stage,))]
    depth = sum(b.d * b.block_kwargs["transformer_depth"] for b in cfgs if b.type == "mobilevit")
    return Built(model, _image(64), _mlps(model, depth, "transformer_depth of the mobilevit stages"))
