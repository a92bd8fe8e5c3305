"""The torch paths the GPU runs bring their numbers to the host in one copy per call (each float()/int()/bool()/
tolist()/nonzero of a CUDA tensor makes the host wait for the GPU; the first H200 run was host-bound).

Counted here on CPU tensors through the same Python calls; the C fast path is switched off so the torch path runs."""
from __future__ import annotations

import contextlib

import pytest
import torch

from fp8probe.analysis import block_scales as BS
from fp8probe.analysis import metrics as M

WAITS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero", "cpu", "numpy")


@contextlib.contextmanager
def counted_waits():
    calls: list[str] = []
    saved = {name: getattr(torch.Tensor, name) for name in WAITS}

    def wrap(name, orig):
        def inner(*args, **kwargs):
            calls.append(name)
            return orig(*args, **kwargs)
        return inner
    try:
        for name, orig in saved.items():
            setattr(torch.Tensor, name, wrap(name, orig))
        yield calls
    finally:
        for name, orig in saved.items():
            setattr(torch.Tensor, name, orig)


@pytest.fixture
def torch_path(monkeypatch):
    monkeypatch.setenv("FP8PROBE_BACKEND", "reference")


def _seeded(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("specials", (False, True))
def test_operand_accumulator_update_waits_once(torch_path, specials) -> None:
    x = _seeded(5000, 1)
    q = x.to(torch.bfloat16).to(torch.float32)
    if specials:
        x[7], q[9] = float("nan"), float("inf")
    acc = M.OperandAccumulator()
    with counted_waits() as calls:
        acc.update(x, q)
    assert len(calls) == (3 if specials else 1), calls  # the rare path: the sums, _dots, the counts
    assert acc.n_finite == 5000 - specials and acc.n_nonzero > 0


def test_block_stats_torch_path_waits_once_and_equals_the_indexed_sums() -> None:
    g = torch.Generator().manual_seed(3)
    n = 777
    scale = torch.exp2(torch.randint(-20, 20, (n,), generator=g).to(torch.float32)) * (1 + torch.rand(n, generator=g))
    scale[::50] = float("nan")
    scale[5::61] = 0.0
    zero_block = torch.zeros(n, dtype=torch.bool)
    zero_block[3::40] = True
    nonzero = torch.randint(0, 33, (n,), generator=g)
    underflow = torch.minimum(torch.randint(0, 5, (n,), generator=g), nonzero)
    clipped = torch.rand(n, generator=g) < 0.1
    with counted_waits() as calls:
        got = BS._torch_batch_stats(scale, zero_block, nonzero, underflow, clipped)
    assert calls == ["tolist"]
    s = scale.to(torch.float64)
    nan = torch.isnan(s)
    good = ~zero_block & ~nan & (s != 0)
    sg = s[good]
    assert got.n_scales == int(good.sum()) and got.scale_min == float(sg.min()) and got.scale_max == float(sg.max())
    assert got.n_nonfinite_blocks == int(nan.sum()) and got.n_zero_scale_blocks == int(((s == 0) & ~zero_block & ~nan).sum())
    assert got.sum_log2 == pytest.approx(float(torch.log2(sg).sum()), rel=1e-12)
    assert got.sum_log2_sq == pytest.approx(float((torch.log2(sg) ** 2).sum()), rel=1e-12)
    e = torch.frexp(sg)[1] - 1
    vals, counts = torch.unique(e, return_counts=True)
    assert got.exp_counts == dict(zip(vals.tolist(), counts.tolist()))
    has = nonzero > 0
    assert got.max_block_underflow == float((underflow[has].double() / nonzero[has].double()).max())
    assert BS._torch_batch_stats(scale[:0], zero_block[:0], nonzero[:0], underflow[:0], clipped[:0]).n_blocks == 0


def test_error_dots_wait_once() -> None:
    r = _seeded(300, 4).double()
    q = r + 1e-3 * _seeded(300, 5).double()
    with counted_waits() as calls:
        got = M._dots(r, q)
    assert calls == ["tolist"]
    err = r - q
    assert got == (float(r @ r), float(err @ err), float(q @ q), float(r @ q), float(err.abs().max()))


def test_bnb_recipe_operands_check_no_codebook_per_call(torch_path, monkeypatch) -> None:
    # the bnb recipes pass their codebooks by name: a fresh codebook tensor per call was validated and
    # order-checked again (two waits on a GPU, per operand and recipe), and copied from host memory
    from fp8probe import functional
    from fp8probe.analysis import strategies as ST
    from fp8probe.formats import get_codebook

    checked = []
    real = functional.validate_codebook
    monkeypatch.setattr(functional, "validate_codebook", lambda code: checked.append(1) or real(code))
    x = _seeded(4 * 300, 6).reshape(4, 300)
    want = functional.fake_quantize(x[0], get_codebook("bnb-e4m3"), 64)
    checked.clear()
    for _ in range(3):
        got = ST._fq_code(x[0], "bnb-e4m3", 64)
        ST._fq_code_slices(x, "bnb-e5m2", None)
    assert checked == []
    assert torch.equal(got, want)


def test_get_codebook_copies_stay_private() -> None:
    from fp8probe.formats import get_codebook

    a = get_codebook("bnb-e4m3")
    a.zero_()                              # a caller's copy may be changed: the next call is not
    b = get_codebook("bnb-e4m3")
    assert b.abs().max() > 0 and b.data_ptr() != get_codebook("bnb-e4m3").data_ptr()


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64))
def test_tensor_stats_update_waits_once_on_finite_data(torch_path, dtype) -> None:
    x = (_seeded(64 * 300, 8) * torch.exp(3 * _seeded(64 * 300, 9))).reshape(64, 300).to(dtype)
    x[0, :7] = 0.0
    s = M.TensorStats()
    with counted_waits() as calls:
        s.update(x)
    assert calls == ["tolist"]
    # the same numbers as the obvious formulas
    v = x.double()
    assert s.n == x.numel() and s.zeros == 7 and s.amax == float(v.abs().max())
    assert s.min_nonzero == float(v.abs()[v != 0].min()) and s.subnormal_count == 0
    assert s.mean == pytest.approx(float(v.mean()), rel=1e-12, abs=1e-12)
    assert s.m2 == pytest.approx(float(((v - v.mean()) ** 2).sum()), rel=1e-12)
    assert int(s.hist.sum()) == x.numel() - 7
    y = x.clone()
    y[3, 3] = float("nan")                 # a special value: the counting path, after the one copy
    t = M.TensorStats()
    t.update(y)
    assert t.nan_count == 1 and t.n == x.numel() - 1


def test_outlier_census_update_waits_once(torch_path) -> None:
    a = _seeded(40 * 64, 10).reshape(40, 64) * 2
    a[5, 7], a[9, 7], a[11, 30] = 9.0, -float("inf"), float("nan")
    census = M.OutlierCensus(threshold=6.0)
    M._at_least(6.0, a.dtype)              # (the threshold on the dtype's grid: worked out once per dtype)
    with counted_waits() as calls:
        census.update(a)
    assert calls == ["cpu", "__int__"]      # one copy to the host; the int() reads that copy
    mag = a.abs().nan_to_num(nan=0.0, posinf=float("inf"))
    hit = mag >= 6.0
    assert census.col_rows.dtype == torch.int64 and torch.equal(census.col_rows, hit.sum(0))
    assert census.rows_touched == int(hit.any(1).sum())
    assert torch.equal(census.col_amax, mag.amax(0).double())
