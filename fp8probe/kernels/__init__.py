"""One cached loader for the CUDA sources in this package: read `<name>.cu`, compile with NVRTC, cache."""
from __future__ import annotations

import functools
import re
from importlib import resources
from typing import Any

# C++ spellings of the storage types the templated kernels accept (see common.cuh).
CUDA_TYPES = ("float", "half_t", "bf16_t")

# Every kernel file and the template instantiations it must provide. `check.py` compiles all of
# them; `load_module` passes them as name_expressions so templates get mangled names we can look up.
KERNELS: dict[str, tuple[str, ...]] = {
    "codebook_quant": tuple(
        f"{kernel}<{t}>"
        for kernel in ("quantize_blockwise", "absmax_global", "quantize_with_absmax", "dequantize_blockwise")
        for t in CUDA_TYPES
    ),
    "int8": tuple(
        f"{kernel}<{t}>"
        for kernel in ("int8_vectorwise_quant", "int8_col_stats", "int8_col_quant", "int8_mm_dequant")
        for t in CUDA_TYPES
    ) + ("int8_zero_columns", "int8_vectorwise_dequant", "int8_linear_matmul"),
    "scaled_cast": tuple(
        f"{kernel}<{t}>"
        for kernel in ("amax_tiles", "cast_to_fp8", "cast_from_fp8")
        for t in CUDA_TYPES
    ),
}

# No fast-math: IEEE division/reciprocal, no flush-to-zero, no FMA contraction, so results match the
# PyTorch reference bit for bit (SPEC §10 Q16). The kernels also spell every rounding step with *_rn
# intrinsics; --fmad=false is a second line of defence for any expression that slipped through.
DEFAULT_OPTIONS: tuple[str, ...] = ("-std=c++17", "--fmad=false")

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([A-Za-z0-9_]+\.cuh)"\s*$')


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel source; the message carries the compiler log (file:line via #line)."""


def read_source(name: str) -> str:
    """Return the text of `<name>.cu` (or a `.cuh` when `name` ends with it) from the package."""
    filename = name if name.endswith(".cuh") else f"{name}.cu"
    path = resources.files(__package__).joinpath(filename)
    if not path.is_file():
        raise ValueError(f"no kernel source {filename!r} in fp8probe/kernels; known: {sorted(KERNELS)}")
    return path.read_text(encoding="utf-8")


def preprocess(source: str, filename: str, _seen: frozenset[str] = frozenset()) -> str:
    """Inline local `#include "x.cuh"` headers and add `#line` markers so errors name the real file.

    Headers are inlined (not found via -I) because CuPy's on-disk cache keys on the source text only:
    an edited header would otherwise be served stale from the cache.
    """
    out = [f'#line 1 "{filename}"']
    for lineno, line in enumerate(source.splitlines(), start=1):
        match = _INCLUDE.match(line)
        if match is None:
            out.append(line)
            continue
        header = match.group(1)
        if header not in _seen:
            out.append(preprocess(read_source(header), header, _seen | {header}))
        out.append(f'#line {lineno + 1} "{filename}"')
    return "\n".join(out) + "\n"


def kernel_source(name: str) -> str:
    """The full, preprocessed source of kernel file `name` as handed to NVRTC."""
    return preprocess(read_source(name), f"{name}.cu")


def compile_only(name: str, *, arch: str = "compute_90", source: str | None = None,
                 name_expressions: tuple[str, ...] | None = None,
                 options: tuple[str, ...] = DEFAULT_OPTIONS) -> str:
    """Compile kernel file `name` to PTX with NVRTC, without a GPU or CUDA driver; return the PTX.

    `source` replaces the file's text (tests use it for deliberately broken code). Raises
    KernelCompileError with NVRTC's log (which names `<name>.cu` and the line) on failure.
    """
    # Low-level binding on purpose: cupy.RawModule.compile() queries the device architecture and
    # therefore needs a driver, which a CI machine without a GPU does not have.
    from cupy_backends.cuda.libs import nvrtc

    filename = f"{name}.cu"
    text = preprocess(source, filename) if source is not None else kernel_source(name)
    exprs = KERNELS.get(name, ()) if name_expressions is None else name_expressions
    prog = nvrtc.createProgram(text, filename, [], [])
    try:
        for expr in exprs:
            nvrtc.addNameExpression(prog, expr)
        try:
            nvrtc.compileProgram(prog, [f"-arch={arch}", *options])
        except nvrtc.NVRTCError as exc:
            log = nvrtc.getProgramLog(prog)
            raise KernelCompileError(f"NVRTC failed to compile {filename} for {arch}: {exc}\n{log}") from None
        for expr in exprs:
            nvrtc.getLoweredName(prog, expr)        # raises if an instantiation is missing
        ptx = nvrtc.getPTX(prog)
        return ptx.decode("utf-8", "replace") if isinstance(ptx, bytes) else ptx
    finally:
        nvrtc.destroyProgram(prog)


@functools.lru_cache(maxsize=None)
def _load(name: str, options: tuple[str, ...], device_id: int) -> Any:
    import cupy

    with cupy.cuda.Device(device_id):
        module = cupy.RawModule(code=kernel_source(name), options=options,
                                name_expressions=list(KERNELS[name]))
        module.compile()
    return module


def load_module(name: str, options: tuple[str, ...] = DEFAULT_OPTIONS) -> Any:
    """Compiled `cupy.RawModule` for kernel file `name` on the current CUDA device (cached).

    The cache key is (name, options, device): a module is compiled once per process and device; CuPy
    additionally keeps compiled binaries on disk across processes.
    """
    import cupy

    if name not in KERNELS:
        raise ValueError(f"unknown kernel file {name!r}; expected one of {sorted(KERNELS)}")
    return _load(name, tuple(options), cupy.cuda.Device().id)


def get_function(name: str, expression: str, options: tuple[str, ...] = DEFAULT_OPTIONS) -> Any:
    """The `cupy.RawKernel` for `expression` (e.g. "quantize_blockwise<float>") in file `name`."""
    if expression not in KERNELS.get(name, ()):
        raise ValueError(f"{expression!r} is not an instantiation declared for {name}.cu")
    return load_module(name, options).get_function(expression)
