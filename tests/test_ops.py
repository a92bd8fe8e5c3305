"""torch.library checks of every fp8probe op: opcheck (schema, fake impl, autograd registration, AOT) per device."""
from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import fp8probe.functional  # noqa: F401  (registers fake_quantize, the compiled layers' composite op)
import fp8probe.ops  # noqa: F401  (registers torch.ops.fp8probe.*)
from fp8probe.formats import create_linear_map, get_codebook

OPS = torch.ops.fp8probe
# float8 inputs cannot go through opcheck's test_schema (it multiplies tensors to detect mutation)
NO_SCHEMA = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


def _cases(device: str) -> list[tuple[str, object, tuple, tuple | None]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 70, generator=g).to(device)
    code = get_codebook("bnb-e4m3", device)
    q8 = torch.randint(-127, 128, (5, 70), generator=g, dtype=torch.int8).to(device)
    return [
        ("quantize_blockwise", OPS.quantize_blockwise, (x, code, 64, ""), None),
        ("quantize_blockwise_bnb_fp16", OPS.quantize_blockwise, (x.half(), code, 64, "bnb"), None),
        ("quantize_blockwise_specials", OPS.quantize_blockwise,
         (torch.cat([x.reshape(-1)[:10], torch.tensor([float("inf")], device=device)]), code, 4, ""), None),
        ("quantize_global", OPS.quantize_global, (x, code, ""), None),
        ("quantize_global_bnb", OPS.quantize_global, (x, code, "bnb"), None),
        ("dequantize_blockwise", OPS.dequantize_blockwise,
         (torch.randint(0, 256, (5, 70), generator=g, dtype=torch.uint8).to(device), torch.rand(6, generator=g).to(device),
          code, 64, torch.float16, torch.tensor([3], device=device), torch.tensor([float("inf")], device=device), ""),
         None),
        ("int8_vectorwise_quant", OPS.int8_vectorwise_quant, (x.half(), 1.5, ""), None),
        ("int8_vectorwise_dequant", OPS.int8_vectorwise_dequant, (q8, torch.rand(5, generator=g).to(device)), None),
        ("int8_double_quant", OPS.int8_double_quant, (x, 1.5, "bnb"), None),
        # threshold 0: the fake impls give a static empty outlier_cols (torch.compile, issue 14)
        ("int8_vectorwise_quant_t0", OPS.int8_vectorwise_quant, (x, 0.0, ""), None),
        ("int8_double_quant_t0", OPS.int8_double_quant, (x.half(), 0.0, ""), None),
        # bnb's unsorted 3-bit linear map, searched as bnb does
        ("quantize_blockwise_bnb_unsorted", OPS.quantize_blockwise,
         (x, create_linear_map(True, 3).to(device), 64, "bnb"), None),
        ("int8_linear_matmul", OPS.int8_linear_matmul,
         (q8.reshape(5, 2, 35), torch.randint(-127, 128, (3, 35), generator=g, dtype=torch.int8).to(device)), None),
        ("int8_mm_dequant", OPS.int8_mm_dequant,
         (torch.randint(-1000, 1000, (2, 5, 3), generator=g, dtype=torch.int32).to(device),
          torch.rand(10, generator=g).to(device), torch.rand(3, generator=g).to(device),
          torch.rand(3, generator=g).half().to(device), torch.float16, ""), None),
        ("int8_mm_dequant_bnb", OPS.int8_mm_dequant,
         (torch.randint(-1000, 1000, (2, 5, 3), generator=g, dtype=torch.int32).to(device),
          torch.rand(10, generator=g).to(device), torch.rand(3, generator=g).to(device), None, torch.bfloat16, "bnb"),
         None),
        ("quantize_scaled", OPS.quantize_scaled, (x, "e4m3", 1, 32), None),
        ("fake_quantize", OPS.fake_quantize, (x, code, 64, ""), None),
        ("fake_quantize_global_bnb_bf16", OPS.fake_quantize, (x.bfloat16(), code, 0, "bnb"), None),
        ("fake_quantize_specials", OPS.fake_quantize,
         (torch.cat([x.reshape(-1)[:10], torch.tensor([float("inf"), float("-inf")], device=device)]), code, 4, ""),
         None),
        ("quantize_scaled_mx", OPS.quantize_scaled, (x, "mxfp8-e5m2", 1, 32), None),
        ("dequantize_scaled", OPS.dequantize_scaled,
         (torch.randn(5, 70, generator=g).to(torch.float8_e4m3fn).to(device), torch.rand(5, 3, generator=g).to(device),
          1, 32, torch.bfloat16), NO_SCHEMA),
        ("quantize_scaled_mx_rceil", OPS.quantize_scaled, (x, "mxfp8-e4m3", 1, 32, "rceil"), None),
        ("quantize_scaled_mxfp4", OPS.quantize_scaled, (x, "mxfp4-e2m1", 1, 32, "even"), None),
        ("quantize_scaled_nvfp4", OPS.quantize_scaled,
         (x, "nvfp4", 16, 16, "floor", torch.tensor(0.01, device=device)), None),
        ("dequantize_scaled_nvfp4", OPS.dequantize_scaled,
         (torch.randint(0, 16, (5, 70), generator=g, dtype=torch.uint8).to(device),
          torch.rand(5, 5, generator=g).to(device), 1, 16, torch.float32, "nvfp4", torch.tensor(0.5, device=device)),
         None),
    ]


CASE_NAMES = [c[0] for c in _cases("cpu")]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_opcheck(name: str, device: str) -> None:
    _, op, args, utils = next(c for c in _cases(device) if c[0] == name)
    kwargs = {"test_utils": utils} if utils else {}
    opcheck(op, args, **kwargs)


def test_every_declared_op_is_checked() -> None:
    declared = {"quantize_blockwise", "quantize_global", "dequantize_blockwise", "int8_vectorwise_quant",
                "int8_vectorwise_dequant", "int8_double_quant", "int8_linear_matmul", "int8_mm_dequant",
                "quantize_scaled", "dequantize_scaled", "fake_quantize"}
    for name in declared:
        assert hasattr(OPS, name)
    checked = {str(c[1]).removeprefix("fp8probe.") for c in _cases("cpu")}
    assert declared <= checked


@pytest.mark.parametrize("name", CASE_NAMES)
def test_fake_impl_shapes_match_real(name: str, device: str) -> None:
    """Output dtypes and (static) shapes from the fake impl equal the real ones."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    _, op, args, _ = next(c for c in _cases(device) if c[0] == name)
    real = op(*args)
    real = real if isinstance(real, tuple) else (real,)
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        fargs = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        fake = op(*fargs)
    fake = fake if isinstance(fake, tuple) else (fake,)
    assert len(real) == len(fake)
    for r, f in zip(real, fake):
        assert r.dtype == f.dtype and r.device.type == f.device.type and r.dim() == f.dim()
        for rs, fs in zip(r.shape, f.shape):
            if isinstance(fs, int):
                assert rs == fs


def test_a_backward_through_an_op_says_it_has_no_gradient_and_what_to_use() -> None:
    """A functional op on a tensor that requires grad gave an output with a grad_fn whose backward raised torch's
    "no autograd formula was registered. Please use register_autograd" (user test): read as an fp8probe bug. The
    backward now says the op has no gradient and names what trains; outputs and inputs are unchanged."""
    import fp8probe.functional as F

    g = torch.Generator().manual_seed(11)
    x = torch.randn(8, 64, generator=g).requires_grad_()
    calls = {"fake_quantize": lambda: F.fake_quantize(x, "bnb-e4m3", 16),
             "dequantize_scaled": lambda: F.quantize_scaled(x, "e4m3").dequantize(),
             "int8_vectorwise_dequant": lambda: F.int8_vectorwise_dequant(*F.int8_vectorwise_quant(x)[:2])}
    for name, call in calls.items():
        y = call()
        assert y.requires_grad, name
        with pytest.raises(RuntimeError, match=r"fp8probe\.\w+ has no gradient: quantisation is not differentiable.*"
                                               r"fp8probe\.autograd .*straight-through estimator"):
            y.sum().backward()
        with torch.no_grad():
            assert torch.equal(call(), y.detach()), name  # (the same values with and without the graph)
    assert x.grad is None
