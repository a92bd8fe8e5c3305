"""The rendered report opens in headless Chromium (offline) and paints a non-blank page; skipped without chromium."""
from __future__ import annotations

import importlib.util
import shutil
import struct
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).parent / "data" / "results_small.json"

pytestmark = pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")


def _load_script():
    spec = importlib.util.spec_from_file_location("screenshot_report", ROOT / "benchmarks" / "screenshot_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_screenshot_of_report(tmp_path: Path) -> None:
    mod = _load_script()
    png = tmp_path / "shot.png"
    assert mod.main([str(DATA), "-o", str(png), "--width", "1000", "--height", "1200"]) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1000, 1200)
    # a blank page compresses to a few KB; the report's tables and charts do not
    assert len(data) > 50_000


# Injected before </body>: after laying the page out at the window's width (every <details> open), it writes the
# page's scroll width and its viewport width into the DOM that --dump-dom prints.
_MEASURE = ("<script>document.querySelectorAll('details').forEach(d => d.open = true);"
            "const p = document.createElement('pre'); p.id = 'widths';"
            "p.textContent = document.documentElement.scrollWidth + ' ' + document.documentElement.clientWidth;"
            "document.body.appendChild(p);</script></body>")


def _page_widths(html: Path, width: int, tmp_path: Path) -> tuple[int, int]:
    """(scroll width, viewport width) of ``html`` in headless Chromium at a ``width`` px window."""
    import re
    import subprocess

    probe = tmp_path / "probe.html"
    probe.write_text(html.read_text(encoding="utf-8").replace("</body>", _MEASURE), encoding="utf-8")
    mod = _load_script()
    proc = subprocess.run([mod.find_chromium(), *mod.CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                           f"--window-size={width},1000", "--virtual-time-budget=3000", "--dump-dom",
                           probe.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="widths">(\d+) (\d+)</pre>', proc.stdout)
    assert found, proc.stderr[-2000:]
    return int(found.group(1)), int(found.group(2))


def test_at_800_px_only_wide_tables_scroll_not_the_page(tmp_path: Path) -> None:
    """A warning naming a long layer name (no break opportunity in it) pushed the whole page sideways at 800 px,
    where the wide tables scroll inside their own box (QA)."""
    import copy
    import json

    from fp8probe.report.render import load_results, render_report
    from report_tables import with_agreed_tables

    data = with_agreed_tables(load_results(DATA.parent / "results_demo_small.json"), keep=["blocks.1.mlp.fc2"])
    long_name = "model.language_model.encoder.layers.0.self_attention.query_key_value_projection_" + "x" * 60
    data = json.loads(json.dumps(data).replace("blocks.0.fc1", long_name))
    for r in data["tables"]["operands"]:
        if r["layer"] == long_name:
            r["underflow_frac"] = 0.5  # (the verdict warns of it, naming the layer)
    html = render_report(copy.deepcopy(data), tmp_path / "r.html", draw=False)
    assert long_name in html.read_text(encoding="utf-8").split('<section id="verdict">')[1].split("</ul>")[0]
    scroll, viewport = _page_widths(html, 800, tmp_path)
    assert scroll <= viewport
