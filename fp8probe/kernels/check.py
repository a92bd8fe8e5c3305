"""`python -m fp8probe.kernels.check`: compile every kernel instantiation with NVRTC (no GPU needed)."""
from __future__ import annotations

import sys
import time

from fp8probe.kernels import KERNELS, KernelCompileError, compile_only

ARCHES = ("compute_80", "compute_90")


def main() -> int:
    """Compile each .cu file for every architecture in ARCHES; print one line per kernel; 0 = all ok."""
    try:
        from cupy_backends.cuda.libs import nvrtc
        version = nvrtc.getVersion()
    except Exception as exc:  # ImportError, or the NVRTC shared library missing
        print(f"error: NVRTC is not usable ({type(exc).__name__}: {exc}); "
              "install the test extra: pip install -e '.[test]'", file=sys.stderr)
        return 1
    print(f"NVRTC {version[0]}.{version[1]}")
    failures = 0
    for name, expressions in KERNELS.items():
        for arch in ARCHES:
            start = time.perf_counter()
            try:
                ptx = compile_only(name, arch=arch)
            except KernelCompileError as exc:
                failures += 1
                print(f"FAIL {name}.cu [{arch}]\n{exc}", file=sys.stderr)
                continue
            ms = (time.perf_counter() - start) * 1e3
            for expr in expressions:
                print(f"ok   {name}.cu [{arch}] {expr}")
            print(f"     {name}.cu [{arch}]: {len(expressions)} kernels, {len(ptx)} bytes PTX, {ms:.0f} ms")
    if failures:
        print(f"{failures} compilation(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
