"""Converted models (GR-KAN and SNNK, by kanc.compile) train under DDP and FSDP2 (fully_shard): 2 processes on the
CPU (gloo) started by torchrun. The loss and every gradient, rational coefficients included, match one process
on the whole batch; a torch.distributed.checkpoint of the sharded model reloads, sharded and in one process."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import dist_model
import pytest
import torch
import torch.distributed.checkpoint as dcp

WORKER = Path(__file__).resolve().parent / "worker.py"
CASES = ["ddp-grkan", "ddp-snnk", "fsdp2-grkan", "fsdp2-snnk"]
TIMEOUT = 300  # seconds for all cases together (torchrun, two ranks); the ranks' own collectives time out at 60 s


def launch(workdir: Path) -> str:
    """torchrun on a free port (--standalone); killed with its ranks on a timeout or an error; its output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [*cmd, str(workdir)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        out = ""
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            out += proc.communicate()[0]
            pytest.fail(f"torchrun did not finish in {TIMEOUT} s:\n{out[-3000:]}")
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed (exit {proc.returncode}):\n{out[-3000:]}")
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case run once: (workdir, setup, rank 0's results by case)."""
    workdir = tmp_path_factory.mktemp("dist")
    x, y = dist_model.batch()
    setup = {case: {"state": dist_model.build(case.split("-")[1]).state_dict(), "x": x, "y": y} for case in CASES}
    torch.save(setup, workdir / "setup.pt")
    launch(workdir)
    return workdir, setup, {case: torch.load(workdir / f"{case}.pt", weights_only=True) for case in CASES}


def single_process(target: str, data: dict) -> dict:
    """The same two steps in one process on the whole batch."""
    model = dist_model.build(target)
    model.load_state_dict(data["state"])
    opt = torch.optim.SGD(model.parameters(), lr=dist_model.LR)
    loss1 = dist_model.loss(model(data["x"]), data["y"])
    loss1.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    assert all(g.abs().sum() > 0 for g in grads.values())
    opt.step()
    with torch.no_grad():
        loss2 = dist_model.loss(model(data["x"]), data["y"])
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"loss": [loss1.item(), loss2.item()], "grads": grads, "params": params}


@pytest.mark.parametrize("case", CASES)
def test_loss_and_every_gradient_match_one_process(runs, case):
    _, setup, results = runs
    target = case.split("-")[1]
    got, want = results[case], single_process(target, setup[case])
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert set(got["grads"]) == set(want["grads"])
    rationals = [n for n in want["grads"] if n.endswith(("numerator", "denominator"))]
    assert len(rationals) == (6 if target == "grkan" else 0)  # fc1, fc2 and the SwiGLU's gate: 3 rationals
    for name, g in want["grads"].items():
        assert got["grads"][name] is not None, name
        assert torch.isfinite(got["grads"][name]).all(), name
        torch.testing.assert_close(got["grads"][name], g, atol=1e-6, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    for name, p in want["params"].items():
        torch.testing.assert_close(got["params"][name], p, atol=1e-6, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("case", ["fsdp2-grkan", "fsdp2-snnk"])
def test_a_distributed_checkpoint_reloads_sharded_and_in_one_process(runs, case):
    _, setup, results = runs
    target = case.split("-")[1]
    saved = results[case]["dcp"]
    torch.testing.assert_close(saved["reloaded"], saved["trained"], atol=0, rtol=0)
    model = dist_model.build(target, seed=7)  # other weights: everything must come from the checkpoint
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=saved["folder"])
    model.load_state_dict(state["model"])
    want = single_process(target, setup[case])["params"]
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), want[name], atol=1e-6, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    with torch.no_grad():
        torch.testing.assert_close(model(setup[case]["x"]), saved["trained"], atol=1e-5, rtol=1e-4)
