"""Output files: atomic writes (complete or absent, never half written) and output-directory claims (no silent mixing of runs)."""
from __future__ import annotations

import errno
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

# What each command writes into its output directory: results.json, index.html and <table>.csv for
# the tables docs/architecture.md defines. This fixed list is the only source of names fp8probe may
# replace or delete (--overwrite): never the names inside an existing results.json, which a pull
# request can plant ("../elsewhere/victim", "/abs/path", "mydata"). A new table must be added here.
RESULTS_JSON = "results.json"
REPORT_HTML = "index.html"
KNOWN_TABLES = ("layers", "gemm", "operands", "tensors", "histograms", "outliers", "blocksize_sweep",
                "threshold_sweep", "errors", "coverage", "e2e", "sensitivity", "recommendation", "training",
                "delayed_scaling", "block_scales", "skipped", "weight_blocks", "weight_outliers")
COMPARE_FILES = ("compare.html", "compare.md")
DEMO_SUBDIRS = ("analyze", "sweep-blocksize", "sweep-threshold")
OUTPUT_KINDS = ("run", "compare", "demo")
#: The claim on an output directory held while a command writes into it (see lock_output_dir).
LOCK_FILE = ".fp8probe.lock"


# Python decodes the command line and file names with the filesystem encoding and keeps each byte it cannot
# decode as a lone surrogate U+DC80..U+DCFF (PEP 383 "surrogateescape"): with an ASCII filesystem encoding
# (LC_ALL=C without UTF-8 mode) `--name "run é"` arrives as "run \udcc3\udca9". Such text cannot be encoded
# as UTF-8; any other lone surrogate can only come from a hostile file.
_ESCAPED_BYTES = re.compile("[\udc80-\udcff]+")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def as_utf8_text(text: str) -> str:
    """``text`` as real characters that encode to UTF-8: bytes the OS layer kept as surrogates are decoded as
    UTF-8 again ("\udcc3\udca9" -> "é", what the user typed), bytes that are not UTF-8 and any other lone
    surrogate become U+FFFD. Paths keep their surrogates for file access; this is for the text written out."""
    if text.isascii():
        return text
    text = _ESCAPED_BYTES.sub(lambda m: m.group().encode("utf-8", "surrogateescape").decode("utf-8", "replace"),
                              text)
    return _LONE_SURROGATE.sub("\ufffd", text)


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
    if path.exists() and not path.is_file():
        # (os.replace would put a regular file in its place: `-o /dev/null` run as root replaced the device)
        raise OSError(errno.EINVAL, "it exists and is not a regular file (a device, pipe or directory), which an "
                                    "output never replaces", str(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # (the error named the hidden temp file, e.g. /proc/.x.html.lx8ktfh4.tmp, not -o's path)
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())  # the rename must not reach the disk before the data (power loss)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if (exc.filename is None or exc.filename == tmp) and exc.errno is not None:  # a failed write() (ENOSPC, EIO)
            raise OSError(exc.errno, exc.strerror, str(path)) from exc             # names no file; chmod the temp one
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` as UTF-8 (newlines untranslated) to ``path`` atomically (see atomic_write_bytes); lone
    surrogates (a name decoded from the command line, see as_utf8_text) are repaired, so the file is valid UTF-8."""
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        data = as_utf8_text(text).encode("utf-8")
    return atomic_write_bytes(path, data)


def append_text(path: str | Path, text: str) -> Path:
    """Append ``text`` as UTF-8 to ``path`` (created if missing) in one write call, so a reader of a file shared by
    several writers ($GITHUB_STEP_SUMMARY) never sees half of it from this process. An OSError names ``path``: a
    failed write or flush (ENOSPC on /dev/full) names no file of its own."""
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(as_utf8_text(text))
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    return Path(path)


def run_outputs(out: Path) -> list[Path]:
    """fp8probe run outputs (results.json, index.html, table CSVs) present directly in ``out``. Only
    regular files (not symlinks) with fp8probe's own fixed names count."""
    names = [RESULTS_JSON, REPORT_HTML, *(f"{t}.csv" for t in KNOWN_TABLES)]
    return [out / n for n in names if (out / n).is_file() and not (out / n).is_symlink()]


def existing_outputs(out_dir: str | Path, kind: str) -> list[Path]:
    """The files a command of this ``kind`` ("run": analyze / sweeps; "compare"; "demo") would write
    that already exist in ``out_dir``, plus the hidden temp files a killed write left for them."""
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"kind must be one of {', '.join(OUTPUT_KINDS)}, got {kind!r}")
    out = Path(out_dir)
    if not out.is_dir():
        return []
    if kind == "compare":
        found = [out / n for n in COMPARE_FILES if (out / n).is_file() and not (out / n).is_symlink()]
        names: Iterable[str] = COMPARE_FILES
    else:
        found = run_outputs(out)
        if kind == "demo":
            for sub in DEMO_SUBDIRS:
                if (out / sub).is_dir():
                    found += run_outputs(out / sub)
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


class OutputLockedError(RuntimeError):
    """Another fp8probe command is writing into the same output directory right now."""


class OutputDirLock:
    """An exclusive claim on an output directory for one command (``LOCK_FILE`` inside it, flock'ed).

    Two runs into the same directory would otherwise both succeed with results.json from one and
    index.html from the other. The kernel drops a flock when its process dies (even kill -9), so a
    crashed run never leaves a stale claim; the file names the holder for the error message.
    """

    def __init__(self, out_dir: Path, created_dir: bool, fd: int) -> None:
        self.out_dir, self.created_dir, self._fd = out_dir, created_dir, fd

    def release(self) -> None:
        """Drop the claim; remove the lock file, and the directory when this run created it and it is empty."""
        if self._fd is None:
            return
        # Unlink before unlocking: a run that opened the old file then re-checks the inode (lock_output_dir).
        (self.out_dir / LOCK_FILE).unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
        if self.created_dir:
            try:
                self.out_dir.rmdir()  # only when empty: a failed run leaves no empty --out behind
            except OSError:
                pass


def lock_output_dir(out_dir: str | Path, holder: str) -> OutputDirLock:
    """Create ``out_dir`` if needed (so an unwritable or dangling --out fails before any work) and take
    the exclusive claim; raises OutputLockedError naming the current holder, OSError for a directory
    that cannot be created or written."""
    import fcntl  # POSIX only, like the rest of the CLI's file handling; imported here so the module stays importable

    out = Path(out_dir)
    created = not out.exists() and not out.is_symlink()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                who = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            finally:
                os.close(fd)
            raise OutputLockedError(f"output directory {out} is in use by {who}: wait for it to finish or "
                                    "choose another --out") from None
        try:
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the previous holder removed the file between our open and flock: retry
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"fp8probe {holder} (pid {os.getpid()} on {socket.gethostname()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')})".encode(), 0)
        return OutputDirLock(out, created, fd)
    raise OutputLockedError(f"output directory {out}: could not take the claim on {path} (it keeps being replaced)")
