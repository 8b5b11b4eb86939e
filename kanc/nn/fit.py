"""Rational fits (placeholder: identity only; the fitter and shipped table replace this)."""

from __future__ import annotations

import torch


def rational_coefficients(init, degrees=(5, 4)):
    m, n = degrees
    if init == "identity":
        num = torch.zeros(m + 1)
        num[1] = 1.0
        return num, torch.zeros(n)
    raise NotImplementedError(init)
