"""report.html in a real headless Chromium (Debian's package; `make test` installs it): the page renders, the SVG
roofline and bar chart and the findings are in the DOM, and the screenshot is not blank."""

import os
import shutil
import subprocess
from html import escape

import pytest
import torch
from PIL import Image

import kanc

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def _chromium(tmp_path, *args) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        pytest.fail("chromium not found: install Debian's chromium (apt-get install chromium; `make test` does)")
    profile = tmp_path / "chromium-profile"
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})


def test_report_html_renders_with_its_plots(tmp_path, make_kan_model):
    report = kanc.profile(make_kan_model(), torch.randn(2, 12, 16), train=True, warmup=1, iters=2)
    page = report.write(tmp_path / "prof") / "report.html"
    url = page.resolve().as_uri()
    dom = _chromium(tmp_path, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert '<svg id="roofline"' in html and '<svg id="layer-times"' in html
    assert html.count('class="point"') >= 6  # one per counted layer and direction
    assert html.count('class="roof"') >= 1 and html.count('class="bar"') >= 6
    # the top findings, whose wording follows the measured CPU peaks (test_profile.py tests it on fixed figures)
    shown = report.findings[:8]
    assert any(f.kind == "roofline" for f in shown) and "reference (no kernel)" in html
    assert all(escape(f.text, quote=False) in html for f in shown), [f.text for f in shown]
    png = tmp_path / "report.png"
    shot = _chromium(tmp_path, f"--screenshot={png}", "--window-size=1280,1100", "--hide-scrollbars", url)
    assert shot.returncode == 0 and png.is_file(), shot.stderr[-2000:]
    image = Image.open(png).convert("RGB")
    assert image.size == (1280, 1100)
    colors = image.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50  # text, axes, points and bars: far from a blank page
    pixels = list(image.getdata())
    forward = sum(1 for r, g, b in pixels if abs(r - 0x2B) < 30 and abs(g - 0x6C) < 30 and abs(b - 0xB0) < 30)
    backward = sum(1 for r, g, b in pixels if abs(r - 0xDD) < 30 and abs(g - 0x6B) < 30 and abs(b - 0x20) < 30)
    assert forward > 500 and backward > 500  # the bars and points are drawn in both directions' colours
