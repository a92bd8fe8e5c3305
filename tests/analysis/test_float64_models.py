"""A float64 model runs through every command as its float32 twin does: the recipes and the quantisers read its
operands as float32 (strategies.quantisable), the references stay float64. Before, the int8 and bnb-mixed recipes
recorded "A must have dtype in [float32, float16, bfloat16]" per layer and the sweeps and the end-to-end part
stopped with it."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from torch import nn

from fp8probe.analysis.pipeline import analyze
from fp8probe.analysis.sweeps import sweep_blocksize, sweep_threshold
from fp8probe.analysis.weights_only import sweep_blocksize_weights


def _model(dtype: torch.dtype) -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16)).to(dtype)
    x = torch.randn(12, 32) * torch.linspace(0.2, 9.0, 32)  # some outlier columns for LLM.int8
    return model, [x.to(dtype)]


def _close_sqnr(a: pd.Series, b: pd.Series, tol_db: float) -> None:
    assert len(a) == len(b)
    for x, y in zip(a.astype(float), b.astype(float)):
        if min(x, y) > 100:  # an exact GEMM's (int8 with its int32 sums): float32 rounding against float64, both
            continue
        assert abs(x - y) <= tol_db, (x, y)


def test_analyze_float64_model_every_strategy_and_end_to_end() -> None:
    res64 = analyze(*_model(torch.float64), "all")
    res32 = analyze(*_model(torch.float32), "all")
    assert "errors" not in res64.tables  # (a failing recipe would list its layers there)
    assert len(res64.tables["gemm"]) == len(res32.tables["gemm"])
    # float32 copies of float64 operands: the same quantised values as the float32 twin's, up to the last bits
    _close_sqnr(res64.tables["gemm"]["sqnr_db"], res32.tables["gemm"]["sqnr_db"], 0.05)
    e2e = res64.tables["e2e"]
    assert len(e2e) == len(res32.tables["e2e"]) and e2e["loss_rel_change"].notna().all()


@pytest.mark.parametrize("sweep", [sweep_blocksize, sweep_threshold])
def test_sweeps_take_a_float64_model(sweep) -> None:
    res64 = sweep(*_model(torch.float64))
    res32 = sweep(*_model(torch.float32))
    table = "blocksize_sweep" if sweep is sweep_blocksize else "threshold_sweep"
    _close_sqnr(res64.tables[table]["sqnr_db" if table == "blocksize_sweep" else "fprop_sqnr_db"],
                res32.tables[table]["sqnr_db" if table == "blocksize_sweep" else "fprop_sqnr_db"], 0.05)


def test_weights_only_sweep_takes_a_float64_weight(tmp_path) -> None:
    torch.manual_seed(8)
    w = torch.randn(24, 64, dtype=torch.float64)
    torch.save({"a.weight": w}, tmp_path / "w64.pt")
    torch.save({"a.weight": w.float()}, tmp_path / "w32.pt")
    t64 = sweep_blocksize_weights(tmp_path / "w64.pt", [32, 64]).tables["blocksize_sweep"]
    t32 = sweep_blocksize_weights(tmp_path / "w32.pt", [32, 64]).tables["blocksize_sweep"]
    _close_sqnr(t64["sqnr_db"], t32["sqnr_db"], 1e-3)
