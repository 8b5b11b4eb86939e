"""report.json's schema: shipped in the package, strict (no undeclared field), and the validator catches violations."""

import copy
import json
from importlib import resources

import pytest
import torch

import kanc
from kanc.runtime import SCHEMA_VERSION, validate
from kanc.runtime.schema import report_schema


@pytest.fixture(scope="module")
def document():
    torch.manual_seed(0)
    model = torch.nn.Sequential(kanc.nn.GRKANMlp(16, 32, 16, groups=4), kanc.nn.SNNKMlp(16, 8, 24))
    return kanc.profile(model, torch.randn(3, 16), train=True, warmup=1, iters=1).to_json()


def test_schema_ships_in_the_package():
    text = (resources.files("kanc.runtime") / "report.schema.json").read_text()
    schema = json.loads(text)
    assert schema["$schema"].startswith("https://json-schema.org/draft/2020-12")
    assert schema["properties"]["version"] == {"const": SCHEMA_VERSION}
    assert schema["additionalProperties"] is False


def test_a_real_report_validates(document):
    assert validate(document) == []
    json.dumps(document, allow_nan=False)  # strict JSON: no NaN or Infinity


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d.pop("layers"), "$: missing 'layers'"),
        (lambda d: d.update(version=2), "$.version: expected 1, got 2"),
        (lambda d: d.update(surprise=1), "$: unexpected 'surprise'"),
        (lambda d: d["layers"][0].update(direction="sideways"), "$.layers[0].direction: 'sideways' is not one of"),
        (lambda d: d["layers"][0].update(time_ms=-1.0), "$.layers[0].time_ms: -1.0 < minimum 0"),
        (lambda d: d["layers"][0].update(flops="many"), "$.layers[0].flops: expected number or null, got str"),
        (lambda d: d["run"].update(train="yes"), "$.run.train: expected boolean, got str"),
        (lambda d: d["peaks"].update(memory_gbps=0), "$.peaks.memory_gbps: 0 <= exclusive minimum 0"),
        (lambda d: d["peaks"]["vector_tflops"].pop("fp32"), "$.peaks.vector_tflops: missing 'fp32'"),
        (lambda d: d["step"]["quantiles_ms"].pop("p80"), "$.step.quantiles_ms: missing 'p80'"),
        (lambda d: d["stalls"].update(tool="vtune"), "$.stalls.tool: 'vtune' is not one of"),
        (lambda d: d["findings"].append({"text": "", "subject": "", "kind": "note", "saving_ms": None}),
         "text: shorter than 1 characters"),
    ],
)  # fmt: skip
def test_violations_are_reported_with_their_path(document, mutate, expected):
    broken = copy.deepcopy(document)
    mutate(broken)
    errors = validate(broken)
    assert any(expected in e for e in errors), errors


def test_kernel_rows_and_stall_entries_are_checked(document):
    broken = copy.deepcopy(document)
    row = {"kernel": "k", "op": "kanc::x", "layer": "0", "direction": "forward", "launches": 1, "programs": 4,
           "atomics": 0, "grid": [4], "config": {}, "shapes": [[2, 3]], "dtype": "float32", "time_ms": 1.0,
           "time_source": "cuda (torch.profiler)", "share": 0.5, "flops": None, "bytes": None,
           "achieved_gbps": None, "achieved_tflops": None, "intensity": None, "bandwidth_fraction": None,
           "compute_fraction": None, "compute_peak": None, "bound": None, "roofline_ms": None,
           "roofline_fraction": None, "stalls": None}  # fmt: skip
    broken["kernels"] = [row]
    assert validate(broken) == []
    row["stalls"] = {"kernel": "k", "launches": "one"}
    errors = validate(broken)
    assert any("$.kernels[0].stalls: matches 0 of the oneOf" in e for e in errors), errors
    row["grid"] = [4, -1]
    assert any("$.kernels[0].grid[1]: -1 < minimum 0" in e for e in validate(broken))


def test_validator_refuses_keywords_it_does_not_implement():
    with pytest.raises(ValueError, match="'pattern' .* not supported"):
        validate("x", {"type": "string", "pattern": "^x$"})
    assert report_schema() is report_schema()  # loaded once
