"""examples/train_char_gpt.py end to end on a tiny config, and its corpus (the standard library, split by file)."""

import json
import shlex
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import char_gpt  # noqa: E402
import evidence  # noqa: E402
import train_char_gpt  # noqa: E402

TINY = (
    "--steps 12 --finetune-steps 6 --eval-every 6 --batch 8 --context 32 --dim 32 --depth 2 --heads 2 --hidden 64 "
    "--val-windows 8 --calibration 4 --snnk-features 32 --max-chars 20000"
).split()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("char_gpt")
    argv = [*TINY, "--seeds", "2", "--out", str(out)]
    return out, argv, train_char_gpt.main(argv)


def test_results_saved_with_their_record(tiny_run):
    out, argv, results = tiny_run
    saved = json.loads((out / "char_gpt.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["run"]["command"] == shlex.join(["python", "examples/train_char_gpt.py", *argv])
    assert saved["run"]["seeds"] == [0, 1] and saved["run"]["threads"] == 1
    timing = saved["timing"]
    assert timing["wall_s"] > 0 and timing["cpu_s"] > 0 and len(timing["loadavg_start"]) == 3
    assert set(timing["sec_per_step"]) == {"mlp", "grkan_scratch", "mlp_finetune", "grkan_finetune", "snnk_finetune"}
    for name in ("char_gpt_conversion.png", "char_gpt_scratch.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_data_is_the_stdlib_split_by_file(tiny_run):
    data = tiny_run[2]["data"]
    root, names = char_gpt.stdlib_files()
    assert data["root"] == str(root) and data["files"] == len(names)
    assert data["file_list_sha256"] == char_gpt.list_hash(names)
    assert data["val_files"] and set(data["val_files"]) < set(names)
    assert data["train_chars"] == data["val_chars"] == 20000  # --max-chars


def test_models_learn_and_conversion_keeps_the_function(tiny_run):
    for run in tiny_run[2]["seeds"]:
        conv = run["conversion"]
        start = conv["pretrain"]["val_loss"][0]
        assert conv["before"] < start - 0.3  # 12 steps already leave the uniform ln(98) = 4.6 nats
        assert run["scratch"]["grkan"]["val_loss"][-1] < run["scratch"]["grkan"]["val_loss"][0] - 0.3
        assert conv["after_conversion"]["mlp"] == conv["before"]
        assert abs(conv["after_conversion"]["grkan"] - conv["before"]) < 1e-3
        assert abs(conv["after_conversion"]["snnk"] - conv["before"]) < 0.5
        assert len(conv["finetune"]["grkan"]["step"]) == 2 and conv["finetune"]["grkan"]["step"][-1] == 6


def test_from_scratch_models_have_matched_parameter_counts(tiny_run):
    params = tiny_run[2]["params"]
    mlp, grkan = params["scratch"]["mlp"], params["scratch"]["grkan"]
    assert abs(grkan - mlp) / mlp < 0.02 and params["hidden"] == {"mlp": 64, "grkan": 64}
    config = char_gpt.GPTConfig(context=32, dim=32, depth=2, heads=2, hidden=64)
    best = train_char_gpt.matched_grkan_config(config)
    for other in (best.hidden - 8, best.hidden + 8):  # the neighbours are no closer
        model = char_gpt.CharGPT(char_gpt.GPTConfig(context=32, dim=32, depth=2, heads=2, hidden=other), "grkan")
        assert abs(train_char_gpt.n_params(model) - mlp) >= abs(grkan - mlp)


def test_matched_width_moves_when_rationals_outweigh_a_group_of_units():
    config = char_gpt.GPTConfig(context=16, dim=8, depth=1, heads=2, hidden=32, groups=8)
    mlp = train_char_gpt.n_params(char_gpt.CharGPT(config, "mlp"))
    matched = train_char_gpt.matched_grkan_config(config)
    # 8 hidden units cost 8 * (2 * 8 + 1) = 136 parameters, the two rationals 2 * 8 * 10 = 160: one group fewer
    assert matched.hidden == 24
    assert abs(train_char_gpt.n_params(char_gpt.CharGPT(matched, "grkan")) - mlp) == 24


def test_rationals_moved_and_statistics(tiny_run):
    _, _, results = tiny_run
    for run in results["seeds"]:
        rows = run["conversion"]["rational_motion"]
        assert len(rows) == 4 and all(r["numerator"]["abs"] > 0 and r["denominator"]["abs"] > 0 for r in rows)
    summary = results["summary"]
    assert summary["scratch"]["grkan"]["n"] == 2 and len(summary["verdicts"]) == 5
    text = train_char_gpt.format_report(results)
    assert "blocks.1.mlp.fc2.rational" in text and "smallest change over all seeds and blocks" in text


def test_same_command_same_numbers(tiny_run, tmp_path):
    """Seed 1 run on its own gives bit for bit the seed-1 numbers of the two-seed run."""
    _, _, results = tiny_run
    again = train_char_gpt.main([*TINY, "--seed", "1", "--seeds", "1", "--no-plot", "--out", str(tmp_path)])
    first, second = (json.dumps(evidence.deterministic_part(r)) for r in (results["seeds"][1], again["seeds"][0]))
    assert first == second
    assert results["seeds"][0]["conversion"]["before"] != results["seeds"][1]["conversion"]["before"]


def test_the_same_command_twice_gives_the_same_json(tiny_run):
    """The fixture's command run again: every number of the JSON (all but timings and dates) equal bit for bit."""
    out, argv, results = tiny_run
    again = train_char_gpt.main(argv)
    saved = json.loads((out / "char_gpt.json").read_text())
    first, second = (json.dumps(evidence.deterministic_part(r)) for r in (results, saved))
    assert first == second and saved == json.loads(json.dumps(again))
    assert saved["timing"] != results["timing"]  # the file is the second run's, not the first one's


def test_a_frozen_rational_stops_the_run(monkeypatch, tmp_path):
    """Optimiser groups that leave the rationals out (a parameter that cannot learn): the run fails, saves nothing."""

    def without_rationals(model, weight_decay):
        frozen = {id(p) for r in evidence.rationals(model).values() for p in r.parameters()}
        return [{"params": [p for p in model.parameters() if id(p) not in frozen], "weight_decay": 0.0}]

    monkeypatch.setattr(train_char_gpt, "param_groups", without_rationals)
    with pytest.raises(SystemExit, match=r"a rational did not learn: blocks\.0\.mlp\.fc1\.rational: numerator and"):
        train_char_gpt.main([*TINY, "--seeds", "1", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_corpus_split_by_file(tmp_path):
    for i in range(40):
        (tmp_path / f"mod{i:02d}.py").write_text(f"x = {i}\n")
    (tmp_path / "notes.txt").write_text("not python")
    corpus = char_gpt.load_corpus(tmp_path, val_fraction=0.2)
    assert sorted(corpus.train_files + corpus.val_files) == [f"mod{i:02d}.py" for i in range(40)]
    assert not set(corpus.train_files) & set(corpus.val_files) and 2 <= len(corpus.val_files) <= 16
    first = (tmp_path / corpus.val_files[0]).read_text() + "\n\n"  # files are joined by a blank line
    assert char_gpt.decode(corpus.val[: len(first)]) == first
    assert char_gpt.decode(char_gpt.encode("é\tok")) == "?\tok"  # outside the vocabulary: one shared token
    windows = char_gpt.fixed_windows(corpus.train, 3, 5)
    assert torch.equal(windows[0][:, 1:], windows[1][:, :-1])  # targets are the inputs shifted by one
    with pytest.raises(SystemExit, match="no \\*.py files"):
        char_gpt.load_corpus(tmp_path / "empty_does_not_exist")


def test_gpt_is_causal_and_matches_sdpa():
    torch.manual_seed(0)
    model = char_gpt.CharGPT(char_gpt.GPTConfig(context=16, dim=16, depth=2, heads=2, hidden=32)).eval()
    idx = torch.randint(0, char_gpt.VOCAB_SIZE, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % char_gpt.VOCAB_SIZE
    with torch.no_grad():
        logits, other = model(idx), model(changed)
    assert torch.equal(logits[:, :10], other[:, :10]) and not torch.allclose(logits[:, 10:], other[:, 10:])
    attn, x = model.blocks[0].attn, torch.randn(2, 16, 16)
    q, k, v = attn.qkv(x).reshape(2, 16, 3, 2, 8).permute(2, 0, 3, 1, 4)
    ref = attn.proj(
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
    )
    torch.testing.assert_close(attn(x), ref)
