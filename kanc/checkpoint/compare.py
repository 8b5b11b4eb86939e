"""``compare_checkpoints``: an original checkpoint folder and its kanc conversion, side by side, one layer at a time.

Neither model is loaded whole. The converted model runs forward on a few token sequences; at each layer the original
layer is read from the original folder and the converted one is rebuilt (``kanc.api.reapply``) and read from the
converted folder. Per layer: the converted layer against the original on the same inputs, and the converted model's
hidden states against the original model's (each carried from layer to layer on its own). The tensors outside the
layers must be equal in both folders.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kanc.api import read_manifest, reapply
from kanc.checkpoint import meta
from kanc.checkpoint.shards import CheckpointReader, ReadAhead
from kanc.checkpoint.walk import (
    LayerWalk,
    Progress,
    calibration_inputs,
    describe,
    first_tensor,
    local_name,
    output_error,
    with_hidden,
)
from kanc.errors import KancError


def compare_checkpoints(
    original: str | os.PathLike, converted: str | os.PathLike, inputs: Any = None, progress: Progress | None = None
) -> dict:
    """Per layer, ``layer_error`` (converted layer vs original layer on the converted model's hidden states) and
    ``drift`` (the converted model's hidden states after the layer vs the original model's), relative errors.

    ``inputs``: model inputs (default: two seeded random sequences of 16 token ids). Also returns how many tensors
    outside the layers were compared and which of them differ.
    """
    original, converted = Path(original), Path(converted)
    manifest = read_manifest(converted)
    if manifest is None:
        raise KancError(f"{converted} has no kanc manifest: it is not a kanc conversion")
    model = meta.empty_model(meta.read_config(original))
    walk = _SideBySide(model, CheckpointReader(original), CheckpointReader(converted), manifest, progress)
    outside = walk.fill_outside()
    data = calibration_inputs(model, inputs)
    try:
        walk.walk(data)
    finally:
        walk.close()
    return {"inputs": describe(data), "layers": walk.records, **outside}


class _SideBySide(LayerWalk):
    def __init__(
        self, model: nn.Module, original: CheckpointReader, converted: CheckpointReader, manifest: dict, progress: Any
    ) -> None:
        super().__init__(model, progress)
        self.original, self.converted, self.manifest = original, converted, manifest
        self.ignored = meta.ignored_keys(model, original.keys())
        meta.check_keys(model, original.shapes, self.ignored)
        self.records: list[dict] = []
        self._hidden: Tensor | None = None  # the original model's hidden states, carried on their own
        self._cur: dict[str, Any] = {}
        # each folder's next layer, paged in on a thread while this one runs (kanc.checkpoint.shards.ReadAhead)
        self._ahead = {
            "original": ReadAhead(lambda n: original.read_under(n, self.ignored)),
            "converted": ReadAhead(converted.read_under),
        }

    def close(self) -> None:
        for ahead in self._ahead.values():
            ahead.close()

    def fill_outside(self) -> dict:
        """Give the model the original's tensors outside the layers; list those the converted folder changed."""
        prefixes = tuple(f"{s}." for s in self.stacks)
        names = [k for k in self.original.keys() if not k.startswith(prefixes) and k not in self.ignored]
        tensors = self.original.read(names)
        meta.fill(self.model, tensors, "", skip=prefixes)
        missing = [n for n in names if n not in self.converted.shard_of]
        if missing:
            raise KancError(f"the converted folder has no tensor {missing[0]!r}")
        theirs = self.converted.read(names)
        different = [n for n in names if not _same(tensors[n], theirs[n])]
        return {"outside_tensors": len(names), "outside_different": different}

    def before(self, name: str, layer: nn.Module, inputs: dict[str, Any]) -> None:
        following = self.following(name)
        meta.fill(layer, self._ahead["original"].take(name, following), name)
        same = layer(**inputs)
        if self.starts_stack(name):  # each layer list starts from its own inputs (as the stream measures it)
            self._hidden = None
        ours = with_hidden(inputs, self._hidden)
        alone = layer(**ours) if ours is not inputs else same
        blocks = [local_name(name, b) for b in self.manifest.get("blocks", []) if b == name or b.startswith(f"{name}.")]
        conv = layer
        if blocks:
            conv = reapply(layer, {**self.manifest, "blocks": blocks})
            meta.release(conv)
        meta.fill(conv, self._ahead["converted"].take(name, following), f"{name} (converted)")
        self._cur = {"same": same, "alone": alone, "conv": conv}

    def after(self, name: str, layer: nn.Module, inputs: dict[str, Any], output: Any) -> Any:
        cur, self._cur = self._cur, {}
        if cur["conv"] is not layer:
            output = cur["conv"](**inputs)
        record = {
            "name": name,
            "layer_error": output_error(output, cur["same"], f"layer {name}"),
            "drift": output_error(output, cur["alone"], f"model after {name}"),
        }
        self.records.append(record)
        self._hidden = first_tensor(cur["alone"])
        meta.release(cur["conv"])
        meta.release(layer)
        return output


def _same(a: Tensor, b: Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))
