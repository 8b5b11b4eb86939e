"""The rewrites of the pattern table: from a matched MLPBlock to edits plus the new block as a function.

GR-KAN (``grkan_linears``, ``grkan_gate``): fc1 becomes GRKANLinear with the identity rational (exact), fc2 a
GRKANLinear whose rational is fitted to the activation, and the activation node goes away. With a norm
between the activation and fc2 the rational cannot move past it, so it replaces the activation in place.
Gated blocks keep their three matmuls; the gate activation becomes a GroupRational fitted to it.

SNNK (``snnk_span``, ``snnk_split``): the block becomes the bundled SNNKMlp, Phi(x) then one Linear, fitted
in closed form to the original block on calibration rows ("preserve"), the paper's W2 Psi(W1) ("warm", plain
blocks only) or freshly initialised ("variance").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kanc.frontend.activations import ActSpec
from kanc.nn import GRKANLinear, GroupRational, SNNKMlp
from kanc.nn.fit import fit_rational, rational_coefficients
from kanc.nn.init import init_grkan_linear_, variance_gain
from kanc.passes.checks import Act, Linear, Miss, MLPBlock, Passthrough
from kanc.passes.layers import ChannelsLast
from kanc.passes.ratfit import fit_to_samples
from kanc.passes.surgery import DropNode, Edit, ReplaceNode, ReplaceSpan, SetModule

GRKAN_INITS = ("preserve", "variance")
SNNK_INITS = ("preserve", "warm", "variance")
GROUP_POLICIES = ("adjust", "skip")
FIT_ROWS = 2048


@dataclass
class GRKANOptions:
    """Options of ``rewrite_to_grkan`` (see kanc.compile)."""

    groups: int = 8
    degrees: tuple[int, int] = (5, 4)
    init: str = "preserve"
    group_policy: str = "adjust"
    fit: str = "data"  # "data": refine the rational on the block's pre-activations; "table": the shipped fit as is

    def __post_init__(self) -> None:
        self.degrees = (int(self.degrees[0]), int(self.degrees[1]))
        _choice("init", self.init, GRKAN_INITS)
        _choice("fit", self.fit, ("data", "table"))
        _choice("group_policy", self.group_policy, GROUP_POLICIES)
        if int(self.groups) < 1:
            raise ValueError(f"groups must be >= 1, got {self.groups}")
        if self.degrees[0] < 1 or self.degrees[1] < 0:
            raise ValueError(f"degrees must be (m >= 1, n >= 0), got {self.degrees}")


@dataclass
class SNNKOptions:
    """Options of ``rewrite_to_snnk`` (see kanc.compile)."""

    num_features: int | None = None
    feature_ratio: float = 0.25
    kind: str = "relu"
    orthogonal: bool = True
    seed: int = 0
    init: str = "preserve"
    ridge: float = 1e-3

    def __post_init__(self) -> None:
        _choice("kind", self.kind, ("relu", "exp", "cos"))
        _choice("init", self.init, SNNK_INITS)
        if self.num_features is not None and int(self.num_features) < 1:
            raise ValueError(f"num_features must be >= 1, got {self.num_features}")
        if not self.feature_ratio > 0:
            raise ValueError(f"feature_ratio must be > 0, got {self.feature_ratio}")

    def features_for(self, hidden: int) -> int:
        return int(self.num_features) if self.num_features else max(1, round(hidden * self.feature_ratio))


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


@dataclass
class Rewrite:
    """What a rewrite produced: the edits, the new block on rows, and notes for the report."""

    edits: list[Edit]
    replacement: Callable[[Tensor], Tensor]
    modules: list[nn.Module]
    notes: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    entry: nn.Module | None = None  # the converted model's module that receives the block's input
    exit: nn.Module | None = None  # ... and the one that returns the block's output (hooked to measure the block)


@dataclass
class RewriteContext:
    """Per-pass state shared by the rewrites: fitted rationals by activation, calibration rows by block key."""

    fits: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)  # block key -> rows to fit on
    evaluation: dict = field(default_factory=dict)  # block key -> held-out rows to measure on
    index: int = 0
    measure: bool = True  # measure each block on rows here (no model inputs to measure it on later)


# ---- building the new layers ---------------------------------------------------------------------------------


def pick_groups(width: int, groups: int, policy: str) -> int | None:
    """``groups`` if it divides ``width``; else the largest divisor below it ("adjust") or None ("skip")."""
    if width % groups == 0:
        return groups
    if policy == "skip":
        return None
    return max(g for g in range(1, min(groups, width) + 1) if width % g == 0)


def _coefficients(spec: ActSpec | str, degrees: tuple[int, int], ctx: RewriteContext) -> tuple[Tensor, Tensor]:
    if isinstance(spec, str):
        return rational_coefficients(spec, degrees)
    key = (spec.key, degrees)
    if key not in ctx.fits:
        if spec.shipped:
            ctx.fits[key] = rational_coefficients(spec.name, degrees)
        else:
            num, den = fit_rational(spec.fn, degrees).tensors()
            ctx.fits[key] = (num.float(), den.float())
    return ctx.fits[key]


@torch.no_grad()
def make_rational(
    width: int,
    groups: int,
    degrees: tuple[int, int],
    spec: ActSpec | str,
    ctx: RewriteContext,
    samples: Tensor | None = None,
) -> GroupRational:
    """GroupRational over ``width`` channels fitted to ``spec`` ("identity" or an activation).

    With pre-activation ``samples`` the fit is refined where they lie (kanc.passes.ratfit).
    """
    rational = GroupRational(width, groups, degrees, "identity")
    num, den = _coefficients(spec, degrees, ctx)
    if samples is not None and not isinstance(spec, str):
        with torch.enable_grad():
            num, den = fit_to_samples(spec.fn, (num, den), samples, seed=ctx.index)
    rational.numerator.copy_(num.reshape(1, -1).expand_as(rational.numerator))
    rational.denominator.copy_(den.reshape(1, -1).expand_as(rational.denominator))
    rational.init = spec if isinstance(spec, str) else spec.name
    return rational


@torch.no_grad()
def make_grkan_linear(
    lin: Linear,
    spec: ActSpec | str,
    groups: int,
    opts: GRKANOptions,
    ctx: RewriteContext,
    samples: Tensor | None = None,
) -> GRKANLinear:
    """GRKANLinear(F(x)) with the weights of ``lin`` ("preserve") or KAT's variance init ("variance")."""
    w = lin.weights
    layer = GRKANLinear(
        w.in_features, w.out_features, w.bias is not None, groups, "identity", opts.degrees,
        device=w.weight.device, dtype=w.weight.dtype,
    )  # fmt: skip
    layer.rational = make_rational(w.in_features, groups, opts.degrees, spec, ctx, samples).to(w.weight.device)
    if opts.init == "variance":
        init_grkan_linear_(layer)
    else:
        layer.weight.copy_(w.weight)
        if w.bias is not None:
            layer.bias.copy_(w.bias)
    return layer


def drop_act(act: Act) -> Edit:
    """Remove the activation: its node, or its whole region (an activation written as arithmetic)."""
    if act.region:
        return ReplaceSpan(list(act.region), act.entry, act.node, None, "activation")
    return DropNode(act.node)


def replace_act(act: Act, module: nn.Module) -> Edit:
    """Call ``module`` where the activation (node or region) was."""
    if act.region:
        return ReplaceSpan(list(act.region), act.entry, act.node, module, "rational")
    return ReplaceNode(act.node, module, "rational")


def _place(lin: Linear, module: nn.Module) -> Edit:
    """Put ``module`` where ``lin`` was (a swap for module calls, a node replacement for aten.linear)."""
    module = ChannelsLast(module) if lin.channels_first else module
    if lin.module is not None:
        return SetModule(lin.path, module)
    return ReplaceNode(lin.node, module, lin.path.replace(".", "_") or "linear")


def _layer_fn(lin: Linear, module: nn.Module | None = None) -> Callable[[Tensor], Tensor]:
    """Rows -> rows for the new (or, with module None, the original) linear layer, in its parameters' dtype."""
    if module is not None:
        return module
    w, b = lin.weights.weight.detach(), lin.weights.bias
    b = b.detach() if b is not None else None
    return lambda x: F.linear(x, w, b)


def _steps(between: list[Passthrough], channels_first: bool) -> Callable[[Tensor], Tensor]:
    norms = [p.module for p in between if p.kind == "norm"]

    def run(x: Tensor) -> Tensor:
        for norm in norms:
            x = norm(x[:, :, None, None])[:, :, 0, 0] if channels_first else norm(x)
        return x

    return run


def block_rows(block: MLPBlock, ctx: RewriteContext, seed: int = 777) -> Tensor:
    """Rows to fit on: the block's calibration rows, else synthetic N(0, 1) rows of its input width."""
    rows = ctx.calibration.get(block.key)
    if rows is None:
        gen = torch.Generator().manual_seed(seed + ctx.index)
        rows = torch.randn(FIT_ROWS, block.in_features, generator=gen, dtype=torch.float64)
    return rows


@torch.no_grad()
def _preacts(block: MLPBlock, opts: GRKANOptions, ctx: RewriteContext) -> Tensor | None:
    """The activation's inputs on the block's rows (what the rational must get right), for fit="data"."""
    if opts.fit != "data" or opts.init != "preserve":
        return None
    w = block.fc1.weights
    rows = block_rows(block, ctx).to(w.weight.device, torch.float64)
    pre = F.linear(rows, w.weight.double(), w.bias.double() if w.bias is not None else None)
    if block.chunk is not None:
        pre = pre.split(block.hidden, dim=-1)[block.gate_index]
    return pre


# ---- GR-KAN --------------------------------------------------------------------------------------------------


def _groups_or_miss(block: MLPBlock, widths: list[int], opts: GRKANOptions) -> list[int] | Miss:
    picked = [pick_groups(w, int(opts.groups), opts.group_policy) for w in widths]
    if any(g is None for g in picked):
        bad = next(w for w, g in zip(widths, picked) if g is None)
        return Miss("groups", f"width {bad} is not divisible by groups={opts.groups} (group_policy='skip')")
    return picked


def _group_notes(widths: list[int], picked: list[int], opts: GRKANOptions) -> list[str]:
    return [
        f"groups={g} for width {w} (not divisible by {opts.groups})" for w, g in zip(widths, picked) if g != opts.groups
    ]


def grkan_linears(block: MLPBlock, opts: GRKANOptions, ctx: RewriteContext) -> Rewrite | Miss:
    """Plain and split blocks: fc1 -> GRKANLinear(identity), fc2 -> GRKANLinear(fit to act), act removed."""
    widths = [block.in_features, block.hidden]
    picked = _groups_or_miss(block, widths, opts)
    if isinstance(picked, Miss):
        return picked
    g_in, g_hidden = picked
    fc1 = make_grkan_linear(block.fc1, "identity", g_in, opts, ctx)
    edits: list[Edit] = [_place(block.fc1, fc1)]
    steps = _steps(block.between, block.channels_first)
    if not block.norms:
        fc2 = make_grkan_linear(block.fc2, block.act.spec, g_hidden, opts, ctx, _preacts(block, opts, ctx))
        edits += [_place(block.fc2, fc2), drop_act(block.act)]
        notes = _group_notes(widths, picked, opts)
        return Rewrite(edits, lambda x: fc2(steps(fc1(x))), [fc1, fc2], notes, entry=fc1, exit=fc2)
    samples = _preacts(block, opts, ctx)
    rational = make_rational(block.hidden, g_hidden, opts.degrees, block.act.spec, ctx, samples).to(fc1.weight.device)
    edits.append(replace_act(block.act, rational))
    fc2, exit_module = _layer_fn(block.fc2), block.fc2.module
    if opts.init == "variance":
        fc2_new = _variance_linear(block.fc2, variance_gain(rational))
        edits.append(_place(block.fc2, fc2_new))
        fc2 = exit_module = fc2_new
    notes = _group_notes(widths, picked, opts) + ["a norm sits between the activation and fc2: rational kept in place"]
    replacement = lambda x: fc2(steps(rational(fc1(x))))
    return Rewrite(edits, replacement, [fc1, rational], notes, entry=fc1, exit=exit_module)


@torch.no_grad()
def _variance_linear(lin: Linear, gain: float) -> nn.Linear:
    w = lin.weights
    layer = nn.Linear(w.in_features, w.out_features, w.bias is not None, device=w.weight.device, dtype=w.weight.dtype)
    layer.weight.normal_(0.0, (gain / w.in_features) ** 0.5)
    if layer.bias is not None:
        layer.bias.zero_()
    return layer


def grkan_gate(block: MLPBlock, opts: GRKANOptions, ctx: RewriteContext) -> Rewrite | Miss:
    """Gated blocks: the gate activation becomes a GroupRational fitted to it; the matmuls stay."""
    picked = _groups_or_miss(block, [block.hidden], opts)
    if isinstance(picked, Miss):
        return picked
    device = block.fc1.weights.weight.device
    samples = _preacts(block, opts, ctx)
    rational = make_rational(block.hidden, picked[0], opts.degrees, block.act.spec, ctx, samples).to(device)
    gate, down = _layer_fn(block.fc1), _layer_fn(block.fc2)
    up = _layer_fn(block.up) if block.up is not None else None
    steps, half, index = _steps(block.between, block.channels_first), block.hidden, block.gate_index

    def replacement(x: Tensor) -> Tensor:
        if up is not None:
            h = rational(gate(x)) * up(x)
        else:
            a, b = gate(x).split(half, dim=-1)
            h = rational(a) * b if index == 0 else a * rational(b)
        return down(steps(h))

    notes = _group_notes([block.hidden], picked, opts)
    if opts.init == "variance":
        notes.append("variance init: gated blocks keep their linear weights; only the rational is new")
    edits = [replace_act(block.act, rational)]
    return Rewrite(edits, replacement, [rational], notes, entry=block.fc1.module, exit=block.fc2.module)


# ---- SNNK ----------------------------------------------------------------------------------------------------


def _snnk_module(block: MLPBlock, opts: SNNKOptions, ctx: RewriteContext) -> SNNKMlp | Miss:
    m = opts.features_for(block.hidden)
    seed = int(opts.seed) + ctx.index
    device, dtype = block.fc1.weights.weight.device, block.fc1.weights.weight.dtype
    if opts.init == "warm":
        if block.gated or block.norms:
            return Miss("warm_unsupported", "init='warm' (W2 Psi(W1)) exists only for plain blocks without a norm")
        w1, w2 = block.fc1.weights, block.fc2.weights
        snnk = SNNKMlp.from_mlp(
            w1.weight, w1.bias, w2.weight, w2.bias, block.act.spec.fn, m, opts.kind, opts.orthogonal, seed, "warm"
        )
    else:
        snnk = SNNKMlp(block.in_features, block.out_features, m, opts.kind, opts.orthogonal, seed)
        snnk.to(device)
        if opts.init == "variance":
            snnk.reset_variance_()
        else:
            rows = ctx.calibration.get(block.key)
            snnk.fit_to(block.reference(), rows.to(device) if rows is not None else None, opts.ridge)
    snnk.linear.to(device=device, dtype=dtype)
    return snnk.to(device)


def weights_read_elsewhere(block: MLPBlock) -> str | None:
    """Where code outside fc1/fc2 reads their parameters (a recorded execution says; PyTorch's fused paths and
    open_clip's ``get_weight_dtype`` do), or None."""
    gm = block.fc1.part.graph_module
    names = {f"{lin.path}.{n}" for lin in (block.fc1, block.fc2) if lin.module is not None for n in ("weight", "bias")}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in names and node.users:
            site = next((u.meta.get("call_site") for u in node.users if u.meta.get("call_site")), None)
            return f"{node.target} is read at {site or 'another place in the model'}"
    return None


def _snnk_rewrite(block: MLPBlock, snnk: SNNKMlp, edits: list[Edit], opts: SNNKOptions, ctx: RewriteContext) -> Rewrite:
    rows = ctx.calibration.get(block.key)
    info = {"num_features": snnk.features.num_features, "kind": snnk.features.kind, "seed": snnk.features.seed}
    info["init"] = opts.init
    if opts.init == "preserve":
        info["fitted_on"] = f"{rows.shape[0]} calibration rows" if rows is not None else "synthetic N(0,1) rows"
    return Rewrite(edits, snnk, [snnk], [], info, entry=snnk, exit=snnk)


def snnk_span(block: MLPBlock, opts: SNNKOptions, ctx: RewriteContext) -> Rewrite | Miss:
    """The whole block (x -> ... -> fc2) becomes one SNNKMlp call.

    A block read from the source of a module that does not trace cannot be replaced as a span of its graph:
    it is rewritten by swaps, as a split block is.
    """
    if block.fc1.part.source or block.fc1.part.recorded:
        return snnk_split(block, opts, ctx)
    snnk = _snnk_module(block, opts, ctx)
    if isinstance(snnk, Miss):
        return snnk
    module = ChannelsLast(snnk) if block.channels_first else snnk
    source = block.fc1.input
    span = ReplaceSpan(block.nodes(), source, block.fc2.node, module, "snnk")
    return _snnk_rewrite(block, snnk, [span], opts, ctx)


def snnk_split(block: MLPBlock, opts: SNNKOptions, ctx: RewriteContext) -> Rewrite | Miss:
    """Split blocks: the first module's fc1 becomes the SNNKMlp, its activation and the second's fc2 identities."""
    if block.norms:
        return Miss("split_norm", "a norm between the two halves of a split block would act on the SNNK output")
    read = weights_read_elsewhere(block)
    if read is not None:
        return Miss("weights_read", f"{read}: SNNK replaces that layer, whose weights this code reads")
    snnk = _snnk_module(block, opts, ctx)
    if isinstance(snnk, Miss):
        return snnk
    first = ChannelsLast(snnk) if block.channels_first else snnk
    edits: list[Edit] = [SetModule(block.fc1.path, first), drop_act(block.act)]
    edits.append(SetModule(block.fc2.path, nn.Identity()))
    return _snnk_rewrite(block, snnk, edits, opts, ctx)
