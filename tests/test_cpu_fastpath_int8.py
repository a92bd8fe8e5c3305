"""The C paths of the LLM.int8 ops (backends/cpu.py: int8_double_quant's column half, int8_vectorwise_dequant,
int8_mm_dequant) against the PyTorch reference, bit for bit."""
from __future__ import annotations

import pytest
import torch

from fp8probe.backends import cpu
from fp8probe.backends import reference as ref

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# odd widths and heights (no multiple of 8 / 64 / the 64-column strips), 1-D, 3-D and one big enough
# (> 2^16 elements) to run on two threads
SHAPES = ((37, 53), (1, 5), (130,), (3, 7, 67), (300, 300))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()])


def _same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(_bits(x.contiguous()), _bits(y.contiguous()))


@pytest.fixture(autouse=True)
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def _activations(shape, dtype, seed, specials):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2
    flat = x.view(-1)
    flat[::11] = 0.0
    flat[4::23] = 2e-40                                # float32 subnormal
    if x.dim() > 1:
        x[..., 2] *= 30.0                              # an outlier column
        x[..., min(6, x.shape[-1] - 1)] = 0.0          # an all-zero column (0/0 in the column codes)
    if specials:
        flat[[1, flat.numel() // 2, flat.numel() - 1]] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", [0.0, 1.5, 40.0])
def test_double_quant_matches_reference(dtype, threshold, isa) -> None:
    for i, shape in enumerate(SHAPES):
        for specials in (False, True):
            x = _activations(shape, dtype, i, specials)
            _same(cpu.int8_double_quant(x, threshold, ""), ref.int8_double_quant(x, threshold, ""))


def test_vectorwise_dequant_matches_reference(isa) -> None:
    g = torch.Generator().manual_seed(1)
    for shape in SHAPES:
        rows = 1 if len(shape) == 1 else int(torch.tensor(shape[:-1]).prod())
        q = torch.randint(-127, 128, shape, dtype=torch.int8, generator=g)
        stats = torch.rand(rows, generator=g) * torch.exp2(torch.randint(-20, 20, (rows,), generator=g).float())
        stats[0] = 0.0
        _same([cpu.int8_vectorwise_dequant(q, stats)], [ref.int8_vectorwise_dequant(q, stats)])
        stats[-1] = float("nan")  # the reference runs (and propagates it)
        _same([cpu.int8_vectorwise_dequant(q, stats)], [ref.int8_vectorwise_dequant(q, stats)])


@pytest.mark.parametrize("dtype", DTYPES)
def test_mm_dequant_matches_reference(dtype, isa) -> None:
    g = torch.Generator().manual_seed(2)
    for shape in SHAPES:
        rows = 1 if len(shape) == 1 else int(torch.tensor(shape[:-1]).prod())
        n = shape[-1]
        # int32 products above 2^24 (the float conversion rounds), scales over many binades
        C = torch.randint(-2**30, 2**30, shape, dtype=torch.int32, generator=g)
        rs = torch.rand(rows, generator=g) * torch.exp2(torch.randint(-12, 12, (rows,), generator=g).float())
        cs = torch.rand(n, generator=g) * 127
        cs[0] = 0.0
        bias = torch.randn(n, generator=g)
        for b in (None, bias, bias.to(torch.float16), bias.to(torch.bfloat16)):
            _same([cpu.int8_mm_dequant(C, rs, cs, b, dtype, "")], [ref.int8_mm_dequant(C, rs, cs, b, dtype, "")])
        big = rs.clone()
        big[0] = 3e38  # products overflow to ±Inf (fp16: far beyond 65504)
        _same([cpu.int8_mm_dequant(C, big, cs + 1, bias, dtype, "")],
              [ref.int8_mm_dequant(C, big, cs + 1, bias, dtype, "")])
        nan_bias = bias.clone()
        nan_bias[-1] = float("nan")
        _same([cpu.int8_mm_dequant(C, rs, cs, nan_bias, dtype, "")],
              [ref.int8_mm_dequant(C, rs, cs, nan_bias, dtype, "")])


def test_c_paths_run(monkeypatch) -> None:
    """The comparisons above exercise C (a silent fallback would make them vacuous): with the reference
    functions unusable, finite inputs still give results."""
    if not cpu.enabled():
        pytest.skip("fast path off")

    def refuse(*a, **kw):
        raise AssertionError("reference ran")
    for name in ("int8_double_quant", "int8_vectorwise_dequant", "int8_mm_dequant"):
        monkeypatch.setattr(ref, name, refuse)
    x = _activations((37, 53), torch.float32, 0, False)
    cpu.int8_double_quant(x, 1.5, "")
    q, stats, _ = cpu.int8_vectorwise_quant(x, 0.0, "")
    cpu.int8_vectorwise_dequant(q, stats)
    cpu.int8_mm_dequant(torch.ones(4, 53, dtype=torch.int32), torch.ones(4), torch.ones(53), torch.ones(53),
                        torch.bfloat16, "")


def test_reference_forced_and_compat() -> None:
    """compat="bnb" and mismatched scale counts go to the reference (which defines their result)."""
    C = torch.randint(-1000, 1000, (5, 7), dtype=torch.int32)
    rs, cs = torch.rand(5), torch.rand(7)
    _same([cpu.int8_mm_dequant(C, rs, cs, None, torch.float16, "bnb")],
          [ref.int8_mm_dequant(C, rs, cs, None, torch.float16, "bnb")])
    x = _activations((9, 13), torch.float16, 3, False)
    _same(cpu.int8_double_quant(x, 1.5, "bnb"), ref.int8_double_quant(x, 1.5, "bnb"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_scaled_mm_without_the_int32_product_matches_the_two_ops(dtype, isa, monkeypatch) -> None:
    """cpu.int8_scaled_mm (float32 product dequantised in C) = int8_mm_dequant(int8_linear_matmul) bit for bit:
    odd shapes, 3-D A, transposed (non-contiguous) codes, K in both float chunks, bias dtypes, Inf/NaN stats."""
    from fp8probe import functional as F
    monkeypatch.setenv("FP8PROBE_INT8_GEMM", "f32")
    g = torch.Generator().manual_seed(5)
    for shape, k, n in (((37, 53), 53, 29), ((3, 7, 67), 67, 8), ((5, 1500), 1500, 9), ((300, 300), 300, 300)):
        a = torch.randint(-127, 128, shape, dtype=torch.int8, generator=g)
        b = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        rows = a.numel() // k
        rs = torch.rand(rows, generator=g) * torch.exp2(torch.randint(-12, 12, (rows,), generator=g).float())
        cs = torch.rand(n, generator=g) * 127
        cs[0] = 0.0
        bias = torch.randn(n, generator=g)
        bad = rs.clone()
        bad[0] = float("inf")
        cases = [(rs, cs, b_) for b_ in (None, bias, bias.to(torch.bfloat16))] + [(bad, cs, None), (rs * 3e37, cs, bias)]
        for r, c, b_ in cases:
            want = F.int8_mm_dequant(F.int8_linear_matmul(a, b), r, c, bias=b_, dtype=dtype)
            _same([cpu.int8_scaled_mm(a, b, r, c, b_, dtype)], [want])
            _same([F.int8_scaled_mm(a, b, r, c, b_, dtype)], [want])
        if a.dim() == 2:
            at, bt = a.t().contiguous().t(), b.t().contiguous().t()
            _same([cpu.int8_scaled_mm(at, bt, rs, cs, None, dtype)], [F.int8_scaled_mm(a, b, rs, cs, None, dtype)])


def test_scaled_mm_skips_the_int32_product(monkeypatch) -> None:
    """functional.int8_scaled_mm's plain CPU call takes the fused path (no int32 GEMM, no int32 dequant) where
    the float32 int8 GEMM is in use, and the two ops elsewhere (another method, K beyond two chunks)."""
    if not cpu.enabled():
        pytest.skip("fast path off")
    from fp8probe import functional as F
    from fp8probe.backends import int8_gemm
    g = torch.Generator().manual_seed(6)
    calls = []
    real = int8_gemm.int8_gemm
    monkeypatch.setattr(int8_gemm, "int8_gemm", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(ref, "int8_linear_matmul", lambda *a, _r=ref.int8_linear_matmul: calls.append(1) or _r(*a))
    a, b = (torch.randint(-127, 128, s, dtype=torch.int8, generator=g) for s in ((6, 40), (5, 40)))
    monkeypatch.setenv("FP8PROBE_INT8_GEMM", "f32")
    F.int8_scaled_mm(a, b, torch.rand(6), torch.rand(5))
    assert calls == []
    monkeypatch.setenv("FP8PROBE_INT8_GEMM", "f64")
    assert cpu.int8_scaled_mm(a, b, torch.rand(6), torch.rand(5), None, torch.float32) is None
    F.int8_scaled_mm(a, b, torch.rand(6), torch.rand(5))
    assert calls == [1]
    with pytest.raises(ValueError, match="row_stats must have 6 entries"):
        F.int8_scaled_mm(a, b, torch.rand(5), torch.rand(5))
    with pytest.raises(TypeError, match="A must have dtype"):
        F.int8_scaled_mm(a.float(), b, torch.rand(6), torch.rand(5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_mm_dequant_out_is_written_by_the_c_code(dtype, monkeypatch) -> None:
    """``int8_mm_dequant(..., out=buf)`` computed a fresh result and copied it into buf: half the speed of no out=
    (bench_int8, 2026-12-01). The C code now writes buf itself, the same bits; buffers it cannot write (sharing memory
    with an input, strided) and inputs it declines (NaN stats) still get the right values through the copy."""
    import fp8probe.functional as F
    if not cpu.enabled():
        pytest.skip("fast path off")
    g = torch.Generator().manual_seed(9)
    C = torch.randint(-2**20, 2**20, (3, 70, 130), dtype=torch.int32, generator=g)
    rs, cs, bias = torch.rand(210, generator=g) + 0.1, torch.rand(130, generator=g) * 127, torch.randn(130, generator=g)
    want = F.int8_mm_dequant(C, rs, cs, bias=bias, dtype=dtype)
    copies = []
    real_write_out = F._write_out
    monkeypatch.setattr(F, "_write_out", lambda out, y, *a: copies.append(1) or real_write_out(out, y, *a))
    buf = torch.full(C.shape, 7.0, dtype=dtype)
    assert F.int8_mm_dequant(C, rs, cs, out=buf, bias=bias, dtype=dtype) is buf and not copies
    _same([buf], [want])
    strided = torch.zeros(C.shape[::-1], dtype=dtype).permute(2, 1, 0)
    _same([F.int8_mm_dequant(C, rs, cs, out=strided, bias=bias, dtype=dtype)], [want])
    if dtype == torch.float32:  # out over A's own memory: read before written, per element
        alias = C.clone().view(torch.float32)
        got = F.int8_mm_dequant(alias.view(torch.int32), rs, cs, out=alias, bias=bias, dtype=dtype)
        _same([got], [want])
    nan_rs = rs.clone()
    nan_rs[5] = float("nan")
    _same([F.int8_mm_dequant(C, nan_rs, cs, out=buf, bias=bias, dtype=dtype)],
          [F.int8_mm_dequant(C, nan_rs, cs, bias=bias, dtype=dtype)])
    assert len(copies) >= 2
