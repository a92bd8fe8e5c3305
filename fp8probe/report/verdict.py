"""The verdict: what the results say at a glance (recipe, 16-bit layers, loss change, coverage, warnings), shared by the terminal and the report."""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fp8probe.report.schema import NOTE_NEAREST_PLAN, NOTE_NO_FINITE_REFERENCE, NOTE_NOT_SEARCHED, metric_value

# A layer is "hurt" under a strategy when its forward GEMM keeps less than 20 dB SQNR: the
# quantisation noise is above 1 % of the output power (10^(-20/10) = 0.01). Per-tensor FP8 on
# well-behaved data gives ~25-31 dB, int8 vector-wise ~35-40 dB, so 20 dB flags clearly hurt layers.
KEEP_16BIT_DB = 20.0
# An operand is flagged when a recipe flushes more than 10 % of its non-zero elements to zero in a layer (operands
# table, underflow_frac). Those elements are lost outright, not rounded: for grad_output a tenth of the gradient
# entries stop reaching the weights, yet the energy-weighted SQNR can still read ~26 dB when the flushed ones are
# small (QA F7: per-sample loss weights over 14 decades, 46-66 % flushed under per-tensor FP8). Well-scaled operands
# flush well under 1 %, so 10 % flags a scale that does not fit the data, not rounding noise.
UNDERFLOW_WARN_FRAC = 0.10
# The FP8 recipes with a finer scale than one per tensor (analysis/strategies.py: one per row along the contraction
# dim, 1x128 tiles, blocks of 32), in the order the underflow warning offers them. Names only: report does not
# import analysis. The warning names only those a run did not try: it suggested ocp-rowwise to a run of ocp-rowwise
# whose outliers sit inside each row (QA F5).
FINER_SCALE_RECIPES = ("ocp-rowwise", "mxfp8", "ocp-blockwise", "mxfp8-rceil")
# The recipes whose elements are 4- or 6-bit floats (E2M1, E2M3, E3M2: 2-3 exponent bits), already with a scale per block
# of 16 or 32. Their underflow comes from the element format: E2M1 holds 0.5..6 times its scale, so a value under 1/24
# of its block's largest flushes to zero whatever the scale; a finer scale is no cure, more exponent bits are. Names
# only (report does not import analysis).
NARROW_ELEMENT_RECIPES = ("mxfp4", "nvfp4", "nvfp4-train", "mxfp6-e2m3", "mxfp6-e3m2")
# Layer names listed inline in one verdict line before "… and N more".
MAX_NAMES = 6
# What an outlier threshold of 0 means (SPEC §5.1: no outlier columns when threshold == 0): said beside the value.
THRESHOLD_ZERO = " = plain int8, no outlier columns in 16-bit"
# A recommended plan's KL over this many times its own loss change (both in nats) means at least half of the change
# cancels in the loss: hidden_kl_warning.
HIDDEN_KL_RATIO = 2.0
# A plan within the budget that leaves under this share of the forward GEMM FLOPs in low precision gains little over
# 16-bit: with low-precision GEMMs twice as fast as 16-bit ones (FP8 vs BF16 tensor cores), half of the FLOPs in low
# precision shorten the GEMM time by a quarter at most (1 / (0.5 + 0.5 / 2) = 1.33x), and the 16-bit layers are most
# of the rest. Its "within budget" is qualified ("yes, little gain"), not a plain green yes: a random-init Llama under
# kl:1e-5 kept 32 of 37 layers under nvfp4 (5.2 % of the FLOPs in low precision) beside a green "yes" (QA A3).
LOW_GAIN_LP_SHARE = 0.5
# A plan within a loss budget whose KL is over this many times the recommended plan's moves the output distribution
# far more than the loss shows. KL grows with the square of a small logit error, so 100x is a logit error ten times
# the recommended plan's (about 20 dB less output SQNR). Not 10x: per-tensor FP8 sits 14-19x above int8/switchback on
# the demo and the random-init Llama (the gap between recipe families, 10-12 dB), while the FP4 recipes that met a
# 1 % loss budget with top-1 agreement 30 % sat 190-290x above it (QA A3). A KL budget bounds the KL itself: no flag.
KL_FAR_RATIO = 100.0

# A relative change under this many percent prints as "≈ +0 %" (signed_pct says why).
NEGLIGIBLE_PCT = 1e-6

# One line each for a table the verdict needs but the results do not carry.
MISSING = {
    "e2e": "no end-to-end run in these results: run analyze without --no-e2e for the loss change per strategy",
    "recommendation": "no validated recommendation in these results: run analyze with its end-to-end pass",
    "coverage": "no coverage table in these results: GEMMs outside linear layers were not counted",
}

Records = list[dict]


def records(table: Any) -> Records:
    """A table as a list of dicts with NaN turned into None: accepts a pandas DataFrame (Results.tables)
    or the JSON list of records (results.json), so the terminal and the report read the same rows."""
    if table is None:
        return []
    if hasattr(table, "to_dict"):
        table = table.to_dict("records")
    out = []
    for r in table:
        out.append({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in dict(r).items()})
    return out


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return None if math.isnan(v) else v


def signed_pct(v: Any, digits: int = 2) -> str:
    """A relative change as a signed percentage ("+0.12 %"); "–" when not measured. Under 10^(1-digits) % (0.1 % at
    two decimals), where the decimals hold fewer than two significant digits, two significant digits in plain decimal
    ("+0.016 %", "+0.000032 %"):
    * the demo's sensitivity table read "+0.00 %" / "-0.00 %" in every row, and -0.0159 % / 0.0103 % / 0.0109 %
      read "-0.02 %" / "+0.01 %" / "+0.01 %" (QA): rankings and ties could not be told from the numbers shown;
    * a change shown beside a bound rounded up to two significant digits (the nearest plan's --budget) then never
      reads above it: "+0.01 %" stood beside the "--budget 0.007%" that accepts it (QA F6);
    * never scientific notation: "+8.9e-05 %" beside "+0.0012 %" read as a different kind of number (QA D1).
    Under NEGLIGIBLE_PCT (10^-6 %, a relative change of 10^-8: below one float32 rounding step of the loss, ~6·10^-8)
    the digits are rounding noise, and "+0.00000000020 %" is unreadable: "≈ +0 %" / "≈ -0 %", keeping the sign (a
    loss that moved at all, and which way). Exactly 0 stays "+0.00 %"."""
    x = _num(v)
    if x is None:
        return "–"
    if math.isinf(x):
        return "+∞ %" if x > 0 else "−∞ %"
    p = 100 * x
    if x != 0 and abs(p) < NEGLIGIBLE_PCT:
        return "≈ +0 %" if x > 0 else "≈ -0 %"
    if x != 0 and abs(p) < 10.0 ** (1 - digits):
        # the decimal exponent after rounding to two significant digits (9.96e-5 rounds to 1.0e-4: 5 decimals)
        exponent = int(f"{p:.1e}".split("e")[1])
        return f"{p:+.{max(1 - exponent, digits)}f} %"
    return f"{p:+.{digits}f} %"


def pct(v: Any, digits: int = 1) -> str:
    """A share (0..1) as a percentage ("97.3 %"); "–" when not measured. A share under 1 that rounds to 100 is
    ">99.9 %": "100.0 %" beside int8's outlier columns kept in 16-bit read as every FLOP in low precision (QA)."""
    x = _num(v)
    if x is None:
        return "–"
    text = f"{100 * x:.{digits}f} %"
    return f">{100 - 10.0 ** -digits:.{digits}f} %" if x < 1 and text == f"{100:.{digits}f} %" else text


def _g(v: Any) -> str:
    x = _num(v)
    return "–" if x is None else f"{x:.3g}"


def budget_value(value: Any, kind: Any) -> str:
    """A budget's value as the numbers beside it read: a loss budget is a relative change, so a percentage like the
    loss changes ("0.5 %" for 0.005); a KL budget in nats as it is ("0.01")."""
    x = _num(value)
    if x is None:
        return "–"
    return f"{100 * x:g} %" if str(kind or "loss") == "loss" else f"{x:g}"


def strategies_text(n: int) -> str:
    """"1 strategy", "12 strategies"."""
    return f"{n} strateg{'y' if n == 1 else 'ies'}"


def budget_text(value: Any, kind: Any) -> str:
    """"|loss change| ≤ 0.5 %", "KL ≤ 0.01": the budget as the bound it sets, for "(budget …)", the Recommendation
    table and the sweeps' lines ("1e-05 kl" and "0.5 % loss" named the kind after the number, QA C4)."""
    bound = budget_value(value, kind)
    return f"KL ≤ {bound}" if str(kind or "loss") == "kl" else f"|loss change| ≤ {bound}"


def loss_change_text(rel: Any, loss_hp: Any) -> str:
    """"loss change +0.0013 % of 9.049": a relative loss change and the high-precision loss it is relative to (QA C3:
    only the relative change appeared, the loss itself nowhere; then "loss 9.049 → -0.0023 %" read as the loss going
    to -0.0023 %); the change alone when that loss is not known or not finite."""
    hp = _num(loss_hp)
    change = signed_pct(rel)
    base = "" if hp is None or not math.isfinite(hp) or change == "–" else f" of {hp:.4g}"
    return f"loss change {change}{base}"


def frozen_text(metadata: Mapping) -> str:
    """What the results say about frozen weights ("" when none): their layers have no wgrad rows."""
    names = metadata.get("frozen_layers") or []
    if not names:
        return ""
    return (f"{len(names)} layer(s) have frozen weights (requires_grad False while other parameters train), so "
            f"training computes no weight gradient for them and their wgrad is not analysed (nor their dgrad when "
            f"nothing trained comes before them): {_names(names)} (to analyse it, unfreeze them with "
            "requires_grad_(True) in the model you load)")


def not_run_text(metadata: Mapping) -> str:
    """What the results say about backward GEMMs training does not run, frozen weights aside ("" when none):
    the dgrad of a layer whose input needs no gradient (metadata.no_dgrad_layers) and the wgrad of a GEMM whose
    second operand needs none (no_wgrad_layers) have no rows."""
    parts = []
    dgrad = metadata.get("no_dgrad_layers") or []
    if dgrad:
        parts.append(f"no dgrad for {len(dgrad)} layer(s) whose input needs no gradient (the model's input data, or "
                     f"what only frozen layers computed from it): {_names(dgrad)}")
    wgrad = metadata.get("no_wgrad_layers") or []
    if wgrad:
        parts.append(f"no wgrad for {len(wgrad)} GEMM(s) whose second operand needs no gradient (a buffer or a "
                     f"constant): {_names(wgrad)}")
    if not parts:
        return ""
    return "training runs " + "; and ".join(parts) + ", so these GEMMs are not analysed"


def model_mode(metadata: Mapping) -> str | None:
    """The mode the model ran in: "train" (metadata.train_mode: --train-mode, or a program exported from train()),
    "eval", or None for a weights-only run (no model run, no mode)."""
    if "weights_only" in metadata:
        return None
    return "train" if metadata.get("train_mode") else "eval"


def untrained_batchnorm_text(metadata: Mapping) -> str:
    """The BatchNorm layers that still have their initial running statistics (metadata.untrained_batchnorm, "" for
    none): the model runs in eval mode, so they normalise nothing and what follows them is not what a trained
    model computes."""
    names = metadata.get("untrained_batchnorm") or []
    if not names:
        return ""
    return (f"{len(names)} BatchNorm layer(s) still have their initial running statistics (mean 0, variance 1): "
            f"{_names(names)}. The model runs in eval mode, as for inference, so they normalise nothing and the "
            "GEMMs after them see unnormalised activations; analyse a trained checkpoint, or one whose BatchNorm "
            "statistics were updated on real batches")


def inputs_shape_text(metadata: Mapping) -> str:
    """"2 batch(es) of 1 x 64 tokens" (token ids found) or "2 batch(es) of x 8 x 3 x 32 x 32, y 8" (the first batch's
    tensors) from metadata.input_shapes, "" for results written before it: what a user's inputs file held, as the
    demo's own description says it (QA C3: "inputs: x.pt" gave no shape or token count)."""
    info = metadata.get("input_shapes")
    if not isinstance(info, Mapping) or not info.get("tensors"):
        return ""
    n = info.get("batches")
    tensors = [t for t in info["tensors"] if isinstance(t, Mapping)]
    token = next((t for t in tensors if t.get("name") == info.get("token_ids")), None)
    if token is not None:
        text = f"{n} batch(es) of {' x '.join(str(d) for d in token.get('shape') or [])} tokens"
        if _num(info.get("tokens")) is not None and n != 1:
            text += f" ({int(info['tokens'])} tokens in all)"
    else:
        text = f"{n} batch(es) of " + ", ".join(
            f"{t.get('name')} {' x '.join(str(d) for d in t.get('shape') or []) or 'scalar'}" for t in tensors)
    return text + ("" if info.get("same_shapes", True) else "; the first batch's shape, later ones differ")


def inputs_text(metadata: Mapping) -> str:
    """"x.pt: 2 batch(es) of 1 x 64 tokens (128 tokens in all)": the inputs' description and what they held; the
    description alone when it already says the shape (the demo's "4 seeded batch(es) of 8 x 32 tokens") or when the
    results predate metadata.input_shapes."""
    desc = str(metadata.get("inputs") or "")
    shape = inputs_shape_text(metadata)
    if not shape or shape.split(" of ", 1)[-1].split(" (", 1)[0] in desc:
        return desc
    return f"{desc}: {shape}" if desc else shape


def gemm_sites_text(n_sites: int, tables: Mapping[str, Any], metadata: Mapping) -> str:
    """"37 GEMM site(s) (74 GEMM call(s) in 2 batch(es))": a site is a layer or matmul of the model, a call one run of
    it; the coverage line counts calls (QA C3: the header's "74 GEMMs" beside the terminal's "37 GEMM site(s)").
    ``tables``/``metadata`` as for build_verdict: the calls are the coverage line's captured count."""
    cov = coverage_summary(records(tables.get("coverage")), metadata.get("coverage"))
    calls = _num((cov or {}).get("captured"))
    batches = _num(metadata.get("batches"))
    if calls is None or batches is None:
        return f"{n_sites} GEMM site(s)"
    return f"{n_sites} GEMM site(s) ({int(calls)} GEMM call(s) in {int(batches)} batch(es))"


def _names(names: Sequence[str], limit: int = MAX_NAMES) -> str:
    shown = ", ".join(str(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def keep_list(v: Any) -> list[str]:
    """keep_16bit as a list: JSON gives a list; a CSV round trip may give its JSON text."""
    if isinstance(v, str):
        import json

        try:
            v = json.loads(v)
        except ValueError:
            return [v] if v else []
    return [str(x) for x in v] if isinstance(v, (list, tuple)) else []


def keep_set_searched(row: Mapping) -> bool:
    """Whether a recommendation row's keep-set was searched (and so judged against the budget): not when the search
    was skipped (a KL budget on an output that is no distribution), which results say by a null within_budget and,
    written before that, by the note alone (with within_budget false and n_keep 0, read as a failed plan)."""
    return row.get("within_budget") is not None and not str(row.get("note") or "").startswith(NOTE_NOT_SEARCHED)


def not_searched_why(row: Mapping) -> str:
    """Why a recommendation row's keep-set was not searched: its note after NOTE_NOT_SEARCHED."""
    return str(row.get("note") or "").split(NOTE_NOT_SEARCHED, 1)[-1]


def _strategy_order(tables: Mapping[str, Records], metadata: Mapping) -> list[str]:
    names = list(metadata.get("strategies") or [])
    for t in ("e2e", "recommendation", "gemm"):
        names += [r["strategy"] for r in tables.get(t, []) if r.get("strategy") not in (None, "hp")]
    return list(dict.fromkeys(names))


def isolated_summary(gemm: Records, strategies: Sequence[str], keep_db: float = KEEP_16BIT_DB) -> list[dict]:
    """Per strategy, from the isolated per-GEMM table: how many layers' fprop SQNR is below ``keep_db``
    (or undefined), out of how many measured, and the worst layer."""
    out = []
    for s in strategies:
        rows = [r for r in gemm if r.get("strategy") == s and r.get("gemm") == "fprop"]
        if not rows:
            continue
        vals = [(metric_value(r), r["layer"]) for r in rows]
        hurt = [(v, layer) for v, layer in vals if v is not None and (math.isnan(v) or v < keep_db)]
        # the worst layer: an undefined SQNR (no finite reference, NaN) before any measured one
        measured = sorted(((v, layer) for v, layer in vals if v is not None), key=lambda t: (not math.isnan(t[0]), t[0]))
        worst = measured[0] if measured else None
        out.append({"strategy": s, "n_layers": len(rows), "n_below": len(hurt),
                    "below": [layer for _, layer in sorted(hurt, key=lambda t: (not math.isnan(t[0]), t[0]))],
                    "worst_layer": worst[1] if worst else None, "worst_db": worst[0] if worst else None})
    return out


def _chosen_skip(why: str) -> bool:
    """A skip the user asked for (--layers / --gemms), not a GEMM fp8probe could not analyse."""
    return "not matched by --layers" in why or "(--gemms)" in why


def coverage_summary(coverage: Records, meta_coverage: Mapping | None = None) -> dict | None:
    """GEMMs executed / captured, captured share of GEMM FLOPs and skips by reason, from the coverage
    table (or ``metadata["coverage"]`` when only that is present)."""
    if coverage:
        executed = sum(int(_num(r.get("executed")) or 0) for r in coverage)
        captured = sum(int(_num(r.get("captured")) or 0) for r in coverage)
        flops = sum(_num(r.get("gflops")) or 0.0 for r in coverage)
        flops_cap = sum(_num(r.get("gflops_captured")) or 0.0 for r in coverage)
        skipped: dict[str, int] = {}
        for r in coverage:
            n = int(_num(r.get("skipped")) or 0)
            if n:  # (a row's reason may carry its own count, "not matched by --layers (4)": the count is added below)
                reason = re.sub(r" \(\d+\)$", "", str(r.get("reason") or "not captured"))
                why = f"{r.get('op') or r.get('kind')}: {reason}"
                skipped[why] = skipped.get(why, 0) + n
        return {"executed": executed, "captured": captured,
                "flop_share": flops_cap / flops if flops > 0 else (1.0 if executed == captured else None),
                "skipped": skipped}
    if meta_coverage:
        return {"executed": meta_coverage.get("gemms_executed"), "captured": meta_coverage.get("gemms_captured"),
                "flop_share": meta_coverage.get("flop_share"), "skipped": dict(meta_coverage.get("skipped") or {})}
    return None


def nan_inf_warning(tensors: Records, where: str = "captured tensors") -> str | None:
    """The NaN/Inf warning of a ``tensors`` table (counted per layer and tensor, never fatal), else None."""
    rows = records(tensors)
    nan = sum(int(_num(r.get("nan_count")) or 0) for r in rows)
    inf = sum(int(_num(r.get("inf_count")) or 0) for r in rows)
    if not (nan or inf):
        return None
    bad = list(dict.fromkeys(r["layer"] for r in rows
                             if (_num(r.get("nan_count")) or 0) or (_num(r.get("inf_count")) or 0)))
    return f"{nan} NaN and {inf} Inf values in {where} of {len(bad)} layer(s): {_names(bad, 3)}"


def nonfinite_operands_warning(metadata: Mapping) -> str | None:
    """A sweep's NaN/Inf warning (metadata.nonfinite_operands: sweeps keep no tensors table), else None."""
    info = metadata.get("nonfinite_operands") or {}
    n = _num(info.get("values")) if isinstance(info, Mapping) else None
    if not n:
        return None
    bad = [str(x) for x in (info.get("layers") or [])]
    return (f"{int(n)} NaN/Inf values in the swept operands of {len(bad)} layer(s): {_names(bad, 3)} (excluded from "
            "every SQNR)")


def underflow_warnings(operands: Records, strategies: Sequence[str],
                       limit: float = UNDERFLOW_WARN_FRAC, pick: Mapping | None = None) -> list[str]:
    """One warning per operand that some recipe flushes to zero in more than ``limit`` of its non-zero elements in
    some layer: in how many layers, then under each layer that is some recipe's worst the recipes with their share,
    largest first. When no recipe of the run stays at or under ``limit`` in every one of those layers, what might.
    ``pick``: the verdict's pick (_underflow_pick); a warning that names it says how the two relate.

    Short on purpose (QA B6: each warning ran 4-5 lines, one "in N of M layer(s) (worst: …)" per recipe and then the
    list of every recipe that was fine); the operands table holds every layer's share.
    """
    rows = [r for r in operands if _num(r.get("underflow_frac")) is not None]
    rank = {s: i for i, s in enumerate(strategies)}
    out = []
    for op in dict.fromkeys(r.get("operand") for r in rows):
        mine = [r for r in rows if r.get("operand") == op]
        hit: dict[str, list[tuple[float, str]]] = {}
        for r in mine:
            if r["underflow_frac"] > limit:
                hit.setdefault(r.get("strategy"), []).append((r["underflow_frac"], str(r.get("layer"))))
        if not hit:
            continue
        worst = {s: max(v) for s, v in hit.items()}
        order = sorted(hit, key=lambda s: (-worst[s][0], rank.get(s, len(rank))))  # (ties in the run's order)
        by_layer: dict[str, list[str]] = {}
        for s in order[:MAX_NAMES]:
            by_layer.setdefault(worst[s][1], []).append(f"{s} {pct(worst[s][0])}")
        said = "; ".join(f"{layer} under {', '.join(names)}" for layer, names in by_layer.items())
        if len(order) > MAX_NAMES:
            said += f" and {len(order) - MAX_NAMES} more recipe(s)"
        layers = {layer for v in hit.values() for _, layer in v}
        n_layers = len({str(r.get("layer")) for r in mine})
        text = (f"{op} underflow: over {pct(limit, 0)} of its non-zero elements flush to zero in {len(layers)} of "
                f"{n_layers} layer(s); worst: {said}")
        if pick and pick["strategy"] in order[:MAX_NAMES]:
            kept = {layer for _, layer in hit[pick["strategy"]]} <= pick["keep"]
            text += f" ({pick['kept'] if kept else pick['grad'] if op == 'grad_output' else pick['clause']})"
        run = list(dict.fromkeys([*strategies, *(r.get("strategy") for r in mine)]))
        # (what keeps a recipe under it is its business: a finer scale, or a format with more range such as E5M2)
        if not any(s not in hit and layers <= {str(r.get("layer")) for r in mine if r.get("strategy") == s
                                               and r["underflow_frac"] <= limit} for s in run):
            text += "; " + _no_recipe_helps(run, hit)
        out.append(text)
    return out


def nonfinite_output_warning(gemm: Records, strategies: Sequence[str], pick: Mapping | None = None) -> str | None:
    """One warning naming the recipes whose low-precision GEMM outputs are NaN/±Inf where the float64 reference is
    finite (``gemm.nonfinite``), most GEMMs first, each with its worst GEMM; None when there are none.

    Why: the SQNRs are taken over the finite elements only, so a recipe turning a quarter of a layer's outputs NaN
    (one +Inf weight poisons an NVFP4 16x16 tile; an int8 row scale of +Inf makes the whole row NaN) showed an ordinary
    16 dB in the heat map, and the verdict recommended switchback with its dgrad all NaN on that layer (QA).
    """
    rank = {s: i for i, s in enumerate(strategies)}
    hit: dict[str, list[tuple[float, int, int, str, str]]] = {}
    for r in gemm:
        n = int(_num(r.get("nonfinite")) or 0)
        if n > 0:
            total = n + int(_num(r.get("compared")) or 0)
            hit.setdefault(str(r.get("strategy")), []).append((n / total, n, total, str(r.get("layer")),
                                                               str(r.get("gemm"))))
    if not hit:
        return None
    order = sorted(hit, key=lambda x: (-len(hit[x]), rank.get(x, len(rank))))
    parts = []
    for name in order[:MAX_NAMES]:
        _, n, total, layer, which = max(hit[name])
        parts.append(f"{name} in {len(hit[name])} GEMM(s) (worst: {layer} {which}, {n} of {total})")
    text = ("NaN/Inf low-precision GEMM outputs where the float64 reference is finite (their SQNRs count only the "
            "finite outputs; cells marked ⚠): " + "; ".join(parts)
            + (f" and {len(order) - MAX_NAMES} more recipe(s)" if len(order) > MAX_NAMES else ""))
    if pick and pick["strategy"] in hit:
        layers = {x[3] for x in hit[pick["strategy"]]}
        text += (f" ({pick['kept']})" if layers <= pick["keep"] else
                 f" ({pick['strategy']}, the verdict's pick, is one of them: keep "
                 + _names(sorted(layers - pick["keep"]), 4) + " in 16-bit, or find the NaN/Inf in the tensors table)")
    return text


def _underflow_pick(recommended: Mapping | None, best_isolated: Mapping | None, tables: Mapping[str, Records],
                    metadata: Mapping) -> dict | None:
    """What an underflow warning naming the verdict's pick says of it: the recommended recipe passed its end-to-end
    check with the underflow ("kept" where its keep-set holds every layer it flushes in 16-bit, so the check ran
    without it; "grad" for a gradient: the budget reads the forward outputs, the gradient SQNR shows the backward);
    the isolated pick of a run without one was never checked (the advice to run it only where --no-e2e was the
    reason: a forward-only run says its own in a note)."""
    if recommended:
        s = recommended["strategy"]
        return {"strategy": s, "keep": set(recommended["keep_16bit"]),
                "clause": f"{s} is the recommended recipe: its end-to-end check passed with this underflow",
                "kept": f"{s} is the recommended recipe: it keeps these layers in 16-bit",
                "grad": f"{s} is the recommended recipe: its budget reads the forward outputs; see its gradient SQNR"}
    if best_isolated and not tables.get("e2e"):
        s = best_isolated["strategy"]
        clause = (f"{s}, the isolated pick, was not validated end to end"
                  + ("" if metadata.get("e2e_off") else ": run without --no-e2e"))
        return {"strategy": s, "keep": set(), "clause": clause, "kept": clause, "grad": clause}
    return None


def _no_recipe_helps(run: Sequence[str], hit: Mapping[str, Any]) -> str:
    """Why no recipe of the run keeps an operand from flushing: the finer-scaled recipes the run did not try, and
    those it tried that flush too (their scales did not help: the small values share rows or blocks with large ones).
    4- and 6-bit recipes (NARROW_ELEMENT_RECIPES) are told that their elements are the cause, with their share: a
    run of mxfp4 alone was offered "a per-row or per-block scale (e.g. ocp-rowwise, mxfp8)", and mxfp4 has one."""
    text = "no recipe of this run stays under it there"
    narrow = [s for s in hit if s in NARROW_ELEMENT_RECIPES]
    if narrow:
        shares = ", ".join(f"{s} flushes up to {pct(max(hit[s])[0])}" for s in narrow[:MAX_NAMES])
        wider = [s for s in ("mxfp8", "mxfp6-e3m2") if s not in hit]
        text += (f": {shares}: 4- and 6-bit elements (2-3 exponent bits) cannot hold values far below their block's "
                 "largest, whatever the scale; a format with more exponent bits keeps them (an FP8 recipe"
                 + (f" such as {' or '.join(wider)})" if wider else ")"))
        if len(narrow) == len(hit):
            return text
        text += f"; for {', '.join(s for s in hit if s not in narrow)}"
    tried = [s for s in FINER_SCALE_RECIPES if s in hit]
    untried = [s for s in FINER_SCALE_RECIPES if s not in run]
    if tried:
        text += (f", not even the finer scales of {', '.join(tried)}: the small values sit inside each row or block "
                 "next to large ones")
    if untried and tried:
        text += f"; other per-row or per-block scales (e.g. {', '.join(untried[:2])}) were not tried"
    elif untried:
        text += (f": a per-row or per-block scale (e.g. {', '.join(untried[:2])}) gives small rows their own "
                 "scale")
    return text


def lp_share_text(share: Any, coverage: Mapping | None, short: bool = False) -> str:
    """"94.7 % of forward GEMM FLOPs": the end-to-end share of FLOPs run in low precision. The end-to-end passes
    replace the analysed GEMMs only, so where the capture left some out (--layers, --gemms, unsupported ops) the
    share is of the analysed FLOPs, and the model's share (times the captured share) is given beside it.

    Forward, and said so: the share counts each GEMM's forward FLOPs (e2e.Gemms), as the budget reads the forward
    outputs (loss, KL). "100.0 % of GEMM FLOPs" for switchback, whose dgrad and wgrad run unquantised, read as
    every GEMM of a training step (QA A3); the backward GEMMs show in the heat map's dgrad / wgrad views."""
    cov = _num((coverage or {}).get("flop_share"))
    whole = "forward FLOPs" if short else "of forward GEMM FLOPs"
    if _num(share) is None or cov is None or cov >= 0.9995:
        return f"{pct(share)} {whole}"
    return (f"{pct(share)} of the analysed forward GEMM FLOPs ({pct(_num(share) * cov)} of the model's)"
            if not short else f"{pct(share)} analysed forward FLOPs ({pct(_num(share) * cov)} of the model's)")


def _budget_undefined(kind: str, e2e_rows: list[dict]) -> str | None:
    """Why no strategy's budget metric is defined (every e2e row's loss change, or KL, null or NaN), else None:
    then "no strategy stays within the budget" would blame the recipes for what the model or the metric did."""
    metric = "kl_div" if kind == "kl" else "loss_rel_change"
    values = [_num(r.get(metric)) for r in e2e_rows]
    if not values or any(v is not None and not math.isnan(v) for v in values):
        return None
    if kind == "kl":
        return ("the KL divergence is undefined for this model's output (it is not read as class logits; see the "
                "end-to-end notes): use a loss budget (--budget 0.01)")
    hp = [_num(r.get("loss_hp")) for r in e2e_rows]
    if any(v is None or not math.isfinite(v) for v in hp):
        return ("the high-precision loss itself is not finite (NaN/Inf): the model or its inputs produce non-finite "
                "values (see the NaN/Inf counts), or a batch is empty")
    if all(v == 0 for v in hp):
        return "the high-precision loss is 0, so its relative change is undefined"
    return "the loss change is undefined for every strategy"


def hidden_kl_warning(recommended: Mapping | None, e2e_rows: Records) -> str | None:
    """A warning when the recommended plan keeps a loss budget while its output distribution moves by much more than
    its loss does, else None: the KL (nats per row) is over HIDDEN_KL_RATIO x the plan's own |loss change| in nats
    (relative change x |high-precision loss|) and over what the budget lets the loss move (budget x |loss|).

    Why: a loss averages signed per-token changes, which can cancel (a layer whose harm shows in the KL but not in
    the loss, QA of 2026-12-01); for a calibrated classifier the expected loss change is about the KL, so a KL well
    above the loss change means the loss hides part of it. Comparing with the budget alone fired on plans whose loss
    moved about as much as their KL, merely close to the budget (QA: loss 0.0029 nats, KL 0.0034). The KL is only
    computed for outputs read as class logits (e2e.Runner), so both are in nats.
    """
    if not recommended or str(recommended.get("budget_kind") or "loss") != "loss":
        return None
    kl, budget, rel = (_num(recommended.get(k)) for k in ("kl_div", "budget", "loss_rel_change"))
    hp = next((_num(r.get("loss_hp")) for r in e2e_rows if r.get("strategy") == recommended.get("strategy")), None)
    if None in (kl, budget, rel, hp) or not all(math.isfinite(x) for x in (kl, rel, hp)):
        return None
    allowed, moved = budget * abs(hp), abs(rel * hp)
    if kl <= allowed or kl <= HIDDEN_KL_RATIO * moved:
        return None
    return (f"{recommended.get('strategy')} keeps the loss within its {budget_value(budget, 'loss')} budget, but its "
            f"output distribution moves by KL {_g(kl)} nats per row, over {HIDDEN_KL_RATIO:g}x its loss change "
            f"({_g(moved)} nats) and over the {_g(allowed)} the budget lets the loss move: per-token changes cancel in "
            f"the loss; --budget kl:{_g(allowed)} bounds the output distribution instead of the loss")


def little_gain(share: Any) -> bool:
    """Whether a plan's share of forward GEMM FLOPs in low precision is under LOW_GAIN_LP_SHARE (little gain over
    16-bit)."""
    x = _num(share)
    return x is not None and x < LOW_GAIN_LP_SHARE


def little_gain_text(share: Any) -> str:
    """What is said beside a share under LOW_GAIN_LP_SHARE: the verdict line, the recommended mark, the report's
    headline and its end-to-end table all use these words."""
    return f"under {pct(LOW_GAIN_LP_SHARE, 0)}: little gain over 16-bit" if little_gain(share) else ""


def low_output_sqnr(within: Any, budget_kind: Any, sqnr: Any, keep_db: float = KEEP_16BIT_DB) -> bool:
    """Whether a plan within a loss budget leaves the model output under ``keep_db`` SQNR (noise over 1 % of the
    output's power at 20 dB): a loss averages its errors, and a plan moving the output by 8.6 dB SQNR met a 1 % loss
    budget with a green "yes" (QA). A KL budget bounds the output distribution itself: no flag."""
    x = _num(sqnr)
    return within is True and str(budget_kind or "loss") == "loss" and x is not None and x < keep_db


def low_output_sqnr_text(sqnr: Any, keep_db: float = KEEP_16BIT_DB) -> str:
    """What is said beside a plan low_output_sqnr flags: the verdict line, the report's headline and its cells."""
    return (f"output SQNR {_num(sqnr):.1f} dB, under {keep_db:g} dB: within the loss budget, but the model output "
            "moves far from high precision's")


def kl_far_ratio(kl: Any, recommended: Mapping | None) -> float | None:
    """``kl`` / the recommended plan's KL when a loss budget chose that plan and the ratio is over KL_FAR_RATIO, else
    None (a KL budget bounds every plan's KL; a recommended KL of 0 or unmeasured gives no scale)."""
    if not recommended or str(recommended.get("budget_kind") or "loss") != "loss":
        return None
    x, base = _num(kl), _num(recommended.get("kl_div"))
    if x is None or base is None or not (math.isfinite(x) and math.isfinite(base)) or base <= 0:
        return None
    return x / base if x > KL_FAR_RATIO * base else None


def build_verdict(tables: Mapping[str, Any], metadata: Mapping | None = None,
                  keep_db: float = KEEP_16BIT_DB) -> dict:
    """The verdict as plain data (the report's view model and verdict_lines both read it).

    ``tables``: name → DataFrame or list of records (e2e, recommendation, coverage, gemm, tensors,
    errors, sensitivity, training; any may be absent). ``metadata``: the results metadata (loss kind,
    strategies, coverage) or None.
    """
    metadata = metadata or {}
    t = {name: records(rows) for name, rows in tables.items()}
    strategies = _strategy_order(t, metadata)
    rec_rows = t.get("recommendation", [])
    strat_rows = [r for r in rec_rows if r.get("kind") == "strategy"]
    chosen = next((r for r in strat_rows if r.get("recommended") is True), None)
    recommended = None
    if chosen:
        keep = keep_list(chosen.get("keep_16bit"))
        recommended = {"strategy": chosen.get("strategy"), "keep_16bit": keep, "n_keep": len(keep),
                       "loss_rel_change": chosen.get("loss_rel_change"), "kl_div": chosen.get("kl_div"),
                       "lp_flop_share": chosen.get("lp_flop_share"), "budget": chosen.get("budget"),
                       "budget_kind": chosen.get("budget_kind"),
                       "little_gain": little_gain(chosen.get("lp_flop_share"))}
        # the plan's own output SQNR (results before the column: the end-to-end run's, when no layer is kept)
        sqnr = chosen.get("output_sqnr_db")
        if _num(sqnr) is None and not keep:
            sqnr = next((r.get("output_sqnr_db") for r in t.get("e2e", []) if r.get("strategy") == chosen.get("strategy")),
                        None)
        recommended.update(output_sqnr_db=sqnr,
                           low_sqnr=low_output_sqnr(True, chosen.get("budget_kind"), sqnr, keep_db))
    no_recommendation = None
    if strat_rows and not chosen:
        budget = strat_rows[0]
        kind = budget.get("budget_kind") or "loss"
        undefined = _budget_undefined(kind, t.get("e2e", []))
        nearest = next((str(r["note"]).split(NOTE_NEAREST_PLAN, 1)[1] for r in strat_rows
                        if NOTE_NEAREST_PLAN in str(r.get("note") or "")), None)
        no_recommendation = (f"the {'KL' if kind == 'kl' else kind} budget cannot be judged: {undefined}" if undefined
                             else f"no strategy stays within the budget ({budget_text(budget.get('budget'), kind)}) "
                             "even with layers kept in 16-bit" + (f"; nearest: {nearest}" if nearest else ""))
    settings = {r.get("kind"): r for r in rec_rows if r.get("kind") in ("blocksize", "threshold")}
    e2e = {r.get("strategy"): r for r in t.get("e2e", [])}
    # the high-precision loss every relative change is of (one reference run: every e2e row carries the same)
    loss_hp = next((x for r in t.get("e2e", []) if (x := _num(r.get("loss_hp"))) is not None and math.isfinite(x)),
                   None)
    per_strategy = []
    for s in strategies:
        r = e2e.get(s)
        if r is None:
            continue
        rec = next((x for x in strat_rows if x.get("strategy") == s), {})
        # (None: no recommendation row; False: a row whose keep-set was not searched, so it has no keep-set to show)
        searched = keep_set_searched(rec) if rec else None
        n_keep = len(keep_list(rec.get("keep_16bit"))) if searched else None
        # the plan "within budget" is judged on: the keep-set's recommendation row; with no layer kept, that is the
        # end-to-end run itself (its numbers where the recommendation row lacks one)
        plan = {k: rec.get(k) if searched else None for k in ("lp_flop_share", "kl_div", "output_sqnr_db")}
        if searched and not n_keep:
            plan = {k: v if _num(v) is not None else r.get(k) for k, v in plan.items()}
        within = rec.get("within_budget") if searched else None
        per_strategy.append({"strategy": s, "loss_rel_change": r.get("loss_rel_change"), "kl_div": r.get("kl_div"),
                             "top1_agreement": r.get("top1_agreement"), "output_sqnr_db": r.get("output_sqnr_db"),
                             "grad_sqnr_db_min": r.get("grad_sqnr_db_min"),
                             "grad_sqnr_db_median": r.get("grad_sqnr_db_median"),
                             "lp_flop_share": r.get("lp_flop_share"), "note": r.get("note") or "",
                             "within_budget": within, "searched": searched,
                             "not_searched": "" if searched is not False else
                             not_searched_why(rec),
                             "recommended": rec.get("recommended") is True,
                             "n_keep": n_keep, "keep_lp_flop_share": plan["lp_flop_share"],
                             "keep_kl_div": plan["kl_div"],
                             "little_gain": within is True and little_gain(plan["lp_flop_share"]),
                             "kl_far": kl_far_ratio(plan["kl_div"], recommended) if within is True else None,
                             "keep_output_sqnr_db": plan["output_sqnr_db"],
                             "low_sqnr": low_output_sqnr(within, rec.get("budget_kind"), plan["output_sqnr_db"],
                                                         keep_db)})
    e2e_notes = _shared_notes(per_strategy)
    isolated = isolated_summary(t.get("gemm", []), strategies, keep_db)
    best_isolated = None
    ranked = [r for r in isolated if r["worst_db"] is not None]
    if ranked and not recommended and not no_recommendation:
        # without an end-to-end run: the strategy with the fewest hurt layers, then the best worst layer
        best_isolated = min(ranked, key=lambda r: (r["n_below"], -_defined(r["worst_db"])))
        # how many recipes share its count of hurt layers: the headline then says the worst layer decided (QA: 11
        # recipes tied at "0 of 271" and int8 was named with no rule given)
        best_isolated = {**best_isolated, "tied": sum(r["n_below"] == best_isolated["n_below"] for r in ranked)}
    coverage = coverage_summary(t.get("coverage", []), metadata.get("coverage"))
    warnings = []
    loss = metadata.get("loss") or {}
    if loss.get("kind") == "surrogate":
        # (the end-to-end loss is that surrogate too: its changes, and a loss budget, say how far the output's mean
        # square moved, and the warning named only the gradients, QA)
        what = "the end-to-end loss changes and the gradients come" if t.get("e2e") else "gradients come"
        warnings.append(f"{what} from a surrogate loss (mean of squared outputs): pass --loss module:function for "
                        "your training loss")
    tensors_nan_inf = nan_inf_warning(t.get("tensors", []))
    if tensors_nan_inf:
        warnings.append(tensors_nan_inf)
    # every diverged run by name, with its own reason (a note's first part; the rest is about other runs)
    diverged = [f"{'high precision' if r.get('strategy') == 'hp' else r.get('strategy')} "
                f"({str(r.get('note')).split('; ')[0]})"
                for r in t.get("training", []) if str(r.get("note") or "").startswith("diverged")]
    if diverged:
        warnings.append(f"the training simulation diverged: {_names(diverged, 4)}; lower --lr")
    low = [f"{r['strategy']} {_num(r['keep_output_sqnr_db']):.1f} dB" for r in per_strategy if r["low_sqnr"]]
    if low:
        warnings.append(f"within the loss budget, but the model output's SQNR is under {keep_db:g} dB: {_names(low)}: "
                        "the loss averages out errors the output shows; a smaller --budget keeps more layers in 16-bit")
    hidden = hidden_kl_warning(recommended, t.get("e2e", []))
    if hidden:
        warnings.append(hidden)
    # Underflow is warned of whatever the budget says: the warnings read the operands table only (the tensors and the
    # recipes), so two runs on the same tensors warn alike under a loss budget and a KL budget. Elements flushed to
    # zero are lost outright, and a budget met on a few batches need not show it: a random-init Llama's FP4 recipes
    # met a 1 % loss budget with top-1 agreement 30 %, while the same tensors under kl:1e-5 were warned (QA A3, when
    # a recipe within the budget with every layer in low precision was left out of these warnings).
    # A warning naming the recipe the banner above it picks says how the two relate (QA A4: "switchback 15.8 %" sat
    # under "Recommended: switchback" with nothing between them).
    warnings += underflow_warnings(t.get("operands", []), strategies,
                                   pick=_underflow_pick(recommended, best_isolated, t, metadata))
    nonfinite_outputs = nonfinite_output_warning(t.get("gemm", []), strategies,
                                                 pick=_underflow_pick(recommended, best_isolated, t, metadata))
    if nonfinite_outputs:
        warnings.append(nonfinite_outputs)
    sweep_nonfinite = nonfinite_operands_warning(metadata)
    if sweep_nonfinite and not tensors_nan_inf:
        warnings.append(sweep_nonfinite)
    # GEMMs left out by the user's own --layers / --gemms are not a warning (the coverage line lists them)
    unwanted = {k: v for k, v in coverage["skipped"].items() if not _chosen_skip(k)} if coverage else {}
    if unwanted:
        n = sum(unwanted.values())
        warnings.append(f"{n} GEMM call(s) not analysed: " + "; ".join(f"{k} ({v})" for k, v in unwanted.items()))
    if t.get("errors"):
        warnings.append(f"{len(t['errors'])} strategy/layer combination(s) failed and have no numbers")
    # A forward-only or streamed run says why it has no end-to-end part (metadata.e2e_off).
    missing = [(metadata.get("e2e_off") if name == "e2e" else None) or MISSING[name]
               for name in ("e2e", "coverage") if not t.get(name)]
    if t.get("e2e") and not rec_rows:
        missing.append(MISSING["recommendation"])
    training = _training_summary(t.get("training", []))
    return {"recommended": recommended, "no_recommendation": no_recommendation, "best_isolated": best_isolated,
            "training": training, "loss_hp": loss_hp,
            "blocksize": settings.get("blocksize"), "threshold": settings.get("threshold"),
            "e2e": per_strategy, "e2e_notes": e2e_notes, "isolated": isolated,
            "coverage": coverage, "warnings": warnings, "missing": missing, "keep_db": keep_db,
            "has_e2e": bool(per_strategy)}


def _training_summary(rows: Records) -> dict | None:
    """The training table's last row per run: steps, the window its ratio is the mean of, and per recipe the ratio
    and "diverged from step 3" ("diverged" for results that say so only in the note; "" when it did not)."""
    last: dict = {}
    for r in rows:
        step = _num(r.get("step"))
        if step is not None and (r.get("strategy") not in last or step > last[r.get("strategy")]["step"]):
            last[r.get("strategy")] = r
    if not last:
        return None

    def diverged(r: Mapping) -> str:
        step = _num(r.get("diverged_step"))
        if step is not None:
            return f"diverged from step {step:.0f}"
        return "diverged" if str(r.get("note") or "").startswith("diverged") else ""

    windows = {r.get("final_window") for r in last.values()}
    window = _num(next(iter(windows))) if len(windows) == 1 else None
    return {"steps": int(max(r["step"] for r in last.values())), "window": None if window is None else int(window),
            "hp_diverged": diverged(last["hp"]) if "hp" in last else "",
            "runs": [{"strategy": s, "ratio": _num(r.get("final_loss_ratio")), "diverged": diverged(r)}
                     for s, r in last.items() if s != "hp"]}


def training_line(summary: Mapping) -> str:
    """``training over 20 steps, mean loss of the last 2 steps / high precision's: int8 0.997, global 4.1 (diverged
    from step 3)``: the training table in one line (verdict_lines prints it after the end-to-end lines)."""
    n = summary["window"]
    last = f"the last {n} step{'s' if n != 1 else ''}" if n is not None else "the last steps"
    runs = [f"{r['strategy']} {_ratio(r['ratio'])}" + (f" ({r['diverged']})" if r["diverged"] else "")
            for r in summary["runs"]]
    line = f"training over {summary['steps']} steps, mean loss of {last} / high precision's: " + ", ".join(runs)
    if summary["hp_diverged"]:
        line += f"; high precision {summary['hp_diverged']}"
    return line


# A loss ratio under this prints with RATIO_DECIMALS decimals: recipes differ in the 3rd or 4th (1.0004 read "1" at
# 3 significant digits, as if the recipe trained exactly like high precision); a diverged run's 1e+30 keeps .3g.
RATIO_FIXED_BELOW, RATIO_DECIMALS = 1e4, 4


def _ratio(v: Any) -> str:
    x = _num(v)
    if x is None:
        return "–"
    return f"{x:.{RATIO_DECIMALS}f}" if abs(x) < RATIO_FIXED_BELOW else f"{x:.3g}"


def split_notes(notes: Sequence[Any]) -> tuple[list[str], list[str]]:
    """(the note parts, "; "-separated, that every one of two or more ``notes`` repeats, in order; each note without
    them): run-wide facts said once under a table, each row keeping only what is its own. One note keeps its parts."""
    parts = [[p for p in str(n or "").split("; ") if p] for n in notes]
    shared = [p for p in parts[0] if all(p in other for other in parts[1:])] if len(parts) > 1 else []
    return shared, ["; ".join(p for p in own if p not in shared) for own in parts]


def _shared_notes(rows: list[dict]) -> list[str]:
    """Take the note parts every end-to-end row repeats (which output was compared, parameters left out of the
    gradient SQNR, FSDP) out of the rows' notes (split_notes) and return them, to be said once under the table. One
    row keeps its note as it is."""
    if len(rows) < 2:
        return []
    shared, own = split_notes([r["note"] for r in rows])
    for r, note in zip(rows, own):
        r["note"] = note
    return shared


def coverage_line(cov: Mapping) -> str:
    """``captured 248 of 250 GEMMs = 99.8 % of GEMM FLOPs; skipped: 2 × einsum: …`` (the agreed CLI line).

    ``cov``: coverage_summary()'s dict (executed, captured, flop_share, skipped {"op: reason": count}).
    The terminal (analysis/gemms.coverage_line), the verdict and the report all print this one line.
    """
    line = f"captured {cov.get('captured')} of {cov.get('executed')} GEMMs = {pct(cov.get('flop_share'))} of GEMM FLOPs"
    skipped = cov.get("skipped") or {}
    line += "; skipped: " + ("; ".join(f"{v} × {k}" for k, v in skipped.items()) if skipped else "none")
    return line


def _defined(sqnr: float) -> float:
    """An SQNR for ranking: an undefined one (NaN: no finite reference) as the worst, −∞."""
    return -math.inf if math.isnan(sqnr) else sqnr


def sqnr_text(sqnr: float) -> str:
    """An isolated SQNR in words: "28.5 dB", "exact", "−∞ dB" or "undefined SQNR (no finite reference)"."""
    if math.isnan(sqnr):
        return f"an undefined SQNR ({NOTE_NO_FINITE_REFERENCE})"
    return f"{sqnr:.1f} dB" if math.isfinite(sqnr) else ("exact" if sqnr > 0 else "−∞ dB")


def isolated_headline(r: Mapping, keep_db: float = KEEP_16BIT_DB) -> str:
    """The verdict line when only isolated per-GEMM numbers exist (no end-to-end validation): the recipe with the
    fewest layers below ``keep_db``, then the highest worst-layer SQNR, then the first in --strategy."""
    worst_text = sqnr_text(r["worst_db"])
    hurt = (f"keeps every layer at or above {keep_db:g} dB fprop SQNR" if not r["n_below"]
            else f"has the fewest layers below {keep_db:g} dB fprop SQNR ({r['n_below']} of {r['n_layers']})")
    tied = r.get("tied", 1)
    decided = (f", the highest worst layer of the {tied} recipes with {'none' if not r['n_below'] else r['n_below']} "
               "below (ties: the first in --strategy)" if tied > 1 else "")
    return (f"verdict (isolated GEMMs, not validated end to end): {r['strategy']} {hurt}; worst layer "
            f"{r['worst_layer']} at {worst_text}{decided}")


def verdict_lines(tables: Mapping[str, Any], metadata: Mapping | None = None,
                  keep_db: float = KEEP_16BIT_DB) -> list[str]:
    """The verdict as plain-text lines (terminal summary, Markdown, the report's first lines).

    ``tables``: name → DataFrame or list of records, as in ``Results.tables`` or a results JSON.
    Every line stands alone; absent tables give a one-line note instead of their line.
    """
    v = build_verdict(tables, metadata, keep_db)
    lines = []
    rec = v["recommended"]
    if rec:
        keep = (f"keep {rec['n_keep']} layer(s) in 16-bit ({_names(rec['keep_16bit'])})" if rec["n_keep"]
                else "no layer needs 16-bit")
        budget = f"budget {budget_text(rec['budget'], rec['budget_kind'])}"
        lines.append(f"verdict: {rec['strategy']}, {keep}: {loss_change_text(rec['loss_rel_change'], v['loss_hp'])}, "
                     f"KL {_g(rec['kl_div'])} ({budget}); {lp_share_text(rec['lp_flop_share'], v['coverage'])} in "
                     "low precision" + (f" ({little_gain_text(rec['lp_flop_share'])})" if rec["little_gain"] else "")
                     + (f"; output SQNR {_num(rec['output_sqnr_db']):.1f} dB (under {keep_db:g} dB: see the warning)"
                        if rec["low_sqnr"] else ""))
    elif v["no_recommendation"]:
        lines.append(f"verdict: {v['no_recommendation']}")
    elif v["best_isolated"]:
        lines.append(isolated_headline(v["best_isolated"], keep_db))
    for kind, label in (("blocksize", "block size"), ("threshold", "outlier threshold")):
        r = v[kind]
        if r and _num(r.get("value")) is not None:
            achieved = f"loss {signed_pct(r.get('loss_rel_change'))}" + (
                f", KL {_g(r['kl_div'])}" if _num(r.get("kl_div")) is not None else "")
            # the recipe the value is for (a block size is the mixed recipe's, a threshold int8's), and what a
            # threshold of 0 means: a bare "0" read as "keep every column in 16-bit"
            label = f"{label} for the whole model" + (f" ({r['strategy']})" if r.get("strategy") else "")
            value = f"{_num(r['value']):g}" + (THRESHOLD_ZERO if kind == "threshold" and _num(r["value"]) == 0 else "")
            if r.get("within_budget") is False:  # (the nearest value tried is no recommendation)
                lines.append(f"{label}: none of the swept values stays within the budget (nearest: {value}, {achieved})")
            else:
                lines.append(f"{label}: {value} (validated: {achieved})")
            run_t = _num((metadata or {}).get("threshold"))
            if kind == "threshold" and run_t is not None and run_t != _num(r["value"]) and v["e2e"]:
                # (three thresholds met the reader unexplained: the header's, this one and the sweep's per-layer knee)
                lines[-1] += f"; the end-to-end int8 lines used --threshold {run_t:g}"
    for r in v["e2e"]:
        mark = ""
        if r["recommended"]:  # this line is every layer in low precision: the recommended plan may keep some
            # (with the keep-set's own share: the line's share is every layer's, 100 % beside a keep-set's 5 %)
            n_keep = rec["n_keep"] if rec and rec["strategy"] == r["strategy"] else 0
            share = lp_share_text(r["keep_lp_flop_share"], v["coverage"], short=True)
            see = f"{little_gain_text(r['keep_lp_flop_share'])}; " if r["little_gain"] else ""
            mark = (f" ← recommended, keeping {n_keep} layer(s) in 16-bit, {share} low precision ({see}see the "
                    "verdict line)" if n_keep else " ← recommended")
        lines.append(f"end-to-end {r['strategy']}: loss {signed_pct(r['loss_rel_change'])}, KL {_g(r['kl_div'])}, "
                     f"top-1 {pct(r['top1_agreement'])}, output SQNR {_g(r['output_sqnr_db'])} dB, "
                     f"{lp_share_text(r['lp_flop_share'], v['coverage'], short=True)} low precision{mark}")
    if v["training"]:
        lines.append(training_line(v["training"]))
    if not v["e2e"]:
        for r in v["isolated"]:
            w = r["worst_db"]
            worst = ("" if w is None or math.isinf(w) else f"; worst: {r['worst_layer']} ("
                     + (f"SQNR undefined: {NOTE_NO_FINITE_REFERENCE}" if math.isnan(w) else f"{w:.1f} dB") + ")")
            lines.append(f"isolated {r['strategy']}: {r['n_below']} of {r['n_layers']} layer(s) below "
                         f"{keep_db:g} dB fprop SQNR{worst}")
    if v["coverage"]:
        lines.append(coverage_line(v["coverage"]))
    lines += [f"warning: {w}" for w in v["warnings"]]
    lines += [f"note: {m}" for m in v["missing"]]
    return lines
