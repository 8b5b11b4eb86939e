"""Measure one kanc conversion independently of kanc's own report.

For a built family and a target: the blocks converted (kanc layers found in the converted model, each assigned to
the expected block whose modules it sits in), the output error against the original in no_grad and in grad mode
(measured separately on the converted model), and the silent changes:

- the two modes disagree on the converted model;
- an expected block is neither converted nor covered by a skip of ``kanc.report``;
- a kanc layer that the forward never calls (forward hooks, in eval and train mode, with and without grad);
- the original model's parameters, buffers, module tree, attributes, hooks or outputs changed by the conversion.

The report is only read to cross-check: the number of blocks it says it converted, and its skips.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from families.base import Built, Expected, Family, quiet

CONFIGS = (("eval", False), ("eval", True), ("train", False), ("train", True))  # (mode, grad enabled)
MODE_TOL = 1e-5  # the two modes of one model compute the same function: fp32 round-off apart at most
ROOT_NAMES = ("", "<root>")


# ---- running a model -----------------------------------------------------------------------------------------


def clone_inputs(inputs: Any) -> Any:
    """A fresh copy of the inputs (a model or a conversion that writes into them cannot change the next run)."""
    if isinstance(inputs, Tensor):
        return inputs.detach().clone()
    if isinstance(inputs, Mapping):
        return {k: clone_inputs(v) for k, v in inputs.items()}
    if isinstance(inputs, list | tuple):
        return type(inputs)(clone_inputs(v) for v in inputs)
    return inputs


def call(model: nn.Module, inputs: tuple | dict) -> Any:
    inputs = clone_inputs(inputs)
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def tensors(out: Any) -> list[Tensor]:
    """The floating-point tensors of any output structure (tensor, tuple, dict, ModelOutput, dataclass), in order."""
    if isinstance(out, Tensor):
        return [out] if out.is_floating_point() or out.is_complex() else []
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in tensors(v)]
    if isinstance(out, list | tuple):
        return [t for v in out for t in tensors(v)]
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [t for f in dataclasses.fields(out) for t in tensors(getattr(out, f.name))]
    return []


def run(model: nn.Module, inputs: tuple | dict, grad: bool) -> list[Tensor]:
    """The model's output tensors with autograd on (``grad``) or off; detached copies."""
    with torch.set_grad_enabled(grad):
        return [t.detach().clone() for t in tensors(call(model, inputs))]


def rel_error(actual: list[Tensor], reference: list[Tensor]) -> float:
    """max over outputs of ||a - r|| / ||r|| in float64.

    Never optimistic: a NaN/inf in ``actual`` where the reference is finite, a missing or reshaped output, or a
    non-zero output against an all-zero reference all give inf; identical outputs give 0.
    """
    if len(actual) != len(reference):
        return math.inf
    worst = 0.0
    for a, r in zip(actual, reference):
        if a.shape != r.shape:
            return math.inf
        wide = torch.complex128 if a.is_complex() or r.is_complex() else torch.float64
        a, r = a.detach().to(wide), r.detach().to(wide)
        finite = torch.isfinite(r)
        if not torch.equal(torch.isfinite(a) | ~finite, torch.ones_like(finite)):
            return math.inf  # non-finite where the reference is finite
        if not torch.equal(a[~finite].nan_to_num(), r[~finite].nan_to_num()):
            return math.inf  # the reference's own inf/NaN entries must come back the same
        diff, norm = float((a - r)[finite].norm()), float(r[finite].norm())
        worst = max(worst, diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf))
    return worst


# ---- the original model, before and after ---------------------------------------------------------------------

_PLAIN = (int, float, bool, str, bytes, type(None))


def snapshot(model: nn.Module) -> dict:
    """Everything a conversion could change on the original: tensors, module tree, plain attributes, hooks."""
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, Tensor)}
    for path, buf in model.named_buffers(remove_duplicate=False):
        state.setdefault(path, buf.detach().clone())
    tree = [(path, type(m).__qualname__, id(m)) for path, m in model.named_modules(remove_duplicate=False)]
    attrs = {path: _attrs(m) for path, m in model.named_modules()}
    flags = {path: m.training for path, m in model.named_modules()}
    grads = {k: p.requires_grad for k, p in model.named_parameters(remove_duplicate=False)}
    return {"state": state, "tree": tree, "attrs": attrs, "flags": flags, "grads": grads}


def _attrs(module: nn.Module) -> dict:
    out = {}
    for key, value in vars(module).items():
        if key in ("_parameters", "_buffers", "_modules", "training"):
            continue
        if key.endswith("_hooks") or key.endswith("_hooks_with_kwargs") or key.endswith("_pre_hooks"):
            out[key] = len(value) if hasattr(value, "__len__") else repr(value)
        elif isinstance(value, _PLAIN):
            out[key] = value
        elif callable(value) and not isinstance(value, nn.Module):
            out[key] = ("callable", id(value))
    return out


def changes(before: dict, after: dict) -> list[str]:
    """What differs between two snapshots of the original model, one line each."""
    found = []
    b, a = before["state"], after["state"]
    if set(b) != set(a):
        found.append(f"state_dict keys changed: -{sorted(set(b) - set(a))[:3]} +{sorted(set(a) - set(b))[:3]}")
    for key in sorted(set(b) & set(a)):
        if b[key].shape != a[key].shape or b[key].dtype != a[key].dtype or not torch.equal(b[key], a[key]):
            found.append(f"tensor {key} changed")
    if before["tree"] != after["tree"]:
        found.append("module tree changed (a module was added, removed or swapped)")
    for path, attrs in before["attrs"].items():
        if after["attrs"].get(path, attrs) != attrs:
            diff = sorted(
                k for k in set(attrs) | set(after["attrs"][path]) if attrs.get(k) != after["attrs"][path].get(k)
            )
            found.append(f"attributes of {path or '<root>'} changed: {', '.join(diff)}")
    if before["flags"] != after["flags"]:
        found.append("train/eval mode of the original changed")
    if before["grads"] != after["grads"]:
        found.append("requires_grad of the original's parameters changed")
    return found


# ---- kanc layers in the converted model ------------------------------------------------------------------------


def is_kanc(module: nn.Module) -> bool:
    """A module defined in the kanc package (its layers and wrappers); judged by class, not by kanc's helpers."""
    return type(module).__module__.split(".")[0] == "kanc"


def kanc_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The outermost kanc modules of ``model`` by path (a kanc module inside another one is part of it)."""
    found: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        if is_kanc(module) and not any(within(path, p) for p in found):
            found[path] = module
    return found


def within(path: str, ancestor: str) -> bool:
    """``path`` is ``ancestor`` or below it (the root, "", contains everything). ``ancestor`` may be a glob: kanc
    names one skip for several modules of a class ``model.layers.*.self_attn``."""
    if ancestor in ROOT_NAMES or path == ancestor or path.startswith(ancestor + "."):
        return True
    return "*" in ancestor and (fnmatch.fnmatchcase(path, ancestor) or fnmatch.fnmatchcase(path, ancestor + ".*"))


def assign(paths: Iterable[str], expected: list[Expected]) -> tuple[dict[str, list[str]], list[str]]:
    """Each kanc layer to the expected block(s) it belongs to. Returns (block name -> kanc layer paths, unassigned).

    In order: the blocks it replaces whole (every scope path of the block lies under it: one SNNK module for a
    stack of experts); else the block whose scope holds it (deepest scope wins); else the one block whose name is
    its deepest ancestor (a module added beside the block's own, e.g. for a rewritten call site).
    """
    owned: dict[str, list[str]] = {e.name: [] for e in expected}
    unassigned = []
    for path in paths:
        blocks = _replaced(path, expected)
        if not blocks:
            one = _by_scope(path, expected) or _by_owner(path, expected)
            blocks = [one] if one is not None else []
        for block in blocks:
            owned[block.name].append(path)
        if not blocks:
            unassigned.append(path)
    return owned, unassigned


def _replaced(path: str, expected: list[Expected]) -> list[Expected]:
    return [e for e in expected if all(within(s, path) for s in e.scope)]


def _by_scope(path: str, expected: list[Expected]) -> Expected | None:
    hits = [(len(s), e) for e in expected for s in e.scope if within(path, s) and s not in ROOT_NAMES]
    return max(hits, key=lambda h: h[0])[1] if hits else None


def _by_owner(path: str, expected: list[Expected]) -> Expected | None:
    hits = [e for e in expected if within(path, e.name) and e.name not in ROOT_NAMES]
    if not hits:
        return None
    deepest = max(len(e.name) for e in hits)
    best = [e for e in hits if len(e.name) == deepest]
    return best[0] if len(best) == 1 else None


def covering_skip(block: Expected, skipped: list[dict]) -> dict | None:
    """The report skip that accounts for ``block``: one about the block, a part of it, or a module containing it."""
    for skip in skipped:
        name = str(skip.get("name", ""))
        if within(block.name, name) or any(within(s, name) or within(name, s) for s in block.scope):
            return skip
    return None


def called_layers(model: nn.Module, inputs: tuple | dict, layers: dict[str, nn.Module]) -> dict[str, Any]:
    """Which kanc layers each of eval/train x no_grad/grad calls. Restores the model's train/eval flags.

    A global module forward hook, filtered to the kanc layers: a hook on the layers themselves would change what
    runs (PyTorch's Transformer layers leave their fast path when any submodule has a hook).
    """
    calls: dict[str, Any] = {}
    hit: set[str] = set()
    by_id = {id(m): p for p, m in layers.items()}
    handle = torch.nn.modules.module.register_module_forward_hook(_recorder(hit, by_id))
    was_training = {p: m.training for p, m in model.named_modules()}
    try:
        for mode, grad in CONFIGS:
            model.train(mode == "train")
            hit.clear()
            key = f"{mode}/{'grad' if grad else 'no_grad'}"
            try:
                with torch.random.fork_rng():
                    run(model, inputs, grad)
                calls[key] = set(hit)
            except Exception as e:  # noqa: BLE001 - a failed train-mode forward is recorded, not fatal
                calls[key] = f"{type(e).__name__}: {_line(e)}"
    finally:
        handle.remove()
        for p, m in model.named_modules():
            m.training = was_training.get(p, False)
    return calls


def _recorder(hit: set[str], by_id: dict[int, str]) -> Callable:
    def hook(module, args, output):
        path = by_id.get(id(module))
        if path is not None:
            hit.add(path)

    return hook


def _line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""


# ---- one target, one family ------------------------------------------------------------------------------------

Convert = Callable[[nn.Module, str, Any], nn.Module]
Report = Callable[[nn.Module], Any]


def kanc_convert(model: nn.Module, target: str, inputs: Any) -> nn.Module:
    import kanc

    return kanc.compile(model, target=target, example_inputs=clone_inputs(inputs))


def kanc_report(model: nn.Module) -> Any:
    import kanc

    return kanc.report(model)


@dataclasses.dataclass
class Reference:
    """The original model's outputs in both modes, taken before any conversion."""

    no_grad: list[Tensor]
    grad: list[Tensor]
    mode_gap: float


@torch.no_grad()
def redraw_weights(model: nn.Module, seed: int = 0, scale: float = 0.2) -> int:
    """Seeded random weights at a scale where every block matters; returns how many parameters were redrawn.

    Libraries initialise for training (timm: N(0, 0.02); zero-initialised heads and AdaLN weights, 1e-5 layer
    scales), which leaves pre-activations near 0, where any smooth fit is exact, and MLP branches that hardly reach
    the output: an error measured there says nothing. So every matrix (ndim >= 2) is drawn N(0, 1 / fan_in), like
    a trained layer's scale, and every other constant parameter (zeros, ones, 1e-5) gets noise of ``scale`` around
    its value. Buffers (running statistics, position ids, masks) are left alone.
    """
    gen = torch.Generator().manual_seed(seed)
    redrawn = 0
    for _, p in model.named_parameters():
        if not p.numel() or not p.is_floating_point():
            continue
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
        if p.ndim >= 2:
            fan_in = max(1, p[0].numel())
            p.copy_(noise / math.sqrt(fan_in))
        elif bool((p == p.reshape(-1)[0]).all()):
            p.add_(scale * noise)
        else:
            continue
        redrawn += 1
    return redrawn


def reference_of(model: nn.Module, inputs: tuple | dict) -> Reference:
    no_grad, grad = run(model, inputs, False), run(model, inputs, True)
    if not no_grad:
        raise RuntimeError("the model returns no floating-point tensor to compare")
    if any(float(t.abs().max()) == 0 for t in no_grad if t.numel() > 1):
        raise RuntimeError("an output of the original model is all zeros: an error against it would measure nothing")
    if not all(torch.isfinite(t).all() for t in [*no_grad, *grad]):
        raise RuntimeError("the original model's output is not finite on the example inputs")
    return Reference(no_grad, grad, rel_error(grad, no_grad))


def measure_target(
    built: Built, ref: Reference, target: str, convert: Convert = kanc_convert, report: Report = kanc_report
) -> dict:
    """Convert ``built.model`` to ``target`` and measure the result (see the module docstring)."""
    row: dict[str, Any] = {"target": target, "status": "ok"}
    start = time.perf_counter()
    try:
        converted = convert(built.model, target, built.inputs)
        row["convert_seconds"] = time.perf_counter() - start
        rep = report(converted)
    except Exception as e:  # noqa: BLE001 - a crash is this target's failure, recorded
        return {**row, "status": "crashed", "error": f"{type(e).__name__}: {_line(e)}", "trace": _tail(e)}
    converted.eval()
    layers = kanc_layers(converted)
    owned, unassigned = assign(layers, built.expected)
    blocks = [b for b in built.expected if owned[b.name]]
    skipped = [dict(s) for s in getattr(rep, "skipped", [])]
    reported = [str(c.get("name", "")) for c in getattr(rep, "converted", [])]
    claimed = [b.name for b in built.expected if any(_names(n, b) for n in reported)]
    row.update(
        converted=len(blocks),
        converted_blocks=[b.name for b in blocks],
        kanc_layers=sorted(layers),
        unassigned_layers=unassigned,
        reported_converted=len(claimed),
        reported_blocks=claimed,
        reported_extra=[n for n in reported if not any(_names(n, b) for b in built.expected)],
        skips=len(skipped),
        skip_codes=sorted({str(s.get("code")) for s in skipped}),
        reported_error=_reported_error(rep),
    )
    row.update(_errors(converted, built.inputs, ref))
    row["not_converted"] = _not_converted(built.expected, owned, skipped)
    row["calls"] = called_layers(converted, built.inputs, layers)
    row["silent"] = _silent_target(row, ref)
    row["seconds"] = time.perf_counter() - start
    return row


def _tail(e: BaseException) -> str:
    return "".join(traceback.format_exception(type(e), e, e.__traceback__)[-3:])[-1500:]


def _names(entry: str, block: Expected) -> bool:
    """A report entry (named by its owner module) is about ``block``: the block itself, a part of it, or a module
    holding it (a layer that holds the block's linears, a stack of experts)."""
    return entry == block.name or any(within(entry, s) or within(s, entry) for s in block.scope)


def _reported_error(rep: Any) -> float | None:
    fid = getattr(rep, "fidelity", None) or {}
    outs = fid.get("outputs") if isinstance(fid, dict) else None
    return max(outs.values()) if outs else None


def _errors(converted: nn.Module, inputs: tuple | dict, ref: Reference) -> dict:
    try:
        no_grad, grad = run(converted, inputs, False), run(converted, inputs, True)
    except Exception as e:  # noqa: BLE001 - the converted model does not run: a failure, recorded
        return {"error_no_grad": math.inf, "error_grad": math.inf, "mode_gap": math.inf, "run_error": _line(e)}
    return {
        "error_no_grad": rel_error(no_grad, ref.no_grad),
        "error_grad": rel_error(grad, ref.grad),
        "mode_gap": rel_error(grad, no_grad),
    }


def _not_converted(expected: list[Expected], owned: dict, skipped: list[dict]) -> list[dict]:
    out = []
    for block in expected:
        if owned[block.name]:
            continue
        skip = covering_skip(block, skipped)
        entry = {"block": block.name, "listed": skip is not None}
        if skip is not None:
            entry.update(code=skip.get("code"), message=str(skip.get("message", ""))[:300])
        out.append(entry)
    return out


def _silent_target(row: dict, ref: Reference) -> list[str]:
    silent = []
    gap_allowed = max(MODE_TOL, 10 * ref.mode_gap)
    if not row["mode_gap"] <= gap_allowed:
        silent.append(f"no_grad and grad outputs of the converted model differ by {row['mode_gap']:.2e}")
    if not row["kanc_layers"]:
        for mode in ("no_grad", "grad"):
            if not row[f"error_{mode}"] <= gap_allowed:
                err = row[f"error_{mode}"]
                silent.append(f"{mode} output changed by {err:.2e} though no kanc layer is in the model")
    silent += [f"{n['block']} neither converted nor listed as a skip" for n in row["not_converted"] if not n["listed"]]
    for config, hit in row["calls"].items():
        if isinstance(hit, set):
            missed = [p for p in row["kanc_layers"] if p not in hit]
            silent += [f"kanc layer {p} is never called in {config}" for p in missed]
            row["calls"][config] = sorted(hit)
    return silent


def measure_family(
    family: Family, targets: Iterable[str] = ("grkan", "snnk"), convert: Convert = kanc_convert,
    report: Report = kanc_report,
) -> dict:  # fmt: skip
    """Build ``family`` once, convert it to each target, and measure everything; a crash becomes the row's status."""
    row: dict[str, Any] = {"family": family.name, "library": family.library, "named": family.named}
    start = time.perf_counter()
    try:
        with quiet():
            built = family.build()
            built.model.eval()
            redrawn = redraw_weights(built.model)
            ref = reference_of(built.model, built.inputs)
    except Exception as e:  # noqa: BLE001 - a family that does not build is recorded as failed
        return {**row, "status": "build_failed", "error": f"{type(e).__name__}: {_line(e)}", "trace": _tail(e)}
    row.update(
        status="ok", expected=len(built.expected), expected_blocks=[dataclasses.asdict(e) for e in built.expected]
    )
    row.update(threshold=family.threshold(built.expected), original_mode_gap=ref.mode_gap, redrawn=redrawn)
    row["targets"] = {}
    before = snapshot(built.model)
    changed: list[str] = []
    for target in targets:
        with quiet():
            row["targets"][target] = measure_target(built, ref, target, convert, report)
            changed += [f"after {target}: {c}" for c in changes(before, snapshot(built.model))]
    with quiet():
        changed += _output_changes(built, ref)
    row["original_changed"] = changed
    row["seconds"] = time.perf_counter() - start
    return row


def _output_changes(built: Built, ref: Reference) -> list[str]:
    out = []
    for grad, expected in ((False, ref.no_grad), (True, ref.grad)):
        try:
            now = run(built.model, built.inputs, grad)
        except Exception as e:  # noqa: BLE001 - the conversion broke the original: recorded
            out.append(f"the original no longer runs after conversion: {type(e).__name__}: {_line(e)}")
            break
        if len(now) != len(expected) or not all(torch.equal(a, b) for a, b in zip(now, expected)):
            out.append(f"the original's {'grad' if grad else 'no_grad'} outputs changed after conversion")
    return out


# ---- verdicts ------------------------------------------------------------------------------------------------


def silent_changes(row: dict) -> list[str]:
    """Every silent change of a family row: the original changed, and each target's own."""
    out = list(row.get("original_changed", []))
    for target, t in row.get("targets", {}).items():
        out += [f"{target}: {s}" for s in t.get("silent", [])]
    return out


def failures(row: dict) -> list[str]:
    """Why a family row fails issue 11's checks (empty when it passes; coverage is judged on the totals)."""
    if row["status"] != "ok":
        return [f"{row['status']}: {row.get('error', '')}"]
    out = silent_changes(row)
    for target, t in row["targets"].items():
        if t["status"] != "ok":
            out.append(f"{target} {t['status']}: {t.get('error', '')}")
            continue
        bound = row["threshold"] if target == "grkan" else math.inf  # SNNK approximates: finite is all it owes
        for mode in ("no_grad", "grad"):
            err = t[f"error_{mode}"]
            if not err <= bound:
                out.append(f"{target} output error ({mode}) {err:.2e} > {bound:.1e}")
        held, said = set(t["converted_blocks"]), set(t["reported_blocks"])
        if held != said:
            out.append(
                f"{target}: the report and the model disagree: converted in the report only {sorted(said - held)[:3]}"
                f", in the model only {sorted(held - said)[:3]}"
            )
    return out


def totals(rows: list[dict], targets: Iterable[str]) -> dict:
    """Converted / expected per target over the issue's families and over all, and the silent-change count."""
    out: dict[str, Any] = {}
    for scope, selected in (("named", [r for r in rows if r["named"]]), ("all", rows)):
        expected = sum(r.get("expected", 0) for r in selected)
        entry: dict[str, Any] = {"families": len(selected), "expected": expected}
        for target in targets:
            done = sum(r["targets"][target].get("converted", 0) for r in selected if target in r.get("targets", {}))
            entry[target] = {"converted": done, "fraction": done / expected if expected else None}
        entry["silent_changes"] = sum(len(silent_changes(r)) for r in selected)
        entry["failed_families"] = sorted(r["family"] for r in selected if failures(r))
        out[scope] = entry
    out["by_library"] = {lib: _converted(rs, targets) for lib, rs in _group(rows, "library").items()}
    return out


def _group(rows: list[dict], key: str) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r[key], []).append(r)
    return groups


def _converted(rows: list[dict], targets: Iterable[str]) -> dict:
    out: dict[str, Any] = {"expected": sum(r.get("expected", 0) for r in rows)}
    for target in targets:
        out[target] = sum(r["targets"][target].get("converted", 0) for r in rows if target in r.get("targets", {}))
    return out
