"""Render a results JSON to HTML and take a headless Chromium screenshot of it (offline: no network flags)."""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from fp8probe.report.render import load_results, render_report

# Every flag that could make Chromium reach a network is turned off: the report is self-contained
# and the screenshot must prove it renders without one.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars")
WINDOW = (1400, 1000)  # the first screen: the verdict must be readable in it


def find_chromium() -> str | None:
    """Path of a Chromium binary (Debian `chromium`, or `chromium-browser` / `google-chrome`), else None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(html: Path, png: Path, window: tuple[int, int] = WINDOW, timeout_s: float = 120.0) -> Path:
    """Screenshot ``html`` (a local file) into ``png`` at ``window`` = (width, height) CSS pixels."""
    binary = find_chromium()
    if binary is None:
        raise RuntimeError("no chromium binary on PATH (Debian: apt-get install -y chromium)")
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fp8probe-chromium-") as profile:
        cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={png.resolve()}",
               f"--window-size={window[0]},{window[1]}", html.resolve().as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0 or not png.exists() or png.stat().st_size == 0:
        raise RuntimeError(f"chromium failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", type=Path, help="results JSON (e.g. reports/demo/results.json)")
    parser.add_argument("-o", "--out", type=Path, default=Path("reports/demo_screenshot.png"), help="PNG to write")
    parser.add_argument("--html", type=Path, default=None, help="where to render the HTML (default: a temp file)")
    parser.add_argument("--width", type=int, default=WINDOW[0])
    parser.add_argument("--height", type=int, default=WINDOW[1])
    parser.add_argument("--small", action="store_true",
                        help="store a 256-colour palette PNG (3-4x smaller; for the screenshots committed to reports/)")
    args = parser.parse_args(argv)
    results = load_results(args.results)
    with tempfile.TemporaryDirectory(prefix="fp8probe-shot-") as tmp:
        html = render_report(results, args.html or Path(tmp) / "report.html")
        png = screenshot(html, args.out, (args.width, args.height))
    if args.small:
        from PIL import Image

        with Image.open(png) as im:
            small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        small.save(png, format="PNG", optimize=True)
    print(f"screenshot written to {png} ({png.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
