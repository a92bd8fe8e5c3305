"""The report's outlier section: the census of every layer is shown only when some layer has outlier columns."""
from __future__ import annotations

from pathlib import Path

from report_tables import deep_results

from fp8probe.report.render import render_report


def test_no_outliers_is_one_sentence_without_a_census_of_zero_rows(tmp_path: Path) -> None:
    """"0 of 37 layers have …" was followed by a collapsed census of 37 all-zero rows (QA C7)."""
    doc = deep_results(n_layers=6, strategies=("global",), width=16, sweeps=False)
    for r in doc["tables"]["outliers"]:
        r.update({"n_outlier_cols": 0, "frac_cols": 0.0, "frac_rows": 0.0, "top_dims": [],
                  "col_amax": [1.0] * len(r["col_amax"])})
    html = render_report(doc, tmp_path / "none.html").read_text(encoding="utf-8")
    section = html.split('<h2 id="outliers">')[1].split("<h2 ")[0]
    assert "No layer has an input feature column with |x| ≥ the LLM.int8 threshold (6; 6 layers checked)." in section
    assert "census" not in section and "<table" not in section and " of 6 layers have" not in section
    flagged = render_report(deep_results(n_layers=6, strategies=("global",), width=16, sweeps=False),
                            tmp_path / "some.html").read_text(encoding="utf-8")
    section = flagged.split('<h2 id="outliers">')[1].split("<h2 ")[0]
    assert "2 of 6 layers have input feature columns" in section and "Outlier census of every layer" in section
