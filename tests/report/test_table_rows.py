"""render.table_rows builds the table macro's <tbody> rows in Python: byte-identical to the jinja loop it replaced."""
from __future__ import annotations

import jinja2
import pytest
from markupsafe import Markup

from fp8probe.report.render import table_rows

# The loop as the macro had it (templates/_macros.html.j2), in the report's environment settings.
LOOP = """{% for row in rows %}
<tr>{% for c in row %}<td{% if c.cls %} class="{{ c.cls }}"{% endif %}{% if c.sort is not none %} data-sort="{{ c.sort }}"{% endif %}>{{ c.text }}</td>{% endfor %}</tr>
{% else %}
<tr><td colspan="{{ ncols }}" class="empty">no rows</td></tr>
{% endfor %}
"""


def _jinja(rows: list, ncols: int) -> str:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True)
    return env.from_string(LOOP).render(rows=rows, ncols=ncols)


CELLS = [
    {"text": "1.25", "sort": 1.25, "cls": ""},
    {"text": "–", "sort": None, "cls": "warn"},
    {"text": "∞", "sort": 1e308, "cls": ""},
    {"text": "<script>alert('x')</script> & \"q\"", "sort": None, "cls": "txt"},
    {"text": "yes", "sort": 1, "cls": "a\"b<c>"},
    {"text": Markup("<b>kept</b>"), "sort": -0.0, "cls": None},
    {"text": 42, "sort": float("nan"), "cls": "x"},
    {"text": "", "sort": 0, "cls": ""},
]


@pytest.mark.parametrize("rows", [[], [CELLS], [CELLS[:3], CELLS[3:], [CELLS[0]]], [[]]])
def test_same_bytes_as_the_jinja_loop(rows: list) -> None:
    assert str(table_rows(rows, 7)) == _jinja(rows, 7)
    assert isinstance(table_rows(rows, 7), Markup)  # inserted as is by the autoescaping template


def test_a_cell_without_its_keys_is_an_error_as_in_the_template() -> None:
    with pytest.raises(KeyError):
        table_rows([[{"text": "a"}]], 1)


def test_a_cell_with_a_title_says_it_escaped_on_hover() -> None:
    """A flagged cell of the end-to-end table says why in its title (QA A3); a cell without one is unchanged."""
    row = [{"text": "yes*", "sort": 0.5, "cls": "warn", "title": "KL 196× the plan's <b>\"x\"</b>"}, CELLS[0]]
    assert str(table_rows([row], 2)) == ('<tr><td class="warn" data-sort="0.5" title="KL 196× the plan&#39;s '
                                        '&lt;b&gt;&#34;x&#34;&lt;/b&gt;">yes*</td><td data-sort="1.25">1.25</td></tr>\n')
