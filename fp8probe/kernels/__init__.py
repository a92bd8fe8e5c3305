"""One cached loader for the CUDA sources in this package: read `<name>.cu`, compile with NVRTC, cache.

Why not `cupy.RawModule`: CuPy appends `-ftz=true` to every NVRTC compile it performs (flush
subnormals to zero), which would make `__fmul_rn`/`__frcp_rn` produce `mul.rn.ftz.f32` and break
bit-exactness with the PyTorch reference on subnormal values. So the loader drives NVRTC itself
(CuPy's low-level binding, which also works without a GPU for `compile_only`), builds a cubin for
the device's exact architecture (PTX for the newest supported one when NVRTC does not know the
device), and loads it with `cupy.cuda.function.Module`; kernels are looked up by their template
name expression through NVRTC's lowered names.
"""
from __future__ import annotations

import functools
import re
from importlib import resources
from typing import Any

# C++ spellings of the storage types the templated kernels accept (see common.cuh).
CUDA_TYPES = ("float", "half_t", "bf16_t")
# ... and of the inputs the metrics kernels read (a float64 reference among them).
SUM_TYPES = ("double", *CUDA_TYPES)

# Every kernel file and the template instantiations it must provide. `check.py` compiles all of
# them; `load_module` passes them as name_expressions so templates get mangled names we can look up.
KERNELS: dict[str, tuple[str, ...]] = {
    "codebook_quant": tuple(
        f"{kernel}<{t}>"
        for kernel in ("quantize_blockwise", "quantize_blockwise_warp", "absmax_global", "quantize_with_absmax",
                       "dequantize_blockwise")
        for t in CUDA_TYPES
    ),
    "int8": tuple(
        f"{kernel}<{t}>"
        for kernel in ("int8_vectorwise_quant", "int8_col_stats", "int8_col_quant", "int8_mm_dequant")
        for t in CUDA_TYPES
    ) + ("int8_zero_columns", "int8_vectorwise_dequant", "int8_linear_matmul"),
    "scaled_cast": tuple(
        f"{kernel}<{t}>"
        for kernel in ("amax_tiles", "amax_tiles_small", "cast_to_fp8", "cast_from_fp8", "cast_to_lowbit", "cast_from_lowbit")
        for t in CUDA_TYPES
    ),
    "metrics": tuple(
        f"{kernel}<{a}, {b}>"
        for kernel in ("error_sums_blocks", "operand_qmax", "operand_sums_blocks")
        for a in SUM_TYPES
        for b in SUM_TYPES
    ) + ("sums_finish",),
}

# No fast-math: IEEE division/reciprocal, no flush-to-zero (NVRTC's default -ftz=false; CuPy's own
# compile path would force -ftz=true, see above), no FMA contraction, so results match the PyTorch
# reference bit for bit (SPEC §10 Q16). The kernels also spell every rounding step with *_rn
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


def _nvrtc_build(name: str, *, arch: str, source: str | None, name_expressions: tuple[str, ...] | None,
                 options: tuple[str, ...], cubin: bool) -> tuple[bytes, dict[str, str]]:
    """Compile kernel file `name` (or `source` under that name) for `arch`; return the PTX or cubin
    image and the lowered (mangled) symbol of every name expression."""
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
        lowered = {expr: nvrtc.getLoweredName(prog, expr) for expr in exprs}  # raises if one is missing
        image = nvrtc.getCUBIN(prog) if cubin else nvrtc.getPTX(prog)
        return image, lowered
    finally:
        nvrtc.destroyProgram(prog)


def compile_only(name: str, *, arch: str = "compute_90", source: str | None = None,
                 name_expressions: tuple[str, ...] | None = None,
                 options: tuple[str, ...] = DEFAULT_OPTIONS) -> str:
    """Compile kernel file `name` to PTX with NVRTC, without a GPU or CUDA driver; return the PTX.

    `source` replaces the file's text (tests use it for deliberately broken code). Raises
    KernelCompileError with NVRTC's log (which names `<name>.cu` and the line) on failure.
    """
    # cupy.RawModule.compile() would query the device architecture and therefore need a driver.
    ptx, _ = _nvrtc_build(name, arch=arch, source=source, name_expressions=name_expressions,
                          options=options, cubin=False)
    return ptx.decode("utf-8", "replace") if isinstance(ptx, bytes) else ptx


def device_arch(compute_capability: str) -> tuple[str, bool]:
    """NVRTC `-arch` value for a device (e.g. "90" -> ("sm_90", True)); the bool says cubin.

    A device newer than this NVRTC knows gets PTX for the newest architecture it supports, which
    the driver JIT-compiles.
    """
    from cupy_backends.cuda.libs import nvrtc

    cc = int(compute_capability)
    supported = tuple(nvrtc.getSupportedArchs())
    if cc in supported:
        return f"sm_{cc}", True
    older = [a for a in supported if a <= cc]
    return f"compute_{max(older) if older else min(supported)}", False


class CompiledModule:
    """A kernel file loaded on one device; `get_function` takes the C++ name expression."""

    def __init__(self, module: Any, lowered: dict[str, str]) -> None:
        self._module = module
        self._lowered = lowered
        self._functions: dict[str, Any] = {}

    def get_function(self, expression: str) -> Any:
        """The `cupy.cuda.function.Function` for e.g. "quantize_blockwise<float>" (cached)."""
        fn = self._functions.get(expression)
        if fn is None:
            fn = self._functions[expression] = self._module.get_function(self._lowered[expression])
        return fn


@functools.lru_cache(maxsize=None)
def _load(name: str, options: tuple[str, ...], device_id: int) -> CompiledModule:
    import cupy
    from cupy.cuda import function

    with cupy.cuda.Device(device_id) as device:
        arch, cubin = device_arch(device.compute_capability)
        image, lowered = _nvrtc_build(name, arch=arch, source=None, name_expressions=None,
                                      options=options, cubin=cubin)
        module = function.Module()
        module.load(bytes(image))
    return CompiledModule(module, lowered)


def load_module(name: str, options: tuple[str, ...] = DEFAULT_OPTIONS) -> CompiledModule:
    """Compiled kernel file `name` on the current CUDA device (cached per name, options, device)."""
    import cupy

    if name not in KERNELS:
        raise ValueError(f"unknown kernel file {name!r}; expected one of {sorted(KERNELS)}")
    return _load(name, tuple(options), cupy.cuda.Device().id)


def get_function(name: str, expression: str, options: tuple[str, ...] = DEFAULT_OPTIONS) -> Any:
    """The kernel for `expression` (e.g. "quantize_blockwise<float>") in file `name`, current device.

    Call it as ``fn(grid, block, args)``; it launches on CuPy's current stream.
    """
    if expression not in KERNELS.get(name, ()):
        raise ValueError(f"{expression!r} is not an instantiation declared for {name}.cu")
    return load_module(name, options).get_function(expression)
