"""A Hugging Face architecture without its weights: parameters on the meta device, filled in a few at a time.

``empty_model`` builds the class a folder's ``config.json`` names with every parameter on the meta device (no
memory, no random init) while buffers stay real: buffers computed at construction and not saved (RoPE's
``inv_freq``) are exactly what the checkpoint cannot give back. ``layer_lists`` finds the repeated layers to
stream; ``fill`` assigns checkpoint tensors to a module and ``release`` sends it back to the meta device.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from kanc.errors import KancError, first_line, printable
from kanc.frontend.loading import check_hf_config, hf_model_class, read_json
from kanc.text import first_names as _names  # local name kept: engineer scale owns the code below

LAYER_SHARE = 0.1  # a ModuleList holding at least this share of the parameters is a stack of layers to stream


@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """Inside, every parameter a module registers goes to the meta device (buffers stay where they are made)."""
    register = nn.Module.register_parameter

    def to_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            kind = type(module._parameters[name])
            module._parameters[name] = kind(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = to_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def read_config(folder: str | os.PathLike) -> Any:
    """The transformers config of a ``save_pretrained`` folder, offline; remote code is never run (a config that maps
    the model to the folder's own code is refused, as kanc's reader refuses it)."""
    transformers = _transformers(folder)
    check_hf_config(read_json(Path(folder) / "config.json", "config"), Path(folder) / "config.json")
    try:
        return transformers.AutoConfig.from_pretrained(Path(folder), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for bad configs
        raise KancError(f"{Path(folder) / 'config.json'} does not load: {first_line(e)}") from None


def empty_model(config: Any, cls: type | None = None) -> nn.Module:
    """``cls`` (default: the class ``config.architectures[0]`` names) with its parameters on the meta device, in
    eval mode."""
    if cls is None:
        _transformers(None)
        names = getattr(config, "architectures", None) or []
        cls = hf_model_class(names[0]) if names else None
        if cls is None:
            what = (
                f"transformers has no model class {printable(repr(names[0]))}"
                if names
                else "its config names no architecture"
            )
            raise KancError(f"cannot build the model: {what}")
    try:
        with meta_parameters():
            model = cls(config)
    except Exception as e:  # noqa: BLE001 - model code can fail in any way
        raise KancError(f"cannot build {cls.__name__} from its config: {first_line(e)}") from None
    return model.eval()


def layer_lists(model: nn.Module) -> list[str]:
    """Paths of the outermost ModuleLists that hold at least LAYER_SHARE of the parameters (the layer stacks)."""
    total = sum(p.numel() for p in model.parameters()) or 1
    found: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or any(name.startswith(f"{f}.") for f in found):
            continue
        if len(module) and sum(p.numel() for p in module.parameters()) >= LAYER_SHARE * total:
            found.append(name)
    if not found:
        raise KancError(f"{type(model).__name__} has no stack of layers to stream: convert it with kanc.compile")
    return found


def fill(module: nn.Module, tensors: Mapping[str, Tensor], where: str, skip: tuple[str, ...] = ()) -> None:
    """Give ``module`` the checkpoint's ``tensors`` (names relative to it, dtypes kept); every parameter needed.

    Parameters under the ``skip`` prefixes may stay on the meta device (the layers, filled later). Tied weights
    are tied again after the assignment replaced one of them.
    """
    result = module.load_state_dict(dict(tensors), strict=False, assign=True)
    if result.unexpected_keys:
        raise KancError(
            f"the checkpoint's tensors do not fit {where or 'the model'}: unexpected {_names(result.unexpected_keys)}"
        )
    tie = getattr(module, "tie_weights", None)
    if callable(tie):
        tie()
    empty = [n for n, p in module.named_parameters() if p.is_meta and not n.startswith(skip)]
    if empty:
        raise KancError(f"the checkpoint has no tensor for {_names([_join(where, n) for n in empty])}")


def release(module: nn.Module) -> None:
    """Drop the tensors a checkpoint holds: parameters and persistent buffers go to the meta device.

    Buffers a checkpoint does not hold (computed at construction, like RoPE's ``inv_freq``) stay. Call
    ``return_memory`` once the tensors are gone.
    """
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None and not p.is_meta:
                m._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)
        for name, b in m._buffers.items():
            if b is not None and name not in m._non_persistent_buffers_set:
                m._buffers[name] = b.to("meta")


def return_memory() -> None:
    """Give freed heap memory back to the system (glibc keeps it otherwise: the process would grow by about a
    layer per layer streamed). A no-op where ``malloc_trim`` does not exist."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM: Any = None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _transformers(folder: str | os.PathLike | None) -> Any:
    try:
        import transformers
    except ImportError:
        where = f"{folder} is a Hugging Face model folder: " if folder else ""
        raise KancError(f"{where}install transformers to convert it") from None
    return transformers


# ---- the checkpoint against the architecture ------------------------------------------------------------------------


def ignored_keys(model: nn.Module, keys: list[str]) -> set[str]:
    """Checkpoint tensors the architecture does not have and says to ignore (old GPT-2 ``attn.bias`` buffers)."""
    patterns = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
    known = set(model.state_dict().keys())
    return {k for k in keys if k not in known and any(re.search(p, k) for p in patterns)}


class NeedsWeightConversion(KancError):
    """The checkpoint names or shapes its tensors as transformers converts them on load (renamed, or per-expert
    tensors merged into stacked ones): streaming by name cannot read it; loading the model whole can."""


def check_keys(model: nn.Module, shapes: Mapping[str, tuple[int, ...]], ignored: set[str]) -> None:
    """The checkpoint (tensor name -> shape) holds every tensor the model needs, in its shape, and nothing else.

    A tensor tied to another (saved once by save_pretrained) may be missing when its partner is there. A mismatch
    in a model transformers converts on load (``NeedsWeightConversion``) says so.
    """
    try:
        _check_keys(model, shapes, ignored)
    except KancError as e:
        conversions = load_time_conversions(model)
        if conversions:
            raise NeedsWeightConversion(
                f"{e}: transformers converts this checkpoint's tensors when it loads {type(model).__name__} "
                f"({', '.join(conversions)}), which streaming tensor by tensor does not do; convert the model "
                "loaded whole (`kanc convert DIR` falls back to that itself)"
            ) from None
        raise


def load_time_conversions(model: nn.Module) -> list[str]:
    """The kinds of transformers' own load-time weight conversions for ``model`` (renames, merges), model-specific
    ones only; empty where there are none or transformers has no such registry."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping

        transforms = get_model_conversion_mapping(model, add_legacy=False)
    except Exception:  # noqa: BLE001 - an older or newer transformers without this registry: nothing to say
        return []
    return sorted({type(t).__name__ for t in transforms or []})


def _check_keys(model: nn.Module, shapes: Mapping[str, tuple[int, ...]], ignored: set[str]) -> None:
    params = model.state_dict(keep_vars=True)
    where = type(model).__name__
    unexpected = [k for k in shapes if k not in params and k not in ignored]
    if unexpected:
        raise KancError(f"the checkpoint does not fit {where}: unexpected tensors {_names(unexpected)}")
    partners = _tied_keys(model)
    holders: dict[int, list[str]] = {}
    for name, tensor in params.items():
        holders.setdefault(id(tensor), []).append(name)
    missing = [
        k
        for k in params
        if k not in shapes and not any(n in shapes for n in holders[id(params[k])] + partners.get(k, []))
    ]
    if missing:
        raise KancError(f"the checkpoint does not fit {where}: no tensor for {_names(missing)}")
    for k, tensor in params.items():
        if k in shapes and tuple(tensor.shape) != tuple(shapes[k]):
            raise KancError(
                f"the checkpoint does not fit {where}: {k} has shape {list(shapes[k])}, not {list(tensor.shape)}"
            )


def _tied_keys(model: nn.Module) -> dict:
    """name -> the names it is tied to, from transformers' own mapping."""
    get = getattr(model, "get_expanded_tied_weights_keys", None)
    mapping = get(all_submodels=True) if callable(get) else {}
    tied: dict = {}
    for a, b in (mapping or {}).items():
        tied.setdefault(a, []).append(b)
        tied.setdefault(b, []).append(a)
    return tied


@contextlib.contextmanager
def settled_heap() -> Iterator[Callable[[], None]]:
    """Inside, the objects that exist at the start and at each call of the function it gives (the imports, the
    empty model) are out of the cyclic garbage collector's reach (``gc.freeze``) until the end.

    A full collection walks every tracked object: after transformers is imported (about 430,000 objects), 0.12 s
    each on this project's CPU machine, and a conversion ran 3-4 of them (0.3-0.5 s of GPT-2 medium's 7.3 s). Skipped
    when the process froze objects of its own (a forking server): unfreezing at the end would unfreeze those too.
    """
    own = gc.get_freeze_count() == 0

    def settle() -> None:
        if own:
            gc.freeze()

    settle()
    try:
        yield settle
    finally:
        if own:
            gc.unfreeze()
