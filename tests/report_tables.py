"""Hand-made results tables that follow the agreed schemas (e2e, sensitivity, recommendation, training,
coverage: see README "Reports") and a synthetic deep-model results document, for the report tests.

The numbers are small and honest: each table is consistent with itself (the recommended strategy is
within budget, the kept layers are the most sensitive ones, FLOP shares add up), so a renderer that
reads a wrong column or the wrong row shows a wrong figure the tests can catch.
"""
from __future__ import annotations

import copy
import math
import random

STRATEGIES = ("global", "mxfp8")


def e2e_rows() -> list[dict]:
    return [
        {"strategy": "global", "batches": 2, "loss_hp": 2.5, "loss_lp": 2.6, "loss_rel_change": 0.04,
         "output_sqnr_db": 17.2, "kl_div": 0.031, "top1_agreement": 0.91, "grad_sqnr_db_min": 8.5,
         "grad_sqnr_db_median": 14.0, "lp_flop_share": 1.0, "note": ""},
        {"strategy": "mxfp8", "batches": 2, "loss_hp": 2.5, "loss_lp": 2.5075, "loss_rel_change": 0.003,
         "output_sqnr_db": 26.4, "kl_div": 0.0021, "top1_agreement": 0.985, "grad_sqnr_db_min": 15.1,
         "grad_sqnr_db_median": 22.3, "lp_flop_share": 1.0, "note": ""},
    ]


def recommendation_rows(keep: list[str]) -> list[dict]:
    return [
        {"kind": "strategy", "strategy": "global", "value": None, "keep_16bit": keep + ["head"], "n_keep": len(keep) + 1,
         "loss_rel_change": 0.018, "kl_div": 0.012, "within_budget": False, "lp_flop_share": 0.81, "budget": 0.01,
         "budget_kind": "loss", "recommended": False},
        {"kind": "strategy", "strategy": "mxfp8", "value": None, "keep_16bit": keep, "n_keep": len(keep),
         "loss_rel_change": 0.0012, "kl_div": 0.0009, "within_budget": True, "lp_flop_share": 0.947, "budget": 0.01,
         "budget_kind": "loss", "recommended": True},
        {"kind": "blocksize", "strategy": "mixed", "value": 128, "keep_16bit": [], "n_keep": 0, "loss_rel_change": 0.004,
         "kl_div": 0.003, "within_budget": True, "lp_flop_share": 1.0, "budget": 0.01, "budget_kind": "loss",
         "recommended": False},
        {"kind": "threshold", "strategy": "int8", "value": 6.0, "keep_16bit": [], "n_keep": 0, "loss_rel_change": 0.006,
         "kl_div": 0.004, "within_budget": True, "lp_flop_share": 0.99, "budget": 0.01, "budget_kind": "loss",
         "recommended": False},
    ]


def sensitivity_rows(layers: list[str]) -> list[dict]:
    rows = []
    for s_i, s in enumerate(STRATEGIES):
        for i, layer in enumerate(layers):
            rows.append({"strategy": s, "layer": layer, "index": i, "only_lp_loss_rel_change": 0.001 * (i + 1) / (s_i + 1),
                         "only_lp_kl": 0.0005 * (i + 1), "only_hp_loss_rel_change": 0.01 - 0.001 * i, "only_hp_kl": 0.002,
                         "isolated_fprop_sqnr_db": 30.0 - i, "rank": len(layers) - i,
                         "method": "measured: one layer swapped at a time"})
    return rows


def training_rows(steps: int = 3) -> list[dict]:
    rows = []
    for s, slope in (("hp", 0.10), ("mxfp8", 0.095)):
        for step in range(steps):
            row = {"strategy": s, "step": step, "loss": 3.0 - slope * step}
            if step == steps - 1:
                row.update({"final_loss_ratio": (3.0 - slope * step) / (3.0 - 0.10 * step),
                            "weight_drift": 0.0 if s == "hp" else 0.0042})
            rows.append(row)
    return rows


def coverage_rows() -> list[dict]:
    return [
        {"kind": "linear", "op": "linear", "executed": 24, "captured": 24, "skipped": 0, "reason": "",
         "gflops": 3.2, "gflops_captured": 3.2},
        {"kind": "attention", "op": "sdpa", "executed": 4, "captured": 4, "skipped": 0, "reason": "",
         "gflops": 0.6, "gflops_captured": 0.6},
        {"kind": "conv", "op": "conv3d", "executed": 2, "captured": 0, "skipped": 2, "reason": "conv3d not supported",
         "gflops": 0.2, "gflops_captured": 0.0},
    ]


def with_agreed_tables(results: dict, keep: list[str] | None = None) -> dict:
    """A copy of ``results`` carrying e2e, recommendation, sensitivity, training and coverage tables."""
    data = copy.deepcopy(results)
    layers = list(dict.fromkeys(r["layer"] for r in data["tables"]["layers"]))
    keep = keep if keep is not None else layers[-2:]
    data["tables"].update({"e2e": e2e_rows(), "recommendation": recommendation_rows(keep),
                           "sensitivity": sensitivity_rows(layers), "training": training_rows(),
                           "coverage": coverage_rows()})
    return data


def deep_results(n_layers: int = 211, strategies: tuple[str, ...] = ("global", "mixed", "int8", "switchback",
                 "ocp-tensorwise", "ocp-rowwise", "ocp-blockwise", "mxfp8"), width: int = 1024, seed: int = 0) -> dict:
    """A synthetic analyze results document of an ``n_layers``-layer LM-like model: every table the
    pipeline writes (gemm, operands, tensors, histograms with 64 bins, outliers with ``width`` column
    amaxes), the unquantised wgrad of mixed/switchback marked ``quantised: false`` at ~140 dB."""
    rng = random.Random(seed)
    names = []
    for block in range(n_layers // 7 + 1):
        for sub in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            names.append(f"model.layers.{block}.{sub}")
    names = names[:n_layers]
    tables: dict[str, list[dict]] = {k: [] for k in ("layers", "gemm", "operands", "tensors", "histograms", "outliers")}
    for i, layer in enumerate(names):
        tables["layers"].append({"layer": layer, "in_features": width, "out_features": width, "has_bias": False,
                                 "tokens": 512, "bsz": 1024, "bsz2": 1024})
        base = 24 + 8 * rng.random() - (12 if "down_proj" in layer and i % 5 == 0 else 0)
        for s in strategies:
            for g in ("fprop", "dgrad", "wgrad"):
                unq = g == "wgrad" and s in ("mixed", "switchback")
                v = 140 + rng.random() if unq else base + rng.gauss(0, 2) + (10 if "int8" in s else 0)
                tables["gemm"].append({"layer": layer, "strategy": s, "gemm": g, "sqnr_db": v,
                                       "rel_err": 10 ** (-v / 20), "cosine": 1 - 10 ** (-v / 10) / 2,
                                       "max_abs_err": 0.01, "nonfinite": 0, "quantised": not unq})
            for op in ("activation", "weight", "grad_output"):
                tables["operands"].append({"layer": layer, "strategy": s, "operand": op, "sqnr_db": base + 3,
                                           "underflow_frac": 0.0 if op != "grad_output" else 0.002,
                                           "saturation_frac": 0.0})
        for t in ("activation", "weight", "grad_output"):
            tables["tensors"].append({"layer": layer, "tensor": t, "numel": 512 * width, "amax": 20.0, "std": 1.0,
                                      "kurtosis": 3.5, "zero_frac": 0.0, "nan_count": 0, "inf_count": 0,
                                      "range_bits": 18.0, "block_absmax_ratio": 1.5})
            edges = [-20 + 0.5 * k for k in range(65)]
            counts = [int(1000 * math.exp(-((e + 2) / 3) ** 2)) for e in edges[:-1]]
            tables["histograms"].append({"layer": layer, "tensor": t, "edges": edges, "counts": counts})
        col_amax = [2 + rng.random() for _ in range(width)]
        dims = [7, 300, 911] if i % 3 == 0 else []
        for d in dims:
            col_amax[d] = 30 + d / 10
        top = sorted(((d, col_amax[d]) for d in dims), key=lambda t: -t[1])
        tables["outliers"].append({"layer": layer, "threshold": 6.0, "n_outlier_cols": len(dims),
                                   "frac_cols": len(dims) / width, "frac_rows": 0.4 if dims else 0.0,
                                   "top_dims": [[d, a] for d, a in top], "col_amax": col_amax})
    meta = {"name": "deep-lm", "model": f"synthetic {n_layers}-layer LM", "inputs": "2 batches", "created": "",
            "device": "cpu", "seed": seed, "versions": {"fp8probe": "0.1.0"}, "strategies": list(strategies),
            "threshold": 6.0, "loss": {"kind": "model", "detail": "scalar loss returned by the model"},
            "formats": {}, "rules": {s: f"rule of {s}" for s in strategies}, "batches": 2, "layers_regex": None,
            "dtype": "bfloat16", "threads": 1}
    return {"schema": "fp8probe.results", "version": 1, "kind": "analyze", "metadata": meta, "tables": tables}
