"""Kernels: Triton implementations of kanc's layers beside their pure-PyTorch references.

Only this package imports triton, and only lazily: ``import kanc`` works without a GPU or triton.
"""

from kanc.codegen.checker import kernels_disabled, kernels_enabled, set_kernels_enabled
from kanc.codegen.rational import group_rational, rational_ref

__all__ = ["group_rational", "kernels_disabled", "kernels_enabled", "rational_ref", "set_kernels_enabled"]
