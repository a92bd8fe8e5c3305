"""Every CUDA source compiles with NVRTC (no GPU needed) and compiler errors point at the .cu file."""
from __future__ import annotations

import re

import pytest

nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="NVRTC (cupy + nvidia-cuda-nvrtc) not installed")

from fp8probe.kernels import (  # noqa: E402
    KERNELS,
    KernelCompileError,
    _nvrtc_build,
    compile_only,
    device_arch,
    kernel_source,
)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_every_instantiation_compiles(name: str) -> None:
    ptx = compile_only(name, arch="compute_80")
    # every declared template instantiation must be in the PTX as an entry point
    entries = re.findall(r"\.entry\s+(\S+)\(", ptx)
    assert len(entries) == len(KERNELS[name]), (entries, KERNELS[name])
    # bit-exactness with the reference needs IEEE subnormals: no flush-to-zero float instruction
    # (CuPy's RawModule would add -ftz=true; the loader must not)
    ftz = [line.strip() for line in ptx.splitlines() if ".ftz" in line]
    assert not ftz, ftz[:5]
    fused = re.findall(r"\b(?:fma|mad)(?:\.[a-z]+)*\.f(?:16|32|64)\b", ptx)   # integer mad is exact
    assert not fused, f"float FMA would merge two roundings: {fused[:3]}"


def test_cubin_for_a_real_architecture_builds_without_a_gpu() -> None:
    arch, cubin = device_arch("90")
    assert (arch, cubin) == ("sm_90", True)
    image, lowered = _nvrtc_build("int8", arch=arch, source=None, name_expressions=None,
                                  options=("-std=c++17", "--fmad=false"), cubin=True)
    assert image[:4] == b"\x7fELF"                     # a cubin is an ELF image
    assert set(lowered) == set(KERNELS["int8"])
    newest = max(nvrtc.getSupportedArchs())
    assert device_arch("999") == (f"compute_{newest}", False)   # unknown device: PTX for the JIT


def test_header_is_inlined_with_line_markers() -> None:
    src = kernel_source("codebook_quant")
    assert '#line 1 "codebook_quant.cu"' in src
    assert '#line 1 "common.cuh"' in src
    assert "#include" not in src  # local headers are inlined so CuPy's source-keyed cache sees them


def test_compile_error_names_file_and_line() -> None:
    broken = '#include "common.cuh"\n\n__global__ void k(float* x) {\n    x[0] = undefined_name;\n}\n'
    with pytest.raises(KernelCompileError) as info:
        compile_only("broken", source=broken, name_expressions=())
    msg = str(info.value)
    assert "broken.cu(4)" in msg, msg       # line 4 of the user's file, despite the inlined header
    assert "undefined_name" in msg


def test_missing_instantiation_is_an_error() -> None:
    src = "template <typename T> __global__ void k(T* x) { x[0] = T(1); }\n"
    with pytest.raises(Exception):
        compile_only("probe", source=src, name_expressions=("k<float>", "k2<float>"))


def test_unknown_kernel_file_raises_value_error() -> None:
    with pytest.raises(ValueError, match="no kernel source"):
        kernel_source("no_such_kernel")


def test_check_command_reports_failures(monkeypatch, capsys) -> None:
    from fp8probe.kernels import check

    def broken(name: str, *, arch: str) -> str:
        return compile_only(name, arch=arch, source="__global__ void k() { nope; }\n", name_expressions=())

    monkeypatch.setattr(check, "KERNELS", {"int8": KERNELS["int8"]})
    monkeypatch.setattr(check, "compile_only", broken)
    assert check.main() == 1
    err = capsys.readouterr().err
    assert "FAIL int8.cu [compute_80]" in err and "int8.cu(1)" in err and "nope" in err
