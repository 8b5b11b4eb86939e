"""Model files in, safely: recognise the format, refuse what cannot be loaded without running code, say why.

Formats (``detect_format``):
- ``pickle``: ``torch.save(model)``, a whole module pickled. Loading it runs code from the file, so it
  loads only with ``trust_pickle=True`` (``--trust-pickle``).
- ``state_dict``: ``torch.save(model.state_dict())`` (or a checkpoint dict holding one under a usual key such
  as ``"state_dict"`` / ``"model"``), loaded with ``weights_only=True``; the module is rebuilt from ``arch``.
- ``safetensors``: weights only, like ``state_dict``.
- ``pt2``: ``torch.export.save``; loads as the ExportedProgram's module (an aten-level GraphModule).
- ``torchscript``: ``torch.jit.save``; refused: there is no Python module to rewrite.
- ``hf_dir``: a directory from ``save_pretrained`` (``config.json`` + weights), rebuilt with transformers
  from the class its config names, offline.
Anything else (empty, truncated, foreign) is a :class:`KancError` with a one-line reason.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import pickle
import shutil
import struct
import sys
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kanc.errors import KancError

FORMATS = ("pickle", "state_dict", "pt2", "torchscript", "safetensors", "hf_dir")
# Keys under which training checkpoints usually keep the weights (Lightning, timm, plain loops).
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "weights")
_SAFETENSORS_MAX_HEADER = 100 * 2**20
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class LoadedModel:
    """A model read from disk, and what it was.

    ``module`` is the nn.Module (for ``pt2``, the ExportedProgram's module: a GraphModule of aten ops);
    ``exported`` is the ExportedProgram itself for ``pt2`` (its ``example_inputs`` allow re-export), else None.
    """

    module: nn.Module
    format: str
    path: Path
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    exported: Any = None


def detect_format(path: str | os.PathLike) -> str:
    """The format of ``path`` (one of FORMATS), from its contents, not its name; KancError when unknown."""
    path = Path(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf_dir"
        raise KancError(f"{path} is a directory without config.json (not a save_pretrained folder)")
    if not path.exists():
        raise KancError(f"model file not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise KancError(f"{path} is empty")
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return _zip_format(path)
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "state_dict"  # legacy (pre-zip) torch.save; pickle vs weights decided on load
    if _is_safetensors(path, head, size):
        return "safetensors"
    raise KancError(f"{path} is not a PyTorch model file ({_describe_foreign(path, head)})")


def _zip_format(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise KancError(f"{path} is truncated or corrupt (bad zip archive: {e})") from None
    tails = {n.split("/", 1)[1] if "/" in n else n for n in names}
    if "archive_format" in tails or any(t.startswith("models/") for t in tails):
        return "pt2"
    if any(t.startswith("code/") for t in tails) or "constants.pkl" in tails:
        return "torchscript"
    if "data.pkl" in tails:
        return "state_dict"  # or a whole-module pickle: told apart by the weights-only load
    raise KancError(f"{path} is a zip archive but not one torch.save, torch.export or torch.jit wrote")


def _is_safetensors(path: Path, head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 0 < header_len <= min(size - 8, _SAFETENSORS_MAX_HEADER) and head[8:9] == b"{"


def _describe_foreign(path: Path, head: bytes) -> str:
    if path.suffix.lower() == ".onnx":
        return "looks like ONNX: kanc converts PyTorch models, export yours with torch.save instead"
    if head.lstrip()[:1] in (b"{", b"["):
        return "looks like JSON or text"
    return f"unrecognised header {head[:8]!r}"


def load_model(
    path: str | os.PathLike,
    *,
    trust_pickle: bool = False,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | str | None = None,
) -> LoadedModel:
    """Load the model at ``path`` on the CPU (see the module docstring for what each format needs).

    ``arch`` is ``"package.module:Class"`` or ``"path/to/file.py:Class"`` (a class or a function returning a
    module), called with ``arch_kwargs`` (a dict or a JSON object string).
    """
    path = Path(path)
    fmt = detect_format(path)
    kwargs = _parse_kwargs(arch_kwargs)
    if fmt == "torchscript":
        raise KancError(
            f"{path} is TorchScript (torch.jit.save): it has no Python module to rewrite; save the model with "
            "torch.save(model) or torch.save(model.state_dict()) and pass --arch"
        )
    if fmt == "pt2":
        return _load_pt2(path)
    if fmt == "hf_dir":
        return LoadedModel(_load_hf_dir(path, arch, kwargs), fmt, path, arch, kwargs)
    if fmt == "safetensors":
        weights = _load_safetensors(path)
        return LoadedModel(_with_weights(weights, path, arch, kwargs), fmt, path, arch, kwargs)
    obj, fmt = _torch_load(path, trust_pickle)
    if isinstance(obj, nn.Module):
        if arch is not None:
            raise KancError(f"{path} holds a whole module; --arch is only for files that hold weights")
        return LoadedModel(obj, fmt, path)
    weights = _find_state_dict(obj, path)
    return LoadedModel(_with_weights(weights, path, arch, kwargs), "state_dict", path, arch, kwargs)


def _parse_kwargs(arch_kwargs: Mapping[str, Any] | str | None) -> dict[str, Any]:
    if arch_kwargs is None or arch_kwargs == "":
        return {}
    if isinstance(arch_kwargs, str):
        try:
            arch_kwargs = json.loads(arch_kwargs)
        except ValueError as e:
            raise KancError(f"architecture kwargs are not valid JSON: {e}") from None
    if not isinstance(arch_kwargs, Mapping):
        raise KancError("architecture kwargs must be a JSON object, e.g. '{\"dim\": 64}'")
    return dict(arch_kwargs)


def _torch_load(path: Path, trust_pickle: bool) -> tuple[Any, str]:
    """(object, format): weights-only first; a whole-module pickle only when trusted."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True), "state_dict"
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower() and "weights_only" not in str(e).lower():
            raise KancError(f"{path} is truncated or corrupt ({_first_line(e)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise KancError(f"{path} is truncated or corrupt ({_first_line(e)})") from None
    if not trust_pickle:
        raise KancError(
            f"{path} is a pickled whole model (torch.save(model)); loading it runs code from the file: pass "
            "--trust-pickle (trust_pickle=True) if you trust its source, or save a state_dict and pass --arch"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=False), "pickle"
    except (ModuleNotFoundError, AttributeError) as e:
        raise KancError(
            f"cannot unpickle {path}: {_first_line(e)}; the model's classes must be importable under the module "
            "path they were saved from (add their directory to PYTHONPATH)"
        ) from None
    except Exception as e:  # noqa: BLE001 - a trusted pickle can fail in any way its code does
        raise KancError(f"cannot unpickle {path}: {_first_line(e)}") from None


def _find_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    """The tensor mapping inside ``obj``: the object itself, or a checkpoint's weights under a usual key."""
    if _is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in CHECKPOINT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                return inner.state_dict()
            if _is_state_dict(inner):
                return dict(inner)
        keys = ", ".join(repr(k) for k in list(obj)[:8])
        raise KancError(f"{path} holds a dict without model weights (keys: {keys})")
    raise KancError(f"{path} holds a {type(obj).__name__}, not a model or a state_dict")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def _with_weights(weights: dict[str, Tensor], path: Path, arch: str | None, kwargs: dict[str, Any]) -> nn.Module:
    """Build ``arch`` and load ``weights`` into it strictly."""
    if arch is None:
        raise KancError(
            f"{path} holds only weights (a state_dict of {len(weights)} tensors): pass --arch package.module:Class "
            "(and --arch-kwargs JSON) to rebuild the model"
        )
    module = build_arch(arch, kwargs)
    try:
        result = module.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # size mismatches: torch lists them one per line after a header line
        detail = [s.strip() for s in str(e).splitlines()[1:] if s.strip()] or [_first_line(e)]
        raise KancError(f"the weights in {path} do not fit {arch}: {detail[0]}") from None
    problems = [f"missing {_names(result.missing_keys)}"] if result.missing_keys else []
    problems += [f"unexpected {_names(result.unexpected_keys)}"] if result.unexpected_keys else []
    if problems:
        raise KancError(f"the weights in {path} do not fit {arch}: {'; '.join(problems)}")
    return module


def _names(keys: list[str], shown: int = 4) -> str:
    more = f" (+{len(keys) - shown} more)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def build_arch(arch: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Construct ``"package.module:Name"`` or ``"path/file.py:Name"`` with ``kwargs``.

    ``Name`` may be a class or a factory function. A Hugging Face model class (one with ``config_class``) is
    built from ``config_class(**kwargs)``.
    """
    kwargs = dict(kwargs or {})
    target = _import_arch(arch)
    config_class = getattr(target, "config_class", None)
    try:
        if inspect.isclass(target) and config_class is not None and issubclass(target, nn.Module):
            module = target(config_class(**kwargs))
        else:
            module = target(**kwargs)
    except Exception as e:  # noqa: BLE001 - user code: any failure becomes one line
        raise KancError(f"cannot build {arch}({_kwargs_text(kwargs)}): {_first_line(e)}") from None
    if not isinstance(module, nn.Module):
        raise KancError(f"{arch} returned a {type(module).__name__}, not an nn.Module")
    return module


def _import_arch(arch: str) -> Any:
    module_name, sep, attr = arch.rpartition(":")
    if not sep or not module_name or not attr:
        raise KancError(f"--arch must look like package.module:Class or path/to/file.py:Class, got {arch!r}")
    module = _import_file(module_name) if module_name.endswith(".py") else _import_module(module_name)
    target = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise KancError(f"{module_name} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise KancError(f"{arch} is not a class or a function")
    return target


def _import_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise KancError(f"cannot import {name!r} for --arch: {_first_line(e)}") from None


def _import_file(file: str) -> Any:
    path = Path(file).resolve()
    if not path.is_file():
        raise KancError(f"--arch file not found: {file}")
    name = f"_kanc_arch_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    sys.path.insert(0, str(path.parent))  # sibling imports of the user's file
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's file may fail in any way
        sys.modules.pop(name, None)
        raise KancError(f"cannot import {file}: {_first_line(e)}") from None
    finally:
        sys.path.remove(str(path.parent))
    return module


def _kwargs_text(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _load_pt2(path: Path) -> LoadedModel:
    try:
        exported = torch.export.load(path)
    except Exception as e:  # noqa: BLE001 - the deserializer raises many types
        raise KancError(f"{path} is a torch.export archive that does not load: {_first_line(e)}") from None
    return LoadedModel(exported.module(), "pt2", path, exported=exported)


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise KancError(f"{path} is a safetensors file: install safetensors to read it") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise KancError(f"{path} is truncated or corrupt ({_first_line(e)})") from None


def _load_hf_dir(path: Path, arch: str | None, kwargs: dict[str, Any]) -> nn.Module:
    """A save_pretrained folder: the class named by its config (or ``arch``), loaded offline."""
    try:
        import transformers
    except ImportError:
        raise KancError(f"{path} is a Hugging Face model folder: install transformers to read it") from None
    if not any((path / name).is_file() for name in _HF_WEIGHTS):
        raise KancError(f"{path} has config.json but no weights ({' or '.join(_HF_WEIGHTS[::2])})")
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise KancError(f"{path}/config.json does not load: {_first_line(e)}") from None
    cls = _import_arch(arch) if arch else _hf_class(transformers, config, path)
    try:
        return cls.from_pretrained(path, config=config, local_files_only=True).eval()
    except Exception as e:  # noqa: BLE001
        raise KancError(f"cannot load {path} as {cls.__name__}: {_first_line(e)}") from None


def _hf_class(transformers: Any, config: Any, path: Path) -> Any:
    names = getattr(config, "architectures", None) or []
    for name in names:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    if names:
        raise KancError(f"{path}: transformers has no class {names[0]!r}; pass --arch module:Class")
    return transformers.AutoModel


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, directory: bool = False) -> Path:
    """Create ``path`` atomically: ``write(tmp)`` fills a temporary sibling, which is then renamed onto ``path``.

    On any failure nothing is left behind (neither ``path`` nor the temporary). ``directory=True`` makes the
    temporary a folder (for multi-file outputs); an existing ``path`` is replaced (callers check ``--force``).
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise KancError(f"output directory does not exist: {parent}")
    prefix = f".{path.name}.kanc-tmp-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent) if directory else _mkstemp(prefix, path.suffix, parent))
    try:
        write(tmp)
        if directory and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    return path


def _mkstemp(prefix: str, suffix: str, parent: Path) -> str:
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=parent)
    os.close(fd)
    return name


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def _first_line(e: BaseException) -> str:
    lines = [s.strip() for s in str(e).strip().splitlines() if s.strip()]
    return lines[0] if lines else type(e).__name__
