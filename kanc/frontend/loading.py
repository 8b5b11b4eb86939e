"""The reading policy: every file kanc reads goes through this module, and only ``trust_pickle`` lets one run code.

Model formats (``detect_format``), recognised from their contents, not their names:
- ``pickle``: ``torch.save(model)``, a whole module pickled. Loading it runs code from the file, so it loads only
  with ``trust_pickle=True`` (``--trust-pickle``).
- ``state_dict``: ``torch.save(model.state_dict())`` (or a checkpoint dict holding one under a usual key such
  as ``"state_dict"`` / ``"model"``), loaded with ``weights_only=True``; the module is rebuilt from ``arch``.
- ``safetensors``: weights only, like ``state_dict``.
- ``pt2``: ``torch.export.save``; read part by part without running anything (``kanc.frontend.pt2``), as the
  ExportedProgram's module (an aten-level GraphModule). Pickled parts need ``trust_pickle``.
- ``torchscript``: ``torch.jit.save``; refused: there is no Python module to rewrite.
- ``hf_dir``: a directory from ``save_pretrained`` (``config.json`` + weights), rebuilt with transformers from the
  class its config names, offline, weights-only, never with the folder's own code (``auto_map`` is refused).
Anything else (empty, truncated, foreign, unreadable) is a :class:`KancError` with a one-line reason.

Other files: ``read_json`` (manifests and configs: data only), ``read_inputs`` (model inputs, weights-only),
``read_weights`` (the weights of a model kanc wrote). Code runs only where the user names it: ``build_arch`` imports
the ``--arch`` they give; an architecture named by a file (a manifest) is built only when the user names the same
one or trusts the file (``arch_to_build``).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import pickle
import struct
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kanc.errors import KancError, first_line, os_error, printable
from kanc.text import first_names

FORMATS = ("pickle", "state_dict", "pt2", "torchscript", "safetensors", "hf_dir")
# Keys under which training checkpoints usually keep the weights (Lightning, timm, plain loops).
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "weights")
_SAFETENSORS_MAX_HEADER = 100 * 2**20
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_JSON_MAX = 64 * 2**20  # manifests and configs are small: a bigger one is not what it claims to be


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
    if not path.is_file():
        raise KancError(f"{path} is not a regular file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise os_error(e, path, "cannot read") from None
    if size == 0:
        raise KancError(f"{path} is empty")
    if head[:4] == b"PK\x03\x04":
        return _zip_format(path)
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "state_dict"  # legacy (pre-zip) torch.save; pickle vs weights decided on load
    if _is_safetensors(path, head, size):
        return "safetensors"
    raise KancError(f"{path} is not a PyTorch model file ({_describe_foreign(path, head)})")


def zip_names(path: Path) -> list[str]:
    """The entry names of the zip archive at ``path`` (nothing extracted); KancError when it is not one."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise KancError(f"{path} is truncated or corrupt (bad zip archive: {printable(str(e))})") from None


def _zip_format(path: Path) -> str:
    names = zip_names(path)
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
    kwargs = parse_kwargs(arch_kwargs)
    if fmt == "torchscript":
        raise KancError(
            f"{path} is TorchScript (torch.jit.save): it has no Python module to rewrite; save the model with "
            "torch.save(model) or torch.save(model.state_dict()) and pass --arch"
        )
    if fmt == "pt2":
        return _load_pt2(path, trust_pickle)
    if fmt == "hf_dir":
        return LoadedModel(_load_hf_dir(path, arch, kwargs, trust_pickle), fmt, path, arch, kwargs)
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


def parse_kwargs(arch_kwargs: Mapping[str, Any] | str | None) -> dict[str, Any]:
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
        if not _needs_full_unpickler(e):
            raise KancError(f"{path} is truncated or corrupt ({first_line(e)})") from None
    except OSError as e:
        raise os_error(e, path, "cannot read") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise KancError(f"{path} is truncated or corrupt ({first_line(e)})") from None
    if not trust_pickle:
        raise KancError(
            f"{path} is a pickled whole model (torch.save(model)); loading it runs code from the file: pass "
            "--trust-pickle (trust_pickle=True) if you trust its source, or save a state_dict and pass --arch"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=False), "pickle"
    except (ModuleNotFoundError, AttributeError) as e:
        raise KancError(
            f"cannot unpickle {path}: {first_line(e)}; the model's classes must be importable under the module "
            "path they were saved from (add their directory to PYTHONPATH)"
        ) from None
    except Exception as e:  # noqa: BLE001 - a trusted pickle can fail in any way its code does
        raise KancError(f"cannot unpickle {path}: {first_line(e)}") from None


def _needs_full_unpickler(e: pickle.UnpicklingError) -> bool:
    """torch.load(weights_only=True) refused a global (a class or function): only the full unpickler would load it."""
    return "weights only" in str(e).lower() or "weights_only" in str(e).lower()


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
    load_weights(module, weights, path, arch)
    return module


def load_weights(
    module: nn.Module, weights: Mapping[str, Tensor], path: Any, what: str, ignore=(), assign: bool = False
) -> None:
    """``module.load_state_dict(weights)``, every mismatch named in one line (torch's message puts them on the lines
    after a header); missing keys listed in ``ignore`` (tied weights saved once) are not mismatches. ``assign``: the
    tensors become the parameters (dtype kept; for a module built on the meta device)."""
    try:
        result = module.load_state_dict(weights, strict=False, assign=assign)
    except RuntimeError as e:  # size mismatches: torch lists them one per line after a header line
        detail = [s.strip() for s in str(e).splitlines()[1:] if s.strip()] or [first_line(e)]
        more = f" (+{len(detail) - 1} more)" if len(detail) > 1 else ""
        raise KancError(f"the weights in {path} do not fit {what}: {detail[0]}{more}") from None
    missing = [k for k in result.missing_keys if k not in set(ignore)]
    problems = [f"missing {first_names(missing)}"] if missing else []
    problems += [f"unexpected {first_names(result.unexpected_keys)}"] if result.unexpected_keys else []
    if problems:
        raise KancError(f"the weights in {path} do not fit {what}: {'; '.join(problems)}")


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
        raise KancError(f"cannot build {arch}({_kwargs_text(kwargs)}): {first_line(e)}") from None
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
        raise KancError(f"cannot import {name!r} for --arch: {first_line(e)}") from None


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
        raise KancError(f"cannot import {file}: {first_line(e)}") from None
    finally:
        sys.path.remove(str(path.parent))
    return module


def _kwargs_text(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _load_pt2(path: Path, trust_pickle: bool) -> LoadedModel:
    from kanc.frontend.pt2 import read_exported

    exported = read_exported(path, trust_pickle)
    try:
        module = exported.module()
    except Exception as e:  # noqa: BLE001 - unlifting raises many types
        raise KancError(f"{path} is a torch.export archive that does not load: {first_line(e)}") from None
    return LoadedModel(_with_mode_switch(module), "pt2", path, exported=exported)


def _with_mode_switch(module: nn.Module) -> nn.Module:
    """ExportedProgram.module() makes train()/eval() raise; give them back. The graph keeps the mode it was exported
    in (dropout, batch norm), so they set the ``training`` flags only: what kanc's own layers read."""
    for name in ("train", "eval"):
        if name in module.__dict__:
            delattr(module, name)  # back to nn.Module's methods
    return module


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise KancError(f"{path} is a safetensors file: install safetensors to read it") from None
    try:
        return load_file(str(path), device="cpu")
    except OSError as e:
        raise os_error(e, path, "cannot read") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise KancError(f"{path} is truncated or corrupt ({first_line(e)})") from None


def _load_hf_dir(path: Path, arch: str | None, kwargs: dict[str, Any], trust_pickle: bool) -> nn.Module:
    """A save_pretrained folder: the class named by its config (or ``arch``), loaded offline."""
    try:
        import transformers
    except ImportError:
        raise KancError(f"{path} is a Hugging Face model folder: install transformers to read it") from None
    check_hf_config(read_json(path / "config.json", "config"), path / "config.json")
    if "trust_remote_code" in kwargs:
        raise KancError("--arch-kwargs cannot set trust_remote_code: kanc never runs a model folder's own code")
    if not any((path / name).is_file() for name in _HF_WEIGHTS):
        raise KancError(f"{path} has config.json but no weights ({' or '.join(_HF_WEIGHTS[::2])})")
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise KancError(f"{path}/config.json does not load: {first_line(e)}") from None
    cls = _import_arch(arch) if arch else _hf_class(transformers, config, path)
    try:
        model, info = cls.from_pretrained(
            path,
            config=config,
            local_files_only=True,
            trust_remote_code=False,
            weights_only=not trust_pickle,
            output_loading_info=True,
        )
    except Exception as e:  # noqa: BLE001
        if "weights only load failed" in str(e).lower():
            raise KancError(
                f"{path} holds pickled weights that run code when loaded: pass --trust-pickle if you trust its "
                "source, or save the model with safetensors"
            ) from None
        raise KancError(f"cannot load {path} as {cls.__name__}: {first_line(e)}") from None
    _check_loading_info(info, path, cls.__name__)
    return model.eval()


def _check_loading_info(info: Any, path: Path, name: str) -> None:
    """from_pretrained fills a weight the folder lacks (or holds in another shape) with a fresh random init and only
    logs a warning: a conversion of that model would faithfully convert the wrong numbers. Refuse it instead.
    Tensors the folder holds and the class does not use are dropped, as transformers does."""
    info = info if isinstance(info, dict) else {}
    missing = sorted(info.get("missing_keys") or [])
    mismatched = [k[0] if isinstance(k, tuple | list) else k for k in info.get("mismatched_keys") or []]
    if missing:
        raise KancError(f"{path} does not fill {name}: no tensor for {first_names(missing)}")
    if mismatched:
        raise KancError(f"{path} does not fit {name}: wrong shape for {first_names(sorted(mismatched))}")


def check_hf_config(config: Any, where: Path) -> None:
    """A Hugging Face config kanc may build from: a JSON object that maps no class to the folder's own code."""
    if not isinstance(config, dict):
        raise KancError(f"{where} is not a JSON object")
    if config.get("auto_map"):
        raise KancError(
            f"{where} maps the model to Python code in its folder (auto_map): kanc never runs a model folder's "
            "code; load the model yourself, save its state_dict and pass --arch"
        )


def _hf_class(transformers: Any, config: Any, path: Path) -> Any:
    names = getattr(config, "architectures", None) or []
    for name in names:
        cls = hf_model_class(name)
        if cls is not None:
            return cls
    if names:
        name = printable(str(names[0]))
        raise KancError(f"{path}: transformers has no model class '{name}'; pass --arch module:Class")
    return transformers.AutoModel


def hf_model_class(name: Any) -> Any:
    """transformers' model class called ``name`` (a PreTrainedModel subclass), or None."""
    import transformers

    cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    ok = inspect.isclass(cls) and issubclass(cls, transformers.PreTrainedModel)
    return cls if ok else None


# ---- data files: JSON, inputs, weights ----------------------------------------------------------------------------


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """The JSON document at ``path`` (data only: nothing in it is imported or called here)."""
    path = Path(path)
    if not path.is_file():  # a FIFO or device would block or never end
        raise KancError(f"{path} is not a regular file (expected a {what})")
    try:
        with open(path, "rb") as f:
            data = f.read(_JSON_MAX + 1)
    except OSError as e:
        raise os_error(e, path, f"cannot read the {what}") from None
    if len(data) > _JSON_MAX:
        raise KancError(f"{path} is not a {what}: larger than {_JSON_MAX >> 20} MiB")
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise KancError(f"{path} is not a valid {what} (bad JSON: {first_line(e)})") from None


def read_inputs(path: str | os.PathLike, what: str = "inputs") -> Any:
    """Model inputs ``torch.save``d at ``path`` (a tensor, a tuple/list or a dict holding tensors), weights-only."""
    path = Path(path)
    if not path.is_file():
        raise KancError(f"{what} file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise os_error(e, path, f"cannot read the {what}") from None
    except Exception as e:  # noqa: BLE001 - any unreadable file is one line for the user
        hint = " (it holds pickled objects, which kanc never unpickles here)" if _pickled(e) else ""
        raise KancError(
            f"cannot read {what} from {path} (expected torch.save of tensors){hint}: {first_line(e)}"
        ) from None
    if not _has_tensor(obj):
        raise KancError(f"{path} holds no tensor: save a tensor, a tuple of tensors or a dict of tensors")
    return obj


def _pickled(e: Exception) -> bool:
    return isinstance(e, pickle.UnpicklingError) and _needs_full_unpickler(e)


def _has_tensor(obj: Any) -> bool:
    if isinstance(obj, Tensor):
        return True
    if isinstance(obj, dict):
        return any(_has_tensor(v) for v in obj.values())
    if isinstance(obj, tuple | list):
        return any(_has_tensor(v) for v in obj)
    return False


def read_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a weights file (state_dict or safetensors) or of a save_pretrained folder's weight files."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "hf_dir":
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
        if not files:
            raise KancError(f"{path} has no weight files")
        weights: dict[str, Tensor] = {}
        for f in files:
            weights.update(read_weights(f))
        return weights
    if fmt == "safetensors":
        return _load_safetensors(path)
    if fmt == "pt2" or fmt == "torchscript":
        raise KancError(f"{path} is a {fmt} file, not weights")
    obj, _ = _torch_load(path, trust_pickle=False)
    if not _is_state_dict(obj):
        raise KancError(f"{path} does not hold a state_dict")
    return dict(obj)


def arch_to_build(given: str | None, named: Any, trust: bool, where: Path) -> str | None:
    """The architecture to import: the user's (``given``), else the one a file names (``named``) only if trusted.

    A manifest is exactly as untrusted as the model beside it: importing what it names runs that code.
    """
    if given is not None:
        return given
    if not named:
        return None
    if not isinstance(named, str):
        raise KancError(f"{where} names an architecture that is not a string")
    if not trust:
        raise KancError(
            f"{where} names the architecture '{printable(named)}'; kanc imports it only when you name it too: pass "
            f"--arch {printable(named)} (arch=...) if you trust that code, or --trust-pickle if you trust this file"
        )
    return named
