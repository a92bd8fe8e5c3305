"""functional.py's direct eager CPU calls (_run): which calls skip torch.ops.fp8probe.*, and that they return
exactly what the custom op returns."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fp8probe.functional as F
from fp8probe.backends import cpu
from fp8probe.backends import reference as ref

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_EAGER = F._eager_cpu


class _NoOps:
    """Stands in for torch.ops.fp8probe: any op call through the dispatcher fails the test."""

    def __getattr__(self, name: str):
        raise AssertionError(f"torch.ops.fp8probe.{name} was called")


def _data(dtype: torch.dtype, shape=(37, 53), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    x.view(-1)[::97] = 0.0
    x.view(-1)[5::101] = 1e-41  # float32 subnormal (0 in fp16/bf16 after the cast)
    return x.to(dtype)


def _every_op(x: torch.Tensor) -> dict[str, object]:
    """One call of every functional entry point that reaches an op, on x (float)."""
    out: dict[str, object] = {}
    q, st = F.quantize_blockwise(x, "bnb-e4m3", blocksize=64)
    out["quantize_blockwise"] = (q, st.absmax, st.special_index, st.special_value)
    out["dequantize_blockwise"] = F.dequantize_blockwise(q, st)
    qg, stg = F.quantize(x, "bnb-e5m2")
    out["quantize"] = (qg, stg.absmax)
    out["quantize_bnb"] = F.quantize(x.float(), "bnb-e4m3", compat="bnb")[0]
    out["fake_quantize"] = F.fake_quantize(x, "dynamic", 100)
    q8, rs, cols = F.int8_vectorwise_quant(x, 2.5)
    out["int8_vectorwise_quant"] = (q8, rs, cols)
    out["int8_vectorwise_dequant"] = F.int8_vectorwise_dequant(q8, rs)
    out["int8_double_quant"] = F.int8_double_quant(x, 0.0)
    w = x[:29].contiguous()
    cw, sw, _ = F.int8_vectorwise_quant(w)
    c32 = F.int8_linear_matmul(q8, cw)
    out["int8_linear_matmul"] = c32
    out["int8_mm_dequant"] = F.int8_mm_dequant(c32, rs, sw, bias=w[:, 0].contiguous(), dtype=x.dtype)
    st8 = F.quantize_scaled(x, "mxfp8-e4m3")
    out["quantize_scaled"] = (st8.data.view(torch.uint8), st8.scale)
    out["dequantize_scaled"] = F.dequantize_scaled(st8)
    return out


def _same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        if a.is_floating_point():
            bits = {4: torch.int32, 2: torch.int16, 1: torch.uint8}[a.element_size()]
            assert torch.equal(a.view(bits), b.view(bits))
        else:
            assert torch.equal(a, b)
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _same(u, v)
    else:
        assert a == b


def test_eager_cpu_calls_skip_the_dispatcher(monkeypatch) -> None:
    """With torch.ops.fp8probe unusable, every functional entry point still runs in plain eager CPU code."""
    monkeypatch.setattr(F, "_OPS", _NoOps())
    out = _every_op(_data(torch.float32))
    assert out["dequantize_blockwise"].shape == (37, 53)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["c", "reference"])
def test_direct_calls_equal_the_custom_ops(dtype: torch.dtype, backend: str, monkeypatch) -> None:
    """Direct and dispatched calls give the same bits (fast path on and forced off), NaN/±Inf included."""
    if backend == "reference":
        monkeypatch.setenv("FP8PROBE_BACKEND", "reference")
    else:
        monkeypatch.delenv("FP8PROBE_BACKEND", raising=False)
    x = _data(dtype, seed=3)
    x.view(-1)[7] = float("nan")
    x.view(-1)[500] = float("inf")
    x.view(-1)[900] = float("-inf")
    for data in (_data(dtype, seed=1), x):
        direct = _every_op(data)
        monkeypatch.setattr(F, "_eager_cpu", lambda args: False)
        dispatched = _every_op(data)
        monkeypatch.setattr(F, "_eager_cpu", _EAGER)
        assert direct.keys() == dispatched.keys()
        for k in direct:
            _same(direct[k], dispatched[k])



def test_kernel_is_what_the_dispatcher_runs() -> None:
    """cpu.kernel names the registered CPU kernel (or the reference) of every op."""
    for name in cpu.CPU_KERNELS:
        assert cpu.kernel(name) is (getattr(cpu, name) if cpu._registered else getattr(ref, name))
    assert cpu.kernel("int8_mm_dequant") in (getattr(cpu, "int8_mm_dequant", None), ref.int8_mm_dequant)


@pytest.mark.parametrize("case", ["requires_grad", "fake", "meta", "compile_flag", "function_mode", "vmap"])
def test_machinery_keeps_the_custom_op(case: str, monkeypatch) -> None:
    """Whatever needs torch's machinery goes through torch.ops.fp8probe: tensors that autograd tracks,
    FakeTensorMode, other devices, torch.compile tracing, torch-function modes, functorch transforms."""
    x = _data(torch.float32, (8, 16))
    assert F._eager_cpu((x,))
    if case == "requires_grad":
        assert not F._eager_cpu((x.clone().requires_grad_(),))
        with torch.no_grad():  # autograd does not track anything: the kernel serves it
            assert F._eager_cpu((x.clone().requires_grad_(),))
    elif case == "fake":
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:  # the cached codebooks are real
            fx = mode.from_tensor(x)
            assert not F._eager_cpu((fx,))
            fq = mode.from_tensor(torch.ones(8, 16, dtype=torch.int8))
            y = F.int8_vectorwise_dequant(fq, fx[:, 0])  # through the op's fake impl
            assert y.shape == (8, 16) and y.dtype == torch.float32
    elif case == "meta":
        assert not F._eager_cpu((x.to("meta"),))
    elif case == "compile_flag":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert not F._eager_cpu((x,))
    elif case == "function_mode":
        class Mode(torch.overrides.TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                return func(*args, **(kwargs or {}))
        with Mode():
            assert not F._eager_cpu((x,))
    elif case == "vmap":
        seen = []

        def f(row):
            seen.append(F._eager_cpu((row,)))
            return row
        torch.vmap(f)(x)
        assert seen == [False]


def test_requires_grad_input_goes_through_the_op(monkeypatch) -> None:
    """An input autograd tracks reaches torch.ops (which refuses to differentiate it), as before."""
    monkeypatch.setattr(F, "_OPS", _NoOps())
    with pytest.raises(AssertionError, match="torch.ops.fp8probe.int8_vectorwise_dequant"):
        F.int8_vectorwise_dequant(torch.ones(2, 3, dtype=torch.int8), torch.ones(2, requires_grad=True))


def test_compiled_functional_call_matches_eager() -> None:
    """torch.compile of a function calling fp8probe ops traces the custom ops and gives the eager bits."""
    x = _data(torch.float32, (16, 64))

    def f(t):
        q, rs, _ = F.int8_vectorwise_quant(t)
        return F.int8_vectorwise_dequant(q, rs)

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="eager", fullgraph=True)
    _same(compiled(x), f(x))


def test_a_codebook_tensor_is_checked_once_per_content(monkeypatch) -> None:
    """The modules pass one codebook tensor to every call, and checking it on a GPU makes the host wait: it is
    validated once while its values stay the same (an in-place edit is checked again), dead tensors leave the memo."""
    import fp8probe.functional as fn
    from fp8probe.formats import get_codebook, validate_codebook

    calls = []
    monkeypatch.setattr(fn, "validate_codebook", lambda c: (calls.append(id(c)), validate_codebook(c))[1])
    code = get_codebook("dynamic")
    x = torch.randn(1000, generator=torch.Generator().manual_seed(5))
    q1, st1 = fn.quantize_blockwise(x, code, blocksize=64)
    q2, _ = fn.quantize_blockwise(x, code, blocksize=64)
    fn.dequantize_blockwise(q1, st1)
    assert torch.equal(q1, q2) and calls == [id(code)]
    code[0] = float("nan")                                   # in place: a new version, checked again
    with pytest.raises(ValueError, match="only finite values"):
        fn.quantize_blockwise(x, code, blocksize=64)
    assert calls == [id(code), id(code)]
    key = id(code)
    del code, st1
    import gc
    gc.collect()
    assert key not in fn._CODE_FACTS


@pytest.mark.parametrize("write", ["data", "numpy"])
def test_codebook_edits_that_skip_the_version_counter_are_seen(write: str) -> None:
    """Writes through ``.data`` or ``.numpy()`` do not bump ``_version``: a codebook reversed that way was searched
    as if still sorted (max error 8.2 on N(0, 1) data), and a NaN written that way was accepted (QA finding 4)."""
    import fp8probe.functional as fn
    from fp8probe.formats import get_codebook

    def edit(code: torch.Tensor, values: torch.Tensor) -> None:
        if write == "data":
            code.data.copy_(values)
        else:
            code.numpy()[:] = values.numpy()

    x = torch.randn(1000, generator=torch.Generator().manual_seed(6))
    code = get_codebook("bnb-e4m3")
    fn.quantize_blockwise(x, code, blocksize=64)                 # validated, remembered as sorted
    version = code._version
    edit(code, code.flip(0))                                      # valid, now descending
    assert code._version == version
    q_edit, st_edit = fn.quantize_blockwise(x, code, blocksize=64)
    q_fresh, st_fresh = fn.quantize_blockwise(x, code.clone(), blocksize=64)
    assert torch.equal(q_edit, q_fresh)
    assert torch.equal(fn.dequantize_blockwise(q_edit, st_edit), fn.dequantize_blockwise(q_fresh, st_fresh))
    bad = code.clone()
    bad[5] = float("nan")
    edit(code, bad)
    with pytest.raises(ValueError, match="only finite values"):
        fn.quantize_blockwise(x, code, blocksize=64)
    # the state's own copy of the codebook: an edit through .data is checked as well
    edit(st_fresh.code, bad)
    with pytest.raises(ValueError, match="only finite values"):
        fn.dequantize_blockwise(q_fresh, st_fresh)


@pytest.mark.parametrize("code", [None, "bnb-e5m2", "tensor"])
def test_codebook_ops_run_in_inference_mode(code) -> None:
    """The codebook memo read ``code._version``: inference tensors have none, so every codebook op inside
    ``torch.inference_mode()`` raised "Inference tensors do not track version counter" (QA finding 5)."""
    import fp8probe.functional as fn
    from fp8probe.formats import get_codebook

    x = torch.randn(3, 500, generator=torch.Generator().manual_seed(7))
    book = get_codebook("dynamic") if code == "tensor" else code
    q0, st0 = fn.quantize_blockwise(x, book, blocksize=64)
    y0 = fn.dequantize_blockwise(q0, st0)
    with torch.inference_mode():
        book_inf = get_codebook("dynamic") if code == "tensor" else code
        for _ in range(2):  # the second call with the same codebook tensor: the memo's hit
            q, st = fn.quantize_blockwise(x, book_inf, blocksize=64)
            assert torch.equal(q, q0) and torch.equal(fn.dequantize_blockwise(q, st), y0)
        assert torch.equal(fn.fake_quantize(x, book_inf, 64), y0)
        qg, stg = fn.quantize(x, book_inf)
        assert torch.equal(fn.dequantize(qg, stg), fn.fake_quantize(x, book, None))
