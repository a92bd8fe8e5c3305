"""Command-line interface: thin click commands over the library API (exit codes below; one line on stderr per error)."""
from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import click

from fp8probe import __version__
from fp8probe.backends import cpu as _cpu_backend
from fp8probe.report.files import (OutputExistsError, OutputLockedError, append_text, as_utf8_text,
                                   atomic_write_text, claim_output_dir, lock_output_dir, remove_outputs)

# Exit codes (README "Safety and limits"): 0 fine; 1 a `compare` gate failed; 2 bad usage, input
# or environment (one line on stderr); 3 an internal error (a bug: one line, --debug shows the
# traceback); 130 interrupted (Ctrl-C) and 141 stdout closed early (a pipe), the shell conventions
# 128 + SIGINT and 128 + SIGPIPE.
EXIT_OK, EXIT_GATE_FAILED, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 0, 1, 2, 3, 130, 141
# Block sizes must index a flattened tensor with torch's int64 but also fit the fp32 absmax
# count; 2^31 - 1 elements per block is far above any real tensor and keeps every path in range.
MAX_BLOCKSIZE = 2**31 - 1
# torch.manual_seed takes a 64-bit seed.
MAX_SEED = 2**63 - 1


class UsageFailure(click.ClickException):
    """A bad input or usage: one line on stderr, exit code 2 (STYLE: mlflow/ruff exit codes)."""

    exit_code = EXIT_USAGE


def _single_line(text: str) -> str:
    """Collapse a message to one line (click and torch messages may span several)."""
    return " ".join(str(text).split())


def _printable(text: object) -> str:
    """Layer names are user data: control characters (an ANSI escape clearing the terminal, a fake
    newline) are shown as Python escapes instead of reaching the terminal or a CI log. A path or name
    decoded from the command line under an ASCII locale is shown as the text typed (as_utf8_text)."""
    text = as_utf8_text(str(text))
    return text if text.isprintable() else repr(text)[1:-1]


def _fail(exc: BaseException, what: str | None = None) -> UsageFailure:
    """UsageFailure carrying ``exc``'s first message line (the traceback stays reachable for --debug)."""
    text = str(exc).strip().splitlines()
    msg = text[0] if text and text[0] else type(exc).__name__
    failure = UsageFailure(f"{what}: {msg}" if what else msg)
    failure.__cause__ = exc
    return failure


# click >= 8.2 raises this for a group called without a command; older versions print help themselves.
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class _BrokenPipe(Exception):
    """stdout closed early: carried past click, whose main() turns EPIPE into exit 1 ("gate failed")."""


def _user_exit_text(exc: SystemExit) -> str:
    """What a SystemExit raised by the user's code says: its code and where (the innermost frame outside fp8probe,
    click, torch and the standard library; else outside fp8probe and click)."""
    skip = [os.path.dirname(m.__file__) + os.sep for name in ("fp8probe", "click", "torch")
            if (m := sys.modules.get(name)) is not None and getattr(m, "__file__", None)]
    stdlib = os.path.dirname(os.__file__) + os.sep
    mine = other = None
    tb = exc.__traceback__
    while tb is not None:
        path = os.path.abspath(tb.tb_frame.f_code.co_filename)
        if not path.startswith(tuple(skip)):
            other = tb
            if not path.startswith(stdlib) or "site-packages" in path:
                mine = tb
        tb = tb.tb_next
    at = mine or other
    where = "" if at is None else f" in {at.tb_frame.f_code.co_name} at {at.tb_frame.f_code.co_filename}:{at.tb_lineno}"
    return (f"the code fp8probe ran for you (a factory, the model, a --loss function or an unpickled object) called "
            f"sys.exit({exc.code!r}){where}, so the run stopped unfinished; remove the exit (or guard it with "
            "if __name__ == '__main__')")


class Fp8probeGroup(click.Group):
    """click.Group whose main() turns every failure into one stderr line and a documented exit code.

    Overriding main() (not only the console-script function) makes `fp8probe`, `python -m fp8probe`
    and click's CliRunner behave the same. Without --debug no traceback is ever printed.
    """

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                raise _BrokenPipe() from exc
            raise
        except SystemExit as exc:
            # click's own exits (ctx.exit) are click.exceptions.Exit, handled in main(): a SystemExit here came from
            # code the command ran for the user (a factory, a model's forward, a --loss function, an unpickled
            # object, a module calling argparse at import). It had exited 0 with no output and no message.
            raise UsageFailure(_user_exit_text(exc)) from exc
        except RuntimeError as exc:
            # A torchrun peer rank that died or hung (distributed.PeerRankError, raised at any collective of any
            # command) is the environment's failure, not a bug. Looked up, not imported: only a command that
            # joined the ranks has loaded the module, and importing it would import torch.
            distributed = sys.modules.get("fp8probe.analysis.distributed")
            if distributed is not None and isinstance(exc, distributed.PeerRankError):
                raise _fail(exc) from exc
            raise

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # type: ignore[override]
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        state = extra.setdefault("obj", {})
        state = state if isinstance(state, dict) else {}
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except _NO_ARGS_IS_HELP as exc:  # bare `fp8probe`: the help text, as click prints it
            exc.show()
            sys.exit(EXIT_USAGE)
        except click.ClickException as exc:
            if state.get("debug"):
                traceback.print_exception(exc)
            hint = ""
            if isinstance(exc, click.UsageError) and not isinstance(exc, UsageFailure) and exc.ctx is not None:
                hint = f" (see '{exc.ctx.command_path} --help')"
            click.echo(f"Error: {_printable(_single_line(exc.format_message()))}{hint}", err=True)
            # click's own ClickException default is 1, which means "gate failed" here: input errors are 2.
            sys.exit(exc.exit_code if exc.exit_code == EXIT_USAGE else EXIT_USAGE)
        except (OSError, _BrokenPipe) as exc:
            if state.get("debug"):
                traceback.print_exception(exc)
            if isinstance(exc, _BrokenPipe) or exc.errno == errno.EPIPE:
                # stdout closed early (fp8probe ... | head): nothing to report, but not success either
                # (a compare verdict may not have been printed). Point stdout at /dev/null so the
                # interpreter's final flush does not raise again, and exit like a SIGPIPE'd process.
                with contextlib.suppress(OSError, ValueError):
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                sys.exit(EXIT_BROKEN_PIPE)
            where = f" {_printable(exc.filename)}" if exc.filename else ""
            click.echo(f"Error: cannot access{where}: {exc.strerror or exc}; check the path, its permissions "
                       "and the free disk space", err=True)
            sys.exit(EXIT_USAGE)
        except Exception as exc:  # noqa: BLE001 - the one place a bug becomes a one-line message
            if state.get("debug"):
                traceback.print_exception(exc)
            click.echo(f"fp8probe: internal error: {type(exc).__name__}: {_printable(_single_line(str(exc)))} "
                       "(re-run with --debug for the traceback)", err=True)
            sys.exit(EXIT_INTERNAL)
        sys.exit(rv if isinstance(rv, int) else EXIT_OK)


class _FlagEnvOption(click.Option):
    """An option whose automatic environment variable is named after its flag, as the README says
    (``FP8PROBE_ANALYZE_OUT`` for ``analyze --out``), not after the Python parameter behind it (``out_dir``:
    ``FP8PROBE_ANALYZE_OUT_DIR``, which click would read and is still read)."""

    def resolve_envvar_value(self, ctx: click.Context) -> str | None:
        flags = [o for o in self.opts if o.startswith("--")]
        names = []
        if self.envvar is None and self.allow_from_autoenv and ctx.auto_envvar_prefix is not None:
            if flags:
                names.append(f"{ctx.auto_envvar_prefix}_{max(flags, key=len)[2:].replace('-', '_').upper()}")
            if self.name:
                names.append(f"{ctx.auto_envvar_prefix}_{self.name.upper()}")
        for var in names:
            value = os.environ.get(var)
            if value:
                ctx.meta.setdefault("fp8probe.envvars", {})[self.name] = var
                return value
        return super().resolve_envvar_value(ctx)

    def process_value(self, ctx: click.Context, value: object) -> object:
        try:
            return super().process_value(ctx, value)
        except click.BadParameter as exc:  # say where a bad value came from when it was not typed
            var = _env_var(ctx, self.name)
            if var:
                exc.message = f"{exc.message} (from the environment variable {var})"
            raise


#: --threads above this is refused: torch.set_num_threads(100000) crashed the process (a segfault in OpenMP)
#: before any work; no machine fp8probe runs on has more hardware threads.
MAX_THREADS = 1024


def _as_typed(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A text option matched against the model's own names (--layers), as the characters typed: under an ASCII
    filesystem encoding Python hands non-ASCII arguments over as surrogate escapes, which never match a name
    (files.as_utf8_text)."""
    return None if value is None else as_utf8_text(value)


def _option(*decls: str, **attrs: object):  # type: ignore[no-untyped-def]
    """click.option with the flag-named environment variable (_FlagEnvOption)."""
    return click.option(*decls, cls=_FlagEnvOption, **attrs)


@click.group(cls=Fp8probeGroup, context_settings={"help_option_names": ["-h", "--help"],
                                                  "auto_envvar_prefix": "FP8PROBE"})
@click.version_option(__version__, prog_name="fp8probe",
                      message=f"%(prog)s %(version)s (CPU kernels: {_cpu_backend.backend_name()})")
@_option("--debug", is_flag=True, help="show Python tracebacks for errors (also FP8PROBE_DEBUG=1)")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """fp8probe: where does FP8 / INT8 matmul hurt your model?

    Exit codes: 0 fine, 1 a compare gate failed, 2 bad usage or input (one line on stderr),
    3 internal error (a bug; --debug shows the traceback), 130 interrupted.
    """
    obj = ctx.ensure_object(dict)
    obj["debug"] = debug
    # The backends only test FP8PROBE_BACKEND == "reference" (at every op call): a typo would silently run
    # the kernels the user meant to rule out.
    backend = os.environ.get("FP8PROBE_BACKEND")
    if backend not in (None, "", "reference"):
        raise UsageFailure(f"FP8PROBE_BACKEND must be 'reference' (the PyTorch reference on every device) or unset "
                           f"(the CPU and CUDA kernels where they apply), got {backend!r}")


class FiniteFloat(click.ParamType):
    """A finite float >= ``minimum`` (click.FloatRange lets NaN through: NaN < 0 is False)."""

    name = "number"

    def __init__(self, minimum: float | None = 0.0, strict: bool = False) -> None:
        self.minimum = minimum
        self.strict = strict  # (> minimum rather than >=)

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"expected a number, got {value!r}", param, ctx)
        low = self.minimum is not None and (number <= self.minimum if self.strict else number < self.minimum)
        if not math.isfinite(number) or low:
            bound = f" {'>' if self.strict else '>='} {self.minimum:g}" if self.minimum is not None else ""
            self.fail(f"expected a finite number{bound}, got {value!r}", param, ctx)
        return number


def _analysis_failure(exc: BaseException, inputs: str | None) -> UsageFailure:
    """One line for an error raised while running the model; when the model rejected a batch (capture.InputsError,
    which names the batch and, for an eager model, its first layer), say which file it came from."""
    from fp8probe.analysis.capture import InputsError

    failure = _fail(exc)
    if not isinstance(exc, InputsError):
        return failure
    source = f"--inputs {inputs}" if inputs else "the model's own batches (its factory's or the program's example inputs)"
    failure.message = f"{source}: {failure.message}"
    if "do not match the exported program" in failure.message:
        failure.message += " (the program takes inputs of the shapes it was exported for)"
    if "more than 1 value per channel when training" in failure.message:  # (--train-mode)
        failure.message += (" (in training mode BatchNorm takes each channel's statistics over the batch: use batches "
                            "of more than one row, or run without --train-mode)")
    return failure


def _check_out(out: Path, kind: str, overwrite: bool) -> list[Path]:
    """Fail fast (exit 2) when ``out`` already holds this command's outputs and --overwrite is not given,
    when another run is writing into it, or when it cannot be created or written; then hold the
    directory's claim (files.lock_output_dir) until the command ends."""
    if out.exists() and not out.is_dir():
        raise UsageFailure(f"--out {out} is a file, not a directory: choose a directory for the outputs")
    if out.is_symlink() and not out.exists():
        raise UsageFailure(f"--out {_printable(out)} is a dangling symbolic link: remove it or choose another --out")
    ctx = click.get_current_context()
    try:
        lock = lock_output_dir(out, ctx.command_path.split(" ", 1)[-1])
    except OutputLockedError as exc:
        raise UsageFailure(_printable(exc)) from None
    except OSError as exc:
        raise UsageFailure(f"cannot write to --out {_printable(out)}: {exc.strerror or exc}; choose a writable "
                           "directory") from None
    ctx.call_on_close(lock.release)
    try:
        return claim_output_dir(out, kind, overwrite)
    except OutputExistsError as exc:
        raise UsageFailure(str(exc)) from None


def _join_ranks(device: str):  # -> distributed.World
    """Join torchrun's process group when launched by it (WORLD_SIZE > 1); World() otherwise."""
    from fp8probe.analysis import distributed

    try:
        return distributed.init_from_env(device)
    except (ValueError, RuntimeError) as exc:
        raise _fail(exc, "torch.distributed") from exc


def _check_out_on_main(world: "object", out: Path, kind: str, overwrite: bool) -> list[Path]:
    """``_check_out`` on rank 0 only (it alone writes and holds the --out lock); every rank stops with
    rank 0's message when --out is unusable, so no rank waits for a peer that has left."""
    from fp8probe.analysis import distributed

    if world.size == 1:
        return _check_out(out, kind, overwrite)
    stale: list[Path] = []
    message = None
    if world.is_main:
        try:
            stale = _check_out(out, kind, overwrite)
        except UsageFailure as exc:
            message = exc.message
    message = distributed.agree(message, world)
    if message is not None:
        raise UsageFailure(message)
    return stale


def _warn_no_gradient(results: "object") -> None:
    """One stderr line when the loss did not reach the weights (the results then hold fprop only), and one
    naming the frozen layers (no wgrad rows) and one the backward GEMMs training does not run (no rows)."""
    from fp8probe.report.verdict import frozen_text, not_run_text, untrained_batchnorm_text

    loss = results.metadata.get("loss") or {}
    if loss.get("no_gradient"):
        click.echo(f"warning: {_printable(loss['no_gradient'])}", err=True)
    bn = untrained_batchnorm_text(results.metadata)
    if bn:
        click.echo(f"warning: {_printable(bn)}", err=True)
    for text in (frozen_text(results.metadata), not_run_text(results.metadata)):
        if text:
            click.echo(f"note: {_printable(text)}", err=True)


def _check_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():  # is_available() does not initialise CUDA
        raise _bad_option("device", "--device cuda but no CUDA device is available to torch: use --device cpu",
                          prefix=False)


def _check_layers(layers: str | None) -> None:
    if layers is None:
        return
    try:
        re.compile(layers)
    except re.error as exc:
        raise _bad_option("layers", f"--layers must be a valid regular expression, got {layers!r} ({exc})",
                          prefix=False) from exc


_GEMMS_HELP = ("GEMM kinds to capture, comma-separated: linear, matmul (two activations), attention (QKᵀ and PV of "
               "scaled_dot_product_attention), conv (implicit GEMM), or all; what is left out is counted as skipped")


def _check_gemms(gemms: str) -> tuple[str, ...]:
    from fp8probe.analysis.gemms import KINDS, parse_kinds

    _list_items("gemms", gemms, f"comma-separated GEMM kinds of all, {', '.join(KINDS)}")
    try:
        return parse_kinds(gemms)
    except ValueError as exc:
        raise _bad_option("gemms", str(exc)) from exc


def _from_env(ctx: click.Context, name: str) -> bool:
    """Whether the current command's parameter ``name`` took its value from the environment (not typed, not its
    default)."""
    return ctx.get_parameter_source(name) == click.core.ParameterSource.ENVIRONMENT


def _env_var(ctx: click.Context, name: str) -> str | None:
    """The FP8PROBE_* variable parameter ``name`` took its value from (_FlagEnvOption records it); None when the value
    was typed or is the default."""
    return ctx.meta.get("fp8probe.envvars", {}).get(name) if _from_env(ctx, name) else None


def _env_said(ctx: click.Context, name: str, flag: str) -> str:
    """``FP8PROBE_ANALYZE_LOSS (--loss)`` for an option set in the environment (the flag alone when the variable's
    name was not recorded), as the notes on options that had no effect name it."""
    var = _env_var(ctx, name)
    return f"{var} ({flag})" if var else flag


def _bad_option(name: str, message: str, *, prefix: bool = True) -> UsageFailure:
    """UsageFailure for a value of the current command's parameter ``name`` that a check in the command body
    refused: ``--flag: message``, with the environment variable it came from when it was not typed (as
    _FlagEnvOption says for click's own checks: FP8PROBE_ANALYZE_STRATEGY=fp9 in a CI job's environment
    read "strategy must be ..." with nothing pointing at the variable). ``prefix`` False: the message names
    the flag itself."""
    ctx = click.get_current_context()
    param = next((p for p in ctx.command.params if p.name == name), None)
    flag = max(param.opts, key=len) if param is not None else f"--{name.replace('_', '-')}"
    var = _env_var(ctx, name)
    if var:
        message = f"{message} (from the environment variable {var})"
    return UsageFailure(f"{flag}: {message}" if prefix else message)


def _list_items(name: str, text: str, expected: str) -> list[str]:
    """The stripped comma-separated items of the list option ``name``. An empty item (64,,128 or a trailing comma)
    is refused, not skipped: it is a typo, often of a value that was meant to be there."""
    items = [item.strip() for item in text.split(",")]
    empty = [i for i, item in enumerate(items, 1) if not item]
    if empty:
        where = f"item {empty[0]} of {len(items)} is empty" if len(items) > 1 else "it is empty"
        raise _bad_option(name, f"expected {expected}, got {text!r} ({where})")
    return items


def _check_names(model: str, factory: str | None, loss_spec: str | None, strategy: str | None = None) -> None:
    """Resolve what the user named (strategy, factory, a module:function model, --loss) before --out is
    looked at: an unknown strategy or an unimportable factory is the error to report, not an
    existing output directory. Factories are imported once (loading caches them), not run."""
    from fp8probe.analysis.loading import LoadError, factory_conflict, resolve_callable

    checks = []
    if factory:  # (before the factory is imported: a refused --factory never runs)
        try:
            conflict = factory_conflict(Path(model), factory)
        except LoadError as exc:
            raise _fail(exc) from exc
        if conflict:
            raise UsageFailure(conflict)
    if strategy is not None:
        from fp8probe.analysis.strategies import resolve

        _list_items("strategy", strategy, "a strategy name, a comma-separated list of them, or all")
        checks.append(("strategy", lambda: resolve(strategy)))
    if factory:
        checks.append(("factory", lambda: resolve_callable(factory)))
    elif ":" in model and not Path(model).exists():
        checks.append((None, lambda: resolve_callable(model)))
    if loss_spec:
        checks.append(("loss_spec", lambda: resolve_callable(loss_spec)))
    for name, check in checks:
        try:
            check()
        except (LoadError, ValueError) as exc:
            raise (_fail(exc) if name is None else _bad_option(name, _fail(exc).message)) from exc


def _default_out(run_name: str, suffix: str = "") -> Path:
    """reports/<name><suffix>; the run name must then be a plain file name (it becomes a path)."""
    if not run_name or run_name in (".", "..") or any(c in run_name for c in "/\\\0"):
        raise UsageFailure(f"run name {run_name!r} cannot be a directory name: pass --name with a plain name "
                           "or --out")
    return Path("reports") / f"{run_name}{suffix}"


@cli.command("formats")
@_option("--format", "output_format", type=click.Choice(["table", "json"]), default="table",
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
# Terminal summary: the worst layers of EACH strategy (a table of the 10 worst overall is often all
# one recipe's), this many per strategy when there are few strategies, fewer when there are many.
WORST_PER_STRATEGY = 3
WORST_ROWS = 16
# Columns of the worst-layers table besides the layer name (strategy, SQNR, rel err and spacing).
_SUMMARY_FIXED_WIDTH = 44


def _summary_rows(results: "object") -> list[dict]:
    """The worst (layer, strategy) pairs by isolated fprop SQNR, per strategy (lowest first within each,
    strategies in run order): at most WORST_PER_STRATEGY each and WORST_ROWS in all."""
    gemm = results.tables.get("gemm")
    if gemm is None or gemm.empty:
        return []
    fprop = gemm[gemm["gemm"] == "fprop"]
    strategies = list(dict.fromkeys(fprop["strategy"]))
    per = max(1, min(WORST_PER_STRATEGY, WORST_ROWS // max(len(strategies), 1)))
    rows = []
    for s in strategies:
        mine = fprop[fprop["strategy"] == s].sort_values("sqnr_db", na_position="first")
        rows += mine.head(per)[["layer", "strategy", "sqnr_db", "rel_err"]].to_dict("records")
    return rows


def _middle_ellipsis(name: str, width: int) -> str:
    """A layer name that fits ``width`` characters: the start and the end kept (``bert.encoder.layer.0…
    attention.self.query``), since both the block index and the projection name tell layers apart."""
    name = _printable(name)
    if len(name) <= width:
        return name
    head = (width - 1) // 2
    return name[:head] + "…" + name[len(name) - (width - 1 - head):]


def _echo_summary(results: "object") -> None:
    """The terminal summary of an analyze run: the verdict lines, then the worst layers per strategy."""
    import shutil

    from fp8probe.report.verdict import verdict_lines

    for line in verdict_lines(results.tables, results.metadata):
        click.echo(_printable(line))
    worst = _summary_rows(results)
    if not worst:
        return
    columns = shutil.get_terminal_size((120, 24)).columns
    longest = max(len(_printable(r["layer"])) for r in worst)
    width = max(24, min(longest, columns - _SUMMARY_FIXED_WIDTH))
    click.echo("worst layers per strategy (isolated fprop SQNR):")
    click.echo(f"{'layer':<{width}} {'strategy':<15} {'fprop SQNR dB':>13} {'rel err':>9}")
    for r in worst:
        sqnr, rel = (r[k] if isinstance(r[k], (int, float)) else float("nan") for k in ("sqnr_db", "rel_err"))
        # (a NaN SQNR: no finite reference, the gemm table's note; the row sorts first)
        sqnr_s, rel_s = ("undefined", "–") if math.isnan(sqnr) else (f"{sqnr:.2f}", f"{rel:.2e}")
        click.echo(f"{_middle_ellipsis(r['layer'], width):<{width}} {r['strategy']:<15} {sqnr_s:>13} {rel_s:>9}")


def _json_safe(value: object) -> object:
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


_TRUST_PICKLE_HELP = ("allow loading pickled Python objects from MODEL and --inputs (a pickled nn.Module, pickled "
                      "inputs, a .pt2 that needs the full unpickler): this runs arbitrary code from the files, use "
                      "only for files you trust; --trust-pickle-model / --trust-pickle-inputs trust one side only")
_TRUST_MODEL_HELP = "as --trust-pickle, for MODEL (and its weight files) only: --inputs stays tensors-only"
_TRUST_INPUTS_HELP = "as --trust-pickle, for the --inputs file only: MODEL stays tensors-only"
_OVERWRITE_HELP = "replace the fp8probe outputs already in --out (other files there are left alone)"
_EMBEDDINGS_HELP = ("weights-only analysis: also analyse embedding tables (skipped by default: a lookup, not a GEMM "
                    "operand)")


class _Trust(NamedTuple):
    """Which side's pickles may be unpickled (--trust-pickle: both; --trust-pickle-model / -inputs: one)."""

    model: bool = False
    inputs: bool = False

    @classmethod
    def of(cls, both: bool, model: bool, inputs: bool) -> "_Trust":
        return cls(model=both or model, inputs=both or inputs)


# The trust flags of analyze and both sweeps (folded into one _Trust by _Trust.of).
_TRUST_OPTIONS = [_option("--trust-pickle", is_flag=True, help=_TRUST_PICKLE_HELP),
                  _option("--trust-pickle-model", is_flag=True, help=_TRUST_MODEL_HELP),
                  _option("--trust-pickle-inputs", is_flag=True, help=_TRUST_INPUTS_HELP)]


def _trust_options(func):
    for option in reversed(_TRUST_OPTIONS):
        func = option(func)
    return func


_INPUTS_HELP = ("torch.save'd inputs (a tensor, a tuple of args, a dict of kwargs or a list of batches), or text to "
                "tokenize with a Hugging Face model directory's tokenizer: a .txt file, or .jsonl lines with a \"text\" "
                "string (see --seq-len, --batch-size; at most 8 batches unless --batches)")
_SEQ_LEN = _option("--seq-len", type=click.IntRange(min=2), default=None,
                   help="text --inputs: tokens per sequence, BOS included [default: 128, or the model's max positions when "
                        "fewer]")
_BATCH_SIZE = _option("--batch-size", type=click.IntRange(min=1), default=None,
                      help="text --inputs: sequences per batch [default: 2]")


class Inputs(NamedTuple):
    """--inputs as read: the batches (None: the model's own), how the report names them, and a note for the terminal
    ("" or text inputs that left text unused: the user may want more batches)."""

    batches: list | None
    desc: str
    note: str = ""


def _read_inputs(model: str, inputs: str | None, trust_pickle: bool, seq_len: int | None, batch_size: int | None,
                 batches: int | None) -> Inputs:
    """The --inputs batches: a text file tokenized with MODEL's tokenizer (loading.load_text_inputs), else a
    torch.save'd file (the commands refuse --seq-len / --batch-size with those first: _check_text_options)."""
    from fp8probe.analysis.loading import (TEXT_BATCH_SIZE, TEXT_MAX_BATCHES, TEXT_MORE, TEXT_SHORT, is_text_inputs,
                                           load_inputs, load_text_inputs)

    if inputs is not None and is_text_inputs(inputs):
        got, desc = load_text_inputs(inputs, model, seq_len=seq_len, batch_size=batch_size or TEXT_BATCH_SIZE,
                                     max_batches=batches or TEXT_MAX_BATCHES)
        return Inputs(got, desc, f"text inputs {desc}" if TEXT_MORE in desc or TEXT_SHORT in desc else "")
    if inputs is None:
        return Inputs(None, "example inputs / factory batches")
    return Inputs(load_inputs(inputs, trust_pickle=trust_pickle), inputs)


def _check_text_options(inputs: str | None, seq_len: int | None, batch_size: int | None
                        ) -> tuple[int | None, int | None]:
    """(seq_len, batch_size) to use. --seq-len / --batch-size typed without text --inputs would do nothing: a usage
    error, checked with the other typed options before anything is loaded. Set in the environment (a CI job's
    FP8PROBE_ANALYZE_SEQ_LEN for its text runs) they are dropped for other inputs, with a note on stderr."""
    from fp8probe.analysis.loading import is_text_inputs

    if inputs is not None and is_text_inputs(inputs):
        return seq_len, batch_size
    ctx = click.get_current_context()
    set_ = [(name, f"--{name.replace('_', '-')}") for name, v in (("seq_len", seq_len), ("batch_size", batch_size))
            if v is not None]
    typed = [flag for name, flag in set_ if not _from_env(ctx, name)]
    got = f"--inputs {_printable(inputs)}" if inputs else "no --inputs"
    if typed:
        raise UsageFailure(f"{' and '.join(typed)} cut text --inputs (.txt, .jsonl) into token batches: expected text "
                           f"inputs, got {got}")
    if set_:  # (all of them from the environment)
        said = ", ".join(_env_said(ctx, name, flag) for name, flag in set_)
        click.echo(f"note: {said} from the environment had no effect here: it cuts text --inputs into token batches, "
                   f"and this run has {got}", err=True)
    return None, None


def _load(model: str, inputs: str | None, factory: str | None, trust: _Trust, seq_len: int | None = None,
          batch_size: int | None = None, batches: int | None = None) -> tuple:
    """(LoadedModel, Inputs), every loading problem as one UsageFailure line."""
    from fp8probe.analysis.loading import LoadError, load_model

    try:
        loaded = load_model(model, factory=factory, trust_pickle=trust.model)
        read = _read_inputs(model, inputs, trust.inputs, seq_len, batch_size, batches)
    except (LoadError, ValueError, TypeError) as exc:
        raise _fail(exc) from exc
    _check_rows(read.batches, inputs)
    return loaded, read


def _check_rows(batches: list | None, inputs: str | None) -> None:
    """UsageFailure for a batch of the --inputs file with 0 rows (a tensor whose first dimension is 0): the library
    measures it (every metric "no elements"), but a file saved with one is a mistake, and the summary read "loss –"
    and NaN beside a verdict about a non-finite loss. A factory's own empty batch is the author's choice and runs
    (tests/analysis/test_special_values.py)."""
    source = f"--inputs {inputs}"
    for i, batch in enumerate(batches or []):
        empty = [(name, t) for name, t in batch.tensors() if t.dim() and not t.shape[0]]
        if empty:
            name, t = empty[0]
            raise UsageFailure(f"{_printable(source)}: inputs batch {i} (counting from 0) of {len(batches)} has 0 rows "
                               f"({_printable(name)} {' x '.join(map(str, t.shape))}): expected at least one row in "
                               "every batch; drop the empty batch from the file")


_LOSS_HELP = ("module:function called as fn(output, batch) -> scalar loss; batch['labels'] / batch[0] read the saved "
              "dict's keys / tuple's items (also batch.kwargs, batch.args). Default: the model's own loss, else a "
              "Hugging Face causal LM's next-token loss on input_ids, else the mean of squared outputs")

#: analyze and both sweeps: the mode the loaded model runs in (every loader puts it in eval mode).
_TRAIN_MODE = _option("--train-mode", is_flag=True,
                      help="run the model in training mode: dropout on (seeded by --seed, batch by batch: the same masks "
                           "in every end-to-end run of a batch) and BatchNorm on each batch's statistics [default: eval "
                           "mode, as for inference]")


def _set_mode(loaded: "object", train_mode: bool) -> None:
    """--train-mode: the loaded eager model into train(); a .pt2 program is refused (it runs as it was traced)."""
    if not train_mode:
        return
    if loaded.kind == "export":
        raise _bad_option("train_mode", "a torch.export program runs in the mode it was exported in: expected an "
                          "eager model (a factory, a state_dict with --factory, a Hugging Face directory, a pickled "
                          "module), got a .pt2 program; export it from model.train() to analyse training mode")
    loaded.module.train()


#: analyze and both sweeps (one definition: the sweeps lacked it while the README promised it to every command).
_NO_HTML = _option("--no-html", is_flag=True, help="write results.json and CSVs only (render later with fp8probe report)")

_INT8_ROW_SCALE = _option(
    "--int8-row-scale", type=click.Choice(["bnb", "paper"]), default="bnb", show_default=True,
    help="LLM.int8 row absmax: bnb (sub-threshold values of outlier columns count, bitsandbytes) or paper "
         "(outlier columns left out)")


def _recipe_options(int8_row_scale: str, accum_bits: int | None, promote_every: int | None, amax_history: int,
                    amax_compute: str, margin: int):  # -> strategies.RecipeOptions
    """The run-wide recipe settings from the CLI flags, each problem as one usage line."""
    from fp8probe.analysis.accumulation import DEFAULT_PROMOTE_EVERY, Accumulation
    from fp8probe.analysis.delayed import DelayedScaling
    from fp8probe.analysis.strategies import RecipeOptions

    if promote_every is not None and accum_bits is None:
        raise UsageFailure(f"--promote-every {promote_every} needs --accum-bits (the accumulator it promotes from)")
    try:
        acc = None if accum_bits is None else Accumulation(accum_bits, promote_every or DEFAULT_PROMOTE_EVERY)
        return RecipeOptions(int8_row_scale, acc, DelayedScaling(amax_history, amax_compute, margin))
    except (ValueError, TypeError) as exc:
        raise _fail(exc) from exc


def _load_streamed(model: str, inputs: str | None, factory: str | None, trust: _Trust,
                   note: bool = True, seq_len: int | None = None, batch_size: int | None = None,
                   batches: int | None = None) -> tuple:
    """(LoadedModel streamed from its checkpoint, Inputs) for --stream, problems as one line. ``note``: print
    the checkpoint's memory note (under torchrun rank 0 alone does: every rank printed the same line)."""
    from fp8probe.analysis.loading import LoadError
    from fp8probe.analysis.streaming import checkpoint_note, load_streamed

    try:
        loaded = load_streamed(model, factory=factory)
        read = _read_inputs(model, inputs, trust.inputs, seq_len, batch_size, batches)
    except (LoadError, ValueError, TypeError) as exc:
        raise _fail(exc) from exc
    _check_rows(read.batches, inputs)
    if note:
        _echo_checkpoint_note(checkpoint_note(loaded))
    return loaded, read


def _echo_checkpoint_note(note: str) -> None:
    """A checkpoint's memory caveat (weights_only.Checkpoint.note), or what text inputs left unused, on stderr so that
    --format json stays clean."""
    if note:
        click.echo(f"note: {_printable(note)}", err=True)


@cli.command("analyze")
@click.argument("model", type=str)
@_option("--strategy", "-s", default="global", show_default=True,
              help="global, mixed, int8, switchback, ocp-tensorwise, ocp-rowwise, ocp-blockwise, mxfp8, "
                   "delayed, mxfp8-rceil, nvfp4, nvfp4-train, mxfp4, mxfp6-e2m3, mxfp6-e3m2, a comma-separated list, or all")
@_option("--inputs", type=click.Path(dir_okay=False), default=None, help=_INPUTS_HELP)
@_SEQ_LEN
@_BATCH_SIZE
@_option("--factory", default=None, help="module:function or file.py:function building the model for a state_dict")
@_trust_options
@_option("--loss", "loss_spec", default=None, help=_LOSS_HELP)
@_option("--layers", default=None, callback=_as_typed, help="regular expression on GEMM names (module path or weight "
              "name, '#qk'/'#pv'/'#matmul' for GEMMs of two activations): analyse only matching ones")
@_option("--gemms", default="all", show_default=True, help=_GEMMS_HELP)
@_option("--batches", type=click.IntRange(min=1), default=None, help="use at most this many batches")
@_option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@_option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True)
@_option("--threshold", type=FiniteFloat(0.0), default=6.0, show_default=True,
              help="LLM.int8 outlier threshold: columns with any |x| >= threshold")
@_option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="output directory (default reports/<name>/)")
@_option("--overwrite", is_flag=True, help=_OVERWRITE_HELP)
@_option("--name", default=None, help="run name (default: the model file's stem)")
@_option("--quiet", "-q", is_flag=True, help="no progress bar")
@_NO_HTML
@_option("--threads", type=click.IntRange(min=1, max=MAX_THREADS), default=None,
              help="torch intra-op CPU threads (default: torch's choice). 1 is often fastest: per-layer tensors "
                   "are small (demo: 2.0 s with 1 thread vs 10.8 s with 2 on a busy 2-core machine)")
@_option("--format", "output_format", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="table for people, json (paths, verdict lines, worst layers) for scripts")
@_option("--sweeps", is_flag=True,
              help="also run the block-size and threshold sweeps (default grids, one more capture pass) and write "
                   "one results.json and one report with everything")
@_option("--include-embeddings", is_flag=True, help=_EMBEDDINGS_HELP)
@_option("--budget", "budget_spec", default="0.01", show_default=True,
              help="end-to-end budget for the recommendation: relative loss change either way (0.01 or 1%), or kl:0.01 for "
                   "the mean KL divergence of the output distribution")
@_option("--no-e2e", is_flag=True, help="skip the end-to-end runs (no e2e, sensitivity, recommendation tables)")
@_option("--sensitivity", type=click.Choice(["auto", "measured", "estimated"]), default="auto", show_default=True,
              help="per-layer sensitivity: measured by forward runs, estimated from the captured gradients, or auto "
                   "(measured when its forward runs cost at most 2x the isolated analysis' work, counted in GEMM "
                   "FLOPs, never timed: the same inputs give the same choice)")
@_option("--steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="simulate this many training steps per strategy (and in high precision) from the same weights")
@_option("--lr", type=FiniteFloat(0.0, strict=True), default=1e-3, show_default=True, help="learning rate for --steps")
@_option("--optimizer", "optimizer_spec", default=None,
              help="module:function called as fn(params, lr) -> torch optimizer for --steps (default AdamW)")
@_INT8_ROW_SCALE
@_option("--accum-bits", type=click.IntRange(1, 23), default=None,
              help="simulate a reduced-precision FP8 accumulator: partial sums truncated to this many mantissa bits "
                   "(Hopper: about 13-14), in the FP8 recipes' GEMMs; default off = float32")
@_option("--promote-every", type=click.IntRange(min=1), default=None,
              help="with --accum-bits: contraction elements per partial sum before it is added into float32 "
                   "[default: 128, DeepSeek-V3's N_c]")
@_option("--amax-history", type=click.IntRange(min=1), default=1024, show_default=True,
              help="delayed strategy: amax history length per GEMM site and operand")
@_option("--amax-compute", type=click.Choice(["max", "most_recent"]), default="max", show_default=True,
              help="delayed strategy: the amax taken from the history")
@_option("--margin", type=click.IntRange(0, 64), default=0, show_default=True,
              help="delayed strategy: scale = amax * 2^margin / fmt_max (headroom in powers of two)")
@_option("--no-grad", is_flag=True,
              help="forward only: capture the fprop GEMMs with no loss and no backward pass (less memory: one layer's "
                   "activations); no dgrad/wgrad rows, no end-to-end runs")
@_TRAIN_MODE
@_option("--stream", is_flag=True,
              help="bigger than memory: build MODEL (a Hugging Face directory, or a checkpoint with --factory) with "
                   "its weights on the meta device and read each block's weights from the checkpoint only while it "
                   "runs; implies --no-grad (and no end-to-end runs)")
def analyze_cmd(model: str, strategy: str, inputs: str | None, seq_len: int | None, batch_size: int | None,
                factory: str | None, trust_pickle: bool, trust_pickle_model: bool, trust_pickle_inputs: bool,
                loss_spec: str | None, layers: str | None, gemms: str, batches: int | None, device: str, seed: int,
                threshold: float, out_dir: str | None, overwrite: bool, name: str | None, quiet: bool,
                no_html: bool, threads: int | None, output_format: str, sweeps: bool, include_embeddings: bool,
                budget_spec: str, no_e2e: bool, sensitivity: str, steps: int, lr: float, optimizer_spec: str | None,
                int8_row_scale: str, accum_bits: int | None, promote_every: int | None, amax_history: int,
                amax_compute: str, margin: int, no_grad: bool, train_mode: bool, stream: bool) -> None:
    """Capture MODEL's GEMMs (linear, matmul, attention, conv) on real inputs and measure each FP8/INT8 recipe's error.

    MODEL: a torch.export .pt2 file, a state_dict (with --factory), a pickled nn.Module (with
    --trust-pickle), a Hugging Face model directory, or module:function / file.py:function.
    A checkpoint without a model (state_dict .pt, .safetensors, *.index.json, a directory of weight
    files) given without --factory and --inputs gets a weights-only analysis, streamed tensor by tensor.
    Writes results.json + one CSV per table (+ index.html) into --out.
    """
    import json
    import warnings

    import torch

    from fp8probe.analysis.loading import LoadError
    from fp8probe.analysis.pipeline import analyze

    if no_grad or stream:  # (set in the environment these only get a note: not imported or parsed either)
        loss_spec, budget_spec = _unless_from_env({"loss_spec": loss_spec, "budget_spec": budget_spec}).values()
    # Errors in the order a user needs them: what they typed (strategy, factory, loss, layers, device)
    # before anything about the output directory, and all of it before the model is loaded.
    _check_names(model, factory, loss_spec, strategy)
    _check_device(device)
    _check_layers(layers)
    _check_gemms(gemms)
    seq_len, batch_size = _check_text_options(inputs, seq_len, batch_size)
    try:  # before --out: a bad budget is what the user typed, not a problem of the output directory
        from fp8probe.analysis.e2e import parse_budget

        budget = parse_budget(budget_spec)
    except ValueError as exc:
        raise _bad_option("budget_spec", _fail(exc).message) from exc
    options = _recipe_options(int8_row_scale, accum_bits, promote_every, amax_history, amax_compute, margin)
    if optimizer_spec is not None and not steps:  # (checked even unused: a typo should not wait for --steps)
        from fp8probe.analysis.loading import LoadError, resolve_callable

        try:
            resolve_callable(optimizer_spec)
        except (LoadError, ValueError) as exc:
            raise _bad_option("optimizer_spec", _fail(exc).message) from exc
    if steps and (no_grad or stream):
        raise UsageFailure(f"--steps trains the model, which needs gradients: expected --steps 0 with "
                           f"{'--stream' if stream else '--no-grad'}, got --steps {steps}")
    if no_grad or stream:
        _refuse_backward_options("--stream" if stream else "--no-grad", {"loss_spec": loss_spec,
                                                                         "sensitivity": sensitivity,
                                                                         "budget_spec": budget_spec})
    if sweeps and stream:
        raise UsageFailure("--sweeps captures the whole model with a backward pass and --stream runs forward only, "
                           "one block at a time: run the sweeps on a model that fits in memory, or drop --sweeps")
    run_name = name or Path(model.split(":")[0]).stem or "analysis"
    out = Path(out_dir) if out_dir else _default_out(run_name)
    world = _join_ranks(device)
    stale = _check_out_on_main(world, out, "run", overwrite)
    if threads:
        torch.set_num_threads(threads)  # this process only runs this command
    ckpt = None if stream else _weights_checkpoint(model, inputs, factory, note=world.is_main)
    # (a weights-only run names every model-run option it did not use in its own note, --lr included)
    _note_unused_options(strategy, steps, model_run=ckpt is None, no_e2e=no_e2e and not (no_grad or stream))
    if ckpt is not None:
        if not world.is_main:  # weights-only streaming is not sharded: rank 0 reads the checkpoint
            return
        _analyze_weights(ckpt, strategy, layers=layers, include_embeddings=include_embeddings, out=out, stale=stale,
                         run_name=run_name, quiet=quiet, no_html=no_html, output_format=output_format, sweeps=sweeps,
                         unused=_given(_MODEL_RUN_OPTIONS))
        return
    _replay_process()
    trust = _Trust.of(trust_pickle, trust_pickle_model, trust_pickle_inputs)
    loaded, read = _load_streamed(model, inputs, factory, trust, note=world.is_main, seq_len=seq_len,
                                  batch_size=batch_size, batches=batches) if stream else \
        _load(model, inputs, factory, trust, seq_len, batch_size, batches)
    _set_mode(loaded, train_mode)
    batch_list = read.batches
    if world.is_main:
        _echo_checkpoint_note(read.note)
    try:
        n_total = len(batch_list if batch_list is not None else loaded.batches or [])
        n_total = min(n_total, batches) if batches else n_total
        # No bar when stderr is not a terminal (CI, pipes): its label line would precede an error line.
        show_bar = not quiet and output_format == "table" and n_total > 0 and sys.stderr.isatty() and world.is_main
        stage_line = _StageLine() if show_bar else None
        # Failed recipes are recorded in the errors table and counted below; no warning spam.
        with warnings.catch_warnings(record=True), contextlib.ExitStack() as stack:
            bar = stack.enter_context(click.progressbar(length=n_total, label="analyze", file=sys.stderr)
                                      if show_bar else _nullbar())
            if stage_line is not None:
                stack.callback(stage_line.close)  # (after the bar's own last line: the stages follow it)
            warnings.simplefilter("always", RuntimeWarning)
            results = analyze(loaded, batch_list, strategy, threshold=threshold, layers=layers, batches=batches,
                              stages=stage_line,
                              device=device, seed=seed, loss=loss_spec, progress=lambda done, total: bar.update(1),
                              name=run_name, model_desc=loaded.description,
                              inputs_desc=read.desc, gemms=gemms, e2e=not no_e2e,
                              budget=budget, sensitivity=sensitivity, steps=steps, lr=lr, optimizer=optimizer_spec,
                              options=options, grad=not (no_grad or stream))
        if sweeps:
            from fp8probe.analysis.sweeps import sweep_both

            bs_res, th_res = sweep_both(loaded, batch_list, layers=layers, batches=batches, device=device, seed=seed,
                                        loss=loss_spec, name=run_name, model_desc=loaded.description,
                                        inputs_desc=read.desc, gemms=gemms,
                                        e2e=not no_e2e, budget=budget, row_scale=int8_row_scale)
            results = results.merged(bs_res, th_res)
    except (LoadError, ValueError, TypeError) as exc:
        raise _analysis_failure(exc, inputs) from exc
    if not world.is_main:  # every rank holds the same results; rank 0 alone writes and reports them
        return
    remove_outputs(stale)
    paths = results.save(out)
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
        from fp8probe.report.verdict import model_mode, verdict_lines

        click.echo(json.dumps(_json_safe({"results": str(paths["json"]), "html": None if html is None else str(html),
                                          "model_mode": model_mode(results.metadata),
                                          "loss": results.metadata["loss"], "strategy_errors": n_errors,
                                          "coverage": results.metadata["coverage"],
                                          "verdict": verdict_lines(results.tables, results.metadata),
                                          "recommendation": results.to_json()["tables"].get("recommendation", []),
                                          "worst_fprop": worst}), indent=1, default=str))
        return
    loss = results.metadata["loss"]
    from fp8probe.report.verdict import gemm_sites_text, inputs_shape_text

    # (sites and calls both named, with what the batches held: the coverage line below counts calls, QA C3)
    shape = inputs_shape_text(results.metadata)
    click.echo(f"{gemm_sites_text(len(results.tables['layers']), results.tables, results.metadata)}"
               + (f", inputs: {_printable(shape)}" if shape else f", {results.metadata['batches']} batch(es)")
               + f", loss: {loss['kind']} ({_printable(loss['detail'])})")
    _echo_summary(results)  # the verdict lines (coverage line included), then the worst rows per strategy
    if n_errors:
        click.echo(f"note: {n_errors} strategy/layer combination(s) failed; see the errors table", err=True)
    _warn_no_gradient(results)
    click.echo(f"results: {_printable(paths['json'])}" + (f"; report: {_printable(html)}" if html else "; no HTML report written"))


#: What analyze's options that act on the loss, the backward pass or the end-to-end runs do, for the refusal of
#: each in a forward-only run (--no-grad, --stream), where none of those exists.
_BACKWARD_OPTIONS = {"loss_spec": "is the loss a backward pass differentiates",
                     "sensitivity": "chooses how the end-to-end runs rank the layers",
                     "budget_spec": "is what the end-to-end runs must stay within"}


def _unless_from_env(values: dict[str, object]) -> dict[str, object]:
    """``values`` (parameter name -> value) with those set in the environment back at their defaults: a forward-only
    run notes them (_refuse_backward_options) and must not fail on a loss module that only imports where the
    training steps of the same CI job run."""
    ctx = click.get_current_context()
    defaults = {p.name: p.default for p in ctx.command.params}
    return {name: defaults[name] if _from_env(ctx, name) else value for name, value in values.items()}


def _refuse_backward_options(mode: str, values: dict[str, object]) -> None:
    """UsageFailure for the first of ``values`` (parameter name -> value) typed on the command line for a forward-only
    run: it would be ignored. One stderr note for those set in the environment: a variable set for a whole CI job
    (FP8PROBE_ANALYZE_LOSS) must not fail its forward-only runs, but it must not be ignored silently either. A
    default value is not a choice and passes."""
    ctx = click.get_current_context()
    from_env = []
    for name, value in values.items():
        given = _given((name,))
        if not given:
            continue
        flag = given[0]
        if _from_env(ctx, name):
            from_env.append(_env_said(ctx, name, flag))
            continue
        raise UsageFailure(f"{flag} {_BACKWARD_OPTIONS[name]}, and {mode} runs forward only (no loss, no backward, "
                           f"no end-to-end runs): expected no {flag} with {mode}, got {flag} {value}")
    if from_env:
        click.echo(f"note: {', '.join(from_env)} from the environment had no effect here: {mode} runs forward only "
                   "(no loss, no backward, no end-to-end runs)", err=True)


def _weights_checkpoint(model: str, inputs: str | None, factory: str | None,
                       note: bool = True):  # -> Checkpoint | None
    """MODEL as a checkpoint for a weights-only analysis: it holds tensors but no model and neither --factory
    nor --inputs asks for the model to be run; None sends it down the model-loading path. ``note``: print its memory
    note (under torchrun rank 0 alone, which reads it)."""
    from fp8probe.analysis.loading import LoadError
    from fp8probe.analysis.weights_only import open_checkpoint

    if factory is not None or inputs is not None:
        if model.endswith((".safetensors", ".index.json")) and factory is None:
            raise UsageFailure(f"{model} holds weights only: to run the model on --inputs pass --factory "
                               "module:function that builds it (the weights are loaded into it); without --inputs "
                               "the weights alone are analysed")
        return None
    try:
        ckpt = open_checkpoint(model)
    except (LoadError, ValueError, OSError) as exc:
        raise _fail(exc) from exc
    if ckpt is not None and note:
        _echo_checkpoint_note(ckpt.note)
    return ckpt


def _weights_progress(quiet: bool, output_format: str, total: int):  # -> context manager with .update(n)
    show = not quiet and output_format == "table" and total > 0 and sys.stderr.isatty()
    return click.progressbar(length=total, label="weights", file=sys.stderr) if show else _nullbar()


def _weights_banner(results: "object") -> None:
    """The CLI's statement of what a weights-only result is and is not (stderr, so --format json stays clean)."""
    info = results.metadata["weights_only"]
    shares = ", ".join(f"{reason}: {100 * share:.2f} %" for reason, share in info["skipped_share_by_reason"].items())
    click.echo(f"weights-only analysis: {info['analysed']} weight(s) = {100 * info['param_share_analysed']:.2f} % of "
               f"parameters; skipped {info['skipped']} tensor(s)" + (f" ({shares})" if shares else ""), err=True)
    if info.get("transposed"):  # absent from results written before the Conv1D layout was read
        click.echo(f"{len(info['transposed'])} weight(s) stored [in, out] (Hugging Face Conv1D) analysed as their "
                   "GEMM's [out, in] operand", err=True)
    for layer, key in (info.get("tied") or {}).items():
        click.echo(f"{key} is also the {layer} weight (tied word embeddings, stored once): analysed as {layer}",
                   err=True)
    for key, kept in (info.get("same_tensor") or {}).items():
        click.echo(f"{key} is the same tensor as {kept} (tied, saved under both names): counted and analysed once, "
                   f"as {kept}", err=True)
    click.echo(f"note: {info['note']}", err=True)


#: Options that only act on a model run (activations, gradients, the end-to-end part), of analyze and the sweeps (each
#: command's own, through _given): a weights-only run says it did not use them rather than dropping them silently.
_MODEL_RUN_OPTIONS = ("threshold", "batches", "seed", "loss_spec", "no_e2e", "budget_spec", "sensitivity", "steps",
                      "lr", "optimizer_spec", "no_grad", "gemms", "device", "train_mode")


def _note_unused_options(strategy: str, steps: int, model_run: bool = True, no_e2e: bool = False) -> None:
    """One stderr note naming the options the user set that no chosen recipe (or no training run) uses, and one for
    the end-to-end options of a --no-e2e run."""
    from fp8probe.analysis.strategies import resolve

    try:
        names = {s.name for s in resolve(strategy)}
    except (KeyError, ValueError):
        return  # (an unknown strategy is reported where it is resolved)
    unused = []
    if "delayed" not in names:
        unused += _given(("amax_history", "amax_compute", "margin"))
    if "int8" not in names:
        unused += _given(("int8_row_scale",))
    if not names - {"int8", "switchback"}:  # (exact int32 GEMMs: no FP8 accumulation to simulate)
        unused += _given(("accum_bits", "promote_every"))
    if not steps and model_run:
        unused += _given(("lr", "optimizer_spec"))
    if unused:
        click.echo(f"note: {', '.join(unused)} had no effect here (no recipe or run of this command uses "
                   f"{'it' if len(unused) == 1 else 'them'}: --strategy {strategy}"
                   f"{'' if steps or not model_run else ', no --steps'})", err=True)
    if no_e2e and model_run:  # (a forward-only run refuses or notes these itself: _refuse_backward_options)
        e2e_only = _given(("budget_spec", "sensitivity"))
        if e2e_only:
            click.echo(f"note: {', '.join(e2e_only)} had no effect here: --no-e2e skips the end-to-end runs that "
                       f"{'it sets' if len(e2e_only) == 1 else 'they set'} up", err=True)


def _given(names: Sequence[str]) -> list[str]:
    """The command-line flags of the current command's parameters ``names`` that the user set (command line or
    environment), e.g. ["--steps"]."""
    ctx = click.get_current_context()
    given = []
    for param in ctx.command.params:
        if param.name in names and ctx.get_parameter_source(param.name) in (
                click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT):
            given.append(max(param.opts, key=len))
    return given


def _note_model_run_unused(unused: Sequence[str]) -> None:
    """The weights-only note naming the model-run options the user set (``_given(_MODEL_RUN_OPTIONS)``)."""
    if unused:
        click.echo(f"note: {', '.join(unused)} act{'s' if len(unused) == 1 else ''} on a model run and had no effect: "
                   "no model was run (weights only)", err=True)


def _analyze_weights(ckpt: "object", strategy: str, *, layers: str | None, include_embeddings: bool, out: Path,
                     stale: list[Path], run_name: str, quiet: bool, no_html: bool, output_format: str,
                     sweeps: bool = False, unused: Sequence[str] = ()) -> None:
    import json

    from fp8probe.analysis.loading import LoadError
    from fp8probe.analysis.weights_only import analyze_weights, classify, sweep_blocksize_weights
    from fp8probe.report.verdict import nan_inf_warning

    n = sum(1 for e in ckpt.entries if not classify(e, include_embeddings).skip)
    try:
        with _weights_progress(quiet, output_format, n) as bar:
            results = analyze_weights(ckpt, strategy, layers=layers, include_embeddings=include_embeddings,
                                      progress=lambda done, total: bar.update(1), name=run_name)
        if sweeps and not results.tables["layers"].empty:  # the block-size sweep of the weights; no threshold sweep
            results = results.merged(sweep_blocksize_weights(ckpt, layers=layers, include_embeddings=include_embeddings,
                                                             name=run_name))
    except (LoadError, ValueError, TypeError) as exc:
        raise _fail(exc) from exc
    if results.tables["layers"].empty:
        reasons = list(dict.fromkeys(str(r) for r in results.tables["skipped"]["reason"]))
        raise UsageFailure(f"{ckpt.description} has no weight to analyse (every tensor was skipped"
                           + (f" or not matched by --layers {layers!r}" if layers else "")
                           + (f": {'; '.join(reasons[:3])}" if reasons else "")
                           + "; see --include-embeddings)")
    remove_outputs(stale)
    paths = results.save(out)
    html = None
    if not no_html:
        from fp8probe.report.render import render_report

        html = render_report(results.to_json(), out / "index.html")
    ops = results.tables["operands"]
    worst = ops.sort_values("sqnr_db", na_position="first").head(10)[
        ["layer", "strategy", "sqnr_db", "underflow_frac", "saturation_frac"]].to_dict("records")
    _weights_banner(results)
    nan_inf = nan_inf_warning(results.tables.get("tensors", []), "the weights")  # (as a full analysis warns)
    if nan_inf:
        click.echo(f"warning: {_printable(nan_inf)}", err=True)
    if sweeps:
        click.echo("note: --sweeps on weights only: the block-size sweep of the weights is in the results "
                   "(blocksize_sweep); the outlier-threshold sweep needs activations, so it did not run", err=True)
    _note_model_run_unused(unused)
    if output_format == "json":
        click.echo(json.dumps({"results": str(paths["json"]), "html": None if html is None else str(html),
                               "mode": "weights-only", "model_mode": None,
                               "weights_only": results.metadata["weights_only"],
                               "worst_weight": [{k: (None if isinstance(v, float) and v != v else v)
                                                 for k, v in r.items()} for r in worst]}, indent=1, default=str))
        return
    click.echo(f"{'layer':<40} {'strategy':<15} {'weight SQNR dB':>14} {'underflow':>9} {'clipped':>8}")
    for r in worst:
        click.echo(f"{_printable(r['layer'])[:40]:<40} {r['strategy']:<15} {r['sqnr_db']:>14.2f} "
                   f"{100 * r['underflow_frac']:>7.3f} % {100 * r['saturation_frac']:>6.3f} %")
    click.echo(f"results: {_printable(paths['json'])}" + (f"; report: {_printable(html)}" if html else "; no HTML report written"))


class _nullbar:
    """Stand-in for click.progressbar when --quiet."""

    def __enter__(self) -> "_nullbar":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int) -> None:
        return None


# -- report / compare / sweep / demo commands (report engineer) --
def _load_results_or_fail(path: str, role: str = "results") -> dict:
    """A validated results dict from ``path``, or one UsageFailure line saying what the file is instead."""
    from fp8probe.analysis.loading import PLAIN_PICKLE, LoadError, sniff
    from fp8probe.report.render import load_results

    p = Path(path)
    if not p.is_file():
        raise UsageFailure(f"{role} file {p} does not exist: pass the results.json that fp8probe analyze, a sweep "
                           "or demo wrote")
    try:
        kind = sniff(p)  # the same first-bytes check that names wrong files given as models
    except LoadError as exc:
        raise _fail(exc) from exc
    if kind in ("zip", "pickle", PLAIN_PICKLE):
        raise UsageFailure(f"{p} is a PyTorch file (a model or tensors?), not an fp8probe results JSON: run "
                           f"fp8probe analyze {p} first and pass the results.json it writes")
    try:
        return load_results(p)
    except UnicodeDecodeError:
        raise UsageFailure(f"{p} is a binary file, not an fp8probe results JSON: pass the results.json that "
                           "fp8probe analyze, a sweep or demo wrote") from None
    except (ValueError, RecursionError) as exc:
        failure = _fail(exc)
        failure.message += "; pass a results.json written by fp8probe analyze, a sweep or demo"
        raise failure from exc


def _render_or_fail(render, data: dict, out: Path, source: str, **kwargs):  # type: ignore[no-untyped-def]
    """render(data, out, **kwargs); a results document that passes the schema check but has malformed
    records (a missing column, text where a number belongs) is bad input, not an internal error."""
    try:
        return render(data, out, **kwargs)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise UsageFailure(f"{source} has malformed tables ({type(exc).__name__}: {_single_line(str(exc))[:200]}); "
                           "write it again with fp8probe analyze (re-run with --debug for the traceback)") from exc


@cli.command("report")
@click.argument("results", nargs=-1, required=True, type=click.Path(dir_okay=False))
@_option("-o", "--out", "out_html", type=click.Path(dir_okay=False), default="report.html", show_default=True,
              help="HTML file to write (self-contained: inline CSS and images); an existing file is replaced "
                   "atomically")
@_option("--keep-16bit-db", type=FiniteFloat(None), default=20.0, show_default=True,
              help="isolated fprop SQNR threshold in dB: the report lists and shades the layers below it (each layer "
                   "judged alone; the validated keep-set is the end-to-end recommendation's)")
def report_cmd(results: tuple[str, ...], out_html: str, keep_16bit_db: float) -> None:
    """Render RESULTS.json files of ONE model (an analyze run and its sweep runs, in any order) into one
    self-contained HTML report."""
    from fp8probe.report.merge import merge_results
    from fp8probe.report.render import render_report
    from fp8probe.report.schema import ResultsError

    if not out_html.strip():
        raise UsageFailure("-o is empty: expected the HTML file to write, e.g. -o report.html")
    out = Path(out_html)
    for path in results:
        if out.resolve() == Path(path).resolve():
            raise UsageFailure(f"-o {out} would overwrite the results file it renders: choose another file name")
    if len(set(Path(p).resolve() for p in results)) != len(results):
        raise UsageFailure("the same results file is given twice: pass each results.json once")
    docs = [_load_results_or_fail(path) for path in results]
    try:
        data = docs[0] if len(docs) == 1 else merge_results(docs, list(results))
    except ResultsError as exc:
        raise _fail(exc) from exc
    path = _render_or_fail(render_report, data, out, " + ".join(results), keep_16bit_db=keep_16bit_db)
    if data["metadata"].get("inputs_differ"):
        click.echo("note: the merged runs measured other inputs (" + "; ".join(data["metadata"]["inputs_differ"])
                   + "): the report shows them side by side, not one data set", err=True)
    click.echo(f"report written to {_printable(path)}" + (f" ({len(docs)} results merged: "
                                             f"{', '.join(data['metadata']['merged_kinds'])})" if len(docs) > 1 else ""))


@cli.command("compare")
@click.argument("baseline", type=click.Path(dir_okay=False))
@click.argument("current", type=click.Path(dir_okay=False))
@_option("--max-sqnr-drop", type=FiniteFloat(0.0), default=1.0, show_default=True,
              help="fail when any layer's SQNR (any strategy, any GEMM) drops by more than this many dB")
@_option("--max-new-outlier-cols", type=click.IntRange(min=0), default=0, show_default=True,
              help="fail when a layer gains more than this many outlier feature columns")
@_option("--max-underflow-increase", type=FiniteFloat(0.0), default=1.0, show_default=True,
              help="fail when an operand's underflow fraction rises by more than this many percentage points")
@_option("--max-new-nonfinite", type=click.IntRange(min=0), default=0, show_default=True,
              help="fail when a GEMM's low-precision output (or a quantised operand) gains more than this many NaN/Inf "
                   "values where the float64 reference is finite")
@_option("--max-loss-increase", type=FiniteFloat(0.0), default=None,
              help="fail when the size of a strategy's end-to-end relative loss change, |loss change|, grows by more "
                   "than this over the baseline's (0.005 = half a percentage point; a drop counts like a rise, as in "
                   "the loss budget); off by default")
@_option("--out", "out_dir", type=click.Path(file_okay=False), default="reports/compare", show_default=True,
              help="directory for compare.html and compare.md")
@_option("--overwrite", is_flag=True, help="replace compare.html / compare.md already in --out")
@_option("--markdown", "markdown_file", type=click.Path(dir_okay=False), default=None,
              help="also append the Markdown summary to this file (e.g. $GITHUB_STEP_SUMMARY)")
@_option("--allow-missing", is_flag=True,
              help="do not fail when layers / recipes / GEMMs of the baseline are missing from current (they are "
                   "still listed)")
@click.pass_context
def compare_cmd(ctx: click.Context, baseline: str, current: str, max_sqnr_drop: float, max_new_outlier_cols: int,
                max_underflow_increase: float, max_new_nonfinite: int, max_loss_increase: float | None, out_dir: str,
                overwrite: bool,
                markdown_file: str | None, allow_missing: bool) -> None:
    """Gate CURRENT.json against BASELINE.json: exit 1 naming the layers when a gate is exceeded or baseline
    rows are missing, else 0. Only quantised GEMMs are gated (see the gate text)."""
    from fp8probe.report.compare import Gates, compare_markdown, compare_results, failed_text, gated_text
    from fp8probe.report.render import render_compare

    out = Path(out_dir)
    # No output may name an input (as report -o already refuses): the baseline would be appended to
    # or replaced, and the next run would compare against a broken file.
    outputs = [("--markdown", Path(markdown_file))] if markdown_file else []
    outputs += [("--out", out / name) for name in ("compare.html", "compare.md")]
    for option, target in outputs:
        for role, given in (("baseline", baseline), ("current", current)):
            if target.resolve() == Path(given).resolve():
                raise UsageFailure(f"{option} would write {_printable(target)}, which is the {role} results file: "
                                   "choose another output")
    if markdown_file:  # checked before anything is written: a verdict must not end as a usage error after it
        target = Path(markdown_file)
        if target.is_dir():
            problem = "it is a directory"
        elif target.exists():
            problem = "" if os.access(target, os.W_OK) else "it is not writable"
        elif target.resolve().parent == out.resolve():
            problem = ""  # (--out, made below)
        elif not target.parent.is_dir():
            problem = f"there is no directory {_printable(target.parent)}"
        else:
            problem = "" if os.access(target.parent, os.W_OK) else f"{_printable(target.parent)} is not writable"
        if not problem and target.resolve().parent != out.resolve():
            # os.access says yes to root anywhere (/proc/x.md): open it as the append will, and take back a file
            # made only for the test (the verdict had been lost to an exit 2 after compare.html was written)
            existed = target.exists()
            try:
                with open(target, "a", encoding="utf-8"):
                    pass
            except OSError as exc:
                problem = exc.strerror or str(exc)
            else:
                if not existed:
                    target.unlink(missing_ok=True)
        if problem:
            raise UsageFailure(f"--markdown {_printable(target)} cannot be appended to: {problem}; expected a "
                               "writable file path (nothing was written)")
    stale = _check_out(out, "compare", overwrite)
    base, cur = _load_results_or_fail(baseline, "baseline"), _load_results_or_fail(current, "current")
    try:
        gates = Gates(max_sqnr_drop, max_new_outlier_cols, max_underflow_increase, allow_missing=allow_missing,
                      max_loss_increase=max_loss_increase, max_new_nonfinite=max_new_nonfinite)
        comparison = compare_results(base, cur, gates)
    except ValueError as exc:
        raise _fail(exc) from exc
    except (KeyError, TypeError, AttributeError) as exc:
        raise UsageFailure(f"{baseline} or {current} has malformed tables ({type(exc).__name__}: "
                           f"{_single_line(str(exc))[:200]}); write them again with fp8probe analyze") from exc
    remove_outputs(stale)
    out.mkdir(parents=True, exist_ok=True)
    html = _render_or_fail(render_compare, comparison, out / "compare.html", f"{baseline} / {current}")
    md = compare_markdown(comparison)
    atomic_write_text(out / "compare.md", md)
    if markdown_file and Path(markdown_file).resolve() != (out / "compare.md").resolve():  # (that one holds it)
        append_text(markdown_file, md + "\n")  # appended, not replaced: GITHUB_STEP_SUMMARY is shared by every step
    click.echo(f"compare report written to {_printable(html)} and {_printable(out / 'compare.md')}")
    click.echo(gated_text(comparison))
    if comparison["passed"]:
        click.echo("PASS: no gate exceeded")
        return
    click.echo(f"FAIL: {len(comparison['violations'])} gate violation(s): {failed_text(comparison, _printable)}",
               err=True)
    for v in comparison["violations"]:
        click.echo(f"  {v['gate']}: {_printable(v['layer'])}: {_printable(v['detail'])}", err=True)
    ctx.exit(EXIT_GATE_FAILED)


# -q, --threads and --format: the same meaning on every command that runs a model (analyze defines its own copies).
_RUN_OUTPUT_OPTIONS = (
    _option("--quiet", "-q", is_flag=True, help="no progress bar or progress lines"),
    _option("--threads", type=click.IntRange(min=1, max=MAX_THREADS), default=None,
                 help="torch intra-op CPU threads (default: torch's choice)"),
    _option("--format", "output_format", type=click.Choice(["table", "json"]), default="table",
                 show_default=True, help="table for people, json (paths and recommendations) for scripts"),
)


class _StageLine:
    """The end-to-end part's progress on the capture bar's line once the bar is full (analysis Runner.stage): the
    stage, its passes (of how many, when known) and the seconds since it began, rewritten in place; close() leaves
    the time it all took there, and the bar's own exit ends the line. Drawn only where the bar is (a terminal, no -q,
    --format table)."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.width = 0
        self.label: str | None = None
        self.started = self.first = 0.0

    def __call__(self, label: str, done: int, total: int | None) -> None:
        import time

        if label != self.label:
            self.label, self.started = label, time.perf_counter()
            self.first = self.first or self.started
        seconds = time.perf_counter() - self.started
        count = f"{done}/{total}" if total is not None else f"{done}"
        self._show(f"{label}: {count} pass{'es' if (total if total is not None else done) != 1 else ''}, "
                   f"{seconds:.0f} s")

    def close(self) -> None:
        """The line left as what the stages took in all (the capture's bar it replaced had said 100 %)."""
        import time

        if self.width:
            self._show(f"end to end done in {time.perf_counter() - self.first:.0f} s")
            self.width = 0

    def _show(self, text: str) -> None:
        """``text`` over the line, padded over the longer text before it."""
        self.stream.write("\r" + text + " " * max(self.width - len(text), 0))
        self.stream.flush()
        self.width = len(text)


def _progress(label: str, n_total: int, quiet: bool, output_format: str):  # type: ignore[no-untyped-def]
    """A click progress bar on stderr when it is a terminal (and not -q / --format json), else a no-op."""
    if quiet or output_format != "table" or n_total <= 0 or not sys.stderr.isatty():
        return _nullbar()
    return click.progressbar(length=n_total, label=label, file=sys.stderr)


def _replay_process() -> None:
    """This process captures and replays a model: let glibc reuse freed large blocks (capture.keep_freed_blocks)
    and keep the garbage collector off the objects loaded so far (capture.freeze_loaded_objects). Only in the
    command-line process itself (fp8probe._IS_CLI), like its OpenMP and huge-page settings: a command run
    in-process by a library user or a test (click's CliRunner) leaves their process alone."""
    import fp8probe
    from fp8probe.analysis import capture

    if fp8probe._IS_CLI:
        capture.keep_freed_blocks()
        capture.freeze_loaded_objects()


@contextlib.contextmanager
def _threads(threads: int | None):  # type: ignore[no-untyped-def]
    """torch.set_num_threads(threads) for the command, restored after (CliRunner runs commands in-process)."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sweep_options(func):
    """The model/input options of `analyze` (same names, same meaning), shared by both sweep commands."""
    options = [
        click.argument("model", type=str),
        _option("--inputs", type=click.Path(dir_okay=False), default=None, help=_INPUTS_HELP),
        _SEQ_LEN,
        _BATCH_SIZE,
        _option("--factory", default=None,
                     help="module:function or file.py:function building the model for a state_dict"),
        *_TRUST_OPTIONS,
        _option("--loss", "loss_spec", default=None,
                     help=_LOSS_HELP),
        _option("--layers", default=None, callback=_as_typed,
                help="regular expression on GEMM names: sweep only matching ones"),
        _option("--gemms", default="all", show_default=True, help=_GEMMS_HELP),
        _option("--batches", type=click.IntRange(min=1), default=None, help="use at most this many batches"),
        _option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True),
        _option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True),
        _option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
                     help="output directory (default reports/<name>-<command>/)"),
        _option("--overwrite", is_flag=True, help=_OVERWRITE_HELP),
        _option("--name", default=None, help="run name (default: the model file's stem)"),
        _NO_HTML,
        *_RUN_OUTPUT_OPTIONS,
        _option("--budget", "budget_spec", default="0.01", show_default=True,
                     help="end-to-end budget for the model-wide value: relative loss change either way (0.01 or 1%) or "
                          "kl:0.01"),
        _option("--no-e2e", is_flag=True, help="skip validating one model-wide value end to end"),
        _TRAIN_MODE,
    ]
    for opt in reversed(options):
        func = opt(func)
    return func


#: The item of --blocksizes that stands for the doublings between its neighbours (32,64,...,4096).
RANGE_ITEM = "..."


def _parse_blocksizes(text: str) -> list[int]:
    """--blocksizes: comma-separated integers in 1..MAX_BLOCKSIZE (any size works: blocks run over the
    flattened tensor, the last one may be partial; powers of two are only the usual choice), or a doubling
    range ``32,64,...,4096`` (32, 64, 128, ..., 4096): the two sizes before ``...`` give the start and the
    doubling, the one after it the end."""
    expected = "comma-separated whole numbers like 64,128,256, or a doubling range like 32,64,...,4096"
    items = _list_items("blocksizes", text, expected)
    sizes = []
    for item in items:
        if item in (RANGE_ITEM, "…"):
            sizes.append(None)
            continue
        try:
            bs = int(item)
        except ValueError:
            raise _bad_option("blocksizes", f"expected {expected}, got {item!r} in {text!r}") from None
        if not 1 <= bs <= MAX_BLOCKSIZE:
            raise _bad_option("blocksizes", f"expected block sizes between 1 and {MAX_BLOCKSIZE}, got {bs}")
        sizes.append(bs)
    if None not in sizes:
        return sizes
    at = sizes.index(None)
    if sizes.count(None) > 1 or at < 2 or at != len(sizes) - 2:
        raise _bad_option("blocksizes", f"expected a doubling range as start,2*start,...,end (one '...' with two "
                                        f"sizes before it and one after it, like 32,64,...,4096), got {text!r}")
    first, second, end = sizes[at - 2], sizes[at - 1], sizes[-1]
    if second != 2 * first:
        raise _bad_option("blocksizes", f"a range doubles: expected the two sizes before '...' to be start,2*start "
                                        f"(like 32,64), got {first},{second} in {text!r}")
    ratio = end // second
    if end <= second or end % second or ratio & (ratio - 1):
        raise _bad_option("blocksizes", f"a range doubles from {second}: expected an end of {second} times a power of "
                                        f"two ({2 * second}, {4 * second}, ...), got {end} in {text!r}")
    sizes = sizes[:at]
    while sizes[-1] < end:
        sizes.append(2 * sizes[-1])
    return sizes


def _parse_thresholds(text: str) -> list[float]:
    """--thresholds: comma-separated finite numbers >= 0 (0 = no outlier decomposition)."""
    expected = "comma-separated finite numbers >= 0 like 0,2,6"
    values = []
    for item in _list_items("thresholds", text, expected):
        try:
            t = float(item)
        except ValueError:
            raise _bad_option("thresholds", f"expected {expected}, got {item!r} in {text!r}") from None
        if not math.isfinite(t) or t < 0:
            raise _bad_option("thresholds", f"expected {expected}, got {item!r} in {text!r}")
        values.append(t)
    return values


def _run_sweep(kind: str, model: str, values: list, inputs: str | None, seq_len: int | None, batch_size: int | None,
               factory: str | None, trust_pickle: bool, trust_pickle_model: bool, trust_pickle_inputs: bool,
               loss_spec: str | None, layers: str | None, gemms: str, batches: int | None, device: str, seed: int,
               out_dir: str | None, overwrite: bool, name: str | None, quiet: bool, threads: int | None,
               output_format: str, include_embeddings: bool = False, budget_spec: str = "0.01",
               no_e2e: bool = False, int8_row_scale: str | None = None, no_html: bool = False,
               train_mode: bool = False) -> None:
    import json

    from fp8probe.analysis.e2e import parse_budget

    from fp8probe.analysis.gemms import coverage_line
    from fp8probe.analysis.loading import LoadError
    from fp8probe.analysis.sweeps import sweep_blocksize, sweep_threshold
    from fp8probe.report.render import render_report
    from fp8probe.report.verdict import THRESHOLD_ZERO, budget_text, model_mode, pct, signed_pct

    _check_names(model, factory, loss_spec)
    _check_device(device)
    _check_layers(layers)
    _check_gemms(gemms)
    seq_len, batch_size = _check_text_options(inputs, seq_len, batch_size)
    try:  # before --out, like the other options the user typed
        budget = parse_budget(budget_spec)
    except ValueError as exc:
        raise _bad_option("budget_spec", _fail(exc).message) from exc
    run_name = name or Path(model.split(":")[0]).stem or kind
    out = Path(out_dir) if out_dir else _default_out(run_name, f"-{kind}")
    world = _join_ranks(device)
    stale = _check_out_on_main(world, out, "run", overwrite)
    fn, arg = (sweep_blocksize, "blocksizes") if kind == "sweep-blocksize" else (sweep_threshold, "thresholds")
    extra = {} if int8_row_scale is None else {"row_scale": int8_row_scale}
    ckpt = _weights_checkpoint(model, inputs, factory, note=world.is_main)
    if ckpt is not None:
        if not world.is_main:  # weights-only streaming is not sharded: rank 0 reads the checkpoint
            return
        if kind != "sweep-blocksize":
            raise UsageFailure(f"{model} holds weights only, and outlier thresholds apply to activation columns: "
                               "sweep-threshold needs the model run on inputs (--factory with --inputs, a .pt2 program, "
                               "or the Hugging Face directory with --inputs, e.g. a .txt file its tokenizer reads)")
        _sweep_weights(ckpt, values, layers=layers, include_embeddings=include_embeddings, out=out, stale=stale,
                       run_name=run_name, no_html=no_html, output_format=output_format,
                       unused=_given(_MODEL_RUN_OPTIONS))
        return
    with _threads(threads):
        _replay_process()
        loaded, read = _load(model, inputs, factory, _Trust.of(trust_pickle, trust_pickle_model, trust_pickle_inputs),
                             seq_len, batch_size, batches)
        _set_mode(loaded, train_mode)
        batch_list = read.batches
        if world.is_main:
            _echo_checkpoint_note(read.note)
        n_total = len(batch_list if batch_list is not None else loaded.batches or [])
        n_total = min(n_total, batches) if batches else n_total
        try:
            with _progress(kind, n_total, quiet or not world.is_main, output_format) as bar:
                results = fn(loaded, batch_list, **{arg: values}, layers=layers, batches=batches, device=device,
                             seed=seed, loss=loss_spec, name=run_name, model_desc=loaded.description,
                             inputs_desc=read.desc, gemms=gemms,
                             progress=lambda done, total: bar.update(1), e2e=not no_e2e, budget=budget, **extra)
        except (LoadError, ValueError, TypeError) as exc:
            raise _analysis_failure(exc, inputs) from exc
        if not world.is_main:  # every rank holds the same results; rank 0 alone writes and reports them
            return
        remove_outputs(stale)
        paths = results.save(out)
        html = None if no_html else render_report(results.to_json(), out / "index.html")
    table = results.tables["blocksize_sweep" if kind == "sweep-blocksize" else "threshold_sweep"]
    rec = table[table["recommended"]]
    if kind == "sweep-blocksize":
        rec = rec[rec["target"] == "fprop"]
    rule = next(iter(results.metadata["recommendations"].values()))
    if output_format == "json":
        value, sqnr = ("blocksize", "sqnr_db") if kind == "sweep-blocksize" else ("threshold", "fprop_sqnr_db")
        click.echo(json.dumps(_json_safe({"results": str(paths["json"]), "html": None if html is None else str(html),
                                          "model_mode": model_mode(results.metadata), "rule": rule,
                                          "coverage": results.metadata["coverage"],
                                          "recommended": [{"layer": r["layer"], value: r[value], "fprop_sqnr_db": r[sqnr]}
                                                          for r in rec.to_dict("records")]}), indent=1, default=str))
        return
    width = max([24] + [min(len(_printable(x)), 60) for x in rec["layer"]])
    if kind == "sweep-blocksize":
        click.echo(f"{'layer':<{width}} {'recommended':>11} {'fprop SQNR dB':>13}")
        for r in rec.to_dict("records"):
            click.echo(f"{_middle_ellipsis(r['layer'], width):<{width}} {r['blocksize']:>11} {r['sqnr_db']:>13.2f}")
    else:
        click.echo(f"{'layer':<{width}} {'recommended':>11} {'fprop SQNR dB':>13} {'16-bit cols':>11}")
        for r in rec.to_dict("records"):
            click.echo(f"{_middle_ellipsis(r['layer'], width):<{width}} {r['threshold']:>11g} {r['fprop_sqnr_db']:>13.2f} "
                       f"{100 * r['frac_cols_16bit']:>9.1f} %")
    click.echo(coverage_line(results.metadata["coverage"]))
    _warn_nonfinite_operands(results.metadata)
    click.echo(f"rule: {rule}")
    for r in (results.tables["recommendation"].to_dict("records") if "recommendation" in results.tables else []):
        what = "block size" if r["kind"] == "blocksize" else "threshold"
        status = "within" if r["within_budget"] else "OVER"
        change = r["loss_rel_change"]
        if change is None or not math.isfinite(change):  # (a NaN high-precision loss: the e2e notes say why)
            click.echo(f"model-wide {what}: not validated, the end-to-end loss change is undefined (the "
                       "high-precision loss is not finite: NaN/Inf in the model or its inputs, or an empty batch)")
            continue
        # (with a KL budget the KL it was judged on, beside the bound: "loss …, within the budget (KL ≤ 1e-05)" gave
        # the loss alone)
        kl_div = r.get("kl_div")
        kl = f", KL {kl_div:.3g}" if r["budget_kind"] == "kl" and kl_div is not None and math.isfinite(kl_div) else ""
        # (what 0 means, and how much runs in low precision: "model-wide threshold 0" beside per-layer rows of 8 read
        # as a contradiction, and a threshold of 1 within the budget with 92 % of the FLOPs in 16-bit as a success)
        zero = THRESHOLD_ZERO if r["kind"] == "threshold" and r["value"] == 0 else ""
        share = r.get("lp_flop_share")
        lp = (f"; {pct(share)} of forward GEMM FLOPs in low precision"
              if isinstance(share, (int, float)) and math.isfinite(share) else "")
        click.echo(f"model-wide {what} {r['value']:g}{zero} ({r['strategy']}), validated end to end: loss "
                   f"{signed_pct(change)}{kl}, {status} the budget ({budget_text(r['budget'], r['budget_kind'])}){lp}")
    _warn_no_gradient(results)
    click.echo(f"results: {_printable(paths['json'])}" + (f"; report: {_printable(html)}" if html else "; no HTML report written"))


def _warn_nonfinite_operands(metadata: dict) -> None:
    from fp8probe.report.verdict import nonfinite_operands_warning

    line = nonfinite_operands_warning(metadata)
    if line:
        click.echo(f"warning: {_printable(line)}", err=True)


def _sweep_weights(ckpt: "object", sizes: list[int], *, layers: str | None, include_embeddings: bool, out: Path,
                   stale: list[Path], run_name: str, no_html: bool = False, output_format: str = "table",
                   unused: Sequence[str] = ()) -> None:
    import json

    from fp8probe.analysis.loading import LoadError
    from fp8probe.analysis.weights_only import sweep_blocksize_weights
    from fp8probe.report.render import render_report

    try:
        results = sweep_blocksize_weights(ckpt, sizes, layers=layers, include_embeddings=include_embeddings,
                                          name=run_name)
    except (LoadError, ValueError, TypeError) as exc:
        raise _fail(exc) from exc
    if results.tables["layers"].empty:
        raise UsageFailure(f"{ckpt.description} has no weight to sweep (every tensor was skipped"
                           + (f" or not matched by --layers {layers!r}" if layers else "") + ")")
    remove_outputs(stale)
    paths = results.save(out)
    html = None if no_html else render_report(results.to_json(), out / "index.html")
    _weights_banner(results)
    _warn_nonfinite_operands(results.metadata)
    _note_model_run_unused(unused)
    table = results.tables["blocksize_sweep"]
    rec = table[table["recommended"]].to_dict("records")
    rule = results.metadata["recommendations"]["blocksize_sweep"]
    if output_format == "json":  # as a model run's sweep prints it, with the weight SQNR in place of fprop's
        click.echo(json.dumps(_json_safe({"results": str(paths["json"]), "html": None if html is None else str(html),
                                          "mode": "weights-only", "model_mode": None,
                                          "weights_only": results.metadata["weights_only"], "rule": rule,
                                          "recommended": [{"layer": r["layer"], "blocksize": r["blocksize"],
                                                           "weight_sqnr_db": r["sqnr_db"]} for r in rec]}),
                              indent=1, default=str))
        return
    click.echo(f"{'layer':<40} {'recommended':>11} {'weight SQNR dB':>14}")
    for r in rec:
        click.echo(f"{_printable(r['layer'])[:40]:<40} {r['blocksize']:>11} {r['sqnr_db']:>14.2f}")
    click.echo(f"rule: {rule}")
    click.echo(f"results: {_printable(paths['json'])}" + (f"; report: {_printable(html)}" if html else "; no HTML report written"))


@cli.command("sweep-blocksize")
@_sweep_options
@_option("--blocksizes", default="32,64,128,256,512,1024,2048,4096", show_default=True,
              help="comma-separated block sizes (elements per fp32 absmax)")
@_option("--include-embeddings", is_flag=True, help=_EMBEDDINGS_HELP)
def sweep_blocksize_cmd(blocksizes: str, **kwargs: object) -> None:
    """Blockwise FP8 (bnb-e4m3 A/W, bnb-e5m2 G) error per layer x block size, scale overhead, recommended size."""
    _run_sweep("sweep-blocksize", values=_parse_blocksizes(blocksizes), **kwargs)  # type: ignore[arg-type]


@cli.command("sweep-threshold")
@_sweep_options
@_option("--thresholds", default="0,1,2,3,4,5,6,8", show_default=True,
              help="comma-separated LLM.int8 outlier thresholds (0 = no outlier decomposition)")
@_INT8_ROW_SCALE
def sweep_threshold_cmd(thresholds: str, **kwargs: object) -> None:
    """LLM.int8() fprop error vs outlier threshold per layer, fraction of 16-bit columns, recommended knee."""
    _run_sweep("sweep-threshold", values=_parse_thresholds(thresholds), **kwargs)  # type: ignore[arg-type]


DEMO_OUT = "reports/demo"


@cli.command("demo")
@_option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help=f"directory for index.html and the results JSON/CSV files [default: {DEMO_OUT}, replaced on "
                   "every run]")
@_option("--overwrite", is_flag=True, help="replace the fp8probe outputs already in an explicit --out")
@_option("--small", is_flag=True, hidden=True, help="one small batch (for the test suite)")
@_RUN_OUTPUT_OPTIONS[0]
@_option("--threads", type=click.IntRange(min=1, max=MAX_THREADS), default=None,
         help="torch intra-op CPU threads (default: 1: the demo's tensors are too small to share)")
@_RUN_OUTPUT_OPTIONS[2]
def demo_cmd(out_dir: str | None, overwrite: bool, small: bool, quiet: bool, threads: int | None,
             output_format: str) -> None:
    """Built-in demo: a seeded transformer with planted outlier features → analyze (all strategies) + both
    sweeps → one HTML report at reports/demo/index.html. Needs no inputs and no network."""
    import time

    start = time.perf_counter()
    # The demo is seeded and its default directory is its own: re-running it regenerates the same
    # report, so `fp8probe demo` twice in a row just works. An explicit --out follows the rule of
    # every other command (refuse to mix with existing outputs unless --overwrite).
    out = Path(out_dir) if out_dir else Path(DEMO_OUT)
    stale = _check_out(out, "demo", overwrite or out_dir is None)
    # The demo's tensors are tiny (<= 1024 x 256): intra-op threads buy nothing, and OpenMP spin-waiting
    # on shared cores made the whole demo 6x slower (181 s vs 28 s measured at load 6 on 2 cores).
    with _threads(threads or 1):
        _run_demo(out, stale, small, start, quiet or output_format == "json", output_format)


def _run_demo(out: Path, stale: list[Path], small: bool, start: float, quiet: bool, output_format: str) -> None:
    import json
    import time

    from fp8probe.analysis.demo_model import build_demo
    from fp8probe.analysis.pipeline import analyze
    from fp8probe.analysis.sweeps import sweep_both

    _replay_process()
    from fp8probe.report.verdict import verdict_lines

    def say(text: str) -> None:
        if not quiet:
            click.echo(text)

    n_batches, batch = (1, 4) if small else (4, 8)
    model, batches = build_demo(n_batches=n_batches, batch=batch)
    model_desc = (f"built-in demo encoder ({sum(p.numel() for p in model.parameters())} parameters, "
                  f"{model.cfg.n_layers} blocks, planted outlier dims {list(model.cfg.outlier_dims)})")
    inputs_desc = f"{n_batches} seeded batch(es) of {batch} x {model.cfg.seq} tokens"
    say(f"demo: analysing {model_desc} on {inputs_desc} ...")
    common = {"name": "demo", "model_desc": model_desc, "inputs_desc": inputs_desc}
    analysis = analyze(model, batches, strategy="all", **common)
    say(f"demo: analyze done ({time.perf_counter() - start:.1f} s); sweeping block sizes and thresholds ...")
    bs_res, th_res = sweep_both(model, batches, **common)
    remove_outputs(stale)
    analysis.save(out / "analyze")
    bs_res.save(out / "sweep-blocksize")
    th_res.save(out / "sweep-threshold")
    merged = analysis.merged(bs_res, th_res)
    atomic_write_text(out / "results.json", json.dumps(merged.to_json(), indent=1, allow_nan=False))
    html = merged.to_html(out / "index.html")
    lines = verdict_lines(merged.tables, merged.metadata)
    if output_format == "json":
        from fp8probe.report.verdict import model_mode

        # (the keys analyze's --format json has that the README promises for demo too)
        click.echo(json.dumps(_json_safe({"results": str(out / "results.json"), "html": str(html),
                                          "model_mode": model_mode(merged.metadata), "verdict": lines,
                                          "recommendation": merged.to_json()["tables"].get("recommendation", [])}),
                              indent=1, default=str))
        return
    for line in lines:
        click.echo(line)
    shown = _printable(out)
    click.echo(f"demo: report written to {_printable(html)} ({time.perf_counter() - start:.1f} s); "
               f"results JSON in {shown}/results.json (fp8probe report {shown}/results.json -o other.html re-renders it)")


def main() -> None:
    """Console-script entry point."""
    import signal

    import fp8probe

    # From here on click turns Ctrl-C into Abort (exit 130); the import-time handler is not needed.
    if signal.getsignal(signal.SIGINT) is fp8probe._exit_interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    cli(prog_name="fp8probe")


if __name__ == "__main__":
    sys.exit(main())
