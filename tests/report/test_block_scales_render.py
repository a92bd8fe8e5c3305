"""The report's block-scale section: absent for old results, pooled counts, figure and per-layer table from block_scales rows."""
from __future__ import annotations

import copy
from pathlib import Path

from fp8probe.report.render import build_report_view, load_results, render_report

DATA = Path(__file__).parent / "data" / "results_small.json"


def _row(layer: str, n_blocks: int, clipped: float, exp_lo: int, counts: list[int]) -> dict:
    return {"layer": layer, "strategy": "mxfp8", "operand": "activation", "format": "mxfp8-e4m3", "block": "1x32",
            "scale_rule": "floor", "n_blocks": n_blocks, "zero_blocks": 0, "nonfinite_blocks": 0,
            "zero_scale_blocks": 0, "scale_min": 2.0**exp_lo, "scale_max": 2.0 ** (exp_lo + len(counts) - 1),
            "scale_log2_mean": 0.0, "scale_log2_std": 1.0, "clipped_block_frac": clipped,
            "underflow_block_frac": 0.0, "underflow_frac": 0.0, "max_block_underflow_frac": 0.0,
            "exp_lo": exp_lo, "exp_counts": counts}


def test_old_results_have_no_block_section() -> None:
    view = build_report_view(load_results(DATA), draw=False)
    assert view["block_scales"] is None


def test_block_section_pools_layers(tmp_path: Path) -> None:
    data = copy.deepcopy(load_results(DATA))
    layers = [r["layer"] for r in data["tables"]["layers"]][:2]
    data["tables"]["block_scales"] = [_row(layers[0], 100, 0.5, -3, [10, 90]), _row(layers[1], 300, 0.0, -2, [300])]
    view = build_report_view(data, draw=True)
    sec = view["block_scales"]
    (row,) = sec["summary"]["rows"]
    assert [c["text"] for c in row[:6]] == ["mxfp8", "activation", "mxfp8-e4m3", "1x32", "floor", "400"]
    assert row[8]["text"] == "-3 … -2"
    assert row[9]["sort"] == 50 / 400                      # 50 of the 400 pooled blocks clip
    assert len(sec["table"]["rows"]) == 2 and sec["figure"].startswith("data:image/png;base64,")
    html = render_report(data, tmp_path / "r.html").read_text(encoding="utf-8")
    assert 'id="block-scales"' in html and "http" not in html.replace("http-equiv", "")


def test_pooled_row_names_every_layer_block_size() -> None:
    """mixed picks a block size per layer: the pooled row gave the first layer's alone (QA: "256 (flattened)" for
    layers at 64-1024)."""
    data = copy.deepcopy(load_results(DATA))
    layers = [r["layer"] for r in data["tables"]["layers"]][:3]
    rows = [_row(layer, 10, 0.0, -3, [10]) for layer in layers]
    for r, block in zip(rows, ["1024 (flattened)", "64 (flattened)", "1024 (flattened)"]):
        r.update(strategy="mixed", format="bnb-e4m3", block=block, scale_rule="absmax")
    data["tables"]["block_scales"] = rows
    (row,) = build_report_view(data, draw=False)["block_scales"]["summary"]["rows"]
    assert row[3]["text"] == "64, 1024 (flattened), by layer"
    rows[1]["block"] = "1024 (flattened)"
    (row,) = build_report_view(data, draw=False)["block_scales"]["summary"]["rows"]
    assert row[3]["text"] == "1024 (flattened)"
