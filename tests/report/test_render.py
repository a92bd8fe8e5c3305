"""Report rendering from the stored results fixture: structure, self-containment, escaping, strictness."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jinja2
import markupsafe
import pytest

from fp8probe.report import render
from fp8probe.report.render import build_report_view, load_results, render_report

DATA = Path(__file__).parent / "data" / "results_small.json"


@pytest.fixture(scope="module")
def results() -> dict:
    return load_results(DATA)


@pytest.fixture(scope="module")
def html(results: dict, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = render_report(results, tmp_path_factory.mktemp("r") / "report.html")
    return out.read_text(encoding="utf-8")


def test_every_layer_and_strategy_present(results: dict, html: str) -> None:
    layers = {r["layer"] for r in results["tables"]["layers"]}
    assert layers
    for layer in layers:
        assert layer in html
    for strategy in results["metadata"]["strategies"]:
        assert f"<h3>{strategy}</h3>" in html
    # one GEMM table and one operand table per strategy, each with a row per layer
    for strategy in results["metadata"]["strategies"]:
        sid = re.sub(r"[^0-9A-Za-z]", "-", strategy)
        block = html.split(f'id="gemm-{sid}"')[1].split("</table>")[0]
        assert block.count("<tr") == 2 + len(layers)  # two header rows + layers


def test_every_figure_embedded_and_self_contained(results: dict, html: str) -> None:
    imgs = re.findall(r'<img src="([^"]+)"', html)
    # histograms, block-size sweep grid, threshold sweep pair (the SQNR heat map and the outlier
    # dimensions are tables: readable and small at 200+ layers)
    assert len(imgs) == 3
    assert all(src.startswith("data:image/png;base64,") for src in imgs)
    assert "http" not in html  # no network reference at all: not even an xmlns
    assert "<link" not in html and "src=\"/" not in html


def test_content_sections(results: dict, html: str) -> None:
    for anchor in ("verdict", "summary", "heatmap", "strategies", "range", "outliers", "blocksize", "threshold", "methods"):
        assert f'id="{anchor}"' in html
    for fmt in results["metadata"]["formats"]:
        assert fmt in html
    for rule in results["metadata"]["rules"].values():
        assert str(markupsafe.escape(rule)) in html
    assert re.search(r"below\s+<strong>20 dB</strong>", html)
    # the fixture plants low SQNR in qkv and fc1 under the fp8 strategies: both must be flagged
    keep = html.split('<h3 id="below-threshold">Layers below 20 dB fprop SQNR in isolation</h3>')[1].split("</ul>")[0]
    assert "blocks.0.attn.qkv" in keep and "blocks.0.mlp.fc1" in keep
    assert "blocks.0.attn.proj" not in keep


def test_keep_rule_threshold_moves_the_list(results: dict) -> None:
    view = build_report_view(results, keep_16bit_db=100.0, draw=False)
    for k in view["summary"]["keep"]:
        assert len(k["layers"]) == k["n_measured"] == len(results["tables"]["layers"])
    view = build_report_view(results, keep_16bit_db=-100.0, draw=False)
    assert all(not k["layers"] for k in view["summary"]["keep"])


@pytest.mark.parametrize(("keep_db", "share"), [(20.0, "1 %"), (30.0, "0.1 %"), (-5.0, "316 %")])
def test_the_keep_rule_says_the_noise_share_of_its_own_threshold(results: dict, tmp_path: Path, keep_db: float,
                                                                  share: str) -> None:
    """The rule read "the quantisation noise exceeds 1 % of the output power" whatever --keep-16bit-db said (QA)."""
    html = render_report(results, tmp_path / "r.html", keep_16bit_db=keep_db, draw=False).read_text("utf-8")
    assert re.search(rf"below\s+<strong>{keep_db:g} dB</strong>, i.e. the quantisation noise exceeds {share} of the "
                     "output power", html)


def test_sweep_tables_show_an_exact_point_as_exact_not_as_missing(results: dict) -> None:
    """An all-zero layer's sweep points (JSON null, note "exact") read "–" in both sweep tables, the mark of a point
    not measured, while the analyze tables and the command line said exact / inf (QA)."""
    data = copy.deepcopy(results)
    layer = data["tables"]["blocksize_sweep"][0]["layer"]
    for r in data["tables"]["blocksize_sweep"]:
        if r["layer"] == layer and r["target"] == "fprop":
            r["sqnr_db"], r["note"] = None, "exact"
    for r in data["tables"]["threshold_sweep"]:
        if r["layer"] == layer:
            r["fprop_sqnr_db"], r["note"] = None, "exact"
    view = build_report_view(data, draw=False)
    (bs_row,) = [row for row in view["blocksize"]["table"]["rows"] if row[0]["text"] == layer]
    assert {c["text"] for c in bs_row[3:]} == {"exact"} and all(c["sort"] == 1e308 for c in bs_row[3:])
    (th_row,) = [row for row in view["threshold"]["table"]["rows"] if row[0]["text"] == layer]
    assert all(c["text"].startswith("exact / ") for c in th_row[2:]), [c["text"] for c in th_row]


def test_hostile_layer_names_are_escaped(results: dict, tmp_path: Path) -> None:
    evil = "<script>alert(1)</script>"
    # "$\\foo$" would be parsed as (invalid) matplotlib mathtext in the figures' axis labels
    data = json.loads(json.dumps(results).replace("blocks.0.attn.qkv", evil + "$\\\\foo$"))
    data["metadata"]["name"] = "<b>x</b>"
    out = render_report(data, tmp_path / "evil.html").read_text(encoding="utf-8")
    assert evil not in out and "<b>x</b>" not in out
    assert "&lt;script&gt;alert(1)&lt;/script&gt;$\\foo$" in out
    assert out.count("<script>") == 1  # only the report's own sorter


def test_nan_inf_flagged(results: dict, tmp_path: Path) -> None:
    data = copy.deepcopy(results)
    data["tables"]["tensors"][0]["nan_count"] = 3
    data["tables"]["gemm"][0]["sqnr_db"] = float("nan")
    out = render_report(data, tmp_path / "nan.html", draw=False).read_text(encoding="utf-8")
    assert "3 NaN and 0 Inf values" in out
    assert ">NaN<" in out


def test_minimal_results_render(tmp_path: Path) -> None:
    data = {"schema": "fp8probe.results", "version": 1, "kind": "sweep-threshold",
            "metadata": {"name": "m"}, "tables": {"layers": [{"layer": "fc"}]}}
    out = render_report(data, tmp_path / "min.html").read_text(encoding="utf-8")
    assert "fc" in out and "http" not in out


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(schema="other"), "not an fp8probe results file"),
    (lambda d: d.update(version=3), "version"),
    (lambda d: d.update(kind="nope"), "kind"),
    (lambda d: d["tables"].pop("layers"), "layers"),
])
def test_bad_results_raise_value_error(results: dict, mutate, message: str) -> None:
    data = copy.deepcopy(results)
    mutate(data)
    with pytest.raises(ValueError, match=message):
        build_report_view(data, draw=False)


def test_load_results_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        load_results(bad)
    with pytest.raises(ValueError, match="cannot read"):
        load_results(tmp_path / "missing.json")


def test_strict_undefined_catches_missing_view_fields(results: dict) -> None:
    view = build_report_view(results, draw=False)
    del view["summary"]["keep"]
    template = render.environment().get_template("report.html.j2")
    with pytest.raises(jinja2.UndefinedError):
        template.render(v=view)
    assert render.environment().undefined is jinja2.StrictUndefined
    assert render.environment().autoescape is True


def test_real_pipeline_results_render(tmp_path: Path) -> None:
    """results_demo_small.json was written by the real pipeline (`fp8probe demo --small`: analyze with
    every strategy + both sweeps merged), so the report is checked against what analysis emits."""
    data = load_results(DATA.parent / "results_demo_small.json")
    html = render_report(data, tmp_path / "demo.html").read_text(encoding="utf-8")
    for r in data["tables"]["layers"]:
        assert r["layer"] in html
    for s in data["metadata"]["strategies"]:
        assert f"<h3>{s}</h3>" in html
    for rule in data["metadata"]["recommendations"].values():
        assert str(markupsafe.escape(rule)) in html
    imgs = re.findall(r'<img src="([^"]+)"', html)
    assert len(imgs) == 3 and all(i.startswith("data:image/png;base64,") for i in imgs)
    assert "http" not in html


def test_recipe_failures_listed(results: dict, tmp_path: Path) -> None:
    data = copy.deepcopy(results)
    data["tables"]["errors"] = [{"layer": "head", "strategy": "llm-int8", "error": "ValueError: <bad> shape"}]
    out = render_report(data, tmp_path / "err.html", draw=False).read_text(encoding="utf-8")
    assert "Recipe failures" in out and "ValueError: &lt;bad&gt; shape" in out


def test_report_command(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from fp8probe.cli import cli

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "something-else"}))
    res = CliRunner().invoke(cli, ["report", str(bad), "-o", str(tmp_path / "r.html")])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1
    assert "not an fp8probe results file" in res.output


def test_outputs_are_written_atomically_with_normal_permissions(results: dict, tmp_path: Path, monkeypatch) -> None:
    """A failed write leaves the previous report intact and no temp file; new files are not mkstemp's 0600."""
    import os

    from fp8probe.report import files

    out = render_report(results, tmp_path / "r.html", draw=False)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~_current_umask()
    before = out.read_text(encoding="utf-8")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        render_report(results, out, draw=False)
    assert out.read_text(encoding="utf-8") == before
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]


def _current_umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_isolated_summary_counts_linear_layers_apart_from_activation_gemms(results: dict, tmp_path: Path) -> None:
    """'13 linear layers' for a GPT-2 with 8 linear layers and 5 attention GEMMs."""
    doc = copy.deepcopy(results)
    for r in doc["tables"]["layers"][:2]:
        r["b_is_weight"] = False
    n = len(doc["tables"]["layers"])
    html = render_report(doc, tmp_path / "r.html").read_text()
    assert f"{n - 2} linear layers and 2 GEMMs of two activations" in html
    plain = render_report(results, tmp_path / "p.html").read_text()
    assert f"{n} linear layers, strategies" in plain or f"{n} linear layers." in plain


def test_a_low_top1_agreement_is_marked_in_the_end_to_end_table() -> None:
    """FP4 runs of a random-init LM agreed on 30 % of top-1 predictions and read green "within budget", nothing red
    but the output SQNR (QA of the HTML report)."""
    from report_tables import e2e_rows, recommendation_rows

    from fp8probe.report.render import TOP1_WARN, _verdict_section
    rows = e2e_rows()
    rows[0]["top1_agreement"] = 0.31
    view = _verdict_section({"e2e": rows, "recommendation": recommendation_rows([])}, {}, 20.0)
    table = json.dumps(view)
    assert '"text": "31.0 %", "sort": 31.0, "cls": "bad"' in table
    assert TOP1_WARN * 100 > 31.0 and '"text": "98.5 %", "sort": 98.5, "cls": ""' in table
