"""User-controlled strings (layer names, paths, run names, metadata, strategy errors) cannot inject HTML or Markdown."""
from __future__ import annotations

import copy
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

import fp8probe.report.figures as figures
from fp8probe.report.compare import compare_markdown, compare_results
from fp8probe.report.render import render_compare, render_report

DATA = Path(__file__).resolve().parent / "data" / "results_small.json"
HOSTILE = [
    "<script>alert(1)</script>",
    '"onerror="alert(2)',
    "<img src=x onerror=alert(3)>",
    "</td></tr></table><a href='javascript:alert(4)'>x</a>",
    "a & b &amp; c",
    "ünïcødé ✓ 𝔘 层",
    "$\\frac{1}{$ mathtext",
    "[click](javascript:alert(5)) *bold* `tick` | pipe",
    "{{ 7 * 7 }}",
    "line\nbreak\r\x1b[2J",
]


def _hostile_results() -> dict:
    """results_small.json with every layer renamed to a hostile string (consistently across tables),
    and hostile run name, model path, inputs, versions, loss detail, rules and a strategy error."""
    doc = json.loads(DATA.read_text())
    layers = list(dict.fromkeys(r["layer"] for r in doc["tables"]["layers"]))
    half = (len(HOSTILE) + 1) // 2  # two hostile strings per layer name, so 5 layers carry all of them
    rename = {old: f"{HOSTILE[i % half]} {HOSTILE[(i + half) % len(HOSTILE)]}.{i}" for i, old in enumerate(layers)}
    for rows in doc["tables"].values():
        for r in rows:
            if r.get("layer") in rename:
                r["layer"] = rename[r["layer"]]
    meta = doc["metadata"]
    meta["name"] = HOSTILE[0] + " " + HOSTILE[5]
    meta["model"] = "/models/" + HOSTILE[3] + ".pt2"
    meta["inputs"] = HOSTILE[1]
    meta["versions"] = {**meta.get("versions", {}), "torch": HOSTILE[2]}
    meta["loss"] = {"kind": "custom", "detail": HOSTILE[7]}
    meta["rules"] = {k: v + " " + HOSTILE[0] for k, v in (meta.get("rules") or {}).items()}
    doc["tables"]["errors"] = [{"layer": rename[layers[0]], "strategy": "global",
                                "error": "RuntimeError: " + HOSTILE[2] + HOSTILE[0]}]
    return doc


class _Audit(HTMLParser):
    """Collects what an injection would create: elements, on* attributes, link targets, script text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.on_attrs: list[tuple[str, str]] = []
        self.urls: list[str] = []
        self.script_text: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self._in_script = tag == "script"
        for name, value in attrs:
            if name.lower().startswith("on"):
                self.on_attrs.append((tag, name))
            if name.lower() in ("href", "src", "action", "formaction"):
                self.urls.append(value or "")

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.script_text.append(data)


def _audit(html: str) -> _Audit:
    audit = _Audit()
    audit.feed(html)
    audit.close()
    return audit


def _assert_no_injection(html: str, clean_html: str) -> None:
    """``html`` (hostile data) has exactly the elements the clean report's template makes, no event
    handlers, no script text from the data and no link other than in-page anchors and PNG data URIs."""
    bad, clean = _audit(html), _audit(clean_html)
    assert bad.tags.count("script") == clean.tags.count("script") <= 1
    assert sorted(set(bad.tags)) == sorted(set(clean.tags)), set(bad.tags) ^ set(clean.tags)
    assert bad.on_attrs == []
    assert "alert" not in "".join(bad.script_text)
    for url in bad.urls:
        assert url.startswith(("#", "data:image/png;base64,")), url
    # the hostile text is there, as text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "ünïcødé ✓ 𝔘 层" in html
    assert "{{ 7 * 7 }}" in html or "{{ 7 * 7 }}".replace(" ", "") not in html  # data is never a template


@pytest.fixture(scope="module")
def hostile() -> dict:
    return _hostile_results()


@pytest.mark.parametrize("draw", [False, True], ids=["no-figures", "figures"])
def test_report_escapes_everything(hostile, tmp_path, draw) -> None:
    """draw=True also proves matplotlib gets the names as plain text ($...$ would be mathtext and fail)."""
    clean = render_report(json.loads(DATA.read_text()), tmp_path / "clean.html", draw=draw).read_text()
    html = render_report(hostile, tmp_path / "bad.html", draw=draw).read_text()
    _assert_no_injection(html, clean)


def _degraded(results: dict) -> dict:
    """Every layer loses 10 dB and one layer is added: names appear in violations and added lists."""
    worse = copy.deepcopy(results)
    for r in worse["tables"].get("gemm", []):
        if isinstance(r.get("sqnr_db"), (int, float)):
            r["sqnr_db"] -= 10.0
    worse["tables"]["layers"].append({"layer": worse["tables"]["layers"][0]["layer"] + "-added"})
    return worse


def test_compare_html_escapes_everything(hostile, tmp_path) -> None:
    base = json.loads(DATA.read_text())
    clean = render_compare(compare_results(base, _degraded(base)), tmp_path / "clean.html").read_text()
    cmp = compare_results(hostile, _degraded(hostile))
    assert not cmp["passed"] and cmp["added_layers"]
    html = render_compare(cmp, tmp_path / "bad.html").read_text()
    _assert_no_injection(html, clean)


def _outside_code_spans(line: str) -> str:
    """The parts of a Markdown line that are not inside `code spans`."""
    return "".join(part for i, part in enumerate(re.split(r"(`[^`]*`)", line)) if i % 2 == 0)


def test_markdown_quotes_every_user_string(hostile) -> None:
    base = copy.deepcopy(hostile)
    for r in base["tables"]["gemm"]:
        r["strategy"] = "[click](javascript:alert(6)) <b>" + r["strategy"]  # recipes are user data too
    md = compare_markdown(compare_results(base, _degraded(base)))
    table_widths: list[int] = []
    for line in md.splitlines():
        text = _outside_code_spans(line)
        assert line.count("`") % 2 == 0, line  # every span is closed on its own line
        for needle in ("<", ">", "](", "javascript:", "alert", "*bold*", "\x1b"):
            assert needle not in text, (needle, line)
        if line.startswith("|"):
            cells = re.split(r"(?<!\\)\|", line)
            table_widths.append(len(cells))
        elif table_widths:
            assert len(set(table_widths)) == 1, table_widths  # an escaped pipe never adds a column
            table_widths = []
    # the name is shown verbatim inside a code span (its line break folded to a space)
    assert "`<script>alert(1)</script> ünïcødé ✓ 𝔘 层.0`" in md


def test_figure_labels_are_plain_text(hostile) -> None:
    """Figure labels come from the same names: mathtext and control characters must not break drawing."""
    names = [r["layer"] for r in hostile["tables"]["layers"]]
    fig = figures.delta_bars(names, [-1.0 - i for i in range(len(names))], 1.0)
    assert figures.figure_to_data_uri(fig).startswith("data:image/png;base64,")
