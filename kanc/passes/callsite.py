"""The two least invasive code edits, for an activation called as a function in a module that does not trace.

- ``SetAttr``: the function is stored on the module (``self.activation = F.gelu`` in PyTorch's Transformer layers)
  and called through that attribute: the attribute is set to a kanc module instead.
- ``PatchCall``: the function is called in the method's source (``self.fc2(F.gelu(self.fc1(x)))``): that one call
  becomes a call of a kanc module registered on the instance (or, for a removed activation, just its argument);
  every other line and branch of the method is kept. The edited method is compiled from the class's own source
  and installed on the instance as a ``PatchedMethod``, which pickles and deep-copies by recompiling that source.

Both are found from a recorded call's ``call_site`` (kanc.frontend.recording): the frame's code object and ``self``.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import textwrap
import types
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from kanc.errors import KancError

PATCH_PREFIX = "kanc_call_"


@dataclass
class SetAttr:
    path: str  # model path of the module holding the function
    attr: str
    module: nn.Module


@dataclass
class PatchCall:
    """Replace the call of ``fn`` on line ``lineno`` of ``method`` of the module at ``path``."""

    path: str
    method: str
    lineno: int
    fn: Any
    module: nn.Module | None  # None: the call becomes its first argument


def _site(node: fx.Node) -> Any:
    return node.meta.get("call_site")


def function_edit(node: fx.Node, module: nn.Module | None, paths: dict[int, str]) -> SetAttr | PatchCall | str:
    """The least invasive edit replacing the function call ``node`` by ``module`` (None: remove it), else why not."""
    site = _site(node)
    if site is None or site.owner is None or id(site.owner) not in paths:
        return "its call site is not in a method of a module of the model"
    path = paths[id(site.owner)]
    calls = _calls_at(site, node.target)
    if isinstance(calls, str):
        return f"{site}: {calls}"
    attr = _self_attr(calls[0].func)
    if attr is not None and site.owner.__dict__.get(attr) is node.target:
        return SetAttr(path, attr, module if module is not None else nn.Identity())
    method = _method_name(site)
    if method is None:
        return f"{site}: the method cannot be found on {type(site.owner).__name__}"
    resolved = getattr(getattr(type(site.owner), method), "__code__", None)
    if resolved is not site.code:
        return f"{site}: {type(site.owner).__name__} overrides {method} (the call is in a base class's version)"
    return PatchCall(path, method, site.lineno, node.target, module)


def _self_attr(expr: ast.expr) -> str | None:
    if isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name) and expr.value.id == "self":
        return expr.attr
    return None


def _method_name(site: Any) -> str | None:
    for klass in type(site.owner).__mro__:
        for name, value in vars(klass).items():
            if getattr(value, "__code__", None) is site.code:
                return name
    return None


def _function_ast(code: Any) -> tuple[ast.FunctionDef, int] | str:
    """The def of ``code`` and the offset from its lines to the file's."""
    try:
        lines, start = inspect.findsource(code)
    except (OSError, TypeError):
        return "its source cannot be read"
    block = inspect.getblock(lines[code.co_firstlineno - 1 :])
    try:
        tree = ast.parse(textwrap.dedent("".join(block)))
    except SyntaxError:
        return "its source does not parse"
    fn = tree.body[0] if tree.body else None
    if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
        return "its source is not a def"
    return fn, code.co_firstlineno - 1


def _resolves_to(expr: ast.expr, fn: Any, owner: nn.Module, namespace: dict) -> bool:
    """Whether ``expr`` (names and attributes only, nothing called) evaluates to ``fn``."""
    if isinstance(expr, ast.Name):
        return namespace.get(expr.id, vars(builtins).get(expr.id)) is fn
    if isinstance(expr, ast.Attribute):
        if isinstance(expr.value, ast.Name) and expr.value.id == "self":
            return owner.__dict__.get(expr.attr) is fn
        base = _evaluate(expr.value, namespace)
        return base is not None and getattr(base, expr.attr, None) is fn
    return False


def _evaluate(expr: ast.expr, namespace: dict) -> Any:
    if isinstance(expr, ast.Name):
        return namespace.get(expr.id)
    if isinstance(expr, ast.Attribute):
        base = _evaluate(expr.value, namespace)
        return getattr(base, expr.attr, None) if base is not None else None
    return None


def _calls_at(site: Any, fn: Any) -> list[ast.Call] | str:
    found = _function_ast(site.code)
    if isinstance(found, str):
        return found
    tree, offset = found
    namespace = _globals_of(site)
    on_line = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and _spans(n, offset, site.lineno)]
    calls = [n for n in on_line if _resolves_to(n.func, fn, site.owner, namespace)]
    if len(calls) != 1:
        return f"{len(calls)} calls of {getattr(fn, '__name__', fn)} on this line (one is needed to rewrite it)"
    if not calls[0].args or any(isinstance(a, ast.Starred) for a in calls[0].args):
        return "the call has no plain first argument"
    return calls


def _spans(call: ast.Call, offset: int, lineno: int) -> bool:
    """The call's source lines hold ``lineno`` (a frame reports a line of a multi-line call)."""
    return call.lineno + offset <= lineno <= (call.end_lineno or call.lineno) + offset


def _globals_of(site: Any) -> dict:
    method = _method_name(site)
    fn = getattr(type(site.owner), method, None) if method else None
    return getattr(fn, "__globals__", {}) if fn is not None else {}


# ---- installing patched methods ------------------------------------------------------------------------------


class _Rewriter(ast.NodeTransformer):
    def __init__(self, patches: list[tuple[int, Any, str | None]], owner: nn.Module, namespace: dict, offset: int):
        self.patches, self.owner, self.namespace, self.offset = patches, owner, namespace, offset
        self.done = 0

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        for lineno, fn, attr in self.patches:
            if _spans(node, self.offset, lineno) and _resolves_to(node.func, fn, self.owner, self.namespace):
                self.done += 1
                if attr is None:
                    return node.args[0]
                call = ast.Call(ast.Attribute(ast.Name("self", ast.Load()), attr, ast.Load()), [node.args[0]], [])
                return ast.copy_location(call, node)
        return node


def compile_patched(owner: nn.Module, method: str, patches: list[tuple[int, Any, str | None]]) -> types.FunctionType:
    """``type(owner).<method>`` with each (line, fn, attribute) call replaced, compiled in the method's globals."""
    original = getattr(type(owner), method)
    original = getattr(original, "__func__", original)
    found = _function_ast(original.__code__)
    if isinstance(found, str):
        raise KancError(f"cannot rewrite {type(owner).__name__}.{method}: {found}")
    tree, offset = found
    tree.decorator_list = []
    rewriter = _Rewriter(patches, owner, original.__globals__, offset)
    tree = rewriter.visit(tree)
    if rewriter.done != len(patches):
        raise KancError(f"cannot rewrite {type(owner).__name__}.{method}: its source changed since it was recorded")
    return _compile(tree, original)


def _compile(tree: ast.FunctionDef, original: types.FunctionType) -> types.FunctionType:
    """Compile the def inside a factory whose arguments are the original's free variables (``__class__`` for
    ``super()``), so the new function closes over the original's own cells."""
    freevars = original.__code__.co_freevars
    factory = ast.FunctionDef(
        name="__kanc_factory__",
        args=ast.arguments([], [ast.arg(v) for v in freevars], None, [], [], None, []),
        body=[tree, ast.Return(ast.Name(tree.name, ast.Load()))],
        decorator_list=[],
        returns=None,
    )
    module = ast.fix_missing_locations(ast.Module([factory], []))
    code = compile(module, original.__code__.co_filename, "exec")
    factory_code = next(c for c in code.co_consts if isinstance(c, types.CodeType))
    inner = next(c for c in factory_code.co_consts if isinstance(c, types.CodeType) and c.co_name == tree.name)
    cells = dict(zip(freevars, original.__closure__ or ()))
    closure = tuple(cells[v] for v in inner.co_freevars)
    fn = types.FunctionType(inner, original.__globals__, tree.name, original.__defaults__, closure or None)
    fn.__kwdefaults__ = original.__kwdefaults__
    return fn


class PatchedMethod:
    """A method of one instance, recompiled with some calls replaced; pickles as (owner, method, patches)."""

    def __init__(self, owner: nn.Module, method: str, patches: list[tuple[int, Any, str | None]]) -> None:
        self.owner, self.method, self.patches = owner, method, list(patches)
        self.function = compile_patched(owner, method, self.patches)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(self.owner, *args, **kwargs)

    def __reduce__(self) -> tuple:
        return PatchedMethod, (self.owner, self.method, self.patches)


def install_patches(model: nn.Module, edits: list[PatchCall]) -> list[str]:
    """Install every PatchCall (grouped per instance and method); returns the changed module paths."""
    grouped: dict[tuple[str, str], list[PatchCall]] = {}
    for edit in edits:
        grouped.setdefault((edit.path, edit.method), []).append(edit)
    for (path, method), group in grouped.items():
        owner = model.get_submodule(path) if path else model
        previous = owner.__dict__.get(method)
        patches = list(previous.patches) if isinstance(previous, PatchedMethod) else []
        for edit in group:
            attr = None
            if edit.module is not None:
                attr = _free_name(owner)
                owner.add_module(attr, edit.module.train(owner.training))
            patches.append((edit.lineno, edit.fn, attr))
        owner.__dict__[method] = PatchedMethod(owner, method, patches)
    return sorted({path for path, _ in grouped})


def _free_name(owner: nn.Module) -> str:
    i = 0
    while hasattr(owner, f"{PATCH_PREFIX}{i}"):
        i += 1
    return f"{PATCH_PREFIX}{i}"
