"""examples/demo.py (make demo) end to end, with fewer epochs: the CLI converts, the fidelity table is sane."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import demo  # noqa: E402


def test_demo_runs_and_its_table_holds(tmp_path, capsys):
    summary = demo.main(["--epochs", "3", "--out", str(tmp_path), "--threads", "1"])
    out = capsys.readouterr().out
    assert "4 MLP block(s), 0 skipped" in out and "fidelity (no fine-tuning)" in out
    rows = {r[0]: r for r in summary["rows"]}
    assert float(rows["grkan"][2]) < 1e-2 and float(rows["grkan"][3]) > 99.0  # logits kept, predictions kept
    snnk = [float(rows[f"snnk m={m}"][2]) for m in ("h/8", "h/4", "h")]
    assert snnk[0] > snnk[1] > snnk[2]  # closer as m grows
    assert {p.name for p in tmp_path.glob("*.kanc.json")} == {
        "vit_grkan.pt.kanc.json", "vit_snnk_mh8.pt.kanc.json", "vit_snnk_mh4.pt.kanc.json", "vit_snnk_mh.pt.kanc.json"
    }  # fmt: skip
    assert json.loads((tmp_path / "demo.json").read_text())["seconds"] < 180
