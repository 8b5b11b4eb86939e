"""Kolmogorov-Arnold layers (pure PyTorch definitions; kernels are picked by kanc.codegen)."""

from kanc.nn.fit import fit_rational, rational_coefficients
from kanc.nn.init import init_grkan_linear_, variance_gain
from kanc.nn.mlp import GRKANMlp, Mlp
from kanc.nn.pair import GRKANPair
from kanc.nn.rational import GRKANLinear, GroupRational
from kanc.nn.snnk import SNNKFeatures, SNNKLinear, SNNKMlp

__all__ = [
    "GRKANLinear",
    "GRKANMlp",
    "GRKANPair",
    "GroupRational",
    "Mlp",
    "SNNKFeatures",
    "SNNKLinear",
    "SNNKMlp",
    "fit_rational",
    "init_grkan_linear_",
    "rational_coefficients",
    "variance_gain",
]
