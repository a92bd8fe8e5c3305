"""The C CPU fast path (fp8probe._fastpath via backends/cpu.py) against the PyTorch reference, bit for bit.

Every comparison calls the C kernels through the ``*_into`` helpers, which report whether the C code
really ran (so a silent fallback cannot make a test pass), and the reference functions directly;
q, absmax and the dequantised bits must be identical. Both the AVX2 and the scalar loops are checked.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from support import TEST_SERIAL_CUTOFF, cpu_loops, vectors_file

import fp8probe.functional as F
from fp8probe.backends import cpu
from fp8probe.backends import reference as ref
from fp8probe.formats import CODEBOOK_NAMES, get_codebook

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
BLOCKSIZES = (1, 7, 32, 64, 100, 128, 256, 512, 1024, 2048, 4096, 4097)

needs_ext = pytest.mark.skipif(not cpu.available(), reason="fp8probe._fastpath not built (test_extension_is_built fails)")


def test_extension_is_built() -> None:
    """`pip install -e .` compiles the extension wherever gcc and the Python headers exist (CI does)."""
    assert cpu.available(), "fp8probe._fastpath is not importable: the C extension failed to build"
    assert cpu.backend_name() in ("c-avx2", "c-scalar", "reference")


@pytest.fixture
def simd(monkeypatch):
    """The AVX2 loops where the CPU has them (else the scalar ones)."""
    yield from cpu_loops(True, monkeypatch)


@pytest.fixture
def scalar(monkeypatch):
    """The scalar loops only."""
    yield from cpu_loops(False, monkeypatch)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(BITS[t.dtype])


def _check(A: torch.Tensor, code: torch.Tensor, bs: int, out_dtypes=DTYPES) -> None:
    """C quantise/dequantise of A equals the reference bit for bit (C path asserted to have run)."""
    rq, ram, ri, rv = ref.quantize_blockwise(A, code, bs, "")
    assert ri.numel() == 0
    q = torch.full(A.shape, 77, dtype=torch.uint8)
    am = torch.full((-(-A.numel() // bs),), 3.5)
    assert cpu.quantize_blockwise_into(A, code, bs, "", q, am) is not None, "C quantiser declined"
    assert torch.equal(q, rq), f"q differs at {(q != rq).nonzero()[:5].tolist()} (bs={bs}, {A.dtype})"
    assert torch.equal(_bits(am), _bits(ram)), f"absmax differs (bs={bs}, {A.dtype})"
    for odt in out_dtypes:
        ry = ref.dequantize_blockwise(rq, ram, code, bs, odt, ri, rv, "")
        y = torch.empty(A.shape, dtype=odt)
        assert cpu.dequantize_blockwise_into(rq, ram, code, bs, odt, ri, rv, "", y), "C dequantiser declined"
        assert torch.equal(_bits(y), _bits(ry)), f"dequant to {odt} differs (bs={bs}, {A.dtype})"


def _wide(n: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Values over many binades (|x| from ~1e-8 to ~1e8) with some ±0, as `dtype`."""
    x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 4)
    x[torch.rand(n, generator=g) < 0.03] = 0.0
    x[torch.rand(n, generator=g) < 0.03] = -0.0
    big = torch.finfo(dtype).max  # stay finite: NaN/Inf inputs take the reference path (tested below)
    return x.clamp(-big, big).to(dtype)


def _random_blocks(name: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(100 * CODEBOOK_NAMES.index(name) + DTYPES.index(dtype))
    code = get_codebook(name)
    A = _wide(3 * 4097 + 5, dtype, g)  # partial last block for every blocksize above 1
    for bs in BLOCKSIZES:
        _check(A, code, bs)
    _check(A[:10000].reshape(10, 1000), code, 300)  # 2-D, partial last block


@pytest.mark.parametrize("name", CODEBOOK_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_blocks_every_codebook(name: str, dtype: torch.dtype, simd: str) -> None:
    _random_blocks(name, dtype)


@pytest.mark.parametrize("name", ["dynamic", "bnb-e5m2"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_blocks_scalar_loops(name: str, dtype: torch.dtype, scalar: str) -> None:
    """The scalar loops (CPUs without AVX2, and every tail): two codebooks suffice, the search is shared."""
    _random_blocks(name, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_subnormal_and_tiny_absmax_blocks(dtype: torch.dtype, isa: str) -> None:
    """Zero blocks (1/absmax = inf, ±0 stay ±0), subnormal blocks and absmax near 2**-128 (inf reciprocal)."""
    g = torch.Generator().manual_seed(7)
    bs = 64
    blocks = [
        torch.zeros(bs),
        -torch.zeros(bs),
        torch.where(torch.rand(bs, generator=g) < 0.5, 0.0, -0.0),
        torch.randn(bs, generator=g) * 1e-40,             # fp32 subnormals: 1/absmax overflows
        torch.randn(bs, generator=g) * 2.0**-127,         # absmax around the overflow edge of 1/absmax
        torch.randn(bs, generator=g) * 2.0**-125,
        (torch.rand(bs, generator=g) * 2 - 1) * 3.4e38,  # absmax near FLT_MAX: tiny reciprocal
        torch.randn(bs, generator=g) * 6e-5,              # fp16 subnormal range
    ]
    big = torch.finfo(dtype).max  # fp16: the near-FLT_MAX block saturates to ±65504 instead of Inf
    A = torch.cat(blocks).clamp(-big, big).to(dtype)
    A[5] = 0.0  # a zero inside the subnormal block must stay zero, not 0*inf = NaN
    for name in CODEBOOK_NAMES:
        _check(A, get_codebook(name), bs)
        _check(A[: 3 * bs + 11], get_codebook(name), bs)


@pytest.mark.parametrize("name", CODEBOOK_NAMES)
def test_exact_midpoints_go_to_the_even_index(name: str, isa: str) -> None:
    """Inputs whose normalised value is exactly a decision midpoint (and its float neighbours)."""
    code = get_codebook(name)
    mid = ref.code_midpoints(code)
    up = torch.nextafter(mid, torch.tensor(2.0))
    dn = torch.nextafter(mid, torch.tensor(-2.0))
    for scale in (1.0, 2.0**-20, 2.0**40):  # powers of two: x * fl32(1/absmax) is exact
        vals = torch.cat([mid, up, dn, code]).clamp(-1.0, 1.0)
        block = torch.cat([torch.tensor([1.0]), vals])  # absmax exactly 1 (times scale)
        _check((block * scale).contiguous(), code, block.numel(), (torch.float32,))
        _check((block * scale).to(torch.bfloat16), code, block.numel(), (torch.bfloat16,))


def test_one_element_and_signed_zero_tensors(isa: str) -> None:
    code = get_codebook("dynamic")
    for v in (0.0, -0.0, 1.5, -2.5, 1e-42, -3e38):
        for dtype in DTYPES:
            A = torch.tensor([v]).to(dtype)
            if torch.isfinite(A).all():
                _check(A, code, 1)
                _check(A.reshape(()), code, 4096)  # 0-d tensor, one partial block


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_tensors_take_the_threaded_paths(dtype: torch.dtype, isa: str, monkeypatch) -> None:
    """Above the single-thread cutoff (65536 elements): many-block units, and blocks larger than
    FUSED_MAX (2**18) that are cut into pieces (two-phase absmax), including a global block."""
    monkeypatch.setattr(cpu, "_threads", lambda n: 3)  # more threads than cores: uneven claiming
    g = torch.Generator().manual_seed(11)
    n = 2**18 + 2**16 + 123
    A = _wide(n, dtype, g)
    A[70000:70000 + 4096] = 0.0  # a zero block in the middle
    code = get_codebook("dynamic")
    for bs in (100, 2**18 + 5, n, 2**20):  # 2**20 > n: one block, padded
        _check(A, code, bs, (dtype,))
    # fresh outputs above _HUGE_MIN get MADV_HUGEPAGE first (lowered here so this size takes that path)
    monkeypatch.setattr(cpu, "_HUGE_MIN", 1 << 18)
    q, am, si, sv = cpu.quantize_blockwise(A, code, 4096, "")
    rq, ram, ri, rv = ref.quantize_blockwise(A, code, 4096, "")
    assert torch.equal(q, rq) and torch.equal(am, ram)
    y = cpu.dequantize_blockwise(q, am, code, 4096, dtype, si, sv, "")
    assert torch.equal(_bits(y), _bits(ref.dequantize_blockwise(rq, ram, code, 4096, dtype, ri, rv, "")))


def test_public_api_uses_the_fast_path_and_matches_reference(monkeypatch) -> None:
    """functional.quantize_blockwise / quantize / dequantize on CPU tensors go through the C kernels."""
    if not cpu.enabled():
        pytest.skip("fast path not enabled")
    calls = []
    real = cpu._run_quantize
    monkeypatch.setattr(cpu, "_run_quantize", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(3)
    A = torch.randn(3000, generator=g)
    q, st = F.quantize_blockwise(A, blocksize=256)
    rq, ram, _, _ = ref.quantize_blockwise(A, get_codebook("dynamic"), 256, "")
    assert calls and torch.equal(q, rq) and torch.equal(st.absmax, ram)
    qg, stg = F.quantize(A)
    rqg, ramg, _, _ = ref.quantize_global(A, get_codebook("dynamic"), "")
    assert len(calls) == 2 and torch.equal(qg, rqg) and torch.equal(stg.absmax, ramg)


def test_bnb_vectors_through_default_api_match_reference() -> None:
    """Every committed bnb 0.49.2 input, quantised with the default public API (fast path), equals
    the reference bit for bit for each codebook/blocksize the vectors use."""
    bw = torch.load(vectors_file("blockwise_cpu.pt"), weights_only=True)
    for key, x in bw["inputs"].items():
        for cname in ("bnb-e4m3", "dynamic"):
            code = get_codebook(cname)
            for bs in (64, 256, 4096):
                q, st = F.quantize_blockwise(x, code=cname, blocksize=bs)
                rq, ram, ri, rv = ref.quantize_blockwise(x, code, bs, "")
                assert torch.equal(q, rq) and torch.equal(st.absmax, ram), key
                y = F.dequantize_blockwise(q, st)
                ry = ref.dequantize_blockwise(rq, ram, code, bs, x.dtype, ri, rv, "")
                assert torch.equal(_bits(y), _bits(ry)), key


def test_out_and_absmax_are_written_in_place(monkeypatch) -> None:
    if not cpu.enabled():
        pytest.skip("fast path not enabled")

    def no_copy(*args, **kwargs):
        raise AssertionError("out= went through the copy path")

    monkeypatch.setattr(F, "_write_out", no_copy)
    g = torch.Generator().manual_seed(5)
    A = torch.randn(4, 1000, generator=g, dtype=torch.float32).to(torch.bfloat16)
    out = torch.empty(4, 1000, dtype=torch.uint8)
    absmax = torch.empty(-(-4000 // 512))
    p_out, p_abs = out.data_ptr(), absmax.data_ptr()
    q, st = F.quantize_blockwise(A, blocksize=512, out=out, absmax=absmax)
    assert q is out and st.absmax is absmax and out.data_ptr() == p_out and absmax.data_ptr() == p_abs
    rq, ram, _, _ = ref.quantize_blockwise(A, get_codebook("dynamic"), 512, "")
    assert torch.equal(out, rq) and torch.equal(absmax, ram)
    y = torch.empty(4, 1000, dtype=torch.bfloat16)
    p_y = y.data_ptr()
    r = F.dequantize_blockwise(out, st, out=y)
    assert r is y and y.data_ptr() == p_y
    ry = ref.dequantize_blockwise(rq, ram, get_codebook("dynamic"), 512, torch.bfloat16,
                                  torch.empty(0, dtype=torch.int64), torch.empty(0), "")
    assert torch.equal(_bits(y), _bits(ry))
    qg = torch.empty(4, 1000, dtype=torch.uint8)
    rg, _ = F.quantize(A, out=qg)
    assert rg is qg and torch.equal(qg, ref.quantize_global(A, get_codebook("dynamic"), "")[0])


def test_wrong_out_still_raises() -> None:
    A = torch.randn(100)
    with pytest.raises(ValueError, match="out must be"):
        F.quantize_blockwise(A, blocksize=64, out=torch.empty(99, dtype=torch.uint8))
    q, st = F.quantize_blockwise(A, blocksize=64)
    with pytest.raises(ValueError, match="out must be"):
        F.dequantize_blockwise(q, st, out=torch.empty(100, dtype=torch.float16))


def test_specials_fall_back_to_the_reference() -> None:
    """NaN/±Inf: the C absmax pass declines, the reference result (with specials recorded) comes back."""
    g = torch.Generator().manual_seed(9)
    A = torch.randn(5000, generator=g)
    A[[3, 700, 4999]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    code = get_codebook("dynamic")
    q_buf, am_buf = torch.empty(5000, dtype=torch.uint8), torch.empty(20)
    assert cpu.quantize_blockwise_into(A, code, 256, "", q_buf, am_buf) is None
    q, st = F.quantize_blockwise(A, blocksize=256)
    rq, ram, ri, rv = ref.quantize_blockwise(A, code, 256, "")
    assert torch.equal(q, rq) and torch.equal(st.absmax, ram)
    assert st.special_index.tolist() == [3, 700, 4999] and torch.equal(st.special_index, ri)
    y = F.dequantize_blockwise(q, st)
    ry = ref.dequantize_blockwise(rq, ram, code, 256, torch.float32, ri, rv, "")
    assert torch.equal(torch.isnan(y), torch.isnan(ry)) and torch.equal(y.nan_to_num(), ry.nan_to_num())
    # a non-finite absmax on dequantisation also goes to the reference
    bad = ram.clone()
    bad[1] = float("inf")
    assert not cpu.dequantize_blockwise_into(rq, bad, code, 256, torch.float32, ri, rv, "", torch.empty(5000))
    y2 = F.dequantize_blockwise(rq, absmax=bad, blocksize=256)
    ry2 = ref.dequantize_blockwise(rq, bad, code, 256, torch.float32, ri[:0], rv[:0], "")
    assert torch.equal(torch.isnan(y2), torch.isnan(ry2)) and torch.equal(y2.nan_to_num(), ry2.nan_to_num())


def test_missing_extension_uses_the_reference(monkeypatch) -> None:
    """With the extension absent, the registered kernels and out= paths run the reference."""
    monkeypatch.setattr(cpu, "_EXT", None)
    monkeypatch.setattr(cpu, "_EXT_TRIED", True)
    assert not cpu.available() and cpu.backend_name() == "reference"
    A = torch.randn(1000)
    out = torch.empty(1000, dtype=torch.uint8)
    q, st = F.quantize_blockwise(A, blocksize=128, out=out)
    rq, ram, _, _ = ref.quantize_blockwise(A, get_codebook("dynamic"), 128, "")
    assert q is out and torch.equal(out, rq) and torch.equal(st.absmax, ram)


def test_backend_reference_env_disables_the_fast_path() -> None:
    """FP8PROBE_BACKEND=reference: nothing registered, no call reaches the C module."""
    code = (
        "import fp8probe.backends.cpu as c\n"
        "class Bomb:\n"
        "    def __getattr__(self, k):\n"
        "        raise AssertionError('C fast path used: ' + k)\n"
        "import fp8probe.functional, torch\n"
        "from fp8probe.backends import reference as ref\n"
        "assert c.backend_name() == 'reference' and not c._registered\n"
        "c._EXT, c._EXT_TRIED = Bomb(), True\n"
        "A = torch.randn(100000)\n"
        "code = fp8probe.functional.get_codebook('dynamic')\n"
        "assert c.quantize_blockwise_into(A, code, 256, '', torch.empty(100000, dtype=torch.uint8),\n"
        "                                 torch.empty(391)) is None\n"
        "q, am, si, sv = c.quantize_blockwise(A, code, 256, '')\n"
        "assert torch.equal(q, ref.quantize_blockwise(A, code, 256, '')[0])\n"
        "assert not c.dequantize_blockwise_into(q, am, code, 256, torch.float32, si, sv, '', torch.empty(100000))\n"
        "c.dequantize_blockwise(q, am, code, 256, torch.float32, si, sv, '')\n"
        "print('ok')\n"
    )
    env = {**__import__("os").environ, "FP8PROBE_BACKEND": "reference"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


@needs_ext
def test_bnb_compat_dequant_cast_rules() -> None:
    """compat='bnb' dequantisation: fp32/bf16 outputs go through C (same op), fp16 (half-away cast) does not."""
    g = torch.Generator().manual_seed(13)
    A = torch.randn(3000, generator=g)
    code = get_codebook("dynamic")
    rq, ram, ri, rv = ref.quantize_blockwise(A, code, 64, "")
    for odt in (torch.float32, torch.bfloat16):
        y = torch.empty(3000, dtype=odt)
        assert cpu.dequantize_blockwise_into(rq, ram, code, 64, odt, ri, rv, "bnb", y)
        assert torch.equal(_bits(y), _bits(ref.dequantize_blockwise(rq, ram, code, 64, odt, ri, rv, "bnb")))
    assert not cpu.dequantize_blockwise_into(rq, ram, code, 64, torch.float16, ri, rv, "bnb",
                                             torch.empty(3000, dtype=torch.float16))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int8_vectorwise_quant_matches_reference(dtype: torch.dtype, isa: str, monkeypatch) -> None:
    """Row stats, codes and outlier columns, with NaN/±Inf, zero rows and thresholds (3.3 is not a float32)."""
    assert cpu.enabled()
    monkeypatch.setattr(cpu, "_threads", lambda n: 3)
    g = torch.Generator().manual_seed(17 + DTYPES.index(dtype))
    for shape in [(1,), (7,), (33, 77), (2, 3, 129), (70, 1024), (40000, 2)]:  # the last two: threaded
        x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g))
        flat = x.view(-1)
        r = torch.rand(flat.numel(), generator=g)
        flat[r < 0.02] = 0.0
        flat[(r >= 0.02) & (r < 0.03)] = float("nan")
        flat[(r >= 0.03) & (r < 0.035)] = float("inf")
        flat[(r >= 0.035) & (r < 0.04)] = -float("inf")
        rows = x.view(-1, shape[-1])
        if rows.shape[0] > 2:
            rows[1] = 0.0  # zero row: 1/row_stats = inf
        x = x.to(dtype)
        for thr in (0.0, 1e-3, 2.5, 3.3, 6.0):
            q, rs, cols = cpu.int8_vectorwise_quant(x, thr, "")
            rq, rrs, rcols = ref.int8_vectorwise_quant(x, thr, "")
            assert torch.equal(q, rq), (shape, thr, (q != rq).nonzero()[:5].tolist())
            assert torch.equal(_bits(rs), _bits(rrs)) and torch.equal(cols, rcols), (shape, thr)


def test_two_gather_search_and_custom_codebooks(simd: str, monkeypatch) -> None:
    """The general table search (m thresholds per bucket, used when m > 1) and random codebooks."""
    g = torch.Generator().manual_seed(23)
    A = _wide(5000, torch.float32, g)
    monkeypatch.setattr(cpu, "_TABLES", {})
    monkeypatch.setattr(cpu, "_packed", lambda base, t_val, m: None)  # force the two-gather loop
    for name in ("dynamic", "linear"):
        code = get_codebook(name)
        for bs in (64, 4096):
            _check(A, code, bs, (torch.float32,))
        # the thresholds themselves and their float neighbours, with absmax exactly 1
        t = ref._search_tables(code, "even")[1]
        t = t[torch.isfinite(t) & (t.abs() <= 1)]
        vals = torch.cat([t, torch.nextafter(t, torch.tensor(2.0)), torch.nextafter(t, torch.tensor(-2.0))])
        _check(torch.cat([torch.tensor([1.0]), vals.clamp(-1, 1)]), code, 4096, (torch.float32,))
    monkeypatch.undo()
    monkeypatch.setattr(cpu, "_TABLES", {})
    for k in range(3):  # random sorted codebooks (m = 2 here); the first has repeated values
        code = torch.sort(torch.randn(256, generator=g)).values
        if k == 0:
            code = torch.round(code * 8) / 8
        code = (code / code.abs().max()).contiguous()
        if ref._search_tables(code, "even") is None:  # no monotone table: the C path must decline
            assert cpu.quantize_blockwise_into(A, code, 256, "", torch.empty(5000, dtype=torch.uint8),
                                               torch.empty(20)) is None
            q, am, _, _ = cpu.quantize_blockwise(A, code, 256, "")
            rq, ram, _, _ = ref.quantize_blockwise(A, code, 256, "")
            assert torch.equal(q, rq) and torch.equal(am, ram)
        else:
            _check(A, code, 256, (torch.float32, torch.bfloat16))


def test_version_names_the_active_cpu_backend() -> None:
    """`fp8probe --version` tells a user which CPU kernels run (reference when forced off)."""
    from click.testing import CliRunner

    from fp8probe.cli import cli

    out = CliRunner().invoke(cli, ["--version"]).output
    assert f"(CPU kernels: {cpu.backend_name()})" in out
    forced = subprocess.run([sys.executable, "-m", "fp8probe", "--version"], capture_output=True, text=True,
                            env={**__import__("os").environ, "FP8PROBE_BACKEND": "reference"}, check=True)
    assert "(CPU kernels: reference)" in forced.stdout


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("shape", ((37, 53), (3, 37, 53), (1, 129, 1), (2, 1, 70)))
def test_contiguous_copies_transposed_views_bit_for_bit(dtype, shape, monkeypatch) -> None:
    """cpu.contiguous: a transposed view (2-D, or the last two dims of a 3-D tensor) through the C transpose, slice
    by slice; anything else as torch's contiguous(); the same bits either way."""
    if not cpu.enabled():
        pytest.skip("fp8probe._fastpath not built")
    calls = []
    ext, real = cpu._ext(), cpu._ext().transpose_copy
    monkeypatch.setattr(ext, "transpose_copy", lambda *a: (calls.append(a[2:4]), real(*a))[1])
    g = torch.Generator().manual_seed(11)
    base = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g).to(dtype)
    base.view(-1)[::17] = float("nan")
    view = base.mT
    got = cpu.contiguous(view)
    assert got.is_contiguous() and got.shape == view.shape
    assert (got.data_ptr() != base.data_ptr()) == (not view.is_contiguous())  # a size-1 dim: already contiguous
    assert torch.equal(got.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       view.contiguous().view(torch.int16 if dtype != torch.float32 else torch.int32))
    # one C transpose per slice where a copy was needed
    assert calls == ([] if view.is_contiguous() else [(shape[-1], shape[-2])] * (shape[0] if len(shape) == 3 else 1))
    same = cpu.contiguous(base)
    assert same.data_ptr() == base.data_ptr()  # already contiguous: no copy


@pytest.mark.skipif(not cpu.available(), reason="C extension not built")
def test_serial_cutoff_ships_at_512k_elements_and_tests_lower_it() -> None:
    """Calls below 512K elements run on one thread in a fresh process (_fastpath.c SERIAL_CUTOFF); the tests run
    with the cutoff at 64K (conftest), and serial_cutoff(n) returns the value it replaced."""
    code = "from fp8probe.backends import cpu; print(cpu._ext().serial_cutoff())"
    shipped = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert shipped.stdout.strip() == str(1 << 19)
    ext = cpu._ext()
    assert ext.serial_cutoff() == TEST_SERIAL_CUTOFF
    try:
        assert ext.serial_cutoff(12345) == TEST_SERIAL_CUTOFF
        assert ext.serial_cutoff() == 12345
    finally:
        ext.serial_cutoff(TEST_SERIAL_CUTOFF)
