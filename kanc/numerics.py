"""How far one tensor is from another: the measure the passes report as a block's or a model's fidelity.

``kanc.testing`` re-exports :func:`rel_error` for tests; production code imports it from here.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rel_error(actual: Tensor, expected: Tensor) -> float:
    """||a - e|| / ||e|| in float64.

    NaN and inf are never dropped: a non-finite entry of ``actual`` where ``expected`` holds something else (a finite
    value, or another non-finite one) makes the error inf. Entries where both hold the same non-finite value agree.
    A zero ``expected`` gives 0 only when ``actual`` is zero too (inf otherwise), never a misleading small number.
    """
    a, e = actual.detach().double(), expected.detach().double()
    if a.shape != e.shape:
        return float("inf")
    finite = torch.isfinite(e) & torch.isfinite(a)
    same_nonfinite = (a == e) | (torch.isnan(a) & torch.isnan(e))
    if not bool((finite | same_nonfinite).all()):
        return float("inf")
    diff, denom = float((a - e)[finite].norm()), float(e[finite].norm())
    if denom > 0:
        return diff / denom
    return 0.0 if diff == 0 else float("inf")
