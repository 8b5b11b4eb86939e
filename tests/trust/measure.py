"""Run every kanc command (and ``kanc.load``) on every hostile input of ``hostile.py`` and print what happened:
exit code, stderr lines, whether the payload ran (marker file), whether any file changed.

    python tests/trust/measure.py [--only NAME] [--subprocess] [--json results.json]

In this process by default (fast; a payload that runs only creates its marker), or each in a fresh process with
``--subprocess`` (what a user sees). A good row reads: exit 1, one stderr line, marker no, changed no.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostile  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SHAPE = ["--input-shape", "4,8"]
COMMANDS = {
    "convert": lambda m, out: ["convert", m, "-t", "grkan", "-o", out / "converted"],
    "inspect": lambda m, out: ["inspect", m],
    "profile": lambda m, out: ["profile", m, *SHAPE, "--iters", "1", "--warmup", "0", "-o", out / "prof"],
    "tune": lambda m, out: ["tune", m, *SHAPE, "--iters", "1", "--warmup", "0"],
    "export": lambda m, out: ["export", "onnx", m, "-o", out / "m.onnx", *SHAPE],
    "load": None,
}


def run_here(command: str, case: hostile.Case, out: Path) -> subprocess.CompletedProcess:
    """The command in this process: the same fields as a finished subprocess."""
    os.environ["KANC_CACHE_DIR"] = str(out / "cache")
    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            if command == "load":
                import kanc

                kanc.load(case.model)
            else:
                from kanc.cli import main

                main([str(a) for a in COMMANDS[command](case.model, out) + case.args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException as e:  # noqa: BLE001 - kanc.load raising is the measurement: its type and first line
            print(f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}", file=sys.stderr)
            code = 1
    return subprocess.CompletedProcess([command], code, stdout.getvalue(), stderr.getvalue())


def run(command: str, case: hostile.Case, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KANC_CACHE_DIR": str(out / "cache")}
    env.pop("KANC_DEBUG", None)
    if command == "load":
        argv = [sys.executable, "-c", f"import kanc\nkanc.load({str(case.model)!r})"]
    else:
        argv = [sys.executable, "-m", "kanc", *map(str, COMMANDS[command](case.model, out) + case.args)]
    return subprocess.run(argv, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=600)


def measure(only: str | None, fresh_process: bool) -> list[dict]:
    rows = []
    for name in hostile.BUILDERS:
        if only and only not in name:
            continue
        for command in COMMANDS:
            with tempfile.TemporaryDirectory() as tmp:
                root = Path(tmp)
                case = hostile.build(name, root / "in")
                (root / "out").mkdir()
                before = hostile.snapshot(root / "in")
                proc = (run if fresh_process else run_here)(command, case, root / "out")
                after = hostile.snapshot(root / "in")
                lines = [s for s in proc.stderr.splitlines() if s.strip()]
                rows.append(
                    {
                        "case": name,
                        "command": command,
                        "exit": proc.returncode,
                        "stderr_lines": len(lines),
                        "first_line": lines[-1][:150] if lines else "",
                        "stdout": proc.stdout[-300:],
                        "marker": bool(hostile.markers(root)),
                        "changed": sorted(set(before.items()) ^ set(after.items())) != [],
                        "said": case.says in proc.stderr,
                    }
                )
                print(_row(rows[-1]), flush=True)
    return rows


def _good(r: dict) -> bool:
    """Refused in one line (kanc.load: a KancError) or, for convert, "already converted"; nothing ran or changed."""
    refused = (
        r["exit"] == 1
        and r["stderr_lines"] == 1
        and (r["command"] != "load" or r["first_line"].startswith("KancError"))
    )
    done = r["command"] == "convert" and r["exit"] == 0 and "already converted" in r["stdout"]
    return (refused or done) and not r["marker"] and not r["changed"]


def _row(r: dict) -> str:
    flag = "ok " if _good(r) else "BAD"
    return (
        f"{flag} {r['case']:<26} {r['command']:<8} exit {r['exit']:>3}  stderr {r['stderr_lines']:>3} lines  "
        f"marker {'YES' if r['marker'] else 'no ':<3}  changed {'YES' if r['changed'] else 'no ':<3}  {r['first_line']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="Only cases whose name contains this.")
    parser.add_argument("--json", default=None, help="Save the rows as JSON here.")
    parser.add_argument("--subprocess", action="store_true", help="Each run in a fresh process.")
    args = parser.parse_args()
    rows = measure(args.only, args.subprocess)
    bad = [r for r in rows if not _good(r)]
    print(f"{len(rows) - len(bad)}/{len(rows)} good; payload ran in {sum(r['marker'] for r in rows)}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
