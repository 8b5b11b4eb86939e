"""Two GR-KAN linear layers run as one block, fc2(dropout(fc1(x))), at a chosen fusion placement of fc2's rational.

See ``kanc.codegen.grkan_mlp`` for the placements ("prologue": F2 in fc2's matmul prologue; "epilogue": F2 once, in
fc1's epilogue, fc2 a plain matmul) and for what each holds for the backward.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from kanc.codegen.grkan_mlp import check_placement, choose_placement, grkan_mlp_epilogue
from kanc.errors import KancError
from kanc.nn.rational import GRKANLinear


def check_pair(fc1: nn.Module, fc2: nn.Module, placement: str, dropout: nn.Module | None = None) -> None:
    """KancError unless fc1 and fc2 are GRKANLinear layers that chain, ``placement`` is known, and an explicit
    "epilogue" has no dropout between the layers (F2(dropout(h)) is not dropout(F2(h)))."""
    check_placement(placement)
    if not (isinstance(fc1, GRKANLinear) and isinstance(fc2, GRKANLinear)):
        raise KancError(f"a GR-KAN pair needs two GRKANLinear layers, got {type(fc1).__name__}, {type(fc2).__name__}")
    if fc1.out_features != fc2.in_features:
        raise KancError(f"fc1 writes {fc1.out_features} features but fc2 reads {fc2.in_features}")
    if placement == "epilogue" and _drop_probability(dropout) > 0:
        raise KancError(
            "placement='epilogue' needs no dropout between fc1 and fc2 (F2 would run before it); "
            "use 'auto' (prologue while the dropout is active) or 'prologue'"
        )


def run_pair(fc1: GRKANLinear, fc2: GRKANLinear, x: Tensor, placement: str, dropout: nn.Module | None = None):
    """fc2(dropout(fc1(x))) at ``placement`` ("prologue", "epilogue" or "auto"; see :func:`resolve_placement`).

    The prologue placement calls the two modules (their hooks fire, fx traces them); the epilogue placement runs
    both layers as one op (``kanc::grkan_mlp_epilogue``) from their parameters.
    """
    if resolve_placement(fc1, fc2, x, placement, dropout) == "epilogue":
        return grkan_mlp_epilogue(*_tensors(fc1, fc2, x))
    h = fc1(x)
    return fc2(dropout(h) if dropout is not None else h)


def resolve_placement(
    fc1: GRKANLinear, fc2: GRKANLinear, x: Tensor, placement: str, dropout: nn.Module | None = None
) -> str:
    """What ``placement`` means for a call on ``x`` now: "prologue" in an fx trace (device neutral) and, for "auto",
    while the dropout is active; otherwise ``kanc.codegen.grkan_mlp.choose_placement`` (the epilogue only where its
    kernels run; "auto" from the tuning cache, measured on a GPU on a miss)."""
    if placement == "prologue" or is_fx_symbolic_tracing():
        return "prologue"
    if dropout is not None and dropout.training and _drop_probability(dropout) > 0:
        if placement == "epilogue":
            raise KancError("placement='epilogue' cannot run with an active dropout between fc1 and fc2")
        return "prologue"
    return choose_placement(*_tensors(fc1, fc2, x), placement=placement)


def _tensors(fc1: GRKANLinear, fc2: GRKANLinear, x: Tensor) -> tuple[Tensor | None, ...]:
    """(x, fc1's coefficients, weight, bias, fc2's coefficients, weight, bias): the epilogue op's operands."""
    return (x, *fc1.rational.coefficients(), fc1.weight, fc1.bias, *fc2.rational.coefficients(), fc2.weight, fc2.bias)


def _drop_probability(dropout: nn.Module | None) -> float:
    return float(getattr(dropout, "p", 0.0)) if dropout is not None else 0.0


class GRKANPair(nn.Module):
    """fc2(dropout(fc1(x))) for two GRKANLinear layers owned elsewhere, at a chosen placement (``run_pair``).

    The contract with a fusion pass (a later pass may put this in place of a chain): fc1 and fc2 are GRKANLinear,
    fc2 reads fc1's output and nothing else lies between them but ``dropout`` (identity or nn.Dropout; "epilogue"
    refuses an active one at construction, "auto" runs the prologue while one is active). The pair holds references,
    not registered submodules: the layers stay where they are, so the model's parameters(), state_dict keys, device
    moves and optimizers are unchanged, and the pair itself has no parameters or buffers. Register it beside the
    layers (e.g. ``parent.fc1_fc2``), replace the chain's calls by one call of the pair, and keep the layers
    registered. Launch records (``kanc.codegen.recording``) say which placement ran: the epilogue kernel records
    ``extra["placement"] == "epilogue"``, the prologue kernels ``"prologue"``.
    """

    def __init__(
        self, fc1: GRKANLinear, fc2: GRKANLinear, placement: str = "auto", dropout: nn.Module | None = None
    ) -> None:
        super().__init__()
        check_pair(fc1, fc2, placement, dropout)
        self.placement = placement
        self._layers = (fc1, fc2, dropout)  # a plain tuple: not registered, the owner keeps them

    @property
    def fc1(self) -> GRKANLinear:
        return self._layers[0]

    @property
    def fc2(self) -> GRKANLinear:
        return self._layers[1]

    @property
    def dropout(self) -> nn.Module | None:
        return self._layers[2]

    def resolved_placement(self, x: Tensor) -> str:
        """The placement a call on ``x`` runs at now (what "auto" resolves to, measuring on a GPU on a miss)."""
        fc1, fc2, dropout = self._layers
        return resolve_placement(fc1, fc2, x, self.placement, dropout)

    def forward(self, x: Tensor) -> Tensor:
        fc1, fc2, dropout = self._layers
        return run_pair(fc1, fc2, x, self.placement, dropout)

    def extra_repr(self) -> str:
        widths = (self.fc1.in_features, self.fc1.out_features, self.fc2.out_features)
        return f"{' -> '.join(map(str, widths))}, placement={self.placement!r}"
