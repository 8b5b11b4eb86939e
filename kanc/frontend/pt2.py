"""Reading torch.export archives (``.pt2``) without running anything they hold.

``torch.export.load`` runs code from the file in several places: it unpickles weights and constants marked
``use_pickle`` and opaque objects (``weights_only=False`` / ``pickle.loads``), falls back to an unrestricted unpickler
for ``sample_inputs``, dlopens AOTInductor libraries, evaluates shape expressions with ``sympy.sympify`` (``eval``),
and compiles input names and guard code into Python (``exec``). :func:`read_exported` reads the archive's parts
itself instead: the archive's entry names are checked, every string of the program that reaches ``eval``/``exec`` is
checked against a grammar of what torch writes (plain identifiers, sympy formulas, shape guards), pickled parts are
read weights-only, and anything that would need more is refused in one line unless the caller trusts the file (then
it is ``torch.export.load`` itself). Parsing and graph building stay torch's own (its deserializer and verifier).
"""

from __future__ import annotations

import ast
import io
import json
import logging
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from kanc.errors import KancError, printable

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_PLAIN = re.compile(r"[^\"'\\\x00-\x1f\x7f]*\Z")  # no quote, backslash or control character: cannot leave a literal
_OP = re.compile(r"torch\.ops\.[A-Za-z][A-Za-z0-9_]*\.[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?\Z")  # aten.__and__ too
_TARGET = re.compile(r"(torch|_operator|math)(\.[A-Za-z0-9_]+)+\Z")
_SYMBOL = re.compile(r"[a-z]+[0-9]+\Z")  # s0, u12, zuf3: the symbols torch names shapes with
_GUARD_TEXT = re.compile(r"[A-Za-z0-9_.:\-]*\Z")  # the string constants of a guard (input names, devices)
_GUARD_CHARS = re.compile(r"[^\"\\#\x00-\x1f\x7f]*\Z")  # torch puts guards inside a "..." literal too
_IDENT_KEYS = {"name", "as_name", "forward_arg_names"}  # become Python identifiers in generated code
_DATA_KEYS = {"stack_trace", "torch_version", "as_string", "as_strings", "custom", "from_node"}  # never code
_NATIVE = ("data/aotinductor/",)
_PICKLED_PREFIXES = ("custom_obj_", "opaque_obj_")

# sympy and torch names that torch writes into shape expressions (torch.utils._sympy.functions, sympy core)
SYMPY_NAMES = frozenset(
    """Symbol Integer Float Rational Mul Add Pow Max Min Mod Abs floor ceiling Eq Ne Lt Le Gt Ge And Or Not Xor
    StrictLessThan StrictGreaterThan LessThan GreaterThan Equality Unequality Piecewise ExprCondPair true false
    True False oo zoo nan pi E I Sum Integer Float sqrt log exp FloorDiv ModularIndexing Where PythonMod CleanDiv
    CeilToInt FloorToInt CeilDiv LShift RShift PowByNatural FloatPow FloatTrueDiv IntTrueDiv
    IsNonOverlappingAndDenseIndicator TruncToFloat TruncToInt RoundToInt RoundDecimal ToFloat Identity
    BitwiseFn_bitwise_and BitwiseFn_bitwise_or BitwiseFn_bitwise_xor OpaqueUnaryFn_sqrt OpaqueUnaryFn_exp
    OpaqueUnaryFn_log""".split()
)
SYMPY_ASSUMPTIONS = frozenset(
    "positive negative nonnegative nonpositive integer real finite infinite zero nonzero even odd commutative".split()
)
# what shape guards call: the tensor's size/stride methods, min/max, math functions
GUARD_NAMES = frozenset("L math min max abs int float round len True False None inf".split())
GUARD_ATTRS = frozenset(
    "size stride storage_offset dim shape dtype device is_contiguous isnan isinf isfinite inf nan floor ceil "
    "trunc sqrt log exp pow".split()
)
_OPERATORS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.LShift, ast.RShift)
_OPERATORS += (ast.BitAnd, ast.BitOr, ast.BitXor, ast.USub, ast.UAdd, ast.Not, ast.Invert, ast.And, ast.Or)
_OPERATORS += (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Load)
_STRUCTURE = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.Tuple, ast.List)


def read_exported(path: Path, trust: bool) -> Any:
    """The ExportedProgram in ``path``; with ``trust``, whatever torch.export.load does (it may run the file's code)."""
    if trust:
        return _load_trusted(path)
    _check_entries(path)
    try:
        from torch.export.pt2_archive._package import PT2ArchiveReader

        reader = PT2ArchiveReader(str(path))
        files = set(reader.get_file_names())
    except Exception as e:  # noqa: BLE001 - torch's archive reader raises several types
        raise KancError(f"{path} is a torch.export archive that does not open: {_first_line(e)}") from None
    if "models/model.json" not in files or "data/weights/model.pt" in files:
        raise KancError(
            f"{path} is in an older torch.export layout that kanc cannot read without running its pickles: pass "
            "--trust-pickle if you trust its source, or export it again with this torch"
        )
    return _deserialize(path, reader, files)


def _load_trusted(path: Path) -> Any:
    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.ERROR)  # torch logs a traceback before its fallback; the error below says it in a line
    try:
        return torch.export.load(path)
    except Exception as e:  # noqa: BLE001 - the deserializer raises many types
        raise KancError(f"{path} is a torch.export archive that does not load: {_first_line(e)}") from None
    finally:
        logger.setLevel(level)


def _check_entries(path: Path) -> None:
    """Refuse entry names outside the archive's top folder, and native code torch would load."""
    from kanc.frontend.loading import zip_names

    names = zip_names(path)
    top = names[0].split("/", 1)[0] if names else ""
    for name in names:
        parts = name.split("/")
        if name.startswith("/") or "\\" in name or "\x00" in name or ".." in parts or parts[0] != top:
            raise KancError(f"{path} has an entry outside the archive ('{printable(name)}'): refusing a tampered .pt2")
        if any(name.startswith(f"{top}/{native}") for native in _NATIVE):
            raise KancError(
                f"{path} holds AOTInductor native code ({printable(name)}), which kanc never loads: save the model "
                "with torch.export.save alone"
            )


def _deserialize(path: Path, reader: Any, files: set[str]) -> Any:
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _bytes_to_dataclass

    raw = reader.read_bytes("models/model.json")
    try:
        check_program(json.loads(raw))
    except (ValueError, RecursionError) as e:
        raise KancError(f"{path} is not a .pt2 kanc can read safely: {e}") from None
    if b'"transformers.' in raw:
        _register_transformers_outputs()
    state_dict = _payloads(path, reader, files, "weights")
    constants = _payloads(path, reader, files, "constants")
    inputs = _sample_inputs(path, reader, files)
    try:
        program = _bytes_to_dataclass(schema.ExportedProgram, raw)
        return ExportedProgramDeserializer().deserialize(program, state_dict, constants, inputs)
    except Exception as e:  # noqa: BLE001 - the deserializer and verifier raise many types
        raise KancError(f"{path} is a torch.export archive that does not load: {_first_line(e)}") from None


# ---- the program's strings ---------------------------------------------------------------------------------------


def check_program(doc: Any) -> None:
    """Raise ValueError when a string of the serialized program could run code in torch's loader (see module doc)."""
    _walk(doc, "", "model.json")


def _walk(value: Any, key: str, where: str) -> None:
    if key in _DATA_KEYS:
        return
    special = _FIELDS.get(key)
    if special is not None:
        special(value, where)
    elif isinstance(value, dict):
        for k, v in value.items():
            _plain(k, where)
            _walk(v, k, f"{where}.{k}")
    elif isinstance(value, list):
        for v in value:
            _walk(v, key, where)
    elif isinstance(value, str):
        (_identifier if key in _IDENT_KEYS else _plain)(value, where)


def _plain(text: Any, where: str) -> None:
    if not isinstance(text, str) or not _PLAIN.match(text) or len(text) > 4096:
        raise ValueError(f"unexpected text at {where}: {_quote(text)}")


def _identifier(text: Any, where: str) -> None:
    if text != "" and not (isinstance(text, str) and _IDENT.match(text)):
        raise ValueError(f"the name at {where} is not an identifier: {_quote(text)}")


def _target(text: Any, where: str) -> None:
    op = isinstance(text, str) and bool(_OP.match(text))
    if not op and not (isinstance(text, str) and _TARGET.match(text) and "__" not in text):
        raise ValueError(f"the operator at {where} is not a torch op: {_quote(text)}")


def _expression(text: Any, where: str) -> None:
    """A sympy formula as torch writes it (torch evaluates it with sympify, i.e. eval)."""
    if not isinstance(text, str) or not _safe_ast(text, _sympy_node):
        raise ValueError(f"the shape expression at {where} is not a plain formula: {_quote(text)}")


def _guards(value: Any, where: str) -> None:
    """Shape guards (torch compiles them into the module's guard function)."""
    for text in value if isinstance(value, list) else [value]:
        if not isinstance(text, str) or not _GUARD_CHARS.match(text) or not _safe_ast(text, _guard_node):
            raise ValueError(f"the guard at {where} is not a plain shape check: {_quote(text)}")


def _range_constraints(value: Any, where: str) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"unexpected range constraints at {where}")
    for k, v in value.items():
        _expression(k, where)
        _walk(v, "", f"{where}[{k}]")


def _spec(text: Any, where: str) -> None:
    """A pytree spec (JSON): its type names are looked up in torch's registry, never imported."""
    if text is None:
        return
    try:
        doc = json.loads(text) if isinstance(text, str) and text.isprintable() else None
    except ValueError:
        doc = None
    if doc is None:
        raise ValueError(f"unexpected pytree spec at {where}")
    _spec_types(doc, where)


def _spec_types(node: Any, where: str) -> None:
    if isinstance(node, dict):
        kind = node.get("type")
        if kind is not None and not (isinstance(kind, str) and re.match(r"[A-Za-z0-9_.]+\Z", kind)):
            raise ValueError(f"unexpected type in the pytree spec at {where}: {_quote(kind)}")
        for child in node.get("children_spec") or []:
            _spec_types(child, where)
    elif isinstance(node, list):
        for child in node:
            _spec_types(child, where)


def _metadata(value: Any, where: str) -> None:
    """Node metadata is data, except source_fn_stack, whose targets torch resolves to Python objects."""
    if not isinstance(value, dict):
        raise ValueError(f"unexpected metadata at {where}")
    for item in str(value.get("source_fn_stack") or "").split(";"):
        if item:
            name, _, target = item.partition(",")
            _target(target, f"{where}.source_fn_stack")


_FIELDS = {
    "target": _target,
    "as_operator": _target,
    "expr_str": _expression,
    "guards_code": _guards,
    "range_constraints": _range_constraints,
    "in_spec": _spec,
    "out_spec": _spec,
    "metadata": _metadata,
}


def _safe_ast(text: str, allowed) -> bool:
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return all(allowed(node) for node in ast.walk(tree))


def _sympy_node(node: ast.AST) -> bool:
    if isinstance(node, _STRUCTURE + _OPERATORS):
        return True
    if isinstance(node, ast.Call):
        return isinstance(node.func, ast.Name) and node.func.id in SYMPY_NAMES
    if isinstance(node, ast.keyword):
        return node.arg in SYMPY_ASSUMPTIONS
    if isinstance(node, ast.Name):
        return node.id in SYMPY_NAMES or bool(_SYMBOL.match(node.id))  # never a builtin: those end in no digit
    if isinstance(node, ast.Constant):
        value = node.value
        return isinstance(value, bool | int | float) or (isinstance(value, str) and _plain_name(value))
    return False


def _plain_name(text: str) -> bool:
    return bool(_IDENT.match(text)) and "__" not in text


def _guard_node(node: ast.AST) -> bool:
    if isinstance(node, _STRUCTURE + _OPERATORS + (ast.Subscript, ast.Slice)):
        return True
    if isinstance(node, ast.Call):
        func = node.func
        return (isinstance(func, ast.Name) and func.id in GUARD_NAMES) or (
            isinstance(func, ast.Attribute) and func.attr in GUARD_ATTRS
        )
    if isinstance(node, ast.Attribute):
        return node.attr in GUARD_ATTRS
    if isinstance(node, ast.Name):
        return node.id in GUARD_NAMES
    if isinstance(node, ast.Constant):
        value = node.value
        return value is None or isinstance(value, bool | int | float) or bool(_GUARD_TEXT.match(str(value)))
    return False


def _register_transformers_outputs() -> None:
    """Hugging Face output classes register with pytree when the library imports them (no code from the file)."""
    try:
        import transformers.modeling_outputs  # noqa: F401
    except ImportError:
        pass


# ---- payloads ----------------------------------------------------------------------------------------------------


def _payloads(path: Path, reader: Any, files: set[str], kind: str) -> dict[str, Any]:
    """Weights or constants: raw tensors as torch lays them out; pickled ones read weights-only."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import deserialize_size, deserialize_storage_offset, deserialize_stride
    from torch.export.pt2_archive._package import _build_file_map, _dict_to_dataclass

    config_file = f"data/{kind}/model_{kind}_config.json"
    if config_file not in files:
        raise KancError(f"{path} is a torch.export archive without {config_file}")
    try:
        doc = json.loads(reader.read_string(config_file))
        check_program(doc)
        config = _dict_to_dataclass(schema.PayloadConfig, doc)
        file_map = _build_file_map(reader, _without_pickles(config), f"data/{kind}/")
    except Exception as e:  # noqa: BLE001 - a tampered config fails in many ways
        raise KancError(f"{path} has an unreadable {config_file}: {_first_line(e)}") from None
    out: dict[str, Any] = {}
    for fqn, meta in config.config.items():
        if meta.use_pickle or meta.path_name.startswith(_PICKLED_PREFIXES):
            out[fqn] = _pickled(path, reader, f"data/{kind}/{meta.path_name}", f"{kind[:-1]} {fqn}")
            continue
        tm = meta.tensor_meta
        tensor = torch.as_strided(
            file_map[meta.path_name], deserialize_size(tm.sizes), deserialize_stride(tm.strides),
            deserialize_storage_offset(tm.storage_offset),
        )  # fmt: skip
        out[fqn] = torch.nn.Parameter(tensor, requires_grad=tm.requires_grad) if meta.is_param else tensor
    return out


def _without_pickles(config: Any) -> Any:
    import dataclasses

    kept = {k: v for k, v in config.config.items() if not (v.use_pickle or v.path_name.startswith(_PICKLED_PREFIXES))}
    return dataclasses.replace(config, config=kept)


def _pickled(path: Path, reader: Any, entry: str, what: str) -> Any:
    """A pickled tensor, read weights-only; custom and opaque objects (TorchScript / plain pickle) are refused."""
    name = entry.rsplit("/", 1)[-1]
    if name.startswith(_PICKLED_PREFIXES):
        raise _needs_trust(path, what)
    return _weights_only(path, reader.read_bytes(entry), what)


def _sample_inputs(path: Path, reader: Any, files: set[str]) -> Any:
    entry = "data/sample_inputs/model.pt"
    if entry not in files:
        return None
    data = reader.read_bytes(entry)
    if not data:
        return None
    inputs = _weights_only(path, data, "sample_inputs")
    if not (isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[1], dict)):
        raise KancError(f"{path} has sample_inputs that are not (args, kwargs)")
    return inputs


def _weights_only(path: Path, data: bytes, what: str) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            raise _needs_trust(path, what) from None
        raise KancError(f"{path} has a corrupt {what} ({_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - torch.load raises many types on bad bytes
        raise KancError(f"{path} has a corrupt {what} ({_first_line(e)})") from None


def _needs_trust(path: Path, what: str) -> KancError:
    return KancError(
        f"{path} holds pickled data ({what}) that runs code when loaded: pass --trust-pickle (trust_pickle=True) "
        "if you trust its source"
    )


def _quote(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return "'" + printable(text[:80] + ("..." if len(text) > 80 else "")) + "'"


def _first_line(e: BaseException) -> str:
    lines = [s.strip() for s in str(e).strip().splitlines() if s.strip()]
    return printable(lines[0]) if lines else type(e).__name__
