"""Kernels: Triton implementations of kanc's layers beside their pure-PyTorch references.

Only this package imports triton, and only lazily: ``import kanc`` works without a GPU or triton.

Entry points (each picks a kernel or the reference per call, see ``checker.kernel_route``; a call the reference runs
is counted for its layer, see ``fallbacks``):
``group_rational`` (op ``kanc::group_rational``), ``grkan_linear`` (``kanc::grkan_linear``, y = F(x) W^T + b with F
in the matmul prologue), ``snnk.snnk_block`` (``kanc::snnk_block``, the bundled SNNK block with its features on
chip), ``grkan_mlp.grkan_mlp_epilogue`` (``kanc::grkan_mlp_epilogue``, a GR-KAN MLP block with fc2's rational in
fc1's epilogue; ``grkan_mlp.choose_placement`` picks it or the prologue placement). Each op has a ``*_backward`` op;
Triton kernels live in ``kanc.codegen.kernels``, the CPU's C kernels (the group rational, which the GR-KAN
linear uses before torch's matmul) in ``kanc.codegen.cpu``.
"""

from kanc.codegen.checker import kernels_disabled, kernels_enabled, set_kernels_enabled
from kanc.codegen.grkan_linear import grkan_linear, grkan_linear_ref
from kanc.codegen.grkan_mlp import choose_placement, grkan_mlp_epilogue, grkan_mlp_ref
from kanc.codegen.launches import Launch, recording
from kanc.codegen.rational import group_rational, rational_ref
from kanc.codegen.snnk import snnk_block, snnk_block_ref
from kanc.codegen.tuning import autotuning, forced_config, pick_config, set_autotune

__all__ = [
    "Launch",
    "autotuning",
    "choose_placement",
    "forced_config",
    "grkan_linear",
    "grkan_linear_ref",
    "grkan_mlp_epilogue",
    "grkan_mlp_ref",
    "group_rational",
    "kernels_disabled",
    "kernels_enabled",
    "pick_config",
    "rational_ref",
    "recording",
    "set_autotune",
    "set_kernels_enabled",
    "snnk_block",
    "snnk_block_ref",
]
