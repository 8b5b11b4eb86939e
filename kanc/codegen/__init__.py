"""Kernels: Triton implementations of kanc's layers beside their pure-PyTorch references.

Only this package imports triton, and only lazily: ``import kanc`` works without a GPU or triton.
"""

from kanc.codegen.checker import kernels_disabled, kernels_enabled, set_kernels_enabled
from kanc.codegen.launches import Launch, recording
from kanc.codegen.rational import group_rational, rational_ref
from kanc.codegen.tuning import autotuning, pick_config, set_autotune

__all__ = [
    "Launch",
    "autotuning",
    "group_rational",
    "kernels_disabled",
    "kernels_enabled",
    "pick_config",
    "rational_ref",
    "recording",
    "set_autotune",
    "set_kernels_enabled",
]
