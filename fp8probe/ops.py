"""torch.library declarations of every fp8probe op: schema, fake (meta) impl, reference impl for all devices.

Each op is declared once here with ``torch.library.custom_op``; the reference implementation
(``backends/reference.py``) serves every device. ``backends/cuda.py`` overrides CUDA with
``torch.library.register_kernel("fp8probe::<name>", "cuda", fn)`` where ``fn`` takes exactly the
arguments below; it must not register anything when ``FP8PROBE_BACKEND=reference`` is set.
``compat`` is ``""`` (fp8probe rules) or ``"bnb"`` (bitsandbytes 0.49.2, docs/architecture.md).

Schemas (``ScalarType`` arguments arrive as ``torch.dtype``):

    fp8probe::quantize_blockwise(Tensor A, Tensor code, int blocksize, str compat)
        -> (Tensor q, Tensor absmax, Tensor special_index, Tensor special_value)
        q uint8 A.shape; absmax f32 [ceil(n/blocksize)]; special_index i64 [k]; special_value f32 [k]
    fp8probe::quantize_global(Tensor A, Tensor code, str compat)
        -> (Tensor q, Tensor absmax, Tensor special_index, Tensor special_value)     absmax f32 [1]
    fp8probe::dequantize_blockwise(Tensor q, Tensor absmax, Tensor code, int blocksize, ScalarType dtype,
                                   Tensor special_index, Tensor special_value, str compat) -> Tensor
        out `dtype`, q.shape
    fp8probe::int8_vectorwise_quant(Tensor A, float threshold, str compat)
        -> (Tensor q, Tensor row_stats, Tensor outlier_cols)
        q int8 A.shape; row_stats f32 [rows]; outlier_cols i64 [k] (sorted)
    fp8probe::int8_vectorwise_dequant(Tensor q, Tensor stats) -> Tensor          f32 q.shape
    fp8probe::int8_double_quant(Tensor A, float threshold, str compat)
        -> (Tensor q_row, Tensor q_col, Tensor row_stats, Tensor col_stats, Tensor outlier_cols)
        q_row, q_col int8 A.shape; row_stats f32 [rows]; col_stats f32 [cols]; outlier_cols i64 [k]
    fp8probe::int8_linear_matmul(Tensor A, Tensor B) -> Tensor                   i32 [..., N]
    fp8probe::int8_mm_dequant(Tensor A, Tensor row_stats, Tensor col_stats, Tensor? bias,
                              ScalarType dtype, str compat) -> Tensor
        out `dtype`, A.shape (compat "bnb": [rows, N])
    fp8probe::quantize_scaled(Tensor x, str fmt, int block_rows, int block_cols, str scale_rule="floor",
                              Tensor? global_scale=None) -> (Tensor data, Tensor scale)
        data float8 (uint8 element codes for the 4/6-bit formats) x.shape; scale f32 [ceil(R/block_rows),
        ceil(C/block_cols)]; scale_rule for MX formats, global_scale for nvfp4
    fp8probe::dequantize_scaled(Tensor data, Tensor scale, int block_rows, int block_cols, ScalarType dtype,
                                str fmt="", Tensor? global_scale=None)
        -> Tensor                                                                `dtype`, data.shape

``functional.py`` declares one composite op more, ``fp8probe::fake_quantize(Tensor A, Tensor code, int
blocksize, str compat) -> (Tensor y, Tensor absmax)`` (blocksize 0: tensor-wise), which torch.compile'd
code calls instead of the two above: its outputs have static shapes. Its implementation is the eager
``functional.fake_quantize`` (these ops' kernels), so it needs no kernel of its own.

The exact float32 operation order of each op is written in ``backends/reference.py``.
Inputs are validated in ``functional.py``; the ops assume valid arguments.
"""
from __future__ import annotations


from typing import Any

import torch

from fp8probe.backends import reference as _ref

_F32 = torch.float32
_LIB = "fp8probe"


def _dynamic_size(what: str, op: str) -> Any:
    """A data-dependent size while tracing (torch.compile, FakeTensorMode). On plain meta tensors there is no such
    size to give (torch's own error named neither the cause nor a way out): say so."""
    try:
        return torch.library.get_ctx().new_dynamic_size()
    except RuntimeError as exc:
        raise ValueError(f"fp8probe::{op} cannot run on meta tensors: the length of its {what} depends on the values; "
                         "run it on a real device (torch.compile and FakeTensorMode trace it)") from exc


def _dynamic(A: torch.Tensor, dtype: torch.dtype, op: str) -> torch.Tensor:
    """A 1-D fake tensor of data-dependent length (outlier columns)."""
    return A.new_empty((_dynamic_size("outlier columns", op),), dtype=dtype)


def _specials(A: torch.Tensor, op: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake (special_index int64, special_value float32): one data-dependent length for both, as the op
    returns them (two unrelated lengths made a traced equal-length check a graph break)."""
    k = _dynamic_size("NaN/Inf records (special_index, special_value)", op)
    return A.new_empty((k,), dtype=torch.int64), A.new_empty((k,), dtype=_F32)


# ------------------------------------------------------------------ codebook quantisation
@torch.library.custom_op(f"{_LIB}::quantize_blockwise", mutates_args=())
def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int, compat: str
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _ref.quantize_blockwise(A, code, blocksize, compat)


@quantize_blockwise.register_fake
def _(A, code, blocksize, compat):
    nb = -(-A.numel() // blocksize)
    return (A.new_empty(A.shape, dtype=torch.uint8), A.new_empty((nb,), dtype=_F32),
            *_specials(A, "quantize_blockwise"))


@torch.library.custom_op(f"{_LIB}::quantize_global", mutates_args=())
def quantize_global(A: torch.Tensor, code: torch.Tensor, compat: str
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _ref.quantize_global(A, code, compat)


@quantize_global.register_fake
def _(A, code, compat):
    nb = 1 if A.numel() else 0
    return (A.new_empty(A.shape, dtype=torch.uint8), A.new_empty((nb,), dtype=_F32),
            *_specials(A, "quantize_global"))


@torch.library.custom_op(f"{_LIB}::dequantize_blockwise", mutates_args=())
def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                         dtype: torch.dtype, special_index: torch.Tensor, special_value: torch.Tensor,
                         compat: str) -> torch.Tensor:
    return _ref.dequantize_blockwise(q, absmax, code, blocksize, dtype, special_index, special_value, compat)


@dequantize_blockwise.register_fake
def _(q, absmax, code, blocksize, dtype, special_index, special_value, compat):
    return q.new_empty(q.shape, dtype=dtype)


# ------------------------------------------------------------------ LLM.int8()
@torch.library.custom_op(f"{_LIB}::int8_vectorwise_quant", mutates_args=())
def int8_vectorwise_quant(A: torch.Tensor, threshold: float, compat: str
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _ref.int8_vectorwise_quant(A, threshold, compat)


def _outlier_cols(A: torch.Tensor, threshold: float, op: str) -> torch.Tensor:
    # threshold 0 never reports outliers: a static empty tensor, since a data-dependent size that
    # the caller drops (it returns None there) makes torch.compile fail on a pending symbol
    return A.new_empty((0,), dtype=torch.int64) if threshold == 0.0 else _dynamic(A, torch.int64, op)


@int8_vectorwise_quant.register_fake
def _(A, threshold, compat):
    rows, _ = _ref._rows_cols(A.shape)
    return (A.new_empty(A.shape, dtype=torch.int8), A.new_empty((rows,), dtype=_F32),
            _outlier_cols(A, threshold, "int8_vectorwise_quant"))


@torch.library.custom_op(f"{_LIB}::int8_vectorwise_dequant", mutates_args=())
def int8_vectorwise_dequant(q: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    return _ref.int8_vectorwise_dequant(q, stats)


@int8_vectorwise_dequant.register_fake
def _(q, stats):
    return q.new_empty(q.shape, dtype=_F32)


@torch.library.custom_op(f"{_LIB}::int8_double_quant", mutates_args=())
def int8_double_quant(A: torch.Tensor, threshold: float, compat: str
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _ref.int8_double_quant(A, threshold, compat)


@int8_double_quant.register_fake
def _(A, threshold, compat):
    rows, cols = _ref._rows_cols(A.shape)
    return (A.new_empty(A.shape, dtype=torch.int8), A.new_empty(A.shape, dtype=torch.int8),
            A.new_empty((rows,), dtype=_F32), A.new_empty((cols,), dtype=_F32),
            _outlier_cols(A, threshold, "int8_double_quant"))


@torch.library.custom_op(f"{_LIB}::int8_linear_matmul", mutates_args=())
def int8_linear_matmul(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return _ref.int8_linear_matmul(A, B)


@int8_linear_matmul.register_fake
def _(A, B):
    return A.new_empty((*A.shape[:-1], B.shape[0]), dtype=torch.int32)


@torch.library.custom_op(f"{_LIB}::int8_mm_dequant", mutates_args=())
def int8_mm_dequant(A: torch.Tensor, row_stats: torch.Tensor, col_stats: torch.Tensor,
                    bias: torch.Tensor | None, dtype: torch.dtype, compat: str) -> torch.Tensor:
    return _ref.int8_mm_dequant(A, row_stats, col_stats, bias, dtype, compat)


@int8_mm_dequant.register_fake
def _(A, row_stats, col_stats, bias, dtype, compat):
    if compat == "bnb":
        rows, n = _ref._rows_cols(A.shape)
        return A.new_empty((rows, n), dtype=dtype)
    return A.new_empty(A.shape, dtype=dtype)


# ------------------------------------------------------------------ OCP FP8 / MX scaled casts
@torch.library.custom_op(f"{_LIB}::quantize_scaled", mutates_args=())
def quantize_scaled(x: torch.Tensor, fmt: str, block_rows: int, block_cols: int, scale_rule: str = "floor",
                    global_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return _ref.quantize_scaled(x, fmt, block_rows, block_cols, scale_rule, global_scale)


@quantize_scaled.register_fake
def _(x, fmt, block_rows, block_cols, scale_rule="floor", global_scale=None):
    rows, cols = _ref._rows_cols(x.shape)
    dtype = _ref.SCALED_FORMATS[fmt][0]
    return x.new_empty(x.shape, dtype=dtype), x.new_empty((-(-rows // block_rows), -(-cols // block_cols)), dtype=_F32)


@torch.library.custom_op(f"{_LIB}::dequantize_scaled", mutates_args=())
def dequantize_scaled(data: torch.Tensor, scale: torch.Tensor, block_rows: int, block_cols: int,
                      dtype: torch.dtype, fmt: str = "", global_scale: torch.Tensor | None = None) -> torch.Tensor:
    return _ref.dequantize_scaled(data, scale, block_rows, block_cols, dtype, fmt, global_scale)


@dequantize_scaled.register_fake
def _(data, scale, block_rows, block_cols, dtype, fmt="", global_scale=None):
    return data.new_empty(data.shape, dtype=dtype)


# ------------------------------------------------------------------ no gradients
#: Why an fp8probe op has no gradient, raised when a backward reaches it (torch's own error, "no autograd formula
#: was registered. Please use register_autograd", reads as an fp8probe bug; user test).
NO_GRADIENT = ("{op} has no gradient: quantisation is not differentiable and fp8probe's functional ops do not track "
               "gradients. Train through fp8probe.autograd (MatMulFP8Mixed, MatMulFP8Global, SwitchBackBnb, "
               "MatMul8bitLt) or the fp8probe.nn Linear modules, or use a straight-through estimator: "
               "x + (fake_quantize(x, ...) - x).detach()")


def _no_gradient(op: torch.library.CustomOpDef, name: str) -> None:
    def backward(ctx, *grads):  # noqa: ANN001 - torch.library's signature
        raise RuntimeError(NO_GRADIENT.format(op=f"fp8probe.{name}"))

    op.register_autograd(backward, setup_context=lambda ctx, inputs, output: None)


for _name in ("quantize_blockwise", "quantize_global", "dequantize_blockwise", "int8_vectorwise_quant",
              "int8_vectorwise_dequant", "int8_double_quant", "int8_linear_matmul", "int8_mm_dequant",
              "quantize_scaled", "dequantize_scaled"):
    _no_gradient(globals()[_name], _name)


# CUDA kernels (if any) override the reference for CUDA tensors; the backend itself honours
# FP8PROBE_BACKEND=reference and imports CuPy only lazily.
from fp8probe.backends import cuda as _cuda_backend  # noqa: E402

_cuda_backend.register()

# CPU fast path (C extension fp8probe._fastpath, optional) overrides the reference for CPU tensors in
# the ops it covers; it falls back to the reference per call and honours FP8PROBE_BACKEND=reference.
from fp8probe.backends import cpu as _cpu_backend  # noqa: E402

_cpu_backend.register()
