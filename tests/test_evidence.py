"""examples/evidence.py: the statistics against hand-computed values, the run helpers, the "rational moved" check.

Reference t quantiles (two-sided 95%, i.e. the 0.975 quantile) are the printed table values (Abramowitz &
Stegun table 26.10, scipy.stats.t.ppf(0.975, df) agrees to all digits shown).
"""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import evidence  # noqa: E402

import kanc  # noqa: E402
from kanc.nn import Mlp  # noqa: E402


@pytest.mark.parametrize(
    ("df", "expected"),
    [(1, 12.706204736), (2, 4.302652730), (3, 3.182446305), (4, 2.776445105), (9, 2.262157163), (29, 2.045229642)],
)
def test_t_quantile_matches_the_table(df, expected):
    assert evidence.t_quantile(0.95, df) == pytest.approx(expected, abs=1e-8)


def test_t_quantile_other_levels_and_large_df():
    assert evidence.t_quantile(0.99, 4) == pytest.approx(4.604094871, abs=1e-8)
    assert evidence.t_quantile(0.90, 9) == pytest.approx(1.833112933, abs=1e-8)
    assert evidence.t_quantile(0.95, 10_000) == pytest.approx(1.960201, abs=1e-6)  # -> the normal 1.959964
    with pytest.raises(ValueError):
        evidence.t_quantile(0.95, 0)


def test_summarize_by_hand():
    # 1, 2, 3, 4: mean 2.5, s^2 = (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3, half width t(3) s / 2
    s = evidence.summarize([1, 2, 3, 4])
    half = 3.182446305 * math.sqrt(5 / 3) / 2  # 2.054272...
    assert s["n"] == 4 and s["mean"] == 2.5 and s["std"] == pytest.approx(math.sqrt(5 / 3), rel=1e-12)
    assert s["ci95"] == pytest.approx([2.5 - half, 2.5 + half], abs=1e-8)
    one = evidence.summarize([7.0])
    assert one["std"] is None and one["ci95"] is None and one["mean"] == 7.0
    with pytest.raises(ValueError):
        evidence.summarize([1.0, float("nan")])  # a NaN run is a failure, never dropped
    with pytest.raises(ValueError):
        evidence.summarize([])


def test_paired_differences_and_verdicts():
    # differences 1, 2, 3: mean 2, std 1, half width 4.302652730 / sqrt(3) = 2.484138: 0 is inside
    d = evidence.paired([1, 2, 3], [2, 4, 6])
    assert d["mean"] == 2.0 and d["std"] == 1.0
    assert d["ci95"] == pytest.approx([2 - 2.484138, 2 + 2.484138], abs=1e-6)
    assert "within noise" in evidence.verdict(d, "a", "b", "acc", higher_is_better=True)
    # differences 0.9, 1.0, 1.1: mean 1, std 0.1, half width 0.248414: 0 is outside
    clear = evidence.paired([0, 0, 0], [0.9, 1.0, 1.1])
    assert clear["ci95"][0] == pytest.approx(1 - 0.2484138, abs=1e-6)
    assert "b better beyond noise" in evidence.verdict(clear, "a", "b", "acc", higher_is_better=True)
    assert "b worse beyond noise" in evidence.verdict(clear, "a", "b", "loss", higher_is_better=False)
    assert "cannot tell" in evidence.verdict(evidence.paired([0], [1]), "a", "b", "acc", True)
    # the same difference in every seed (accuracy moves in steps of one test image): a point, said as such
    same = evidence.paired([90.0, 91.0], [90.5, 91.5])
    assert evidence.verdict(same, "a", "b", "acc", True) == "b - a acc: +0.5 in all 2 seeds, b better"
    tie = evidence.paired([90.0, 91.0], [90.0, 91.0])
    assert evidence.verdict(tie, "a", "b", "acc", True) == "b - a acc: +0 in all 2 seeds, identical"
    with pytest.raises(ValueError):
        evidence.paired([1, 2], [1])


def test_deterministic_part_drops_timings_at_any_depth():
    record = {"a": 1, "timing": {"wall_s": 3}, "rows": [{"seconds": [1.0], "acc": 2.0, "sec_per_epoch": 0.5}]}
    assert evidence.deterministic_part(record) == {"a": 1, "rows": [{"acc": 2.0}]}


def test_reproducible_restores_threads_flags_and_rng():
    threads, flag = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    state = torch.get_rng_state()
    with evidence.reproducible(1):
        assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
        torch.randn(10)
    assert torch.get_num_threads() == threads and torch.are_deterministic_algorithms_enabled() == flag
    assert torch.equal(torch.get_rng_state(), state)


def test_require_names_the_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError
    with pytest.raises(SystemExit) as info:
        evidence.require({"sklearn": "for the digits data"}, "train_digits.py")
    message = str(info.value)
    assert "\n" not in message and "scikit-learn is needed for the digits data" in message


def test_write_json_is_atomic(tmp_path):
    path = evidence.write_json(tmp_path / "r.json", {"x": 1.5})
    assert json.loads(path.read_text()) == {"x": 1.5}
    with pytest.raises(ValueError):
        evidence.write_json(tmp_path / "bad.json", {"x": float("nan")})  # NaN is not valid JSON
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no partial file, no temp file


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*(nn.Sequential(nn.LayerNorm(16), Mlp(16, 32, 16)) for _ in range(2)))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.blocks(x))


def _converted_and_trained(frozen: str | None = None) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    model = kanc.compile(TwoBlocks(), target="grkan", calibration=torch.randn(64, 16))
    before = evidence.rational_snapshot(model)
    if frozen:
        model.get_parameter(frozen).requires_grad_(False)
    opt = torch.optim.AdamW(evidence.param_groups(model, 0.1), lr=1e-2)
    for _ in range(2):
        loss = nn.functional.cross_entropy(model(torch.randn(32, 16)), torch.randint(0, 3, (32,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, before


def test_rational_motion_reports_both_coefficients_of_every_block():
    model, before = _converted_and_trained()
    rows = evidence.rational_motion(model, before)
    assert sorted(r["block"] for r in rows) == sorted(kanc.report(model).blocks * 2)  # two rationals per block
    for row in rows:
        assert row["numerator"]["rel"] > 0 and row["denominator"]["abs"] > 0
    fc1 = [r for r in rows if ".fc1." in r["rational"]]
    assert fc1 and all(r["denominator"]["rel"] is None for r in fc1)  # identity start: b = 0, reported as absolute
    assert len(evidence.motion_lines(rows)) == len(rows)


@pytest.mark.parametrize("part", ["denominator", "numerator"])
def test_rational_motion_fails_on_a_frozen_rational(part):
    name = next(n for n in evidence.rationals(kanc.compile(TwoBlocks(), target="grkan")) if ".fc1." in n)
    model, before = _converted_and_trained(frozen=f"{name}.{part}")
    with pytest.raises(evidence.FrozenRationalError, match=f"{name}: {part} did not move"):
        evidence.rational_motion(model, before)


def test_rational_motion_fails_on_a_block_without_rationals():
    model, before = _converted_and_trained()
    name = next(iter(evidence.rationals(model)))
    block = next(b for b in kanc.report(model).blocks if name.startswith(b + "."))
    for rname in [n for n in evidence.rationals(model) if n.startswith(block + ".")]:
        parent, _, child = rname.rpartition(".")
        setattr(model.get_submodule(parent), child, nn.Identity())  # what a rewrite that dropped them would leave
    with pytest.raises(evidence.FrozenRationalError, match=f"converted block {block} has no GroupRational"):
        evidence.rational_motion(model, before)


def test_param_groups_leave_rationals_biases_and_norms_undecayed():
    model = kanc.compile(TwoBlocks(), target="grkan")
    decay, rest = evidence.param_groups(model, 0.1)
    rational_ids = {id(p) for r in evidence.rationals(model).values() for p in r.parameters()}
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    assert all(p.ndim >= 2 and id(p) not in rational_ids for p in decay["params"])
    assert rational_ids <= {id(p) for p in rest["params"]}
    assert len(decay["params"]) + len(rest["params"]) == len(list(model.parameters()))


def test_convert_counts_the_converted_blocks():
    calibration = torch.randn(16, 16)
    snnk = evidence.convert(TwoBlocks(), "snnk", calibration, seed=3, snnk_features=8, blocks=2)
    assert kanc.report(snnk).options["seed"] == 3 and kanc.report(snnk).options["num_features"] == 8
    with pytest.raises(RuntimeError, match=r"converted 2 MLP blocks to grkan, expected 3"):
        evidence.convert(TwoBlocks(), "grkan", calibration, seed=0, snnk_features=8, blocks=3)
