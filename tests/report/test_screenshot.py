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
