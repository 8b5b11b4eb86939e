"""kanc.passes: find MLP blocks and rewrite them (docs/pipeline.md).

    found = find_mlp_blocks(model, inputs=x)  # the pattern table over symbolic traces and a recorded run
    result = rewrite_to_grkan(model, found)   # or rewrite_to_snnk
    fidelity = verify_equivalence(original, result.model, inputs, result)

The files, by role, in pipeline order:
- ``find.py``: the discovery pass (symbolic traces and, with inputs, a recorded run: kanc.frontend.recording);
- ``checks.py``: what an MLP block is (``MLPBlock``) and the checks that recognise one around an activation;
- ``table.py``: the pattern table ``PATTERNS``, one row per block shape pairing its check with its builders;
- ``builders.py``: per row and target, the new layers and the edits that put them in (options, fits);
- ``convert.py``: the rewrite passes ``rewrite_to_grkan`` / ``rewrite_to_snnk`` (plan, then apply the edits);
- ``surgery.py`` (module swaps, fx graph edits) and ``callsite.py`` (attribute swaps, call-site rewrites): the edits;
- ``hazards.py``: library code that would bypass or undo a conversion, handled by name;
- ``verify.py``: fidelity of the converted model itself, both grad modes, and the failed checks;
- ``pipeline.py`` runs them in order; ``report.py`` is what ``kanc.report`` shows; ``calibrate.py``, ``ratfit.py``,
  ``layers.py`` and ``exported.py`` are their helpers.
"""

from kanc.passes.builders import GRKANOptions, SNNKOptions
from kanc.passes.checks import MLPBlock
from kanc.passes.convert import ConvertedBlock, PassResult, rewrite_to_grkan, rewrite_to_snnk
from kanc.passes.find import FindResult, Skip, find_mlp_blocks
from kanc.passes.pipeline import Conversion, counters, run_pipeline
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
