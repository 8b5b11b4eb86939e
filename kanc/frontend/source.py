"""Reading a module's Python source, for what fx cannot trace.

Two readers share the helpers here:
- ``kanc.frontend.dataflow`` reads how the children of a module feed each other (BERT's split blocks);
- ``inline_chains`` finds MLP chains written inline in the methods of a module that does not trace, as in
  OPT, BART, Whisper and the other fairseq-style decoder layers (ALBERT writes its chain in ``ff_chunk``)::

      hidden = self.fc1(hidden)                     # or: hidden = self.act(self.fc1(hidden))
      hidden = self.activation_fn(hidden)
      hidden = F.dropout(hidden, p=self.activation_dropout, training=self.training)
      hidden = self.fc2(hidden)

  ``chain_graph`` turns the chains into a small fx graph over the module's own children (placeholder -> fc1 ->
  act -> ... -> fc2 -> output): a *partial* graph, marked ``source=True``, which the pattern table reads like
  any traced part. It is never run and never installed: a block found in it can only be rewritten by swaps.

A chain is accepted only when every link is certain from the source: each child (fc1, the activation module,
fc2) is called exactly once in the whole class, every intermediate value is read exactly once (by the next
link) before it is reassigned, and the links between the activation and fc2 are dropout calls or dropout,
identity or norm modules. Anything else is not a chain, and the module stays reported as not traced.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

from torch import fx, nn
from torch.nn import functional as F

from kanc.frontend.activations import module_activation
from kanc.frontend.leaves import is_token_norm, linear_kind

# Functional dropouts as they are written in model code: F.dropout, nn.functional.dropout, torch.dropout.
_DROPOUT_NAMES = {("F", "dropout"), ("functional", "dropout"), ("torch", "dropout")}


# ---- the class's methods as syntax trees -------------------------------------------------------------------


def class_methods(cls: type) -> list[ast.FunctionDef]:
    """Methods of cls and its bases up to nn.Module, an override hiding the base's version."""
    seen: dict[str, ast.FunctionDef] = {}
    for klass in cls.__mro__:
        if klass in (nn.Module, object) or not issubclass(klass, nn.Module):
            continue
        for fn in _class_ast(klass):
            seen.setdefault(fn.name, fn)
    return list(seen.values())


@lru_cache(maxsize=256)
def _class_ast(klass: type) -> tuple[ast.FunctionDef, ...]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
    except (OSError, TypeError, SyntaxError, IndentationError):
        return ()
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    return tuple(n for n in body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))


def self_attr(node: ast.AST) -> str | None:
    """ "a" for ``self.a``."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return node.attr
    return None


def self_calls(fn: ast.AST) -> list[tuple[str, ast.Call]]:
    """Every ``self.<name>(...)`` call in ``fn``, with the name."""
    return [(name, n) for n in ast.walk(fn) if isinstance(n, ast.Call) and (name := self_attr(n.func))]


# ---- def-use of plain variables in forward -------------------------------------------------------------------


@dataclass(eq=False)
class _Def:
    value: ast.expr
    uses: int = 0


class _Uses(ast.NodeVisitor):
    """Which assignment each variable read refers to, for ``name = <expr>`` assignments of straight-line code.

    A read is tied to the last assignment of its name seen before it in source order. Assignments inside
    compound statements (if/for/while/with/try), augmented or unpacking assignments make the name's value
    unknown (its later reads are tied to nothing), so only certain dataflow is ever followed.
    """

    def __init__(self) -> None:
        self.current: dict[str, _Def | None] = {}
        self.reads: dict[ast.Name, _Def] = {}

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        simple = len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
        for target in node.targets:
            self._store(target, _Def(node.value) if simple else None)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)
        self._store(node.target, _Def(node.value) if node.value is not None else None)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self.visit(node.value)
        if isinstance(node.target, ast.Name) and (d := self.current.get(node.target.id)) is not None:
            d.uses += 1  # ``h += 1`` reads h too
        self._store(node.target, None)

    def generic_visit(self, node: ast.AST) -> None:
        if isinstance(node, _COMPOUND):
            super().generic_visit(node)
            for name in _stored_names(node):
                self.current[name] = None
            return
        super().generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            d = self.current.get(node.id)
            if d is not None:
                d.uses += 1
                self.reads[node] = d
        elif isinstance(node.ctx, ast.Store | ast.Del):
            self.current[node.id] = None

    def _store(self, target: ast.AST, d: _Def | None) -> None:
        for name in _stored_names(target):
            self.current[name] = None
        if d is not None and isinstance(target, ast.Name):
            self.current[target.id] = d


_COMPOUND = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith, ast.Try, ast.TryStar, ast.Match)


def _stored_names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store | ast.Del)}


# ---- chains --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """One step of a chain: a child module call (``child`` is its name) or a functional dropout (``child`` None)."""

    child: str | None


@dataclass(frozen=True)
class Chain:
    """fc1 -> pre links -> act -> between links -> fc2, all children of one module."""

    fc1: str
    pre: tuple[Link, ...]
    act: str
    between: tuple[Link, ...]
    fc2: str


def _is_dropout_call(call: ast.Call) -> bool:
    func = call.func
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        return (func.value.id, func.attr) in _DROPOUT_NAMES
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Attribute):
        return (func.value.attr, func.attr) in _DROPOUT_NAMES
    return isinstance(func, ast.Name) and func.id == "dropout"


def _passthrough_child(module: nn.Module | None) -> bool:
    if module is None:
        return False
    dropout = nn.Dropout | nn.Dropout1d | nn.Dropout2d | nn.AlphaDropout
    return isinstance(module, dropout | nn.Identity) or is_token_norm(module)


class _ChainReader:
    def __init__(self, children: dict[str, nn.Module], uses: _Uses, calls: Counter) -> None:
        self.children = children
        self.calls = calls
        self.uses = uses

    def child(self, call: ast.Call) -> tuple[str, nn.Module] | None:
        name = self_attr(call.func)
        if name is None or name not in self.children or self.calls[name] != 1:
            return None
        return name, self.children[name]

    def producer(self, expr: ast.expr) -> ast.Call | None:
        """The call whose value ``expr`` is: the call itself, or a variable's single-use assignment of one."""
        if isinstance(expr, ast.Name):
            d = self.uses.reads.get(expr)
            if d is None or d.uses != 1:
                return None
            expr = d.value
        return expr if isinstance(expr, ast.Call) and expr.args else None

    def walk_back(self, call: ast.Call, stop) -> tuple[list[Link], ast.Call] | None:
        """Passthrough links before ``call``'s first argument, up to the call that ``stop`` accepts."""
        links: list[Link] = []
        cur = self.producer(call.args[0])
        while cur is not None:
            if stop(cur):
                return links[::-1], cur
            if _is_dropout_call(cur):
                links.append(Link(None))
            else:
                child = self.child(cur)
                if child is None or not _passthrough_child(child[1]):
                    return None
                links.append(Link(child[0]))
            cur = self.producer(cur.args[0])
        return None

    def chain_at(self, call: ast.Call) -> Chain | None:
        """The chain ending at ``call`` if it is fc2 (a linear child) of one."""
        fc2 = self.child(call)
        if fc2 is None or linear_kind(fc2[1]) is None or len(call.args) != 1:
            return None
        is_act = lambda c: (ch := self.child(c)) is not None and module_activation(ch[1]) is not None
        found = self.walk_back(call, is_act)
        if found is None:
            return None
        between, act_call = found
        is_linear = lambda c: (ch := self.child(c)) is not None and linear_kind(ch[1]) is not None
        found = self.walk_back(act_call, is_linear)
        if found is None:
            return None
        pre, fc1_call = found
        if any(link.child is not None and not isinstance(self.children[link.child], nn.Identity) for link in pre):
            return None  # only identities may sit between fc1 and the activation
        return Chain(self.child(fc1_call)[0], tuple(pre), self.child(act_call)[0], tuple(between), fc2[0])


def inline_chains(module: nn.Module) -> list[Chain]:
    """The MLP chains written inline in ``module``'s methods (forward, or a helper such as ALBERT's ``ff_chunk``);
    empty when its source cannot be read."""
    calls, methods = _method_facts(type(module))
    children = dict(module.named_children())
    chains = []
    for uses, fn_calls in methods:
        reader = _ChainReader(children, uses, calls)
        chains += [c for call in fn_calls if (c := reader.chain_at(call)) is not None]
    return chains


@lru_cache(maxsize=256)
def _method_facts(cls: type) -> tuple[Counter, tuple[tuple[_Uses, tuple[ast.Call, ...]], ...]]:
    """What ``inline_chains`` reads from a class's source, once per class (the layers of a stack share theirs):
    how often each ``self.<name>(...)`` is called, and per method its def-use facts and those calls."""
    methods = class_methods(cls)
    calls = Counter(name for method in methods for name, _ in self_calls(method))
    facts = []
    for fn in methods:
        uses = _Uses()
        uses.visit(fn)
        facts.append((uses, tuple(call for _, call in self_calls(fn))))
    return calls, tuple(facts)


def chain_graph(module: nn.Module, chains: list[Chain]) -> fx.GraphModule:
    """A partial fx graph of ``module`` holding each chain as placeholder -> fc1 -> ... -> fc2 -> output."""
    graph = fx.Graph()
    outputs = []
    for i, chain in enumerate(chains):
        value = graph.placeholder(f"x{i}")
        value = graph.call_module(chain.fc1, (value,))
        for link in chain.pre:
            value = _link(graph, link, value)
        value = graph.call_module(chain.act, (value,))
        for link in chain.between:
            value = _link(graph, link, value)
        outputs.append(graph.call_module(chain.fc2, (value,)))
    graph.output(tuple(outputs) if len(outputs) > 1 else outputs[0])
    name = type(module).__name__
    return fx.GraphModule(module, graph, class_name=name if name.isidentifier() else "GraphModule")


def _link(graph: fx.Graph, link: Link, value: fx.Node) -> fx.Node:
    if link.child is None:
        return graph.call_function(F.dropout, (value,))
    return graph.call_module(link.child, (value,))
