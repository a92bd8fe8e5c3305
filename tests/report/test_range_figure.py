"""The dynamic-range figure: ridgelines, one Axes per tensor and one row per layer (not one Axes per panel)."""
from __future__ import annotations

import math

from fp8probe.report import figures


def _panel(layer: str, tensor: str, lo_bin: int, hi_bin: int, window: tuple[str, float, float] | None) -> dict:
    edges = [float(e) for e in range(-40, 26)]
    counts = [0] * (len(edges) - 1)
    for k in range(lo_bin, hi_bin):
        counts[k] = 1 + (k * 7) % 5
    return {"layer": layer, "tensor": tensor, "edges": edges, "counts": counts,
            "windows": [] if window is None else [window]}


def test_one_axes_per_tensor_rows_in_layer_order_one_legend() -> None:
    layers = [f"model.layers.{i}.mlp.down_proj" for i in range(12)]
    e4 = ("bnb-e4m3 window (scaled to amax)", -20.0, 1.5)
    e5 = ("bnb-e5m2 window (scaled to amax)", -50.0, -10.0)
    panels = [_panel(x, t, 30 + i, 44 + i, e5 if t == "grad_output" else e4)
              for i, x in enumerate(layers) for t in ("activation", "weight", "grad_output")]
    panels.append(_panel("model.layers.0.mlp.down_proj", "extra", 10, 12, None))
    fig = figures.range_histograms(panels, ["activation", "weight", "grad_output"])
    assert len(fig.axes) == 3
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == layers  # top row first, the panels' layer order
    assert [ax.get_title(loc="left") for ax in fig.axes] == ["activation", "weight", "grad_output"]
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [e4[0], e5[0]]  # one entry per window label
    lo, hi = fig.axes[0].get_xlim()
    assert lo < -20.0 and hi > 30 - 40 + 14 + 11 - 1  # the window and the last occupied bin (edge 15) are inside
    assert lo > -40.0  # the empty bins at the fixed edges' left end are not
    assert figures.figure_to_data_uri(fig).startswith("data:image/png;base64,")


def test_missing_and_empty_panels_leave_their_row_blank() -> None:
    panels = [_panel("a", "activation", 30, 35, None), _panel("b", "weight", 30, 35, ("w", -5.0, math.inf)),
              {"layer": "c", "tensor": "activation", "edges": [0.0, 1.0], "counts": []}]
    fig = figures.range_histograms(panels, ["activation", "weight"])
    assert len(fig.axes) == 2 and [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["a", "b", "c"]
    assert math.isfinite(fig.axes[1].get_xlim()[1])
    figures.figure_to_data_uri(fig)


def test_block_scale_panels_give_each_strategy_one_colour() -> None:
    """A panel without a strategy (the weight has no "mixed" series) shifted every later strategy's colour in the
    block-scale figure (QA of the HTML report)."""
    from fp8probe.report.figures import scale_exponent_histograms
    series = {name: {"label": name, "exps": [-3, -2], "counts": [2, 5]} for name in ("mixed", "ocp-blockwise", "mxfp8")}
    fig = scale_exponent_histograms([{"title": "activation", "series": list(series.values())},
                                     {"title": "weight", "series": [series["ocp-blockwise"], series["mxfp8"]]}])
    colours = [{line.get_label(): line.get_color() for line in ax.get_lines()} for ax in fig.axes]
    assert colours[1] == {k: v for k, v in colours[0].items() if k != "mixed"}
    assert len(set(colours[0].values())) == 3


def test_sweep_series_past_the_palette_are_drawn_apart() -> None:
    """12 layers on a 10-colour palette: the 11th and 12th were drawn exactly like the 1st and 2nd (QA)."""
    from fp8probe.report.figures import PALETTE, sweep_panels
    series = [{"label": f"layer{i}", "x": [32, 64], "y": [20.0 + i, 21.0 + i]} for i in range(12)]
    fig = sweep_panels([{"title": "fprop", "xlabel": "block size", "ylabel": "dB", "series": series}])
    styles = [(line.get_color(), line.get_linestyle()) for line in fig.axes[0].get_lines()]
    assert len(set(styles)) == 12 and styles[10][0] == PALETTE[0]


def test_the_sweep_legend_sits_right_of_the_panels_inside_the_figure() -> None:
    """The legend, anchored at the figure's right edge, reached over the last panel (QA of the HTML report); then the
    demo's "model-wide: 4096 (validated end to end)" ran off the figure's right edge (it wraps now)."""
    from fp8probe.report.figures import sweep_panels
    series = [{"label": f"model.layers.{i}.self_attn.o_proj_long_name", "x": [32, 64], "y": [20.0 + i, 21.0]}
              for i in range(12)]
    panels = [{"title": t, "xlabel": "block size", "ylabel": "dB", "series": series,
               "vline": {"value": 64, "label": "model-wide: 4096 (validated end to end)"}} for t in ("fprop", "dgrad", "wgrad")]
    fig = sweep_panels(panels)
    fig.canvas.draw()
    legend = fig.legends[0].get_window_extent()
    assert legend.x0 >= max(ax.get_window_extent().x1 for ax in fig.axes)
    assert legend.x1 <= fig.bbox.x1


def test_the_sweep_legend_shortens_every_name_one_way() -> None:
    """QA 2: "...l.layers.1.self_attn.k_proj" stood beside a whole "model.layers.0.mlp.up_proj" (cut at 28 characters
    from the left): the shared prefix goes to the legend's title and every name keeps the rest."""
    from fp8probe.report.figures import _common_prefix, sweep_panels
    names = ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.k_proj", "lm_head"]
    assert _common_prefix(names[:2]) == "model.layers." and _common_prefix(names) == "" and _common_prefix(names[:1]) == ""
    series = [{"label": n, "x": [32, 64], "y": [20.0, 21.0]} for n in names[:2]]
    fig = sweep_panels([{"title": "fprop", "xlabel": "block size", "ylabel": "dB", "series": series}])
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["0.mlp.up_proj", "1.self_attn.k_proj"]
    assert legend.get_title().get_text() == "model.layers.…"


def test_block_scale_legend_sits_right_of_the_panels() -> None:
    """A legend in each block-scale panel sat on its lines (QA pass 2): one legend now, right of the last panel, inside
    the figure, every strategy in it once."""
    from fp8probe.report.figures import scale_exponent_histograms
    names = [f"strategy-{i}" for i in range(15)]
    series = [{"label": name, "exps": [-3, -2, -1], "counts": [2, 5, 1 + i]} for i, name in enumerate(names)]
    fig = scale_exponent_histograms([{"title": "activation", "series": series},
                                     {"title": "weight", "series": series[3:]}])
    fig.canvas.draw()
    assert all(ax.get_legend() is None for ax in fig.axes)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == names
    box = legend.get_window_extent()
    assert box.x0 >= max(ax.get_window_extent().x1 for ax in fig.axes)
    assert box.x1 <= fig.bbox.x1 and box.y0 >= fig.bbox.y0
    styles = {(line.get_color(), line.get_linestyle()) for line in fig.axes[0].get_lines()}
    assert len(styles) == 15  # past the 10-colour palette the lines are dashed


def test_block_scale_figure_two_panels_a_row_at_9_pt_with_one_legend() -> None:
    """Four operands in one row made a ~19 in figure shown at two thirds of its size: 7 pt text read as 5 px (QA)."""
    from fp8probe.report.figures import PANELS_PER_ROW, SCALE_FONT_PT, scale_exponent_histograms
    series = [{"label": name, "exps": [-3, -2], "counts": [2, 5]} for name in ("mxfp8", "ocp-blockwise")]
    fig = scale_exponent_histograms([{"title": t, "series": series}
                                     for t in ("activation", "weight", "2nd activation", "grad_output")])
    drawn = [ax for ax in fig.axes if ax.axison]
    assert PANELS_PER_ROW == 2 and len(drawn) == 4
    assert len({round(ax.get_position().y0, 3) for ax in drawn}) == 2  # two rows of two
    assert len({round(ax.get_position().x0, 3) for ax in drawn}) == 2
    assert fig.get_figwidth() < 4.2 * 2 + 3
    for ax in drawn:
        assert ax.xaxis.label.get_fontsize() == ax.yaxis.label.get_fontsize() == SCALE_FONT_PT
        assert ax.xaxis.get_ticklabels()[0].get_fontsize() == SCALE_FONT_PT
    (legend,) = fig.legends
    assert {t.get_fontsize() for t in legend.get_texts()} == {SCALE_FONT_PT}
    # three panels: the fourth place is left empty, not drawn
    fig = scale_exponent_histograms([{"title": t, "series": series} for t in ("activation", "weight", "grad_output")])
    assert sum(ax.axison for ax in fig.axes) == 3


def test_sweep_figures_draw_two_panels_a_row() -> None:
    """The block-size sweep's six targets were three panels a row, 15 in wide, shown at ~80 % (QA)."""
    from fp8probe.report.figures import sweep_panels
    series = [{"label": "fc1", "x": [32, 64], "y": [20.0, 21.0]}]
    fig = sweep_panels([{"title": t, "xlabel": "block size", "ylabel": "dB", "series": series}
                        for t in ("fprop", "dgrad", "wgrad", "activation", "weight", "grad_output")])
    assert len({round(ax.get_position().x0, 3) for ax in fig.axes}) == 2
    assert len({round(ax.get_position().y0, 3) for ax in fig.axes}) == 3


def test_the_range_figure_widens_with_its_longest_layer_name_and_cuts_none() -> None:
    """Names were cut to their last 40 characters ("…layers.11.self_attn.rotary_emb.q_proj" lost its model part) to
    fit a fixed 13 in figure (QA); the names' margin is measured, and past 8 in of panels beside it the figure
    widens."""
    short = [_panel("fc1", "activation", 30, 35, None), _panel("fc2", "activation", 30, 35, None)]
    long_name = "encoder.transformer.layers.11.self_attention.rotary_embedding.query_projection"
    wide = [*short, _panel(long_name, "activation", 30, 35, None)]
    narrow_fig, wide_fig = figures.range_histograms(short, ["activation"]), figures.range_histograms(wide, ["activation"])
    assert [t.get_text() for t in wide_fig.axes[0].get_yticklabels()][-1] == long_name
    assert narrow_fig.get_figwidth() == figures.RANGE_WIDTH_IN < wide_fig.get_figwidth()
    wide_fig.canvas.draw()
    labels = [t.get_window_extent() for t in wide_fig.axes[0].get_yticklabels()]
    assert min(box.x0 for box in labels) >= 0  # inside the figure: not clipped at its left edge
    assert max(box.x1 for box in labels) <= wide_fig.axes[0].get_window_extent().x0  # nor under the panel
    panel = wide_fig.axes[0].get_position().width * wide_fig.get_figwidth()
    assert abs(panel - (figures.RANGE_MIN_PANELS_IN - 0.1)) < 0.01  # (0.1 in right margin)
