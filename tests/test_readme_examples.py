"""Every ```python block of README.md's Matmul suite section (<!-- api-examples --> to the next marker) runs."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
START = "<!-- api-examples -->"


def _examples() -> list[str]:
    text = README.read_text(encoding="utf-8")
    if START not in text:
        raise AssertionError(f"README.md lost its {START} marker")
    section = text.split(START, 1)[1]
    end = section.find("<!--")
    section = section if end < 0 else section[:end]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


EXAMPLES = _examples()


def test_section_has_examples() -> None:
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index: int) -> None:
    code = compile(EXAMPLES[index], f"README.md[api-examples #{index}]", "exec")
    exec(code, {"__name__": f"readme_example_{index}"})
