"""Recipes of one replay group (strategies.SHARING: mixed, int8 and switchback) share sub-results on a GEMM call:
the shared tensors are the ones each recipe computes alone, bit for bit, and the tables do not change."""
from __future__ import annotations

import gc

import pandas as pd
import pytest
import torch

from fp8probe.analysis import pipeline as P
from fp8probe.analysis import strategies as S
from fp8probe.analysis.metrics import ErrorAccumulator, OperandAccumulator


def _operands(seed: int, m: int = 48, k: int = 40, n: int = 24, outliers: bool = False):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, k, generator=g)
    if outliers:
        A[:, 3] *= 20.0
    W = torch.randn(n, k, generator=g) * 0.1
    G = torch.randn(m, n, generator=g) * 1e-2
    return A, W, G


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("outliers", [False, True])
@pytest.mark.parametrize("shape", [(48, 40, 24), (7, 33, 65)])
def test_shared_results_equal_each_recipe_alone(outliers, shape):
    A, W, G = _operands(len(shape) + int(outliers), *shape, outliers=outliers)
    strategies = S.resolve("mixed,int8,switchback")
    alone = [S.run_strategy(s, A, W, G) for s in strategies]
    with S.shared_site():
        together = [S.run_strategy(s, A, W, G) for s in strategies]
    for a, t in zip(alone, together):
        for k in a.gemms:
            assert torch.equal(_bits(a.gemms[k]), _bits(t.gemms[k])), k
        for k in a.operands:
            assert torch.equal(a.operands[k][1], t.operands[k][1]), k
    mixed, i8, s8 = together
    # mixed's unquantised wgrad is switchback's where its layout probe chose the same product
    fast = [v for k, v in S._RELAID_EXACT.items() if k[0] == "wgrad" and k[1] == (1, shape[2], shape[0])]
    assert fast and (mixed.gemms["wgrad"].data_ptr() == s8.gemms["wgrad"].data_ptr()) == fast[0]
    # switchback reused int8's dgrad and dequantised weight; the forward product only without outlier columns
    assert i8.gemms["dgrad"].data_ptr() == s8.gemms["dgrad"].data_ptr()
    assert i8.operands["weight"][1].data_ptr() == s8.operands["weight"][1].data_ptr()
    assert (i8.gemms["fprop"].data_ptr() == s8.gemms["fprop"].data_ptr()) == (not outliers)
    # outside a shared_site() block nothing is shared
    assert alone[0].gemms["dgrad"].data_ptr() != alone[1].gemms["dgrad"].data_ptr()


def test_replay_groups_join_neighbours_of_one_group_only():
    assert S.replay_groups(S.resolve("global,mixed,int8,switchback,mxfp8")) == [[0], [1, 2, 3], [4]]
    assert S.replay_groups(S.resolve("switchback,int8")) == [[0, 1]]
    assert S.replay_groups(S.resolve("mixed,global,switchback")) == [[0], [1], [2]]
    assert S.replay_groups(S.resolve("int8,mxfp8,switchback")) == [[0], [1], [2]]
    assert S.replay_groups(S.resolve("int8")) == [[0]]


def test_memo_sums_are_reused_only_while_the_tensors_live():
    g = torch.Generator().manual_seed(5)
    ref, lp = torch.randn(300, generator=g, dtype=torch.float64), torch.randn(300, generator=g)
    memo: dict = {}
    a, b = ErrorAccumulator(), ErrorAccumulator()
    a.update(ref, lp, memo)
    b.update(ref, lp[None][0], memo)   # a view of the same elements: the same sums, taken from the memo
    assert a == b and len(memo) == (1 if P._cpu.enabled() else 0)
    if memo:
        # a recorded tensor that died: its memory may hold another tensor now, so the entry is not used
        key = next(iter(memo))
        memo[key] = ([lambda: None], (0.0,) * 5 + (0, 0, 0))
        c = ErrorAccumulator()
        c.update(ref, lp, memo)
        assert c == a
    o1, o2 = OperandAccumulator(), OperandAccumulator()
    o1.update(lp, lp.round(), None, memo)
    lp2 = lp.clone()
    o2.update(lp2, lp2.round(), None, memo)  # other tensors: computed
    assert o1 == o2
    del lp2
    gc.collect()


def _model_and_batches():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Linear(48, 16))
    g = torch.Generator().manual_seed(1)
    return model, [torch.randn(2, 24, 32, generator=g) * s for s in (1.0, 4.0)]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_tables_are_the_same_with_and_without_sharing(monkeypatch, workers):
    monkeypatch.setenv("FP8PROBE_REPLAY_WORKERS", workers)
    strategies = "global,mixed,int8,switchback,ocp-rowwise"
    products = []
    scaled_mm = S.F.int8_scaled_mm
    monkeypatch.setattr(S.F, "int8_scaled_mm", lambda *a, **k: products.append(1) or scaled_mm(*a, **k))
    model, batches = _model_and_batches()
    shared = P.analyze(model, batches, strategies, e2e=False, threshold=3.0).tables
    n_shared = len(products)
    monkeypatch.setattr(S, "SHARING", ())
    model, batches = _model_and_batches()
    alone = P.analyze(model, batches, strategies, e2e=False, threshold=3.0).tables
    assert 0 < n_shared < len(products) - n_shared   # some forward products were shared
    assert shared.keys() == alone.keys()
    for name in shared:
        pd.testing.assert_frame_equal(shared[name], alone[name], check_exact=True)
