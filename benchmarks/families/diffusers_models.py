"""diffusers: UNet2DConditionModel, DiTTransformer2DModel, SD3Transformer2DModel and FluxTransformer2DModel, tiny.

Expected blocks, from diffusers' classes: every FeedForward (GELU / GEGLU / gelu-tanh MLPs of the transformer
blocks), every TimestepEmbedding (linear_1, SiLU, linear_2) and PixArtAlphaTextProjection (the pooled-text MLP of
SD3 and Flux), and the MLP half of each Flux single-stream block (proj_mlp, act_mlp, then proj_out, which it
shares with the attention output). AdaLN modulation (SiLU then one linear) is not an MLP block.
"""

from __future__ import annotations

import torch

from families.base import Built, Expected, Registry, act_name, check_count, instances, members, require, seeded
from families.tvshim import import_torchvision

REGISTRY = Registry()


def _diffusers():
    import_torchvision()  # diffusers imports transformers, which imports an installed torchvision
    return require("diffusers")


def _gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ff_act(ff) -> str:
    return act_name(ff.net[0])  # GELU (approximate or not), GEGLU, ApproximateGELU, SwiGLU ...


def _mlps(model, diffusers) -> list[Expected]:
    emb = diffusers.models.embeddings
    found = instances(model, diffusers.models.attention.FeedForward, _ff_act)
    found += instances(model, emb.TimestepEmbedding, lambda m: act_name(m.act))
    found += instances(model, emb.PixArtAlphaTextProjection, lambda m: act_name(m.act_1))
    return found


@REGISTRY.add("diffusers_unet2d_condition", "diffusers")
def _unet() -> Built:
    diffusers = _diffusers()
    seeded()
    model = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
    )  # fmt: skip
    # one transformer block per cross-attention down layer (1), mid (1) and up layer (layers_per_block + 1 = 2),
    # and the time embedding MLP
    found = check_count(_mlps(model, diffusers), 1 + 1 + 2 + 1, "transformer blocks + time embedding")
    inputs = (
        torch.randn(2, 4, 8, 8, generator=_gen()),
        torch.tensor([10, 500]),
        torch.randn(2, 5, 16, generator=_gen(2)),
    )
    return Built(model, inputs, found)


@REGISTRY.add("diffusers_dit", "diffusers")
def _dit() -> Built:
    diffusers = _diffusers()
    seeded()
    layers = 2
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=layers, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10, norm_num_groups=8,
    )  # fmt: skip
    # each block: its FeedForward and the timestep MLP of its own AdaLN-zero embedding
    found = check_count(_mlps(model, diffusers), 2 * layers, "num_layers x (feed-forward + timestep MLP)")
    inputs = {
        "hidden_states": torch.randn(2, 4, 8, 8, generator=_gen()),
        "timestep": torch.tensor([10, 500]),
        "class_labels": torch.tensor([1, 3]),
    }
    return Built(model, inputs, found)


@REGISTRY.add("diffusers_sd3", "diffusers")
def _sd3() -> Built:
    diffusers = _diffusers()
    seeded()
    layers = 2
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=layers, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=8,
    )  # fmt: skip
    # image and context feed-forwards per joint block (the last block has no context one), timestep and text MLPs
    found = check_count(_mlps(model, diffusers), 2 * layers - 1 + 2, "joint blocks + time/text embeddings")
    inputs = {
        "hidden_states": torch.randn(2, 4, 8, 8, generator=_gen()),
        "encoder_hidden_states": torch.randn(2, 5, 16, generator=_gen(2)),
        "pooled_projections": torch.randn(2, 16, generator=_gen(3)),
        "timestep": torch.tensor([10, 500]),
    }
    return Built(model, inputs, found)


@REGISTRY.add("diffusers_flux", "diffusers")
def _flux() -> Built:
    diffusers = _diffusers()
    seeded()
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=False, axes_dims_rope=(2, 2, 4),
    )  # fmt: skip
    single = diffusers.models.transformers.transformer_flux.FluxSingleTransformerBlock
    found = _mlps(model, diffusers) + members(model, single, ("proj_mlp", "act_mlp"), lambda m: act_name(m.act_mlp))
    # double block: image + context feed-forwards; timestep and text MLPs; the single block's MLP half
    found = check_count(found, 2 + 2 + 1, "double blocks x 2 + time/text embeddings + single blocks")
    inputs = {
        "hidden_states": torch.randn(2, 16, 8, generator=_gen()),
        "encoder_hidden_states": torch.randn(2, 5, 16, generator=_gen(2)),
        "pooled_projections": torch.randn(2, 16, generator=_gen(3)),
        "timestep": torch.tensor([0.1, 0.5]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(5, 3),
    }
    return Built(model, inputs, found)
