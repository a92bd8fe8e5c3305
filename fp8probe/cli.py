"""Command-line interface: thin click commands over the library API (exit 0 ok, 1 gate failed, 2 usage/input error)."""
from __future__ import annotations

import sys

import click

from fp8probe import __version__
from fp8probe.report.files import atomic_write_text


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


# -- analyze (analysis engineer) --
def _summary_rows(results: "object", limit: int = 10) -> list[dict]:
    """Worst (layer, strategy) pairs by fprop SQNR, lowest first."""
    gemm = results.tables.get("gemm")
    if gemm is None or gemm.empty:
        return []
    fprop = gemm[gemm["gemm"] == "fprop"].sort_values("sqnr_db", na_position="first")
    return fprop.head(limit)[["layer", "strategy", "sqnr_db", "rel_err"]].to_dict("records")


@cli.command("analyze")
@click.argument("model", type=str)
@click.option("--strategy", "-s", default="global", show_default=True,
              help="global, mixed, int8, switchback, ocp-tensorwise, ocp-rowwise, ocp-blockwise, mxfp8, "
                   "a comma-separated list, or all")
@click.option("--inputs", type=click.Path(dir_okay=False), default=None,
              help="torch.save'd inputs: a tensor, a tuple of args, a dict of kwargs or a list of batches")
@click.option("--factory", default=None, help="module:function or file.py:function building the model for a state_dict")
@click.option("--trust-pickle", is_flag=True, help="allow loading a pickled nn.Module (runs arbitrary code)")
@click.option("--loss", "loss_spec", default=None, help="module:function called as fn(output, batch) -> scalar loss")
@click.option("--layers", default=None, help="regular expression on module paths: analyse only matching layers")
@click.option("--batches", type=click.IntRange(min=1), default=None, help="use at most this many batches")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threshold", type=click.FloatRange(min=0.0), default=6.0, show_default=True,
              help="LLM.int8 outlier threshold: columns with any |x| >= threshold")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="output directory (default reports/<name>/)")
@click.option("--name", default=None, help="run name (default: the model file's stem)")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar")
@click.option("--no-html", is_flag=True, help="write results.json and CSVs only (render later with fp8probe report)")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch intra-op CPU threads (default: torch's choice). 1 is often fastest: per-layer tensors "
                   "are small (demo: 2.0 s with 1 thread vs 10.8 s with 2 on a busy 2-core machine)")
@click.option("--format", "output_format", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="table for people, json (paths + worst layers) for scripts")
def analyze_cmd(model: str, strategy: str, inputs: str | None, factory: str | None, trust_pickle: bool,
                loss_spec: str | None, layers: str | None, batches: int | None, device: str, seed: int,
                threshold: float, out_dir: str | None, name: str | None, quiet: bool, no_html: bool,
                threads: int | None, output_format: str) -> None:
    """Capture MODEL's linear GEMMs on real inputs and measure each FP8/INT8 recipe's error.

    MODEL: a torch.export .pt2 file, a state_dict (with --factory), a pickled nn.Module (with
    --trust-pickle), a Hugging Face model directory, or module:function / file.py:function.
    Writes results.json + one CSV per table (+ index.html) into --out.
    """
    import json
    import warnings
    from pathlib import Path

    from fp8probe.analysis.loading import LoadError, load_inputs, load_model
    from fp8probe.analysis.pipeline import analyze

    import torch

    if threads:
        torch.set_num_threads(threads)  # this process only runs this command
    run_name = name or Path(model.split(":")[0]).stem or "analysis"
    out = Path(out_dir) if out_dir else Path("reports") / run_name
    try:
        loaded = load_model(model, factory=factory, trust_pickle=trust_pickle)
        batch_list = load_inputs(inputs) if inputs else None
        n_total = len(batch_list if batch_list is not None else loaded.batches or [])
        n_total = min(n_total, batches) if batches else n_total
        show_bar = not quiet and output_format == "table" and n_total > 0
        # Failed recipes are recorded in the errors table and counted below; no warning spam.
        with warnings.catch_warnings(record=True), \
                click.progressbar(length=n_total, label="analyze", file=sys.stderr) if show_bar else _nullbar() as bar:
            warnings.simplefilter("always", RuntimeWarning)
            results = analyze(loaded, batch_list, strategy, threshold=threshold, layers=layers, batches=batches,
                              device=device, seed=seed, loss=loss_spec, progress=lambda done, total: bar.update(1),
                              name=run_name, model_desc=loaded.description,
                              inputs_desc=inputs or "example inputs / factory batches")
    except (LoadError, ValueError, TypeError) as exc:
        raise UsageFailure(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    try:
        paths = results.save(out)
    except OSError as exc:
        raise UsageFailure(f"cannot write results to {out}: {exc}") from None
    html = render_report = None
    if not no_html:
        try:
            from fp8probe.report.render import render_report
        except ImportError:  # the report module is optional for analyze: results are complete without it
            render_report = None
    if render_report is not None:
        html = render_report(results.to_json(), out / "index.html")
    worst = _summary_rows(results)
    n_errors = len(results.tables["errors"]) if "errors" in results.tables else 0
    if output_format == "json":
        click.echo(json.dumps({"results": str(paths["json"]), "html": None if html is None else str(html),
                               "loss": results.metadata["loss"], "strategy_errors": n_errors,
                               "worst_fprop": [{k: (None if isinstance(v, float) and v != v else v)
                                                for k, v in r.items()} for r in worst]},
                              indent=1, default=str))
        return
    loss = results.metadata["loss"]
    click.echo(f"{len(results.tables['layers'])} linear layer(s), {results.metadata['batches']} batch(es), "
               f"loss: {loss['kind']} ({loss['detail']})")
    if worst:
        click.echo(f"{'layer':<32} {'strategy':<15} {'fprop SQNR dB':>13} {'rel err':>9}")
        for r in worst:
            click.echo(f"{r['layer'][:32]:<32} {r['strategy']:<15} {r['sqnr_db']:>13.2f} {r['rel_err']:>9.2e}")
    if n_errors:
        click.echo(f"note: {n_errors} strategy/layer combination(s) failed; see the errors table", err=True)
    click.echo(f"results: {paths['json']}" + (f"; report: {html}" if html else "; no HTML report written"))


class _nullbar:
    """Stand-in for click.progressbar when --quiet."""

    def __enter__(self) -> "_nullbar":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int) -> None:
        return None


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
    atomic_write_text(out / "compare.md", md)
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


def _sweep_options(func):
    """The model/input options of `analyze` (same names, same meaning), shared by both sweep commands."""
    options = [
        click.argument("model", type=str),
        click.option("--inputs", type=click.Path(dir_okay=False), default=None,
                     help="torch.save'd inputs: a tensor, a tuple of args, a dict of kwargs or a list of batches"),
        click.option("--factory", default=None,
                     help="module:function or file.py:function building the model for a state_dict"),
        click.option("--trust-pickle", is_flag=True, help="allow loading a pickled nn.Module (runs arbitrary code)"),
        click.option("--loss", "loss_spec", default=None,
                     help="module:function called as fn(output, batch) -> scalar loss"),
        click.option("--layers", default=None, help="regular expression on module paths: sweep only matching layers"),
        click.option("--batches", type=click.IntRange(min=1), default=None, help="use at most this many batches"),
        click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
                     help="output directory (default reports/<name>-<command>/)"),
        click.option("--name", default=None, help="run name (default: the model file's stem)"),
    ]
    for opt in reversed(options):
        func = opt(func)
    return func


def _parse_list(text: str, cast: type, what: str) -> list:
    try:
        return [cast(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageFailure(f"--{what} must be a comma-separated list of numbers, got {text!r}") from None


def _run_sweep(kind: str, model: str, values: list, inputs: str | None, factory: str | None, trust_pickle: bool,
               loss_spec: str | None, layers: str | None, batches: int | None, device: str, seed: int,
               out_dir: str | None, name: str | None) -> None:
    from pathlib import Path

    from fp8probe.analysis.loading import LoadError, load_inputs, load_model
    from fp8probe.analysis.sweeps import sweep_blocksize, sweep_threshold
    from fp8probe.report.render import render_report

    run_name = name or Path(model.split(":")[0]).stem or kind
    out = Path(out_dir) if out_dir else Path("reports") / f"{run_name}-{kind}"
    fn, arg = (sweep_blocksize, "blocksizes") if kind == "sweep-blocksize" else (sweep_threshold, "thresholds")
    try:
        loaded = load_model(model, factory=factory, trust_pickle=trust_pickle)
        batch_list = load_inputs(inputs) if inputs else None
        results = fn(loaded, batch_list, **{arg: values}, layers=layers, batches=batches, device=device, seed=seed,
                     loss=loss_spec, name=run_name, model_desc=loaded.description,
                     inputs_desc=inputs or "example inputs / factory batches")
    except (LoadError, ValueError, TypeError) as exc:
        raise UsageFailure(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    paths = results.save(out)
    html = render_report(results.to_json(), out / "index.html")
    table = results.tables["blocksize_sweep" if kind == "sweep-blocksize" else "threshold_sweep"]
    rec = table[table["recommended"]]
    if kind == "sweep-blocksize":
        rec = rec[rec["target"] == "fprop"]
        click.echo(f"{'layer':<40} {'recommended':>11} {'fprop SQNR dB':>13}")
        for r in rec.to_dict("records"):
            click.echo(f"{r['layer'][:40]:<40} {r['blocksize']:>11} {r['sqnr_db']:>13.2f}")
    else:
        click.echo(f"{'layer':<40} {'recommended':>11} {'fprop SQNR dB':>13} {'16-bit cols':>11}")
        for r in rec.to_dict("records"):
            click.echo(f"{r['layer'][:40]:<40} {r['threshold']:>11g} {r['fprop_sqnr_db']:>13.2f} "
                       f"{100 * r['frac_cols_16bit']:>10.1f}%")
    click.echo(f"rule: {next(iter(results.metadata['recommendations'].values()))}")
    click.echo(f"results: {paths['json']}; report: {html}")


@cli.command("sweep-blocksize")
@_sweep_options
@click.option("--blocksizes", default="32,64,128,256,512,1024,2048,4096", show_default=True,
              help="comma-separated block sizes (elements per fp32 absmax)")
def sweep_blocksize_cmd(blocksizes: str, **kwargs: object) -> None:
    """Blockwise FP8 (bnb-e4m3 A/W, bnb-e5m2 G) error per layer x block size, scale overhead, recommended size."""
    _run_sweep("sweep-blocksize", values=_parse_list(blocksizes, int, "blocksizes"), **kwargs)  # type: ignore[arg-type]


@cli.command("sweep-threshold")
@_sweep_options
@click.option("--thresholds", default="0,1,2,3,4,5,6,8", show_default=True,
              help="comma-separated LLM.int8 outlier thresholds (0 = no outlier decomposition)")
def sweep_threshold_cmd(thresholds: str, **kwargs: object) -> None:
    """LLM.int8() fprop error vs outlier threshold per layer, fraction of 16-bit columns, recommended knee."""
    _run_sweep("sweep-threshold", values=_parse_list(thresholds, float, "thresholds"), **kwargs)  # type: ignore[arg-type]

def merge_sweeps_into(results: dict, *sweeps: dict) -> dict:
    """One results dict carrying the analyze tables plus the sweep tables (and their rules), for one report."""
    merged = {**results, "metadata": dict(results["metadata"]), "tables": dict(results["tables"])}
    meta = merged["metadata"]
    meta["rules"] = dict(meta.get("rules") or {})
    meta["recommendations"] = dict(meta.get("recommendations") or {})
    meta["formats"] = dict(meta.get("formats") or {})
    for sw in sweeps:
        for name, rows in sw["tables"].items():
            if name != "layers":
                merged["tables"][name] = rows
        meta["rules"].update(sw["metadata"].get("rules") or {})
        meta["recommendations"].update(sw["metadata"].get("recommendations") or {})
        for fname, f in (sw["metadata"].get("formats") or {}).items():
            meta["formats"].setdefault(fname, f)
    return merged


@cli.command("demo")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="reports/demo", show_default=True,
              help="directory for index.html and the results JSON/CSV files")
@click.option("--small", is_flag=True, hidden=True, help="one small batch (for the test suite)")
def demo_cmd(out_dir: str, small: bool) -> None:
    """Built-in demo: a seeded transformer with planted outlier features → analyze (all strategies) + both
    sweeps → one HTML report at reports/demo/index.html. Needs no inputs and no network."""
    import time

    import torch

    start = time.perf_counter()
    # The demo's tensors are tiny (<= 1024 x 256): intra-op threads buy nothing, and OpenMP spin-waiting
    # on shared cores made the whole demo 6x slower (181 s vs 28 s measured at load 6 on 2 cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run_demo(out_dir, small, start)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out_dir: str, small: bool, start: float) -> None:
    import json
    import time
    from pathlib import Path

    from fp8probe.analysis.demo_model import build_demo
    from fp8probe.analysis.pipeline import analyze
    from fp8probe.analysis.sweeps import sweep_both
    from fp8probe.report.render import render_report

    out = Path(out_dir)
    n_batches, batch = (1, 4) if small else (4, 8)
    model, batches = build_demo(n_batches=n_batches, batch=batch)
    model_desc = (f"built-in demo encoder ({sum(p.numel() for p in model.parameters())} parameters, "
                  f"{model.cfg.n_layers} blocks, planted outlier dims {list(model.cfg.outlier_dims)})")
    inputs_desc = f"{n_batches} seeded batch(es) of {batch} x {model.cfg.seq} tokens"
    click.echo(f"demo: analysing {model_desc} on {inputs_desc} ...")
    common = {"name": "demo", "model_desc": model_desc, "inputs_desc": inputs_desc}
    analysis = analyze(model, batches, strategy="all", **common)
    click.echo(f"demo: analyze done ({time.perf_counter() - start:.1f} s); sweeping block sizes and thresholds ...")
    bs_res, th_res = sweep_both(model, batches, **common)
    analysis.save(out / "analyze")
    bs_res.save(out / "sweep-blocksize")
    th_res.save(out / "sweep-threshold")
    merged = merge_sweeps_into(analysis.to_json(), bs_res.to_json(), th_res.to_json())
    atomic_write_text(out / "results.json", json.dumps(merged, indent=1, allow_nan=False))
    html = render_report(merged, out / "index.html")
    click.echo(f"demo: report written to {html} ({time.perf_counter() - start:.1f} s); "
               f"results JSON in {out}/results.json (fp8probe report {out}/results.json -o other.html re-renders it)")


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="fp8probe")


if __name__ == "__main__":
    sys.exit(main())
