"""examples/train_digits.py end to end on a tiny config: records, statistics, fidelity, rationals, reproducibility.

The tiny config (2 epochs on 256 training images) is too short to learn digits; learning itself is the committed
full run's job (examples/results/digits.json). Here: the machinery, and that the same command
gives the same numbers (run twice, and one seed on its own).
"""

import json
import shlex
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import evidence  # noqa: E402
import train_digits  # noqa: E402

TINY = ["--epochs", "2", "--finetune-epochs", "1", "--train-limit", "256", "--calibration", "64"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    argv = [*TINY, "--seeds", "2", "--out", str(out)]
    return out, argv, train_digits.main(argv)


def test_results_saved_with_their_record(tiny_run):
    out, argv, results = tiny_run
    saved = json.loads((out / "digits.json").read_text())
    assert saved == json.loads(json.dumps(results))
    run = saved["run"]
    assert run["command"] == shlex.join(["python", "examples/train_digits.py", *argv])
    assert run["seeds"] == [0, 1] and run["threads"] == 1 and run["deterministic_algorithms"]
    assert run["versions"]["torch"] and run["versions"]["scikit-learn"] and run["kanc_commit"]
    assert saved["timing"]["wall_s"] > 0
    for name in ("digits_conversion.png", "digits_scratch.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_conversion_keeps_the_function(tiny_run):
    for run in tiny_run[2]["seeds"]:
        rows = run["conversion"]["rows"]
        before = rows["mlp"]["loss_before"]
        assert rows["mlp"]["loss_after_conversion"] == before  # the MLP row is the same model
        assert abs(rows["grkan"]["loss_after_conversion"] - before) < 1e-3
        assert abs(rows["grkan"]["acc_after_conversion"] - rows["mlp"]["acc_before"]) <= 1.0
        assert abs(rows["snnk"]["loss_after_conversion"] - before) < 0.05  # ridge fit: approximate
        assert rows["snnk"]["params"] < rows["mlp"]["params"] < rows["grkan"]["params"]


def test_every_rational_of_every_converted_block_moved(tiny_run):
    for run in tiny_run[2]["seeds"]:
        rows = run["conversion"]["rational_motion"]
        assert len(rows) == 8  # 4 blocks, a rational before fc1 and one before fc2
        assert all(r["numerator"]["abs"] > 0 and r["denominator"]["abs"] > 0 for r in rows)


def test_statistics_and_verdicts(tiny_run):
    _, _, results = tiny_run
    summary = results["summary"]
    assert summary["conversion"]["grkan_acc_after_finetune"]["n"] == 2
    loss = [r["conversion"]["rows"]["snnk"]["loss_after_finetune"] for r in results["seeds"]]
    assert summary["conversion"]["snnk_loss_after_finetune"]["mean"] == pytest.approx(sum(loss) / 2)
    diff = summary["paired"]["grkan_scratch - mlp_scratch loss"]
    scratch = [r["scratch"]["grkan"]["test_loss"][-1] - r["scratch"]["mlp"]["test_loss"][-1] for r in results["seeds"]]
    assert diff["values"] == pytest.approx(scratch)
    assert len(summary["verdicts"]) == len(summary["paired"]) == 10
    text = train_digits.format_table(results)
    assert "within noise" in text or "beyond noise" in text or "in all 2 seeds" in text
    assert "blocks.3.mlp.fc2.rational" in text


def test_same_command_same_numbers(tiny_run, tmp_path):
    """Seed 1 run on its own gives bit for bit the seed-1 numbers of the two-seed run (no state leaks between seeds)."""
    _, _, results = tiny_run
    again = train_digits.main([*TINY, "--seed", "1", "--seeds", "1", "--no-plot", "--out", str(tmp_path)])
    first, second = (json.dumps(evidence.deterministic_part(r)) for r in (results["seeds"][1], again["seeds"][0]))
    assert first == second
    assert not (tmp_path / "digits_conversion.png").exists()  # --no-plot
    seed0 = results["seeds"][0]["conversion"]["pretrain"]["test_loss"]
    assert seed0 != results["seeds"][1]["conversion"]["pretrain"]["test_loss"]  # the seed matters: not vacuous


def test_the_same_command_twice_gives_the_same_json(tiny_run):
    """The fixture's command run again: every number of the JSON (all but timings and dates) equal bit for bit."""
    out, argv, results = tiny_run
    again = train_digits.main(argv)
    saved = json.loads((out / "digits.json").read_text())
    first, second = (json.dumps(evidence.deterministic_part(r)) for r in (results, saved))
    assert first == second and saved == json.loads(json.dumps(again))
    assert saved["timing"] != results["timing"]  # the file is the second run's, not the first one's


def test_missing_optional_dependency_fails_before_training(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(train_digits, "run", lambda *a: pytest.fail("trained without matplotlib"))
    with pytest.raises(SystemExit, match="matplotlib is needed for the figures") as info:
        train_digits.main([*TINY, "--out", str(tmp_path / "out")])
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()
