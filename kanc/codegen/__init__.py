"""Kernels: Triton implementations of kanc's layers beside their pure-PyTorch references.

Only this package imports triton, and only lazily: ``import kanc`` works without a GPU or triton.
"""

from kanc.codegen.rational import group_rational, rational_ref

__all__ = ["group_rational", "rational_ref"]
