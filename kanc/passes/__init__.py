"""kanc.passes: find MLP blocks and rewrite them (docs/pipeline.md).

    found = find_mlp_blocks(model)            # the pattern table over a hierarchical fx trace
    result = rewrite_to_grkan(model, found)   # or rewrite_to_snnk
    fidelity = verify_equivalence(original, result.model, inputs, result)

``PATTERNS`` is the table (one row per MLP shape); ``run_pipeline`` runs the passes in order with linting and
KANC_DEBUG output; ``counters`` sums every pass's hit and skip counts.
"""

from kanc.passes.find import FindResult, Skip, find_mlp_blocks
from kanc.passes.patterns import MLPBlock
from kanc.passes.pipeline import Conversion, counters, run_pipeline
from kanc.passes.rewrite import ConvertedBlock, PassResult, rewrite_to_grkan, rewrite_to_snnk
from kanc.passes.rewrites import GRKANOptions, SNNKOptions
from kanc.passes.table import PATTERNS, Pattern
from kanc.passes.verify import Fidelity, Snapshot, snapshot, verify_equivalence

__all__ = [
    "PATTERNS",
    "Conversion",
    "ConvertedBlock",
    "Fidelity",
    "FindResult",
    "GRKANOptions",
    "MLPBlock",
    "PassResult",
    "Pattern",
    "SNNKOptions",
    "Skip",
    "Snapshot",
    "counters",
    "find_mlp_blocks",
    "rewrite_to_grkan",
    "rewrite_to_snnk",
    "run_pipeline",
    "snapshot",
    "verify_equivalence",
]
