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


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="fp8probe")


if __name__ == "__main__":
    sys.exit(main())
