"""Kolmogorov-Arnold layers (pure PyTorch definitions; kernels are picked by kanc.codegen)."""

from kanc.nn.rational import GRKANLinear, GroupRational

__all__ = ["GRKANLinear", "GroupRational"]
