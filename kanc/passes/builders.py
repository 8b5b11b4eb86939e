"""The rewrites of the pattern table: from a matched MLPBlock to edits plus the new block as a function.

GR-KAN (``grkan_substitute``, every row): the activation becomes a GroupRational fitted to it, where it was; the
rationals that may join a linear layer (the fitted one with fc2, an identity one in front of fc1) are listed as
sites for ``kanc.passes.fuse.fuse_rationals``, which makes them GRKANLinear layers where the layer allows it.

SNNK (``snnk_span``, ``snnk_split``): the block becomes the bundled SNNKMlp, Phi(x) then one Linear, fitted
in closed form to the original block on calibration rows ("preserve"), the paper's W2 Psi(W1) ("warm", plain
blocks only) or freshly initialised ("variance").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from kanc.frontend.activations import ActSpec
from kanc.nn import GroupRational, SNNKMlp
from kanc.nn.fit import fit_rational, rational_coefficients
from kanc.nn.init import variance_gain
from kanc.passes.checks import Act, Linear, Miss, MLPBlock
from kanc.passes.fuse import FusionSite
from kanc.passes.layers import DTYPE_READS, ChannelsLast, KeepsDtype
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
    sites: list[FusionSite] = field(default_factory=list)  # rationals fuse_rationals may join with a linear layer


@dataclass
class RewriteContext:
    """Per-pass state shared by the rewrites: fitted rationals by activation, calibration rows by block key."""

    fits: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)  # block key -> rows to fit on
    evaluation: dict = field(default_factory=dict)  # block key -> held-out rows to measure on
    index: int = 0
    measure: bool = True  # measure each block on rows here (no model inputs to measure it on later)
    reads: Callable[..., str | None] = lambda lin, kept=(): None  # where other code reads a layer's weights


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
            num, den = fit_to_samples(spec.fn, (num, den), samples)
    rational.numerator.copy_(num.reshape(1, -1).expand_as(rational.numerator))
    rational.denominator.copy_(den.reshape(1, -1).expand_as(rational.denominator))
    rational.init = spec if isinstance(spec, str) else spec.name
    return rational


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
    weight = block.fc1.weights.weight
    dtype = torch.promote_types(weight.dtype, torch.float32)  # the model's precision: no fp64 copy of fc1
    pre_activation = block.pre_activation(dtype)
    if opts.fit != "data" or opts.init != "preserve" or pre_activation is None:
        return None
    return pre_activation(block_rows(block, ctx).to(weight.device, dtype))


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


def grkan_substitute(block: MLPBlock, opts: GRKANOptions, ctx: RewriteContext) -> Rewrite | Miss:
    """Every row: the activation becomes a GroupRational fitted to it, where it was (a module swap, an attribute swap,
    a call-site or graph edit); nothing else of the block changes here.

    The rationals that may join a linear layer are listed as sites for ``kanc.passes.fuse.fuse_rationals``: the
    fitted one with fc2 when only dropout or identities lie between them, and, for ungated blocks, an identity
    rational in front of fc1 (KAT's layout; exact). Gated blocks keep their three matmuls.
    """
    widths = [block.hidden] if block.gated else [block.hidden, block.in_features]
    picked = _groups_or_miss(block, widths, opts)
    if isinstance(picked, Miss):
        return picked
    device = block.fc1.weights.weight.device
    samples = _preacts(block, opts, ctx)
    rational = make_rational(block.hidden, picked[0], opts.degrees, block.act.spec, ctx, samples).to(device)
    rational.requires_grad_(trainable(block))
    placed = ChannelsLast(rational) if block.channels_first else rational
    edits: list[Edit] = [replace_act(block.act, placed)]
    notes = _group_notes(widths, picked, opts)
    variance = opts.init == "variance"
    sites = [] if block.gated else [FusionSite("identity", block.fc1, None, picked[1], opts.degrees, variance)]
    if block.norms or block.scales:
        notes.append("a norm or scale sits between the activation and fc2: the rational stays where the activation was")
        if opts.init == "variance" and not block.gated and block.fc2.module is not None and not block.scales:
            edits.append(_place(block.fc2, _variance_linear(block.fc2, variance_gain(rational))))
    elif not block.gated and block.fc2 is not None and not block.concat:
        sites.append(FusionSite("fitted", block.fc2, placed, picked[0], opts.degrees, variance))
    if opts.init == "variance" and block.gated:
        notes.append("variance init: gated blocks keep their linear weights; only the rational is new")
    if samples is None and block.chain and opts.fit == "data":
        notes.append("rational fitted over the shipped range: the ops between fc1 and the activation are not per row")
    replacement = _substituted(block, rational)
    entry = block.fc1.module if block.rowwise else rational
    if block.concat is not None:  # fc2 also reads other features: the block has no function of its own to measure
        entry = None
        notes.append("fc2 reads the activation concatenated with other features: the block is not measured alone")
    return Rewrite(edits, replacement, [rational], notes, entry=entry, exit=block.fc2.module, sites=sites)


def _substituted(block: MLPBlock, rational: nn.Module) -> Callable[[Tensor], Tensor] | None:
    """The converted block on rows (from its input, or from the activation's input when it is not per row)."""
    if block.concat:
        return None
    return block.reference(block.fc1.weights.weight.dtype, act=rational)


def trainable(block: MLPBlock) -> bool:
    """Whether the parameters a conversion adds to ``block`` train: as the block's own linear layers do (any of their
    weights and biases requiring grad). A frozen model stays frozen, and so does a block whose base weights are frozen
    under adapters (LoRA): its new rational or SNNK readout is not trained behind the user's back (nor lost when
    only the adapters are saved). Set ``requires_grad`` on them to train them anyway."""
    return any(lin.trains for lin in (block.fc1, block.fc2, block.up) if lin is not None)


@torch.no_grad()
def _variance_linear(lin: Linear, gain: float) -> nn.Linear:
    w = lin.weights
    layer = nn.Linear(w.in_features, w.out_features, w.bias is not None, device=w.weight.device, dtype=w.weight.dtype)
    layer.requires_grad_(lin.trains)  # a new fc2 trains as the one it replaces did
    layer.weight.normal_(0.0, (gain / w.in_features) ** 0.5)
    if layer.bias is not None:
        layer.bias.zero_()
    return layer


# ---- SNNK ----------------------------------------------------------------------------------------------------


def _snnk_module(block: MLPBlock, opts: SNNKOptions, ctx: RewriteContext) -> SNNKMlp | Miss:
    m = opts.features_for(block.hidden)
    features = {"kind": opts.kind, "orthogonal": opts.orthogonal, "seed": int(opts.seed) + ctx.index}
    device, dtype = block.fc1.weights.weight.device, block.fc1.weights.weight.dtype
    if opts.init == "warm":
        if block.gated or block.norms or block.scales or block.chain or any(p.kind == "norm" for p in block.pre):
            return Miss("warm_unsupported", "init='warm' (W2 Psi(W1)) exists only for plain blocks without a norm")
        w1, w2 = block.fc1.weights, block.fc2.weights
        fn = block.act.spec.fn
        snnk = SNNKMlp.from_mlp(w1.weight, w1.bias, w2.weight, w2.bias, fn, m, init="warm", **features)
    else:
        snnk = SNNKMlp(block.in_features, block.out_features, m, **features)
        snnk.to(device)
        if opts.init == "variance":
            if device.type != "meta":  # on meta (kanc.load of a big folder) the weights are assigned later
                snnk.reset_variance_()
        else:
            rows = ctx.calibration.get(block.key)
            snnk.fit_to(block.reference(), rows.to(device) if rows is not None else None, opts.ridge)
    snnk.linear.to(device=device, dtype=dtype)
    if not trainable(block):
        snnk.requires_grad_(False)
    return snnk.to(device)


def weights_read_elsewhere(block: MLPBlock, ctx: RewriteContext, stand_ins: tuple[Linear, ...] = ()) -> str | None:
    """Where code outside the block's layers reads their parameters, or None; a read of the dtype or device of a
    layer in ``stand_ins`` (replaced by a KeepsDtype) does not count."""
    for lin in block.linears():
        read = ctx.reads(lin, kept=DTYPE_READS) if any(lin is s for s in stand_ins) else ctx.reads(lin)
        if read is not None:
            return read
    return None


def _stand_ins(block: MLPBlock) -> tuple[Linear, ...]:
    """The layers a swap-based SNNK rewrite replaces one for one (a KeepsDtype may stand there): fc1 and fc2, or a
    gated block's fc2 (its gate and up layers vanish inside the module that becomes the SNNKMlp)."""
    layers = (block.fc2,) if block.gated else (block.fc1, block.fc2)
    return tuple(lin for lin in layers if isinstance(getattr(lin.module, "weight", None), Tensor))


def _standing(lin: Linear, module: nn.Module, ctx: RewriteContext) -> nn.Module:
    """``module`` where ``lin`` was: inside a KeepsDtype when other code reads ``lin``'s weight (its dtype only, as
    weights_read_elsewhere checked)."""
    return KeepsDtype(module, lin.module.weight) if ctx.reads(lin) is not None else module


def _snnk_rewrite(block: MLPBlock, snnk: SNNKMlp, edits: list[Edit], opts: SNNKOptions, ctx: RewriteContext) -> Rewrite:
    rows = ctx.calibration.get(block.key)
    info = {"num_features": snnk.features.num_features, "kind": snnk.features.kind, "seed": snnk.features.seed}
    info["init"] = opts.init
    if opts.init == "preserve":
        info["fitted_on"] = f"{rows.shape[0]} calibration rows" if rows is not None else "synthetic N(0,1) rows"
    return Rewrite(edits, snnk, [snnk], [], info, entry=snnk, exit=snnk)


def snnk_span(block: MLPBlock, opts: SNNKOptions, ctx: RewriteContext) -> Rewrite | Miss:
    """The whole block (x -> ... -> fc2) becomes one SNNKMlp call.

    A block read from the source of a module that does not trace, or found on a recorded run, cannot be replaced
    as a span of its graph: it is rewritten by swaps, as a split block is.
    """
    if block.fc1.part.source or block.fc1.part.recorded or block.calls > 1:
        return snnk_split(block, opts, ctx)
    miss = _snnk_obstacle(block, ctx)
    if miss is not None:
        if miss.code == "weights_read" and _snnk_obstacle(block, ctx, _stand_ins(block)) is None:
            return snnk_split(block, opts, ctx)  # only dtype reads: swaps keep a KeepsDtype where they are read
        return miss
    snnk = _snnk_module(block, opts, ctx)
    if isinstance(snnk, Miss):
        return snnk
    module = ChannelsLast(snnk) if block.channels_first else snnk
    source = block.fc1.input
    span = ReplaceSpan(block.nodes(), source, block.fc2.node, module, "snnk")
    return _snnk_rewrite(block, snnk, [span], opts, ctx)


def _snnk_obstacle(block: MLPBlock, ctx: RewriteContext, stand_ins: tuple[Linear, ...] = ()) -> Miss | None:
    """Why SNNK, which replaces fc1 .. fc2 by one function of each token, cannot replace this block."""
    lora = next((lin.path for lin in block.linears() if lin.kind == "lora"), None)
    if lora is not None:
        return Miss("lora", f"{lora} is a peft LoRA layer: SNNK would replace its adapters; merge them into the base "
                    "weights first (model.merge_and_unload()) to convert this block")  # fmt: skip
    if block.concat is not None:
        return Miss("concat", f"{block.fc2.path} also reads other features (concatenated): SNNK replaces a whole block")
    if not block.rowwise:
        ops = ", ".join(n.name for n in block.chain[:4])
        return Miss("not_per_token", f"between {block.fc1.path} and the activation ({ops}) the block mixes tokens or "
                    "reshapes them: SNNK replaces fc1 .. fc2 by one function of each token")  # fmt: skip
    read = weights_read_elsewhere(block, ctx, stand_ins)
    if read is not None:
        return Miss("weights_read", f"{read}: SNNK replaces that layer, whose weights this code reads")
    return None


def _snnk_holder(block: MLPBlock, opts: SNNKOptions, ctx: RewriteContext) -> Rewrite | Miss:
    """A gated block in code that does not trace: the module that takes the block's input and returns its gated
    product (diffusers' GEGLU) becomes the SNNKMlp, the norms after it and fc2 identities."""
    holder = _holder(block)
    after = block.between if holder is not None else []
    if holder is None or any(p.kind in ("norm", "scale") and p.path is None for p in after):
        return Miss("gated_code", "a gated block in code that does not trace, whose gated product no module of its "
                    "own returns: SNNK replaces that product, which module swaps alone cannot remove")  # fmt: skip
    snnk = _snnk_module(block, opts, ctx)
    if isinstance(snnk, Miss):
        return snnk
    edits: list[Edit] = [SetModule(holder, ChannelsLast(snnk) if block.channels_first else snnk)]
    edits += [SetModule(p.path, nn.Identity()) for p in after if p.kind == "norm"]
    edits.append(SetModule(block.fc2.path, _standing(block.fc2, nn.Identity(), ctx)))
    return _snnk_rewrite(block, snnk, edits, opts, ctx)


def _holder(block: MLPBlock) -> str | None:
    """The innermost module whose every recorded call takes the block's input and returns its gated product."""
    part, source = block.fc1.part, block.fc1.input
    found = [
        path
        for path, calls in part.boundaries.items()
        if len(calls) == block.calls and all(ins[:1] == [source] and outs == [block.mul] for ins, outs in calls)
    ]
    inside = [p for p in found if not (block.fc2.path == p or block.fc2.path.startswith(p + "."))]
    return max(inside, key=lambda p: p.count("."), default=None)


WIDTH_FREE = ("flatten", "reshape_as", "view_as", "contiguous", torch.flatten)  # reshapes that take any width


def snnk_split(block: MLPBlock, opts: SNNKOptions, ctx: RewriteContext) -> Rewrite | Miss:
    """By module swaps: fc1 becomes the SNNKMlp, the activation, the norms between and fc2 identities (split blocks,
    and blocks in code that cannot be edited as a graph)."""
    miss = _snnk_obstacle(block, ctx, _stand_ins(block))
    if miss is not None:
        return miss
    if block.gated:
        return _snnk_holder(block, opts, ctx)
    between = [*block.pre, *block.between]
    if any(p.kind in ("norm", "scale") and (p.path is None or p.module is None) for p in between):
        return Miss("split_norm", "a norm or scale that is not a module sits in the block: swaps cannot remove it")
    fixed = [n.name for n in block.chain if n.op != "call_module" and n.target not in WIDTH_FREE]
    if fixed:
        return Miss("split_norm", f"{', '.join(fixed)} between fc1 and the activation would reshape SNNK's output")
    snnk = _snnk_module(block, opts, ctx)
    if isinstance(snnk, Miss):
        return snnk
    first = ChannelsLast(snnk) if block.channels_first else snnk
    edits: list[Edit] = [SetModule(block.fc1.path, _standing(block.fc1, first, ctx)), drop_act(block.act)]
    edits += [SetModule(p.path, nn.Identity()) for p in between if p.kind == "norm"]
    edits.append(SetModule(block.fc2.path, _standing(block.fc2, nn.Identity(), ctx)))
    return _snnk_rewrite(block, snnk, edits, opts, ctx)
