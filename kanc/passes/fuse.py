"""``fuse_rationals``: a GroupRational and the plain linear layer it feeds become one GRKANLinear.

``rewrite_to_grkan`` substitutes activations: the fitted rational goes where the activation was and nothing else
changes. It lists, per block, the sites where a rational may join a linear layer (``FusionSite``): the fitted
rational with fc2 (only dropout or identities between them), and an identity rational in front of fc1 (KAT's
layout, exact). This pass makes each site one ``GRKANLinear`` (the rational in the matmul's prologue, one fused
kernel) where the layer is a plain linear-like module (nn.Linear, HF Conv1D, a 1x1 Conv2d, or an aten.linear
of an exported graph) that is called only by the block and whose weights no other code reads. Elsewhere the
rational stays where it is and fc1 keeps no identity rational: a LoRA or quantized layer, a norm between fc1 and
the activation, code that reads ``fc1.weight`` are no obstacle to the conversion, only to the fusion.

Placement: ``PLACEMENTS`` maps a placement name to the function that builds the fused layer; ``choose_placement``
picks one per site. This pass builds only "prologue" (the rational in front of the next linear). The other placement,
the rational in fc1's epilogue, exists as a layer (``kanc.nn.GRKANMlp(placement=...)``, the custom op
``kanc::grkan_mlp_epilogue``) but is not chosen here yet: it would be a second entry, picked by measurement.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from kanc.frontend.leaves import LINEAR_KINDS, linear_kind
from kanc.nn import GRKANLinear, GroupRational
from kanc.nn.init import init_grkan_linear_
from kanc.passes.checks import Linear
from kanc.passes.layers import ChannelsLast
from kanc.passes.surgery import DropNode, ReplaceNode, apply_node_edit, finish_graph, get_module, swap_module


@dataclass(eq=False)
class FusionSite:
    """A rational that may join the linear layer it feeds.

    ``kind``: "fitted" (the rational that replaced the activation, ``rational`` the module put in its place) or
    "identity" (an identity rational in front of fc1, made when fused).
    """

    kind: str
    linear: Linear
    rational: nn.Module | None
    groups: int
    degrees: tuple[int, int]
    variance: bool = False  # init="variance": the fused layer's weights get KAT's init, not the linear's


@dataclass
class FuseResult:
    """What ``fuse_rationals`` did: ``counters`` (``fused:<placement>``, ``unfused:<reason>``) and changed paths."""

    counters: Counter = field(default_factory=Counter)
    touched: list[str] = field(default_factory=list)


@torch.no_grad()
def fuse_prologue(site: FusionSite, rational: GroupRational, variance: bool) -> nn.Module:
    """GRKANLinear(F(x)) with ``site.linear``'s weights (or KAT's variance init) and ``rational`` as F.

    The layer's own parameters are the linear's when they have its layout (an nn.Linear: shared, not copied, so
    ties and requires_grad are kept and no second copy exists); a transposed or computed weight is copied."""
    w = site.linear.weights
    device, dtype = w.weight.device, w.weight.dtype
    layer = GRKANLinear(
        w.in_features,
        w.out_features,
        w.bias is not None,
        rational.groups,
        "identity",
        rational.degrees,
        device="meta",  # no init of weights replaced at once
        dtype=dtype,
    )  # fmt: skip  (on meta: no init of weights that are replaced at once)
    layer.weight = _parameter(w.weight, variance)
    if w.bias is not None:
        layer.bias = _parameter(w.bias, variance)
    layer.rational = rational.to(device)
    if variance and not layer.weight.is_meta:  # on meta (kanc.load of a big folder) the weights are assigned later
        init_grkan_linear_(layer)
    return layer


def _parameter(t: torch.Tensor, fresh: bool) -> nn.Parameter:
    """``t`` itself when it is a parameter to keep; else a new parameter of its shape (its values unless ``fresh``)."""
    if isinstance(t, nn.Parameter) and not fresh:
        return t
    if fresh:  # a new parameter trains as the one it stands for did (a frozen weight stays frozen)
        return nn.Parameter(torch.empty_like(t, memory_format=torch.contiguous_format), requires_grad=t.requires_grad)
    return nn.Parameter(t.detach().clone(memory_format=torch.contiguous_format), requires_grad=t.requires_grad)


PLACEMENTS: dict[str, Callable[[FusionSite, GroupRational, bool], nn.Module]] = {"prologue": fuse_prologue}


def choose_placement(site: FusionSite) -> str:
    """The placement of a site's rational (one exists today; a measured choice between several goes here)."""
    return "prologue"


def fuse_rationals(model: nn.Module, converted: list, reads: Callable[[Linear], str | None]) -> FuseResult:
    """Fuse every fusible site of the ``converted`` blocks (ConvertedBlock with ``sites``) in ``model``, in place.

    Before: the rewrite's edits are applied (fitted rationals where the activations were). After: each site whose
    layer is plain, called only by its block, and read by nothing else (``reads`` says where it is read) is one
    GRKANLinear; the fitted rational it absorbed is gone from the graph (or is an Identity where it was a module);
    the block's ``entry``/``exit``, parameter count and notes follow. Fitted sites are fused before identity ones:
    a layer that is fc2 of one block and fc1 of the next takes the fitted rational.
    """
    out = FuseResult()
    fused: set[int] = set()
    sites = [(c, s) for kind in ("fitted", "identity") for c in converted for s in c.sites if s.kind == kind]
    for block, site in sites:
        reason = _obstacle(model, site, reads, fused)
        if reason is not None:
            out.counters[f"unfused:{reason[0]}"] += 1
            block.notes.append(_unfused_note(site, reason[1]))
            continue
        placement = choose_placement(site)
        rational = _take_rational(model, site, out)
        layer = PLACEMENTS[placement](site, rational, site.variance)
        _put(model, site, layer, out)
        fused.add(id(layer))
        _follow(block, site, layer, rational)
        out.counters[f"fused:{placement}"] += 1
    out.touched = sorted(set(out.touched))
    return out


def _obstacle(model: nn.Module, site: FusionSite, reads: Callable[[Linear], str | None], fused: set[int]) -> Any:
    """(code, why) when ``site`` cannot be fused, else None."""
    lin = site.linear
    if lin.kind not in (*LINEAR_KINDS, "aten"):
        return "not_plain", f"{lin.path} is a {lin.kind} layer, not a plain linear one"
    if lin.module is not None:
        try:
            now = get_module(model, lin.path)
        except AttributeError:
            now = None
        inner = now.layer if isinstance(now, ChannelsLast) else now
        if id(inner) in fused:
            return "fused", f"{lin.path} already holds a rational in front"
        if now is not lin.module or linear_kind(now) is None:
            return "replaced", f"{lin.path} was replaced by another rewrite"
    read = reads(lin)
    if read is not None:
        return "weights_read", f"{read}: a fused layer keeps the weights but changes what they compute"
    return None


def _unfused_note(site: FusionSite, why: str) -> str:
    if site.kind == "identity":
        return f"fc1 kept as it is, no identity rational in front ({why})"
    return f"the rational stays where the activation was, fc2 unfused ({why})"


def _take_rational(model: nn.Module, site: FusionSite, out: FuseResult) -> GroupRational:
    """The site's rational, removed from where the rewrite put it (or a new identity rational for fc1)."""
    if site.kind == "identity":  # new in front of fc1: it trains as fc1 does
        rational = GroupRational(site.linear.in_features, site.groups, site.degrees, "identity")
        return rational.requires_grad_(site.linear.trains)
    placed = site.rational
    for path in _paths_of(model, placed):
        parent_path, _, name = path.rpartition(".")
        parent = get_module(model, parent_path)
        nodes = _calls(parent, name) if isinstance(parent, fx.GraphModule) else []
        for node in nodes:
            apply_node_edit(parent, DropNode(node))
        if nodes:
            finish_graph(parent)
        else:
            swap_module(model, path, nn.Identity())
        out.touched.append(parent_path)
    return placed.layer if isinstance(placed, ChannelsLast) else placed


def _paths_of(model: nn.Module, module: nn.Module) -> list[str]:
    return [p for p, m in model.named_modules(remove_duplicate=False) if m is module]


def _calls(gm: fx.GraphModule, name: str) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module" and n.target == name]


def _put(model: nn.Module, site: FusionSite, layer: nn.Module, out: FuseResult) -> None:
    lin = site.linear
    placed = ChannelsLast(layer) if lin.channels_first else layer
    if lin.module is not None:
        swap_module(model, lin.path, placed)
        out.touched.append(lin.path.rpartition(".")[0])
        return
    gm = lin.part.graph_module  # an exported graph: the aten.linear node becomes a call of the fused layer
    apply_node_edit(gm, ReplaceNode(lin.node, placed, lin.path.replace(".", "_") or "linear"))
    finish_graph(gm)
    out.touched.append("")


def _follow(block: Any, site: FusionSite, layer: nn.Module, rational: GroupRational) -> None:
    """The block's hooks, parameter count and mode follow the fused layer."""
    if site.kind == "identity":
        block.params_after += sum(p.numel() for p in rational.parameters())
        if block.block.rowwise and block.entry is site.linear.module:  # (None for an aten.linear)
            block.entry = layer
        return
    if block.entry is rational:
        block.entry = layer  # a block measured from its activation's input: the fused fc2 now receives it
    block.exit = layer
