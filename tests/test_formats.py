"""Tests for fp8probe/formats.py: codebooks bit-exact with bitsandbytes 0.49.2, format table, constants, CLI."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from click.testing import CliRunner
from support import vectors_file

from fp8probe import formats
from fp8probe.cli import cli
from fp8probe.formats import (
    FORMATS,
    create_dynamic_map,
    create_fp8_map,
    create_linear_map,
    format_table,
    get_codebook,
    validate_codebook,
)

# vectors name -> (fp8probe name, constructor call)
BOOKS = {
    "e4m3": ("bnb-e4m3", lambda: create_fp8_map(True, 4, 3, 8)),
    "e5m2": ("bnb-e5m2", lambda: create_fp8_map(True, 5, 2, 8)),
    "dynamic_signed": ("dynamic", lambda: create_dynamic_map(True, 7, 8)),
    "dynamic_unsigned": ("dynamic-unsigned", lambda: create_dynamic_map(False, 7, 8)),
    "linear_signed": ("linear", lambda: create_linear_map(True, 8, True)),
}


def _bits(t: torch.Tensor) -> list[int]:
    return [v & 0xFFFFFFFF for v in t.contiguous().view(torch.int32).tolist()]


@pytest.fixture(scope="module")
def books() -> dict:
    return json.loads(vectors_file("codebooks.json").read_text())["codebooks"]


@pytest.mark.parametrize("vec_name", sorted(BOOKS))
def test_codebooks_bit_exact_with_bnb(books: dict, vec_name: str) -> None:
    name, make = BOOKS[vec_name]
    expected = [int(h, 16) for h in books[vec_name]["float32_bits"]]
    assert _bits(make()) == expected
    assert _bits(get_codebook(name)) == expected


def test_fp8_map_structure() -> None:
    code = get_codebook("bnb-e4m3")
    assert code[0].item() == -1.0 and code[255].item() == 1.0
    # +0.0 at 127, -0.0 at 128 (stable sort of v, -v), 255 distinct values
    assert _bits(code[127:129]) == [0x00000000, 0x80000000]
    assert code.unique().numel() == 255
    # smallest positive normalised value: 2**-11 / 480 (SPEC §1.1 table: 1.0172527e-6)
    assert code[129].item() == pytest.approx(2.0**-11 / 480, rel=1e-7)


def test_dynamic_map_structure() -> None:
    code = get_codebook("dynamic")
    assert code[0].item() == pytest.approx(-(1 - 0.9 / 128), rel=1e-7)
    assert code[255].item() == 1.0 and code[127].item() == 0.0
    unsigned = get_codebook("dynamic-unsigned")
    assert unsigned[0].item() == 0.0 and unsigned[255].item() == 1.0


def test_few_bit_maps_have_expected_distinct_counts() -> None:
    # SPEC §9 test_few_bit_quant: unique values in {2**b, 2**b - 1}, always 256 entries
    for bits in (3, 4, 5, 6, 7):
        fp8 = create_fp8_map(True, bits - 2, 1, bits)
        assert fp8.numel() == 256 and fp8.unique().numel() in (2**bits, 2**bits - 1)
        validate_codebook(fp8)  # padded with zeros, then sorted again (SPEC §1.1)
        lin = create_linear_map(True, bits)
        assert lin.numel() == 256 and lin.unique().numel() in (2**bits, 2**bits - 1)
    assert create_dynamic_map(True, 4, 5).unique().numel() in (31, 32)


def test_few_bit_linear_map_is_not_sorted_like_bnb_and_accepted() -> None:
    # bnb inserts the zero padding in the middle of linspace(-1, 1, 7) without sorting, so the
    # 3-bit map has zeros between -0.333 and a slightly negative middle point: not ascending.
    # bnb quantises with it, so the codebook check accepts it (issue 14, item 3).
    code = create_linear_map(True, 3)
    assert not bool((code[1:] >= code[:-1]).all())
    validate_codebook(code)


def test_get_codebook_returns_independent_copies() -> None:
    a = get_codebook("dynamic")
    a[0] = -1.0  # what bnb's CPU kernel does to its shared cache (Q2)
    b = get_codebook("dynamic")
    assert b[0].item() != -1.0
    assert a.data_ptr() != b.data_ptr()


def test_get_codebook_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown codebook 'e4m3'"):
        get_codebook("e4m3")


def test_create_fp8_map_rejects_inconsistent_bits() -> None:
    with pytest.raises(ValueError, match="exponent_bits \\+ precision_bits"):
        create_fp8_map(True, 4, 4, 8)


@pytest.mark.parametrize(
    ("bad", "exc", "match"),
    [
        ([0.0] * 256, TypeError, "torch.Tensor"),
        (torch.linspace(-1, 1, 256, dtype=torch.float64), ValueError, "float32"),
        (torch.linspace(-1, 1, 255), ValueError, "shape \\[256\\]"),
        (torch.linspace(-1, 1, 256).reshape(16, 16), ValueError, "shape \\[256\\]"),
        (torch.cat([torch.linspace(-1, 1, 255), torch.tensor([float("nan")])]), ValueError, "finite"),
        (torch.cat([torch.linspace(-1, 1, 255), torch.tensor([float("inf")])]), ValueError, "finite"),
    ],
)
def test_validate_codebook_errors(bad: object, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        validate_codebook(bad)


def test_validate_codebook_accepts_every_named_book() -> None:
    for name in formats.CODEBOOK_NAMES:
        validate_codebook(get_codebook(name))


def _fl32_bits(v: float) -> int:
    return struct.unpack("<I", struct.pack("<f", v))[0]


def test_int8_constants() -> None:
    assert formats.SCALE_INT8 == 127
    assert formats.INV_127 == 0.007874015718698502
    assert _fl32_bits(formats.INV_127_SQ) == 0x38820610  # fl32(1/16129), SPEC §5.5
    assert _fl32_bits(formats.BNB_INV_127_SQ_TYPO) == 0x388206AA  # bnb CPU typo, Q9
    # the constants are already float32 values, so casting them is exact
    assert torch.tensor(formats.INV_127_SQ).item() == formats.INV_127_SQ


def test_ocp_formats_match_torch_float8() -> None:
    for name, dt in (("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)):
        fi = torch.finfo(dt)
        f = FORMATS[name]
        assert f.max == fi.max
        assert f.min_normal == fi.smallest_normal
        # smallest subnormal: one mantissa ulp below the smallest normal binade
        mant_bits = {"e4m3": 3, "e5m2": 2}[name]
        assert f.min_subnormal == fi.smallest_normal * 2.0**-mant_bits
        assert FORMATS["mxfp8-" + name].max == f.max


def test_bnb_formats_match_codebook_stats(books: dict) -> None:
    for vec_name, name in (("e4m3", "bnb-e4m3"), ("e5m2", "bnb-e5m2")):
        stats = books[vec_name]["stats"]
        f = FORMATS[name]
        assert f.max == stats["max_unnormalised"]
        assert f.min_normal == stats["min_normal_unnormalised"]
        assert f.min_subnormal == stats["min_subnormal_unnormalised"]
    dyn = get_codebook("dynamic")
    assert FORMATS["dynamic"].min_subnormal == pytest.approx(dyn[dyn > 0].min().item(), rel=1e-6)


def test_format_table_rows() -> None:
    rows = format_table()
    names = [r["name"] for r in rows]
    for required in ("bnb-e4m3", "bnb-e5m2", "dynamic", "e4m3", "e5m2", "int8", "mxfp8-e4m3", "mxfp8-e5m2"):
        assert required in names
    for r in rows:
        assert {"name", "max", "min_normal", "min_subnormal", "description"} <= set(r)
        assert 0 < r["min_subnormal"] <= r["min_normal"] <= r["max"]
    with pytest.raises(ValueError, match="min_subnormal"):
        formats.NumberFormat("bad", 1.0, 2.0, 1.0, "x", "float8")


def test_cli_formats_table_and_json() -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["formats"])
    assert res.exit_code == 0, res.output
    assert "mxfp8-e4m3" in res.output and "448" in res.output
    res = runner.invoke(cli, ["formats", "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert {r["name"]: r["max"] for r in rows}["bnb-e5m2"] == 114688.0


def test_lowbit_format_rows_match_their_element_tables() -> None:
    """max / min normal / min subnormal of the 4/6-bit rows equal the extremes of the decoded code tables."""
    from fp8probe.backends.reference import ELEMENT_OF, lowbit_values

    for name in ("mxfp6-e2m3", "mxfp6-e3m2", "mxfp4-e2m1", "nvfp4"):
        elem = ELEMENT_OF[name]
        ebits, mbits = {"e2m1": (2, 1), "e2m3": (2, 3), "e3m2": (3, 2)}[elem]
        vals = lowbit_values(torch.arange(2 ** (ebits + mbits), dtype=torch.uint8), elem)
        f = FORMATS[name]
        assert f.max == vals.max().item()
        assert f.min_subnormal == vals[1].item()                 # code 1: the smallest subnormal
        assert f.min_normal == vals[2**mbits].item()             # exponent field 1, mantissa 0
    e8m0 = torch.tensor([2.0**127, 2.0**-127]).to(torch.float8_e8m0fnu).float()
    assert FORMATS["e8m0"].max == e8m0[0].item() and FORMATS["e8m0"].min_normal == e8m0[1].item()
    out = CliRunner().invoke(cli, ["formats"]).output
    assert all(n in out for n in ("mxfp4-e2m1", "mxfp6-e2m3", "mxfp6-e3m2", "nvfp4", "e8m0"))
