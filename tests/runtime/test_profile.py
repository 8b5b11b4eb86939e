"""kanc.profile on the CPU: rows per layer and direction, launch attribution, the three files, and clean failure."""

import json

import pytest
import torch
from torch import nn

import kanc
from kanc.errors import KancError
from kanc.nn import GroupRational
from kanc.runtime import validate
from kanc.runtime.counts import module_counts, rational_counts
from kanc.runtime.devices import DevicePeaks
from kanc.runtime.report import LayerRow, rates, roofline_finding

X = torch.randn(2, 12, 16)


def _rows(report, name):
    return {row.direction: row for row in report.layers if row.name == name}


def test_profile_train_writes_three_valid_files(kan_model, tmp_path):
    report = kanc.profile(kan_model, X, train=True, warmup=1, iters=2)
    out = report.write(tmp_path / "prof")
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json", "trace.json"]
    document = json.loads((out / "report.json").read_text())
    assert validate(document) == []
    assert document["schema"] == "kanc.profile" and document["version"] == 1
    assert document["run"]["train"] is True and document["run"]["device"] == "cpu"
    trace = json.loads((out / "trace.json").read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {"2.mlp.1", "3.mlp", "1.mlp.fc2"} <= {e["name"] for e in spans}
    assert {e["cat"] for e in spans if "cat" in e} == {"forward", "backward"}
    assert all(e["dur"] >= 0 for e in spans)
    assert "<svg" in (out / "report.html").read_text()


def test_every_kanc_layer_has_both_directions_and_its_path(kan_model):
    """On the CPU the rationals (GR-KAN linears and a standalone one) run kanc's C kernels and the SNNK block runs
    the reference: its rows carry the reason, and one finding says it."""
    report = kanc.profile(kan_model, X, train=True, warmup=1, iters=2)
    for name in ("1.mlp.fc1", "1.mlp.fc2", "2.mlp.1", "3.mlp"):
        rows = _rows(report, name)
        assert set(rows) == {"forward", "backward"}
        for row in rows.values():
            assert row.time_ms > 0 and row.flops > 0 and row.bytes > 0
            assert row.rates.bound in ("memory", "compute") and row.rates.achieved_gbps > 0
    for name in ("1.mlp.fc1", "1.mlp.fc2", "2.mlp.1"):  # F(x) by the C kernel (the linears then call torch's matmul)
        for direction, row in _rows(report, name).items():
            assert row.path == "kernel" and row.kernels == [f"kanc_rational_{direction}"] and row.fallback is None
    for row in _rows(report, "3.mlp").values():  # no SNNK kernel on a plain CPU run
        assert row.path == "reference" and row.launches == 0
        assert row.fallback.startswith("kanc::snnk_block: no CPU kernel for this op")
    (finding,) = [f for f in report.findings if f.kind == "reference"]
    assert finding.subject == "3.mlp" and "no CPU kernel for this op" in finding.text
    assert validate(report.to_json()) == []


def test_counts_on_rows_are_the_hand_counts_of_the_calls(kan_model):
    report = kanc.profile(kan_model, X, train=False, warmup=1, iters=2)
    row = _rows(report, "2.mlp.1")["forward"]
    assert isinstance(kan_model[2].mlp[1], GroupRational) and row.kind == "rational"
    assert row.input_shape == [2, 12, 64] and row.dtype == "float32" and row.elements == 2 * 12 * 64
    assert row.flops == 2 * 12 * 64 * 21 and row.bytes == 2 * 12 * 64 * 8 + 8 * 10 * 4
    assert "backward" not in _rows(report, "2.mlp.1")  # forward only
    shares = sum(row.share for row in report.layers)
    assert shares == pytest.approx(1.0, abs=1e-6)  # exclusive times add up to the hooked step


def test_launches_are_charged_to_the_layer_and_direction_that_made_them(fake_kernel_layer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), fake_kernel_layer(), nn.Linear(32, 4))
    report = kanc.profile(model, torch.randn(8, 16), train=True, warmup=1, iters=3)
    rows = _rows(report, "1")
    assert rows["forward"].path == "kernel" and rows["forward"].kernels == ["_fake_fwd_kernel"]
    assert rows["backward"].kernels == ["_fake_bwd_kernel"] and rows["backward"].atomics == 10 * 8 * 32
    assert _rows(report, "0")["forward"].launches == 0
    kernels = {(k.kernel, k.layer, k.direction): k for k in report.kernels}
    assert set(kernels) == {("_fake_fwd_kernel", "1", "forward"), ("_fake_bwd_kernel", "1", "backward")}
    bwd = kernels[("_fake_bwd_kernel", "1", "backward")]
    assert (bwd.launches, bwd.programs, bwd.grid, bwd.config) == (1, 8, [4, 2], {"BLOCK": 32})
    assert bwd.time_source.startswith("layer time") and bwd.time_ms == pytest.approx(rows["backward"].time_ms)
    assert validate(report.to_json()) == []


def test_many_atomics_are_named_as_the_cause(atomic_rational):
    """The launch facts and the cause do not depend on timing; where the row stands (memory- or compute-bound on
    the measured CPU peaks) does, so that decision is tested on fixed figures below."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), atomic_rational(32, groups=4), nn.Linear(32, 4))
    report = kanc.profile(model, torch.randn(400, 16), train=True, warmup=1, iters=2)
    row = _rows(report, "1")["backward"]
    assert row.path == "kernel" and row.atomics == 10 * 400 * 32 and row.elements == 400 * 32
    (finding,) = [f for f in report.findings if f.subject == "1" and f.kind == "roofline" and "backward" in f.text]
    assert finding == roofline_finding(row, report.peaks.memory, [])  # the decision, on this run's figures
    assert finding.text.startswith("1: rational backward at ")
    assert finding.text.endswith(": atomics dominate (128,000 atomic adds, 10 per element)")
    # a few atomics (here 10 per element, but 2,560 in all) are not called the cause
    small = kanc.profile(model, torch.randn(8, 16), train=True, warmup=1, iters=1)
    assert not any("atomics dominate" in f.text for f in small.findings)


# Fixed figures: a rational backward over 12,800 fp32 elements (65 FLOPs and 12 bytes each: 5.4 FLOP/byte) on a
# CPU measured at 10 GB/s, once with a 0.2 TFLOP/s matmul (ridge 20 FLOP/byte: memory-bound) and once with a
# 0.02 TFLOP/s one (ridge 2: compute-bound), as a loaded machine measures it.
ELEMENTS = 400 * 32
BACKWARD = rational_counts(ELEMENTS, 4, groups=4, direction="backward")


def _cpu(tflops):
    return DevicePeaks("cpu", 10.0, {"fp32": tflops}, {}, "DRAM (measured copy)", "measured")


def _backward_row(time_ms, peaks, atomics=10 * ELEMENTS, elements=ELEMENTS):
    row = LayerRow("1", "AtomicRational", "backward", 1, time_ms, 1.0, "kernel", "rational", ["_fake_bwd_kernel"],
                   1, atomics, elements, BACKWARD.flops, BACKWARD.bytes)  # fmt: skip
    row.rates = rates(BACKWARD, time_ms, peaks, torch.float32)
    return row


ATOMICS = "atomics dominate (128,000 atomic adds, 10 per element)"


@pytest.mark.parametrize(
    "tflops,fraction,expected",
    [
        (0.2, 0.2, f"1: rational backward at 20% of DRAM (measured copy) bandwidth: {ATOMICS}"),
        (0.2, 0.05, f"1: rational backward at 5% of DRAM (measured copy) bandwidth: {ATOMICS}"),
        (0.02, 0.2, f"1: rational backward at 20% of the fp32 peak: {ATOMICS}"),
    ],
)
def test_roofline_finding_on_fixed_figures(tflops, fraction, expected):
    peaks = _cpu(tflops)
    roof = rates(BACKWARD, 1.0, peaks, torch.float32).roofline_ms  # the roofline time does not depend on the time
    finding = roofline_finding(_backward_row(roof / fraction, peaks), peaks.memory, [])
    assert finding.text == expected and finding.kind == "roofline" and finding.subject == "1"
    assert finding.saving_ms == pytest.approx(roof / fraction - roof)


def test_roofline_finding_without_a_named_cause():
    peaks = _cpu(0.2)
    roof = rates(BACKWARD, 1.0, peaks, torch.float32).roofline_ms
    few = dict(atomics=2_560, elements=256)  # 10 per element, but too few in all to matter
    assert roofline_finding(_backward_row(5 * roof, peaks, **few), peaks.memory, []).text.endswith(
        ": 5.0x from its roofline"
    )
    assert roofline_finding(_backward_row(roof, peaks, **few), peaks.memory, []).text.endswith(": at its roofline")
    dense = dict(atomics=1_000_000, elements=10**9)  # many atomics, but 0.001 per element
    assert "atomics" not in roofline_finding(_backward_row(5 * roof, peaks, **dense), peaks.memory, []).text
    assert roofline_finding(_backward_row(0.0, peaks), peaks.memory, []) is None  # nothing measured, no finding


def test_roofline_finding_names_the_stall_reasons():
    peaks = _cpu(0.2)
    roof = rates(BACKWARD, 1.0, peaks, torch.float32).roofline_ms
    row = _backward_row(2 * roof, peaks)
    stalls = [
        {"kernel": "k", "long_scoreboard_fraction": 0.6},
        {"kernel": "k", "lg_throttle_fraction": 0.3},
        {"kernel": "k", "achieved_occupancy_pct": 25.0},
    ]
    text = roofline_finding(row, "HBM3", stalls).text
    assert text == (
        f"1: rational backward at 50% of HBM3 bandwidth: {ATOMICS}; k waits on global memory (60% of stall samples "
        "long-scoreboard); k fills the load/store queue (30% LG-throttle): issue fewer, wider loads; "
        "k reaches 25% occupancy"
    )
    quiet = [{"kernel": "k", "long_scoreboard_fraction": 0.39, "lg_throttle_fraction": 0.19,
              "achieved_occupancy_pct": 30.0}]  # fmt: skip
    assert roofline_finding(row, "HBM3", quiet).text.endswith(f": {ATOMICS}")


def test_inference_restores_mode_and_gradients(kan_model):
    kan_model.train()
    weight = kan_model[0].weight
    weight.grad = torch.ones_like(weight)
    kanc.profile(kan_model, X, train=True, warmup=1, iters=1)
    assert kan_model.training and torch.equal(weight.grad, torch.ones_like(weight))
    kan_model.eval()
    kanc.profile(kan_model, X, train=True, warmup=1, iters=1)
    assert not kan_model.training


def test_keyword_and_integer_inputs_with_dict_outputs(make_kan_model):
    class TokenModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.mlp = make_kan_model(16)[1]

        def forward(self, input_ids):
            return {"hidden": self.mlp(self.embed(input_ids))}

    report = kanc.profile(TokenModel(), {"input_ids": torch.randint(0, 50, (2, 7))}, train=True, warmup=1, iters=2)
    assert report.run["inputs"] == [{"name": "input_ids", "shape": [2, 7], "dtype": "int64"}]
    embed = _rows(report, "embed")
    # the embedding's input needs no gradient: its weight gradient runs after its hook and is still charged to it
    assert embed["backward"].time_ms > 0
    assert validate(report.to_json()) == []


def test_inplace_relu_falls_back_to_forward_hooks_with_a_note():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 4))
    report = kanc.profile(model, torch.randn(3, 8), train=True, warmup=1, iters=2)
    assert report.run["backward_hooks"] is False
    assert any("per-layer backward times unavailable" in n for n in report.notes)
    assert {row.name for row in report.layers if row.direction == "backward"} == {"(backward, not split by layer)"}


def test_terminal_table_lists_the_slowest_layers(kan_model):
    report = kanc.profile(kan_model, X, warmup=1, iters=2)
    text = str(report)
    assert text.splitlines()[0].startswith("kanc profile: Sequential forward on cpu")
    assert "layer" in text.splitlines()[1] and "GB/s" in text.splitlines()[1]
    assert "Nsight Compute and proton need a CUDA GPU" in text


def test_bad_arguments_and_inputs_are_one_line_errors(kan_model):
    with pytest.raises(KancError, match="iters"):
        kanc.profile(kan_model, X, iters=0)
    with pytest.raises(KancError, match="stalls"):
        kanc.profile(kan_model, X, stalls="vtune")
    with pytest.raises(KancError, match="failed on the example inputs: RuntimeError"):
        kanc.profile(kan_model, torch.randn(2, 3))
    with pytest.raises(KancError, match="inputs must be"):
        kanc.profile(kan_model, 3.0)


def test_write_refuses_a_foreign_directory_and_leaves_nothing(kan_model, tmp_path):
    report = kanc.profile(kan_model, X, warmup=1, iters=1)
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(KancError, match="not empty"):
        report.write(foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    with pytest.raises(KancError, match="does not exist"):
        report.write(tmp_path / "missing" / "prof")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]
    # an earlier report is replaced, with force
    first = report.write(tmp_path / "prof")
    with pytest.raises(KancError, match="exists: pass --force"):
        report.write(first)
    assert report.write(first, force=True) == first and validate(json.loads((first / "report.json").read_text())) == []


def test_module_counts_agree_with_rows_for_snnk(kan_model):
    report = kanc.profile(kan_model, X, warmup=1, iters=1)
    row = _rows(report, "3.mlp")["forward"]
    from kanc.runtime.counts import CallShapes

    call = CallShapes((2, 12, 32), torch.float32, (2, 12, 32), torch.float32, False)
    assert row.flops == module_counts(kan_model[3].mlp, call, "forward").flops


def test_runtime_imports_neither_passes_nor_triton():
    import subprocess
    import sys

    code = "import sys, kanc.runtime; bad = {'kanc.passes', 'triton'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)
