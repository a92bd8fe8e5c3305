"""Report figures: matplotlib `Figure` objects (Agg canvas, never pyplot) turned into PNG data URIs."""
from __future__ import annotations

import base64
import io
import math
import textwrap
import warnings
from collections.abc import Mapping, Sequence

# A bare Figure() gets a FigureCanvasBase whose savefig("png") renders through Agg: no pyplot,
# no global backend switch, safe in threads and in users' notebooks.
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle, StepPatch
from matplotlib.textpath import TextToPath

# PNG rather than SVG: matplotlib's SVG carries a DOCTYPE and xmlns URLs, and the report must not
# contain a single network reference. 96 dpi keeps a 12-layer demo report around 1 MB.
PNG_DPI = 96
#: the block-scale figure's text size (titles, axis labels, ticks, legend): 9 pt = 12 px on the page, as the range
#: figure's; its legend column (inches: a 24-character label at 9 pt and its line) and the height of one legend row
SCALE_FONT_PT = 9
SCALE_LEGEND_IN = 2.45
SCALE_LEGEND_ROW_IN = 0.22
#: panels per row of the block-scale and sweep figures: two panels of ~4 in beside a legend fit the page's 1264 px
#: column drawn 1:1; three or four in a row (16 in and more) were scaled down to 7-8 px text on the page (QA)
PANELS_PER_ROW = 2
# Colours kept when a figure is stored as a palette PNG (anti-aliased lines need more than the 10 of PALETTE).
PALETTE_COLOURS = 256
# Colours cycle in this order for strategies / layers (matplotlib's tab10, spelled out so the
# legend order is stable across matplotlib versions).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
# Dash patterns taken in turn once every colour of PALETTE is used (sweep_panels).
LINE_STYLES = ("-", "--", ":", "-.")
#: the sweep and compare figures' text size: 9 pt = 12 px on the page, as the range and block-scale figures'
#: (their 7-8 pt read as 9-10 px, QA)
SWEEP_FONT_PT = 9
# Inches kept right of a sweep figure's panels for its legend (34-character names at 9 pt and their marker).
LEGEND_IN = 3.0
# The characters of a 9 pt legend label that fit that margin beside its marker; longer labels wrap.
LEGEND_CHARS = 34
# Sweep legends name at most this many layers (a 200-layer legend would be taller than the figure).
MAX_LEGEND = 12
# The range figure is drawn as wide as the report shows it 1:1 (13 in · 96 dpi = 1248 px of the page's 1264 px
# column), so its text keeps its size on screen: 9 pt = 12 px labels (7 pt read as ~7 px tall glyphs, QA B4). The
# names' margin is as wide as the longest name, measured; past RANGE_MIN_PANELS_IN of panels left beside it the
# figure widens instead (and the page shows it smaller): names cut at 40 characters to fit lost the part that tells
# them apart (QA).
RANGE_WIDTH_IN = 13.0
RANGE_MIN_PANELS_IN = 8.0
RANGE_LABEL_PT = 9
# Layer names longer than this (hostile or generated ones) keep their tail in the range figure.
RANGE_NAME_MAX = 96
# Height of one ridgeline row of the range figure: 24 rows (MAX_HIST_LAYERS) make a ~12 in (1.1k px) figure.
RANGE_ROW_IN = 0.42


def figure_to_data_uri(fig: Figure) -> str:
    """Render a Figure to PNG and return it as a ``data:image/png;base64,...`` URI."""
    buf = io.BytesIO()
    # No bbox_inches="tight": it draws the figure twice; constrained layout already fits it.
    fig.savefig(buf, format="png", dpi=PNG_DPI, metadata={"Software": None})  # no version string (keeps outputs reproducible)
    png = buf.getvalue()
    try:  # Pillow ships with matplotlib; a 256-colour palette PNG is 2-4x smaller and looks the same for charts
        from PIL import Image

        buf.seek(0)
        with Image.open(buf) as im:
            small = io.BytesIO()
            im.convert("RGB").quantize(colors=PALETTE_COLOURS, method=Image.Quantize.MEDIANCUT,
                                       dither=Image.Dither.NONE).save(small, format="PNG", optimize=True)
        png = min(png, small.getvalue(), key=len)
    except ImportError:
        pass
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _finite(x: float | None) -> float:
    """SQNR may be +inf (exact result) or NaN; clip to a drawable number (200 dB ≈ fp64 noise floor)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return float("nan")
    return max(min(float(x), 200.0), -50.0)


def _short(name: str, width: int = 32) -> str:
    """Axis labels keep the tail of long dotted layer names (the distinctive part).

    Layer names are user data: a ``$`` would start matplotlib mathtext (and ``$\\x$`` fails to
    parse at draw time), so dollars are escaped.
    """
    name = str(name)
    short = name if len(name) <= width else "…" + name[-(width - 1):]
    return short.replace("$", r"\$")


def _text_width_in(texts: Sequence[str], size_pt: float) -> float:
    """The widest of ``texts`` in inches, set in matplotlib's default font at ``size_pt`` (measured: an average
    character width under-counted capitals and wide letters, and clipped names)."""
    measure, prop = TextToPath(), FontProperties(size=size_pt)
    with warnings.catch_warnings():  # (a glyph missing from the font is warned of once, when the figure is drawn)
        warnings.simplefilter("ignore", UserWarning)
        return max((measure.get_text_width_height_descent(t, prop, ismath=False)[0] for t in texts), default=0.0) / 72


def _common_prefix(names: Sequence[str]) -> str:
    """The dotted prefix every one of ``names`` shares before its last part ("model.layers." of two or more
    "model.layers.N…" names; "" for one name or none shared)."""
    parts = [n.split(".")[:-1] for n in names]
    if len(parts) < 2:
        return ""
    common = []
    for tokens in zip(*parts):
        if len(set(tokens)) != 1:
            break
        common.append(tokens[0])
    return ".".join(common) + "." if common else ""


def range_histograms(panels: Sequence[Mapping], tensors: Sequence[str], titles: Mapping[str, str] | None = None
                     ) -> Figure:
    """Ridgelines of log2-magnitude histograms: one column per tensor, one row per layer.

    Each panel dict: ``layer``, ``tensor``, ``edges`` (log2 bin edges, len = len(counts)+1),
    ``counts``, and ``windows``: list of ``(label, lo_log2, hi_log2)`` representable ranges of the
    formats applied to that tensor, already shifted so the format max sits at the tensor's amax.
    Rows follow the panels' layer order (top first); each histogram is scaled to its own peak; a window
    is shaded behind its row (dashed edge: the smallest subnormal, solid: the format max), one colour
    per window label, named in one legend. ``titles``: a column's title when it is not the tensor's name.
    One Axes per tensor, not per panel: 36 panels as small multiples took ~2.5 s to draw (every Axes draws
    its own ticks, labels and legend), this ~0.3 s.
    """
    layers = list(dict.fromkeys(p["layer"] for p in panels))
    names = [_short(x, RANGE_NAME_MAX) for x in layers]
    nrows, ncols = max(len(layers), 1), max(len(tensors), 1)
    height = 1.35 + RANGE_ROW_IN * nrows
    names_in = 0.25 + _text_width_in(names, RANGE_LABEL_PT)
    width = max(RANGE_WIDTH_IN, names_in + RANGE_MIN_PANELS_IN)
    fig = Figure(figsize=(width, height))  # fixed margins: constrained layout costs ~1 s on large figures
    fig.subplots_adjust(left=names_in / width, right=1 - 0.1 / width, top=1 - 0.8 / height,
                        bottom=0.55 / height, wspace=0.05)
    axes = fig.subplots(1, ncols, squeeze=False, sharey=True)[0]
    by_key = {(p["layer"], p["tensor"]): p for p in panels}
    colours: dict[str, str] = {}
    for c, tensor in enumerate(tensors):
        ax = axes[c]
        span: list[float] = []  # x extent of the occupied bins and the windows (the edges cover a fixed range)
        # Artists are added without the per-artist data-limit updates of add_patch/stairs/vlines (Bezier extents
        # of every path: ~40 % of the figure's cost at 24 rows), and the window edges of one colour and style
        # are one LineCollection: the limits are set below from `span`.
        ax.add_collection(LineCollection([[(0, y0), (1, y0)] for y0 in range(nrows)], colors="#dddddd",
                                         linewidths=0.6, zorder=0, transform=ax.get_yaxis_transform()), autolim=False)
        edge_lines: dict[tuple[str, str], list] = {}
        for r, layer in enumerate(layers):
            y0 = nrows - 1 - r
            p = by_key.get((layer, tensor))
            if p is None or not p["counts"]:
                continue
            used = [k for k, n in enumerate(p["counts"]) if n]
            if used:
                span += [p["edges"][used[0]], p["edges"][used[-1] + 1]]
            for label, lo, hi in p["windows"]:
                if not (math.isfinite(lo) and math.isfinite(hi)):
                    continue
                span += [lo, hi]
                colour = colours.setdefault(label, PALETTE[(len(colours) + 1) % len(PALETTE)])
                ax.add_artist(Rectangle((lo, y0), hi - lo, 0.92, color=colour, alpha=0.14, lw=0, zorder=1))
                edge_lines.setdefault((colour, "--"), []).append([(lo, y0), (lo, y0 + 0.92)])
                edge_lines.setdefault((colour, "-"), []).append([(hi, y0), (hi, y0 + 0.92)])
            peak = float(max(p["counts"])) or 1.0
            heights = [y0 + 0.85 * n / peak for n in p["counts"]]
            ax.add_artist(StepPatch(heights, p["edges"], baseline=y0, fill=True, facecolor="#4c72b0", linewidth=0,
                                    alpha=0.8, zorder=3))  # (what ax.stairs(fill=True, color=...) makes)
            ax.update_datalim([(p["edges"][0], y0), (p["edges"][-1], max(heights))])  # (autoscale: no span)
        for (colour, style), segments in edge_lines.items():
            ax.add_collection(LineCollection(segments, colors=colour, linewidths=1, linestyles=style, zorder=2),
                              autolim=False)
        ax.set_title((titles or {}).get(tensor, tensor), fontsize=RANGE_LABEL_PT + 1, loc="left")
        ax.set_xlabel("log2 |x|", fontsize=RANGE_LABEL_PT, labelpad=1)
        ax.tick_params(labelsize=RANGE_LABEL_PT)
        ax.tick_params(axis="y", length=0)
        ax.grid(axis="x", color="#eeeeee", lw=0.6)
        ax.set_axisbelow(True)
        ax.set_ylim(0, nrows)
        finite = [v for v in span if math.isfinite(v)]
        if finite:
            ax.set_xlim(min(finite) - 1.5, max(finite) + 1.5)
    axes[0].set_yticks([nrows - 1 - r + 0.4 for r in range(len(layers))], names, fontsize=RANGE_LABEL_PT)
    if colours:
        fig.legend([Rectangle((0, 0), 1, 1, color=col, alpha=0.3) for col in colours.values()], list(colours),
                   loc="upper right", ncols=min(len(colours), 3), fontsize=RANGE_LABEL_PT, frameon=False)
    return fig


def sweep_panels(panels: Sequence[Mapping], ncols: int = PANELS_PER_ROW) -> Figure:
    """Line plots in a grid, one panel per dict: ``title``, ``xlabel``, ``ylabel``, ``logx2`` and
    ``series`` (dicts: ``label``, ``x``, ``y``, optional ``mark_x`` = the recommended x, drawn as ★).

    One figure for a whole sweep: every extra Figure costs a full Agg draw (~0.3 s on one core).
    """
    ncols = max(1, min(ncols, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    width, height = 4.2 * ncols + LEGEND_IN, 3.0 * nrows + 0.4
    fig = Figure(figsize=(width, height))  # fixed margins: constrained layout costs ~1 s here
    fig.subplots_adjust(left=0.75 / width, right=1 - LEGEND_IN / width, top=1 - 0.4 / height, bottom=0.6 / height,
                        wspace=0.3, hspace=0.45)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    handles, labels = [], []
    # one shortening rule for the legend: the dotted prefix every layer shares is said once in its title, and what
    # is left keeps its tail (QA: "...l.layers.1.self_attn.k_proj" beside a whole "model.layers.0.mlp.up_proj")
    prefix = _common_prefix([str(s["label"]) for s in panels[0]["series"]]) if panels else ""
    for k, ax in enumerate(a for row in axes for a in row):
        if k >= len(panels):
            ax.set_axis_off()
            continue
        p = panels[k]
        many = len(p["series"]) > MAX_LEGEND
        for i, s in enumerate(p["series"]):
            colour = PALETTE[i % len(PALETTE)]
            # past the palette's 10 colours a new dash pattern, so the 11th and 12th layers of the legend are not
            # drawn like the 1st and 2nd (QA: two layers in the same blue);
            # 200 layers: thin lines without markers, and the legend names the first MAX_LEGEND only
            (line,) = ax.plot(s["x"], [_finite(y) for y in s["y"]], marker="" if many else "o", ms=3,
                              lw=0.6 if many else 1.2, alpha=0.6 if many else 1.0, color=colour,
                              ls=LINE_STYLES[i // len(PALETTE) % len(LINE_STYLES)])
            if k == 0 and i < MAX_LEGEND:
                handles.append(line)
                labels.append(_short(str(s["label"])[len(prefix):], LEGEND_CHARS))
            if s.get("mark_x") is not None and s["mark_x"] in list(s["x"]):
                j = list(s["x"]).index(s["mark_x"])
                ax.plot([s["x"][j]], [_finite(s["y"][j])], marker="*", ms=11, color=colour, markeredgecolor="black")
        if p.get("vline"):
            # the one value for the whole model (validated recommendation, or most layers' pick)
            ax.axvline(p["vline"]["value"], color="black", ls=":", lw=1.5)
            if k == 0:
                handles.append(ax.lines[-1])
                labels.append(p["vline"]["label"])
        if p.get("logx2"):
            ax.set_xscale("log", base=2)
        ax.set_xlabel(p["xlabel"], fontsize=SWEEP_FONT_PT)
        ax.set_ylabel(p["ylabel"], fontsize=SWEEP_FONT_PT)
        ax.set_title(p["title"], fontsize=SWEEP_FONT_PT + 1)
        ax.tick_params(labelsize=SWEEP_FONT_PT)
        ax.grid(alpha=0.3)
    if handles:
        n_series = len(panels[0]["series"]) if panels else 0
        if n_series > MAX_LEGEND:
            handles.append(Line2D([], [], lw=0))
            labels.append(f"… {n_series - MAX_LEGEND} more layers")
        # in the margin kept for it, left-aligned just right of the last column: anchored at the figure's right edge
        # it reached over the axes (QA: its markers sat on the wgrad panel's border)
        # a label wider than the margin wraps: "model-wide: 4096 (validated end to end)" ran off the figure's edge
        labels = [textwrap.fill(label, LEGEND_CHARS, subsequent_indent="  ") for label in labels]
        fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1 - (LEGEND_IN - 0.1) / width, 1 - 0.3 / height),
                   fontsize=SWEEP_FONT_PT, frameon=False, title=_short(prefix + "…", LEGEND_CHARS) if prefix else None,
                   title_fontsize=SWEEP_FONT_PT, alignment="left")
    return fig


def delta_bars(labels: Sequence[str], deltas: Sequence[float], limit: float) -> Figure:
    """Horizontal bars of per-layer SQNR change (dB, current − baseline) with the gate line at −limit."""
    fig = Figure(figsize=(9, 0.9 + 0.26 * max(len(labels), 1)), layout="constrained")
    ax = fig.subplots()
    vals = [_finite(d) for d in deltas]
    colours = ["#d62728" if (not math.isnan(v) and v < -limit) else "#4c72b0" for v in vals]
    ax.barh(range(len(labels)), vals, color=colours)
    ax.axvline(-limit, color="#d62728", ls="--", lw=1, label=f"gate: −{limit:g} dB")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(labels)), labels=[_short(x, 40) for x in labels], fontsize=SWEEP_FONT_PT)
    ax.invert_yaxis()
    ax.set_xlabel("Δ SQNR (dB, current − baseline)", fontsize=SWEEP_FONT_PT)
    ax.tick_params(axis="x", labelsize=SWEEP_FONT_PT)
    ax.legend(fontsize=SWEEP_FONT_PT, frameon=False)
    return fig


def scale_exponent_histograms(panels: Sequence[Mapping]) -> Figure:
    """Block-scale exponent histograms, one panel per operand, one step line per strategy.

    Each panel dict: ``title`` and ``series``: list of ``{"label", "exps" (ints), "counts"}``; counts
    are drawn as the share of that strategy's blocks so recipes with different block sizes compare.
    One legend right of the panels (a strategy has one colour in all of them): a legend in each panel sat on
    its lines (QA pass 2).
    """
    n = max(len(panels), 1)
    ncols = min(n, PANELS_PER_ROW)
    nrows = math.ceil(n / ncols)
    labels = list(dict.fromkeys(s["label"] for panel in panels for s in panel["series"]))
    legend_w = SCALE_LEGEND_IN if labels else 0.0
    width = 4.2 * ncols + legend_w
    height = max(3.2 * nrows, 0.9 + SCALE_LEGEND_ROW_IN * len(labels))
    fig = Figure(figsize=(width, height))  # fixed margins: the constrained layout solver cost ~40 % of this figure
    fig.subplots_adjust(left=0.8 / width, right=1 - (0.15 + legend_w) / width, top=1 - 0.35 / height,
                        bottom=0.6 / height, wspace=0.9 / 4.2, hspace=0.75 / (3.2 - 0.75))
    grid = fig.subplots(nrows, ncols, squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[len(panels):]:  # (an odd count leaves the last row's second place empty)
        ax.set_axis_off()
    # one colour per strategy across the panels: a panel without one (the weight has no "mixed" series) shifted
    # every later strategy's colour when each panel counted its own (QA of the HTML report)
    colour = {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}
    dashes = {label: LINE_STYLES[i // len(PALETTE) % len(LINE_STYLES)] for i, label in enumerate(labels)}
    handles: dict[str, Line2D] = {}
    for ax, panel in zip(axes, panels):
        for s in panel["series"]:
            total = sum(s["counts"]) or 1
            xs = [e for e in s["exps"] for _ in (0, 1)]
            xs = [x + d for x, d in zip(xs, [-0.5, 0.5] * len(s["exps"]))]
            ys = [c / total for c in s["counts"] for _ in (0, 1)]
            (line,) = ax.plot(xs, ys, color=colour[s["label"]], ls=dashes[s["label"]], label=_short(s["label"], 24),
                              linewidth=1.4)
            handles.setdefault(s["label"], line)
        ax.set_title(_short(panel["title"]), fontsize=SCALE_FONT_PT + 1)
        ax.set_xlabel("floor(log2 block scale)", fontsize=SCALE_FONT_PT)
        ax.set_ylabel("share of blocks", fontsize=SCALE_FONT_PT)
        ax.tick_params(labelsize=SCALE_FONT_PT)
        ax.grid(alpha=0.3)
    if handles:
        fig.legend([handles[k] for k in labels], [_short(k, 24) for k in labels], loc="upper left",
                   fontsize=SCALE_FONT_PT,
                   bbox_to_anchor=(1 - (legend_w - 0.1) / width, 1 - 0.35 / height), frameon=False, borderaxespad=0)
    return fig
