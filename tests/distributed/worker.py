"""One rank of the distributed tests, started by torchrun (2 processes, gloo, CPU); not a test module itself.

    torchrun --standalone --nproc-per-node=2 tests/distributed/worker.py WORKDIR

WORKDIR/setup.pt (written by the test) holds, per case, the converted model's initial state, the batch and the
targets. Each rank rebuilds the converted model (dist_model.build), loads that state, wraps it (DDP, or FSDP2's
fully_shard per block and at the root), trains two SGD steps on its half of the batch and rank 0 writes
WORKDIR/<case>.pt: the two losses (averaged over the ranks), every full gradient of the first step, the
parameters after it, and for FSDP2 a distributed checkpoint saved, reloaded into a fresh sharded model and run.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dist_model  # noqa: E402


def main(workdir: Path) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    try:
        setup = torch.load(workdir / "setup.pt", weights_only=True)
        for case, data in setup.items():
            result = run_case(case, data, workdir)
            if dist.get_rank() == 0:
                torch.save(result, workdir / f"{case}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()


def run_case(case: str, data: dict, workdir: Path) -> dict:
    wrap, target = case.split("-")
    model = dist_model.build(target)
    model.load_state_dict(data["state"])
    model = DistributedDataParallel(model) if wrap == "ddp" else _shard(model)
    x, y = _my_half(data["x"]), _my_half(data["y"])
    opt = torch.optim.SGD(model.parameters(), lr=dist_model.LR)
    loss1 = dist_model.loss(model(x), y)
    loss1.backward()
    grads = {n: _full(p.grad) for n, p in _named(model)}
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        loss2 = dist_model.loss(model(x), y)
    result = {"loss": [_mean(loss1), _mean(loss2)], "grads": grads, "params": {n: _full(p) for n, p in _named(model)}}
    if wrap == "fsdp2":
        result["dcp"] = _checkpoint_round_trip(model, target, data, workdir / f"dcp-{case}")
    return result


def _shard(model: torch.nn.Module) -> torch.nn.Module:
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def _checkpoint_round_trip(model: torch.nn.Module, target: str, data: dict, folder: Path) -> dict:
    """Save the trained sharded model with torch.distributed.checkpoint, load it into a fresh sharded one."""
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(folder))
    fresh = _shard(dist_model.build(target, seed=99))
    state = {"model": get_model_state_dict(fresh)}
    dcp.load(state, checkpoint_id=str(folder))
    set_model_state_dict(fresh, state["model"])
    with torch.no_grad():
        return {"trained": model(data["x"]).detach(), "reloaded": fresh(data["x"]).detach(), "folder": str(folder)}


def _named(model: torch.nn.Module):
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    return inner.named_parameters()


def _my_half(t: torch.Tensor) -> torch.Tensor:
    return t.chunk(dist.get_world_size())[dist.get_rank()]


def _full(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _mean(loss: torch.Tensor) -> float:
    total = loss.detach().clone()
    dist.all_reduce(total)
    return float(total) / dist.get_world_size()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
