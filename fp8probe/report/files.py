"""Output files: atomic writes (complete or absent, never half written) and output-directory claims (no silent mixing of runs)."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

# What each command writes into its output directory. A run's tables become <table>.csv; the names
# below are the tables docs/architecture.md defines, and a directory's own results.json names any
# others (tables added later), so a re-run also finds CSVs this list does not know.
RESULTS_JSON = "results.json"
REPORT_HTML = "index.html"
KNOWN_TABLES = ("layers", "gemm", "operands", "tensors", "histograms", "outliers", "blocksize_sweep",
                "threshold_sweep", "errors")
COMPARE_FILES = ("compare.html", "compare.md")
DEMO_SUBDIRS = ("analyze", "sweep-blocksize", "sweep-threshold")
OUTPUT_KINDS = ("run", "compare", "demo")


class OutputExistsError(FileExistsError):
    """An output directory already holds fp8probe outputs and overwriting was not requested."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same directory, fsync, then os.replace.

    Readers (and a run killed at any instant) see either the old file, no file, or the complete new
    one: the rename is atomic on POSIX and Windows within one filesystem, which is why the temp file
    lives next to the target (``.<name>.<random>.tmp``, removed again on any error). The file gets
    the usual mode of a new file (0o666 minus the umask), not mkstemp's 0o600, so CI artifacts and
    committed baselines are readable like any other output.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())  # the rename must not reach the disk before the data (power loss)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` as UTF-8 (newlines untranslated) to ``path`` atomically (see atomic_write_bytes)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _run_outputs(out: Path) -> list[Path]:
    """fp8probe run outputs (results.json, index.html, table CSVs) present directly in ``out``."""
    tables = set(KNOWN_TABLES)
    old = out / RESULTS_JSON
    try:
        tables |= {str(t) for t in json.loads(old.read_text(encoding="utf-8")).get("tables", {})}
    except (OSError, ValueError, AttributeError):
        pass  # absent or not ours: only the known names count
    names = [RESULTS_JSON, REPORT_HTML, *sorted(f"{t}.csv" for t in tables)]
    return [out / n for n in names if (out / n).is_file()]


def existing_outputs(out_dir: str | Path, kind: str) -> list[Path]:
    """The files a command of this ``kind`` ("run": analyze / sweeps; "compare"; "demo") would write
    that already exist in ``out_dir``, plus the hidden temp files a killed write left for them."""
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"kind must be one of {', '.join(OUTPUT_KINDS)}, got {kind!r}")
    out = Path(out_dir)
    if not out.is_dir():
        return []
    if kind == "compare":
        found = [out / n for n in COMPARE_FILES if (out / n).is_file()]
        names: Iterable[str] = COMPARE_FILES
    else:
        found = _run_outputs(out)
        if kind == "demo":
            for sub in DEMO_SUBDIRS:
                if (out / sub).is_dir():
                    found += _run_outputs(out / sub)
        names = [RESULTS_JSON, REPORT_HTML] + [f"{t}.csv" for t in KNOWN_TABLES]
    litter = [p for n in names for p in out.glob(f".{n}.*.tmp") if p.is_file()]
    return found + litter


def claim_output_dir(out_dir: str | Path, kind: str, overwrite: bool) -> list[Path]:
    """Check ``out_dir`` before a command writes into it; returns the outputs to replace.

    Raises OutputExistsError (one line naming the files and the ``--overwrite`` flag) when the
    directory already holds outputs of this kind and ``overwrite`` is False. Nothing is deleted here:
    call remove_outputs(...) once the new outputs are ready to be written, so a run that fails before
    that point leaves the old outputs untouched.
    """
    found = existing_outputs(out_dir, kind)
    if found and not overwrite:
        shown = ", ".join(str(p.relative_to(out_dir)) for p in found[:4]) + (", ..." if len(found) > 4 else "")
        raise OutputExistsError(f"output directory {out_dir} already holds fp8probe outputs ({shown}): pass "
                                "--overwrite to replace them, or choose another --out")
    return found


def remove_outputs(paths: Iterable[Path]) -> None:
    """Delete previously claimed outputs (files only; demo sub-directories go when left empty)."""
    parents = set()
    for p in paths:
        Path(p).unlink(missing_ok=True)
        parents.add(Path(p).parent)
    for d in parents:
        if d.name in DEMO_SUBDIRS:
            try:
                d.rmdir()  # only when empty: a user's own files in it stay
            except OSError:
                pass
