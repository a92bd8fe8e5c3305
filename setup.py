"""Build hook for the optional C extension fp8probe._fastpath (all metadata lives in pyproject.toml)."""
import os
import shutil
import subprocess
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# -ffp-contract=off: gcc's default (fast) fuses a*b+c into FMA, which would break bit-exactness with
# the reference; -fno-trapping-math: FP exception flags are never read, so the compiler may turn
# selects on values that could be NaN into vector blends (the scaled-cast loops vectorise only with
# it); it changes no value (no reassociation, no finite-math assumption); no -ffast-math, no -march=native (wheels must run on other CPUs: the AVX2 loops are
# compiled with a target attribute and chosen at run time); -g0: no debug information (Python's own
# CFLAGS add -g, which makes the .so 7x larger and the LTO build 35 % slower). optional=True: if the compiler or the
# Python headers are missing, the install still succeeds and fp8probe uses the torch reference.
COMPILE_ARGS = ["-O3", "-g0", "-std=c99", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math", "-pthread"]

# Link-time optimisation with parallel code generation: the one source file takes ~3 minutes of
# optimisation and code generation in a single gcc process; with -flto the compile step only
# parses it (~15 s) and the link step optimises and generates code in one partition per core
# (-flto=auto), 3 min -> 1.5 min on two cores. Every option above is recorded per function in the LTO
# objects, so the generated code obeys the same rules. Used only when the compiler is gcc and a
# tiny LTO build links (clang spells the option differently); otherwise, or with FP8PROBE_NO_LTO=1 set at
# install time, the plain build runs.
LTO_COMPILE = ["-flto"]
LTO_LINK = ["-flto=auto"]


def _gcc_lto_works(compiler):
    cc = getattr(compiler, "compiler_so", None) or []
    if not cc or os.environ.get("FP8PROBE_NO_LTO"):
        return False
    try:
        version = subprocess.run([cc[0], "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    if "gcc" not in version.lower() and "free software foundation" not in version.lower():
        return False
    tmp = tempfile.mkdtemp(prefix="fp8probe-lto-")
    try:
        src = os.path.join(tmp, "t.c")
        with open(src, "w") as f:
            f.write("int fp8probe_lto_probe(int x) { return x + 1; }\n")
        obj, lib = os.path.join(tmp, "t.o"), os.path.join(tmp, "t.so")
        ok = subprocess.run([cc[0], "-fPIC", "-c", *LTO_COMPILE, src, "-o", obj], capture_output=True, timeout=60)
        if ok.returncode != 0:
            return False
        ok = subprocess.run([cc[0], "-shared", *LTO_LINK, obj, "-o", lib], capture_output=True, timeout=60)
        return ok.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class BuildExt(build_ext):
    """Tries the LTO build first and falls back to the plain one if it fails for any reason."""

    def build_extension(self, ext):
        if _gcc_lto_works(self.compiler):
            plain_compile, plain_link = list(ext.extra_compile_args), list(ext.extra_link_args)
            ext.extra_compile_args = plain_compile + LTO_COMPILE
            ext.extra_link_args = plain_link + COMPILE_ARGS + LTO_LINK
            try:
                return super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - any failure: retry without LTO
                print(f"fp8probe: LTO build failed ({exc}); building without LTO")
                ext.extra_compile_args, ext.extra_link_args = plain_compile, plain_link
                self.force = True
        return super().build_extension(ext)


setup(
    cmdclass={"build_ext": BuildExt},
    ext_modules=[
        Extension(
            "fp8probe._fastpath",
            sources=["fp8probe/_fastpath.c"],
            extra_compile_args=COMPILE_ARGS,
            extra_link_args=["-pthread"],
            libraries=["m"],  # rintf
            optional=True,
        )
    ],
)
