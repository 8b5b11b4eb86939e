"""``convert_checkpoint``: a ``save_pretrained`` folder converted layer by layer, never loaded whole.

The architecture is built with its parameters on the meta device. The tensors outside the layer stacks
(embeddings, final norm, head) are read, given to the model and written out unchanged. Then the model runs
forward on a few calibration sequences, and each decoder layer is handled when the forward reaches it, the way
sequential quantizers (GPTQ) calibrate: a hook reads the layer's tensors from the checkpoint, converts the layer in
place with ``kanc.compile`` (fitted on the hidden states it is given), lets it run, checks its output against the
original layer's on the same inputs, writes its tensors to the output shards and drops them. The converted layer's
output is what the next layer sees (``propagate="converted"``), or the original's (``"original"``).

Memory: the untouched tensors, one layer and its conversion, and the next layer (read ahead on a thread); a shard is
never held. The output folder is written through :mod:`kanc.writing` (a temporary sibling published once complete,
locked, never into or around the input); a failure leaves nothing behind.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kanc.api import check_options, require_blocks
from kanc.checkpoint import meta
from kanc.checkpoint.patterns import Patterns
from kanc.checkpoint.shards import (
    DEFAULT_SHARD_SIZE,
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointReader,
    ReadAhead,
    ShardWriter,
    parse_size,
)
from kanc.checkpoint.walk import (
    LayerWalk,
    calibration_inputs,
    describe,
    first_tensor,
    full_name,
    output_error,
    with_hidden,
)
from kanc.errors import CheckFailedError, KancError
from kanc.frontend.tracing import TRACING
from kanc.manifest import DIR_MANIFEST, attach, is_kanc_folder, make_manifest, manifest_source
from kanc.passes import calibrate
from kanc.passes.pipeline import Conversion, record_block_errors, run_pipeline
from kanc.passes.report import ConversionReport, build_report, count_params
from kanc.passes.verify import Snapshot, verify_equivalence
from kanc.writing import Output, check_outputs, write_outputs

PROPAGATE = ("converted", "original")
Progress = Callable[[str, int, int], None]


@dataclass
class LayerRecord:
    """One streamed layer: its blocks (names relative to it), its output error against the original layer on the
    same inputs (the worse grad mode, and per mode), the converted model's drift after it (None: not measured),
    its time."""

    name: str
    blocks: list[str]
    error: float
    seconds: float
    report: ConversionReport = field(repr=False)
    modes: dict[str, float] = field(default_factory=dict)
    drift: float | None = None

    def as_dict(self) -> dict:
        return {
            "name": self.name, "blocks": self.blocks, "error": self.error, "errors": self.modes,
            "drift": self.drift, "seconds": self.seconds,
        }  # fmt: skip


def convert_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    target: str = "grkan",
    *,
    calibration: Any = None,
    propagate: str = "converted",
    max_shard_size: int | str = DEFAULT_SHARD_SIZE,
    force: bool = False,
    progress: Progress | None = None,
    **options: Any,
) -> ConversionReport:
    """Convert the Hugging Face checkpoint folder ``src`` into ``out`` layer by layer; returns the report.

    ``out`` gets safetensors shards (at most ``max_shard_size`` each, plus the index), ``src``'s config and other
    small files, and ``kanc.json`` recording the conversion (what ``kanc.load(out)`` re-applies). Only the layers of
    the model's layer stacks are converted; everything else is copied unchanged.

    Args:
        calibration: model inputs the layers are fitted on (a dict of keyword tensors, a tensor of token ids);
            default: two seeded random sequences of 16 token ids.
        propagate: "converted" (each layer is fitted on what the converted layers before it produce) or
            "original" (on what the original model produces there).
        force: replace an existing ``out`` that kanc wrote (never ``src``, a folder holding it or inside it, nor a
            folder of the user's), once the new one is complete.
        options: ``kanc.compile``'s target options (groups, degrees, init, fit; num_features, kind, ...).
    """
    opts = dataclasses.asdict(check_options(target, options))
    if propagate not in PROPAGATE:
        raise KancError(f"propagate must be one of {', '.join(PROPAGATE)}, got {propagate!r}")
    parse_size(max_shard_size)
    src, out = Path(src), Path(out)
    check_outputs([_output(out)], inputs=[src], force=force)  # before any work
    reader = _open_source(src)
    with meta.settled_heap() as settle:
        config = meta.read_config(src)
        model = meta.empty_model(config)
        settle()  # the model class's imports and the model: out of the garbage collector's way
        run = _Stream(model, reader, target, opts, propagate, progress)
        _check_space(out, reader)

        def fill(tmp: Path) -> None:
            writer = ShardWriter(tmp, max_shard_size)
            try:
                run.execute(writer, calibration)
                writer.finish()
            finally:
                writer.abort()
            _copy_extras(src, tmp)
            run.write_manifest(tmp, out, max_shard_size)

        write_outputs([_output(out, fill)], inputs=[src], force=force)
    return run.report


def _output(out: Path, fill: Callable[[Path], None] | None = None) -> Output:
    """The converted folder, for kanc.writing: replaceable (with force) only when kanc wrote it."""
    return Output(out, fill, directory=True, replaceable=is_kanc_folder)


# ---- the run ----------------------------------------------------------------------------------------------------


class _Stream(LayerWalk):
    """One streaming conversion: each layer filled, converted in place, checked, written and dropped in turn."""

    def __init__(
        self, model: nn.Module, reader: CheckpointReader, target: str, opts: dict, propagate: str, progress: Any
    ) -> None:
        super().__init__(model, progress)
        self.reader, self.target, self.opts, self.propagate = reader, target, opts, propagate
        self.ignored = meta.ignored_keys(model, reader.keys())
        meta.check_keys(model, reader.shapes, self.ignored)
        # meta copies (free) of the original layers, for when the fit did not run a layer (see before)
        self.templates = {name: copy.deepcopy(m) for name, m in self.layers}
        self.records: list[LayerRecord] = []
        self.params_outside = 0
        self.calibration_text = ""
        self.report: ConversionReport | None = None
        self._current: dict[str, Any] = {}
        self._hidden: Tensor | None = None  # the original model's hidden states, carried beside the converted ones
        self.drift_note: str | None = None  # why the drift is not measured, once it cannot be
        self.seconds: dict[str, float] = {}  # where the time went, summed over the layers
        self.patterns = Patterns()  # blocks found once per kind of layer
        self._ahead = ReadAhead(self._read)  # the next layer's tensors, paged in while this one computes
        # the drift's forward on a thread of its own, beside the conversion, when the GEMMs leave a core idle
        self._aside = ThreadPoolExecutor(1, "kanc-drift") if propagate == "converted" and _spare_core() else None

    def execute(self, writer: ShardWriter, calibration: Any) -> None:
        self.writer = writer
        self._pass_through()
        inputs = calibration_inputs(self.model, calibration)
        self.calibration_text = describe(inputs)
        try:
            self.walk(inputs)
        finally:
            self._ahead.close()
            if self._aside is not None:
                self._aside.shutdown(wait=True)
        self.report = self._merged_report()
        require_blocks(self.report)  # no MLP block in any layer: exit 3, nothing written

    def _pass_through(self) -> None:
        """Read the tensors outside the layer stacks, give them to the model and write them out unchanged."""
        start = time.perf_counter()
        prefixes = tuple(f"{s}." for s in self.stacks)
        names = [k for k in self.reader.keys() if not k.startswith(prefixes) and k not in self.ignored]
        tensors = self.reader.read(names)
        meta.fill(self.model, tensors, "", skip=prefixes)
        for name in names:
            self.writer.add(name, tensors[name])
        self.params_outside = sum(p.numel() for n, p in self.model.named_parameters() if not n.startswith(prefixes))
        self._tick("pass_through", start)

    def before(self, name: str, layer: nn.Module, inputs: dict[str, Any]) -> None:
        """Fill the layer from the checkpoint and convert it in place; the original output comes from the fit."""
        start = time.perf_counter()
        meta.fill(layer, self._ahead.take(name, self.following(name)), name)
        mark = self._tick("read", start)
        # a layer of a kind examined before: its trace now, before the drift thread starts (tracing patches modules)
        found = self.patterns.find(name, layer)
        mark = self._tick("convert", mark)
        alone, pending = None, None
        ours = self._original_inputs(name, inputs)
        if ours is not None:
            pending = self._drift_aside(name, layer, ours) if found is not None else None
            if pending is None:
                alone = layer(**ours)
        mark = self._tick("drift", mark)
        params = count_params(layer)
        seen: list[Any] = []
        catch = layer.register_forward_hook(lambda m, a, out: seen.append(out) if not seen else None)
        try:
            conv = self._convert(layer, inputs, found)
        except BaseException:
            if pending is not None:  # the thread still reads the layer's tensors: let it finish, keep this error
                wait([pending])
            raise
        finally:
            catch.remove()
        if pending is not None:
            mark = self._tick("convert", mark)
            alone = pending.result()  # its error, if any, is the model's own (as when the drift ran here)
            mark = self._tick("drift", mark)
        original = seen[0] if seen else self._run_original(name, inputs)
        self._tick("convert", mark)
        if alone is None:
            alone = original
        self._current = {"conv": conv, "original": original, "alone": alone, "params": params, "start": start}
        self._current["ran"] = time.perf_counter()

    def _convert(self, layer: nn.Module, inputs: dict[str, Any], found: Any) -> Conversion:
        """``kanc.compile(layer, inplace=True)`` without its measurement: the walk checks the layer itself (after).
        The blocks are found on a recorded run of the layer, so modules torch.fx cannot trace (Hugging Face
        attention) are examined there rather than reported as not traced; a later layer of the same kind only by
        its trace, when that matches the first's (``found``, from kanc.checkpoint.patterns)."""
        opts = self._opts()
        if found is not None:  # a layer of its kind was examined in full: its trace suffices (kanc.checkpoint.patterns)
            conv = run_pipeline(layer, self.target, calibration=inputs, found=found, measure=False, **opts)
            if self.patterns.note is not None:
                conv.result.notes.append(self.patterns.note)
            return conv
        conv = run_pipeline(layer, self.target, calibration=inputs, discovery_inputs=inputs, measure=False, **opts)
        self.patterns.learn(conv.found)
        return conv

    def _original_inputs(self, name: str, inputs: dict[str, Any]) -> dict[str, Any] | None:
        """The layer's inputs with the original model's hidden states, carried on their own: the original layer (not
        converted yet) on them says how far the converted model drifts. None when those are the layer's inputs (the
        first layer of a layer list, or "original"). Each layer list starts from its own inputs: a decoder's first
        layer takes the decoder's embeddings, not the encoder's hidden states (its cross-attention inputs are the
        converted encoder's)."""
        if self.starts_stack(name):
            self._hidden = None
        if self._hidden is None or self.propagate != "converted":
            return None
        try:
            return with_hidden(inputs, self._hidden)
        except KancError as e:
            self._hidden, self.drift_note = None, f"drift not measured: {e}"
            return None

    def _drift_aside(self, name: str, layer: nn.Module, ours: dict[str, Any]) -> Future | None:
        """The original layer on ``ours``, run on the drift thread while this one converts ``layer`` in place: the
        layer's meta template (a structure of its own, without the capture's hooks) given the layer's own parameter
        and buffer objects (the same tensors, so the same fp32 casts), handed back when the run is done. None when
        there is no drift thread (the GEMMs use every core) or the template's structure is not the layer's."""
        if self._aside is None:
            return None
        twin = self.templates[name]
        mine, theirs = dict(twin.named_modules()), dict(layer.named_modules())
        if mine.keys() != theirs.keys():
            return None
        saved = [(m, dict(m._parameters), dict(m._buffers)) for m in mine.values()]
        for path, m in mine.items():
            m._parameters.update(theirs[path]._parameters)
            m._buffers.update(theirs[path]._buffers)

        def run() -> Any:
            try:
                with TRACING:  # no fx trace (which patches every module call) while the twin runs
                    return self.run_aside(twin, ours)
            finally:
                for m, params, buffers in saved:
                    m._parameters.clear()
                    m._parameters.update(params)
                    m._buffers.clear()
                    m._buffers.update(buffers)

        return self._aside.submit(run)

    def _drift(self, name: str, output: Any, alone: Any) -> float | None:
        """The converted model's hidden states after layer ``name`` against the original model's; carries the latter."""
        if self.propagate != "converted" or self.drift_note is not None:
            return None
        try:
            drift = output_error(output, alone, f"model after {name}")
        except KancError as e:  # the original chain itself is not finite: nothing to measure the drift against
            self._hidden, self.drift_note = None, f"drift not measured: {e}"
            return None
        self._hidden = first_tensor(alone)
        return drift

    def after(self, name: str, layer: nn.Module, inputs: dict[str, Any], output: Any) -> Any:
        """Check the converted layer in both grad modes, write its tensors, drop the layer; the next layer's input."""
        cur, self._current = self._current, {}
        self._tick("forward", cur["ran"])
        mark = time.perf_counter()
        conv: Conversion = cur["conv"]
        converted = conv.model
        if converted is not layer:  # the conversion replaced the layer's root: run the new one
            output = converted(**inputs)
        fidelity = _check_layer(name, converted, inputs, cur["original"], output, conv)
        drift = self._drift(name, output, cur["alone"])
        options = {**self.opts, "include": [], "exclude": []}  # as kanc.compile records them
        report = build_report(conv, type(layer).__name__, options, cur["params"])
        mark = self._tick("check", mark)
        self._gemm.forget()  # the memo's copies of this layer's GEMMs go before its weights do
        for key, tensor in converted.state_dict().items():
            self.writer.add(f"{name}.{key}", tensor)
        self._tick("write", mark)
        meta.release(converted)
        meta.release(layer)
        meta.return_memory()
        modes = {"no_grad": max(fidelity.outputs.values(), default=0.0)}
        modes["grad"] = max(fidelity.outputs_grad.values(), default=0.0)
        seconds = time.perf_counter() - cur["start"]
        self.records.append(LayerRecord(name, report.blocks, max(modes.values()), seconds, report, modes, drift))
        return output if self.propagate == "converted" else cur["original"]

    def _tick(self, what: str, since: float) -> float:
        """Add the time since ``since`` to ``what`` (reading, converting, ... summed over the layers)."""
        now = time.perf_counter()
        self.seconds[what] = self.seconds.get(what, 0.0) + now - since
        return now

    def _opts(self) -> dict:
        """The target options; SNNK's seed counts on over the blocks of the layers before (as kanc.compile does)."""
        if "seed" not in self.opts:
            return self.opts
        return {**self.opts, "seed": int(self.opts["seed"]) + sum(len(r.blocks) for r in self.records)}

    def _read(self, name: str) -> dict[str, Tensor]:
        return self.reader.read_under(name, self.ignored)

    def _run_original(self, name: str, inputs: dict) -> Any:
        """The original layer's output, read again from the checkpoint (the conversion changed the layer in place)."""
        template = self.templates[name]
        meta.fill(template, self._read(name), name)
        try:
            return template(**inputs)
        finally:
            meta.release(template)

    # -- the report and the manifest -------------------------------------------------------------------------------

    def _merged_report(self) -> ConversionReport:
        first = self.records[0].report
        # discovery_inputs are one layer's keyword inputs: kanc.load would run the whole model on them
        options = {k: v for k, v in first.options.items() if k != "discovery_inputs"}
        merged = ConversionReport(self.target, type(self.model).__name__, options)
        merged.params_before = merged.params_after = self.params_outside
        for r in self.records:
            _merge(merged, r.name, r.report)
        merged.fidelity = {
            "inputs": self.calibration_text,
            "outputs": {},
            "blocks": {},
            "layers": {r.name: r.error for r in self.records},
            "streamed": self._fidelity_summary(),
            "summary": self._summary_lines(),
        }
        if self.ignored:
            merged.notes.append(f"dropped {len(self.ignored)} tensors the architecture ignores on load")
        return merged

    def _fidelity_summary(self) -> dict:
        """What the walk measured: the worst layer per grad mode, the drift after the last layer (JSON-ready)."""
        worst = {}
        for mode in ("no_grad", "grad"):
            r = max(self.records, key=lambda r: r.modes.get(mode, 0.0))
            worst[mode] = {"layer": r.name, "error": r.modes.get(mode, 0.0)}
        last = {self.stack_of(r.name): r for r in self.records}  # each layer list's last layer, in the run's order
        stacks = {s: {"after": r.name, "error": r.drift} for s, r in last.items() if r.drift is not None}
        drift = stacks.get(self.stack_of(self.records[-1].name))
        return {"path": "layer by layer", "layers": len(self.records), "worst_layer": worst, "final_drift": drift,
                "stack_drift": stacks, "drift_note": self.drift_note}  # fmt: skip

    def _summary_lines(self) -> list[str]:
        """The report's fidelity lines: every layer was checked (both grad modes), and how far the model drifted."""
        info = self._fidelity_summary()
        worst = ", ".join(f"{w['error']:.2e} in {w['layer']} ({mode})" for mode, w in info["worst_layer"].items())
        lines = [
            f"streamed layer by layer: each of the {info['layers']} layers checked against the original layer on the "
            f"same inputs (calibration {self.calibration_text}), no_grad and grad mode",
            f"worst layer output error: {worst}",
        ]
        stacks = info["stack_drift"]
        for i, (stack, drift) in enumerate(stacks.items()):
            given = f"; its other inputs ({', '.join(list(stacks)[:i])}'s states) the converted model's" if i else ""
            lines.append(
                f"hidden states after the last layer ({drift['after']}) vs the original model's, both carried from "
                f"{stack}.0 on the calibration tokens (no_grad{given}): drift {drift['error']:.2e}"
            )
        if not stacks:
            lines.append("model drift: " + (self.drift_note or "not measured (propagate='original')"))
        return lines

    def write_manifest(self, tmp: Path, out: Path, max_shard_size: Any) -> None:
        """kanc.json: kanc.save's manifest of an ``hf_dir`` (what kanc.load reads), plus how the run went."""
        attach(self.model, self.report, manifest_source(self.model))
        manifest = make_manifest(self.model, "hf_dir", out, None, None)
        manifest["stream"] = {
            "calibration": self.calibration_text,
            "propagate": self.propagate,
            "max_shard_size": max_shard_size,
            "source_bytes": self.reader.nbytes(),
            "largest_source_shard": self.reader.largest_shard(),
            "seconds": self.seconds,
            "layers": [r.as_dict() for r in self.records],
        }
        (tmp / DIR_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


# ---- helpers ------------------------------------------------------------------------------------------------------


def _merge(into: ConversionReport, prefix: str, part: ConversionReport) -> None:
    """Add one layer's report to the model's, block names made full."""
    into.converted += [
        {**c, "name": full_name(prefix, c["name"]), "owner": full_name(prefix, c["owner"])} for c in part.converted
    ]
    into.skipped += [{**s, "name": full_name(prefix, s["name"])} for s in part.skipped]
    for key, value in part.counters.items():
        into.counters[key] = into.counters.get(key, 0) + value
    for p in part.passes:
        seen = next((q for q in into.passes if q["name"] == p["name"]), None)
        if seen is None:
            seen = {"name": p["name"], "seconds": 0.0, "counters": {}}
            into.passes.append(seen)
        seen["seconds"] += p["seconds"]
        for key, value in p["counters"].items():
            seen["counters"][key] = seen["counters"].get(key, 0) + value
    into.not_traced.update({full_name(prefix, k): v for k, v in part.not_traced.items()})
    into.notes += [n for n in part.notes if n not in into.notes]
    into.params_before += part.params_before
    into.params_after += part.params_after
    into.seconds += part.seconds


def _spare_core() -> bool:
    """Whether the GEMMs leave a core idle for a second thread's (torch's intra-op threads at most half the cores
    this process may use; OMP_NUM_THREADS=1 on two cores, say)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return 2 * torch.get_num_threads() <= cores


def _check_layer(name: str, layer: nn.Module, inputs: dict, original: Any, output: Any, conv: Conversion) -> Any:
    """The converted ``layer`` against the original's ``original`` output on the same ``inputs``, in no_grad (its
    ``output`` from the walk) and grad mode, each block hooked (kanc.passes.verify, the original run once, without
    grad); a non-finite output or modes that disagree fail the check: nothing is written."""
    expected = _named(original)
    for key, value in expected:
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise KancError(f"the original layer {name} gives non-finite outputs ({key}) on the calibration inputs")
    reference = Snapshot({"no_grad": expected, "grad": expected})
    fidelity = verify_equivalence(reference, layer, inputs, conv.result, no_grad_outputs=_named(output))
    if fidelity.failed:
        raise CheckFailedError(f"layer {name}: {fidelity.failures[0]}; nothing written")
    fidelity.inputs = "the layer's calibration inputs"
    record_block_errors(conv.result, fidelity)
    return fidelity


def _named(out: Any) -> list[tuple[str, Tensor]]:
    return [(key, t.detach()) for key, t in calibrate.output_tensors(out)]


def streams(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ``save_pretrained`` folder with safetensors weights (what convert_checkpoint reads)."""
    path = Path(path)
    return (path / "config.json").is_file() and ((path / SINGLE_FILE).is_file() or (path / INDEX_FILE).is_file())


def _open_source(src: Path) -> CheckpointReader:
    if not src.is_dir() or not (src / "config.json").is_file():
        raise KancError(f"{src} is not a save_pretrained folder (no config.json)")
    return CheckpointReader(src)


def _check_space(out: Path, reader: CheckpointReader) -> None:
    """Fail before the work when the output's file system cannot hold about as much as the input."""
    parent = Path(os.path.realpath(out.parent))
    need, free = reader.nbytes(), shutil.disk_usage(parent).free
    if free < need:
        raise KancError(
            f"not enough disk space in {parent}: the output needs about {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free"
        )


_WEIGHT_FILES = (SINGLE_FILE, INDEX_FILE, "kanc.json")


def _copy_extras(src: Path, tmp: Path) -> None:
    """The folder's other files (config, generation config, tokenizer): copied unchanged; weights are not."""
    for path in sorted(src.iterdir()):
        name = path.name
        if name in _WEIGHT_FILES or name.endswith((".safetensors", ".bin", ".part")) or not path.is_file():
            continue
        if name.startswith("pytorch_model") or name.startswith("."):
            continue
        shutil.copyfile(path, tmp / name)
