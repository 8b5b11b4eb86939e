"""The process Nsight Compute profiles: ``python -m kanc.runtime.ncu_child SPEC.json``.

SPEC names the model and inputs kanc pickled for it (``model``, ``inputs``), ``device``, ``train``, ``warmup`` and
the parent's ``sys_path`` (pickles name classes by module).
The child runs the warm-up steps, then exactly one step inside the CUDA profiler range (ncu is started with
``--profile-from-start off``), so the counters cover one step of kanc's kernels after compilation and tuning.
"""

from __future__ import annotations

import json
import sys

import torch

from kanc.runtime.steps import run_step, synchronize


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m kanc.runtime.ncu_child SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(open(argv[0]).read())
    sys.path[1:1] = [p for p in spec.get("sys_path", []) if p not in sys.path]  # the parent's, for its classes
    device = torch.device(spec.get("device", "cuda"))
    model = torch.load(spec["model"], weights_only=False, map_location=device)  # written by kanc itself
    inputs = torch.load(spec["inputs"], weights_only=False, map_location=device)
    args, kwargs, train = tuple(inputs["args"]), dict(inputs["kwargs"]), bool(spec.get("train", False))
    model.train(train)
    for _ in range(int(spec.get("warmup", 1))):
        run_step(model, args, kwargs, train)
    synchronize(device)
    profiling = device.type == "cuda"
    if profiling:
        torch.cuda.profiler.start()
    run_step(model, args, kwargs, train)
    synchronize(device)
    if profiling:
        torch.cuda.profiler.stop()
    print(f"kanc.ncu_child: ran {spec.get('warmup', 1)} warm-up steps and 1 profiled step on {device}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
