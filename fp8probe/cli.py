"""Command-line interface: thin click commands over the library API (exit 0 ok, 1 gate failed, 2 usage/input error)."""
from __future__ import annotations

import sys

import click

from fp8probe import __version__


class UsageFailure(click.ClickException):
    """A bad input or usage: one line on stderr, exit code 2 (STYLE: mlflow/ruff exit codes)."""

    exit_code = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "FP8PROBE"})
@click.version_option(__version__, prog_name="fp8probe")
def cli() -> None:
    """fp8probe: where does FP8 / INT8 matmul hurt your model?"""


@cli.command("formats")
@click.option("--format", "output_format", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="table for people, json for scripts")
def formats_cmd(output_format: str) -> None:
    """List every number format fp8probe knows: max, min normal, min subnormal, description."""
    from fp8probe.formats import format_table

    rows = format_table()
    if output_format == "json":
        import json

        click.echo(json.dumps(rows, indent=1))
        return
    header = f"{'name':<12} {'max':>12} {'min normal':>12} {'min subnormal':>14}  description"
    click.echo(header)
    click.echo("-" * len(header))
    for r in rows:
        click.echo(f"{r['name']:<12} {r['max']:>12.6g} {r['min_normal']:>12.6g} {r['min_subnormal']:>14.6g}  {r['description']}")


# -- analysis / report commands are defined below this line (analyze, sweep-*, report, compare, demo) --


# -- report / compare / sweep / demo commands (report engineer) --
def _load_results_or_fail(path: str) -> dict:
    from fp8probe.report.render import load_results

    try:
        return load_results(path)
    except ValueError as exc:
        raise UsageFailure(str(exc)) from None


@cli.command("report")
@click.argument("results", type=click.Path(dir_okay=False))
@click.option("-o", "--out", "out_html", type=click.Path(dir_okay=False), default="report.html", show_default=True,
              help="HTML file to write (self-contained: inline CSS and images)")
@click.option("--keep-16bit-db", type=float, default=20.0, show_default=True,
              help="list a layer under 'keep in 16-bit' when its fprop SQNR is below this many dB")
def report_cmd(results: str, out_html: str, keep_16bit_db: float) -> None:
    """Render RESULTS.json (from analyze or a sweep) into one self-contained HTML report."""
    from fp8probe.report.render import render_report

    data = _load_results_or_fail(results)
    path = render_report(data, out_html, keep_16bit_db=keep_16bit_db)
    click.echo(f"report written to {path}")


@cli.command("compare")
@click.argument("baseline", type=click.Path(dir_okay=False))
@click.argument("current", type=click.Path(dir_okay=False))
@click.option("--max-sqnr-drop", type=float, default=1.0, show_default=True,
              help="fail when any layer's SQNR (any strategy, any GEMM) drops by more than this many dB")
@click.option("--max-new-outlier-cols", type=int, default=0, show_default=True,
              help="fail when a layer gains more than this many outlier feature columns")
@click.option("--max-underflow-increase", type=float, default=1.0, show_default=True,
              help="fail when an operand's underflow fraction rises by more than this many percentage points")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="reports/compare", show_default=True,
              help="directory for compare.html and compare.md")
@click.option("--markdown", "markdown_file", type=click.Path(dir_okay=False), default=None,
              help="also write the Markdown summary here (e.g. $GITHUB_STEP_SUMMARY)")
@click.pass_context
def compare_cmd(ctx: click.Context, baseline: str, current: str, max_sqnr_drop: float, max_new_outlier_cols: int,
                max_underflow_increase: float, out_dir: str, markdown_file: str | None) -> None:
    """Gate CURRENT.json against BASELINE.json: exit 1 naming the layers when a gate is exceeded, else 0."""
    from pathlib import Path

    from fp8probe.report.compare import Gates, compare_markdown, compare_results
    from fp8probe.report.render import render_compare

    base, cur = _load_results_or_fail(baseline), _load_results_or_fail(current)
    try:
        gates = Gates(max_sqnr_drop, max_new_outlier_cols, max_underflow_increase)
        comparison = compare_results(base, cur, gates)
    except ValueError as exc:
        raise UsageFailure(str(exc)) from None
    out = Path(out_dir)
    html = render_compare(comparison, out / "compare.html")
    md = compare_markdown(comparison)
    (out / "compare.md").write_text(md, encoding="utf-8")
    if markdown_file:
        with open(markdown_file, "a", encoding="utf-8") as fh:  # append: GITHUB_STEP_SUMMARY is shared
            fh.write(md + "\n")
    click.echo(f"compare report written to {html} and {out / 'compare.md'}")
    if comparison["passed"]:
        click.echo("PASS: no gate exceeded")
        return
    click.echo(f"FAIL: {len(comparison['violations'])} gate violation(s) in layer(s): "
               + ", ".join(comparison["failed_layers"]), err=True)
    for v in comparison["violations"]:
        click.echo(f"  {v['gate']}: {v['layer']}: {v['detail']}", err=True)
    ctx.exit(1)

def main() -> None:
    """Console-script entry point."""
    cli(prog_name="fp8probe")


if __name__ == "__main__":
    sys.exit(main())
