"""Python API arguments that were coerced or crashed with an unrelated error: each now gets a clear one."""
from __future__ import annotations

import pytest
import torch

import fp8probe as FP
from fp8probe import functional as F
from fp8probe.formats import create_fp8_map


def _ab() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, 16, generator=g), torch.randn(16, 8, generator=g)


@pytest.mark.parametrize("fn", [FP.matmul_fp8_mixed, FP.matmul_fp8_global])
def test_fp8_matmul_takes_a_codebook_name(fn) -> None:
    A, B = _ab()
    torch.testing.assert_close(fn(A, B, fw_code="bnb-e4m3", bw_code="bnb-e5m2"), fn(A, B), rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown codebook 'nope'"):
        fn(A, B, fw_code="nope")
    with pytest.raises(TypeError, match="fw_code must be a codebook tensor, a codebook name or None, got int"):
        fn(A, B, fw_code=3)


@pytest.mark.parametrize("bad", [1.7, "64", True, 64.0])
def test_fp8_mixed_block_size_must_be_an_integer(bad) -> None:
    A, B = _ab()  # int(1.7) ran as bsz=1
    with pytest.raises(TypeError, match="bsz must be an integer block size"):
        FP.matmul_fp8_mixed(A, B, bsz=bad)


@pytest.mark.parametrize("name, value", [("bsz", 0), ("bsz2", 0), ("bsz2", -5)])
def test_fp8_mixed_block_sizes_are_named_when_not_positive(name, value) -> None:
    A, B = _ab()  # (the quantiser said "blocksize must be a positive int, got 0", naming neither)
    with pytest.raises(ValueError, match=f"{name} must be a positive block size or -1 \\(get_block_sizes\\), got {value}"):
        FP.matmul_fp8_mixed(A, B, **{name: value})


def test_int8_mixed_scaled_mm_names_its_own_arguments() -> None:
    """Its checks were int8_scaled_mm's: "col_stats must have 4 entries (A.shape[-1])" for a short SCB."""
    g = torch.Generator().manual_seed(5)
    A = torch.randn(8, 16, generator=g)
    CA, SCA, _ = F.int8_vectorwise_quant(A)
    CB, SCB, _ = F.int8_vectorwise_quant(torch.randn(4, 16, generator=g))
    with pytest.raises(ValueError, match=r"SCB must have 4 entries \(one per row of CB, CB.shape\[0\]\), got \[3\]"):
        F.int8_mixed_scaled_mm(A, CA, CB, SCA, SCB[:3])
    with pytest.raises(ValueError, match=r"SCA must have 8 entries \(one per row of A\), got \[7\]"):
        F.int8_mixed_scaled_mm(A, CA, CB, SCA[:7], SCB)
    with pytest.raises(ValueError, match=r"CB must be int8 \[N, K\] with K = A.shape\[-1\] = 16, got \[4, 15\]"):
        F.int8_mixed_scaled_mm(A, CA, CB[:, :15].contiguous(), SCA, SCB)
    with pytest.raises(TypeError, match=r"CB must have dtype in \['torch.int8'\]"):
        F.int8_mixed_scaled_mm(A, CA, CB.float(), SCA, SCB)
    out, _ = F.int8_mixed_scaled_mm(A, CA, CB, SCA, SCB)
    assert out.shape == (8, 4)


@pytest.mark.parametrize("args", [(True, -1, 8, 8), (True, 4.0, 3, 8), (False, 4, 4, 8.0)])
def test_create_fp8_map_field_widths_are_integers(args) -> None:
    with pytest.raises(ValueError, match="must be an integer >= 0"):
        create_fp8_map(*args)


def test_dequantize_blockwise_refuses_codes_of_another_size() -> None:
    q, state = F.quantize_blockwise(torch.randn(10, generator=torch.Generator().manual_seed(4)), blocksize=4)
    with pytest.raises(ValueError, match=r"q must hold the 10 codes of quant_state's tensor \[10\], got 11"):
        F.dequantize_blockwise(torch.zeros(11, dtype=torch.uint8), state)
    assert F.dequantize_blockwise(q.reshape(2, 5), state).shape == (2, 5)  # any shape of the same size


def test_int8_mm_dequant_bias_must_be_a_tensor() -> None:
    C = torch.ones(2, 5, dtype=torch.int32)
    with pytest.raises(TypeError, match="bias must be a tensor of 5 entries or None, got list"):
        F.int8_mm_dequant(C, torch.ones(2), torch.ones(5), bias=[1, 2, 3, 4, 5])


def test_scaled_cast_block_alone_means_block_tiles_and_contradictions_are_refused() -> None:
    """quantize_scaled(x, "e4m3", block=(1, 128)) gave one per-tensor scale: the tile was dropped without a word."""
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(7))
    st = F.quantize_scaled(x, "e4m3", block=(1, 128))
    want = F.quantize_scaled(x, "e4m3", "block", (1, 128))
    assert st.granularity == "block" and st.block == (1, 128) and st.scale.shape == (4, 2)
    assert torch.equal(st.data, want.data) and torch.equal(st.scale, want.scale)
    for gran in ("tensor", "row"):
        with pytest.raises(ValueError, match=f"block=\\(1, 128\\) goes with granularity='block' \\(or none\\), got "
                                             f"granularity='{gran}'"):
            F.quantize_scaled(x, "e4m3", gran, (1, 128))
    np = pytest.importorskip("numpy")
    assert F.quantize_scaled(x, "e4m3", "block", (np.int64(1), np.int32(32))).block == (1, 32)
    with pytest.raises(ValueError, match="positive ints, got \\(True, 32\\)"):
        F.quantize_scaled(x, "e4m3", "block", (True, 32))


def test_numpy_integer_block_sizes_are_taken_and_bools_refused() -> None:
    np = pytest.importorskip("numpy")
    x = torch.randn(300, generator=torch.Generator().manual_seed(8))
    q, st = F.quantize_blockwise(x, blocksize=np.int64(64))
    want_q, want = F.quantize_blockwise(x, blocksize=64)
    assert st.blocksize == 64 and type(st.blocksize) is int and torch.equal(q, want_q)
    with pytest.raises(ValueError, match="blocksize must be a positive int, got True"):
        F.quantize_blockwise(x, blocksize=True)


def test_int8_mixed_scaled_mm_refuses_repeated_outlier_columns() -> None:
    """outlier_cols [2, 2] added column 2's product twice: max error 19.9 against 0.016."""
    g = torch.Generator().manual_seed(9)
    X = torch.randn(4, 8, generator=g)
    X[:, 2] = 10
    CA, SCA, cols = F.int8_vectorwise_quant(X, 5.0)
    CB, SCB, _ = F.int8_vectorwise_quant(torch.randn(3, 8, generator=g))
    assert cols.tolist() == [2]
    F.int8_mixed_scaled_mm(X, CA, CB, SCA, SCB, cols)
    with pytest.raises(ValueError, match=r"outlier_cols must not repeat a column, got \[2, 2\]"):
        F.int8_mixed_scaled_mm(X, CA, CB, SCA, SCB, torch.tensor([2, 2]))


@pytest.mark.parametrize("bias", [torch.tensor([True, False, True]), torch.tensor([1, 2, 3]),
                                  torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)])
def test_int8_dequant_ops_refuse_a_bias_that_is_not_float(bias) -> None:
    """An int or bool bias was added as a float one by the functional ops, where matmul refused it."""
    C = torch.randint(-50, 50, (2, 3), dtype=torch.int32, generator=torch.Generator().manual_seed(10))
    A8 = torch.randint(-127, 128, (2, 4), dtype=torch.int8, generator=torch.Generator().manual_seed(11))
    B8 = torch.randint(-127, 128, (3, 4), dtype=torch.int8, generator=torch.Generator().manual_seed(12))
    msg = f"bias must have dtype in .*, got {bias.dtype}"
    with pytest.raises(TypeError, match=msg):
        F.int8_mm_dequant(C, torch.ones(2), torch.ones(3), bias=bias)
    with pytest.raises(TypeError, match=msg):
        F.int8_scaled_mm(A8, B8, torch.ones(2), torch.ones(3), bias=bias)
    assert F.int8_mm_dequant(C, torch.ones(2), torch.ones(3), bias=bias.float()).dtype == torch.float16


def test_a_quant_state_without_a_codebook_is_named() -> None:
    q, st = F.quantize_blockwise(torch.randn(64, generator=torch.Generator().manual_seed(13)))
    st.code = None
    with pytest.raises(TypeError, match="QuantState.code must be the float32 \\[256\\] codebook tensor, got NoneType"):
        F.dequantize_blockwise(q, st)


def test_matmul_lt_state_threshold_is_checked_as_the_ops_check_it() -> None:
    from fp8probe.autograd import MatmulLtState

    A, B = _ab()
    for bad in ("5", b"5", True):
        with pytest.raises(TypeError, match="threshold must be a number, got"):
            FP.matmul(A, B.t(), state=MatmulLtState(threshold=bad))


@pytest.mark.parametrize("fn, name, b_shape", [(FP.matmul_fp8_mixed, "MatMulFP8Mixed", (8, 5)),
                                               (FP.matmul, "MatMul8bitLt", (5, 8)),
                                               (FP.switchback_bnb, "SwitchBackBnb", (5, 8))])
def test_float64_operands_are_refused_by_the_matmul_s_name(fn, name, b_shape) -> None:
    """float64 failed inside a functional op ("A must have dtype in [...]"), even from a layer, while matmul_fp8_global
    takes it (it quantises a float32 copy, as bitsandbytes does)."""
    g = torch.Generator().manual_seed(14)
    A, B = torch.randn(3, 8, generator=g, dtype=torch.float64), torch.randn(*b_shape, generator=g, dtype=torch.float64)
    with pytest.raises(TypeError, match=f"{name}: A must be float16, bfloat16 or float32 .*got float64: convert with "
                                        r"\.float\(\)"):
        fn(A, B)
    with pytest.raises(TypeError, match=f"{name}: B must be" if fn is not FP.matmul_fp8_mixed else "same dtype"):
        fn(A.float(), B)  # (the FP8 matmuls take A and B of one dtype; the int8 weight may be another)
    assert FP.matmul_fp8_global(A, torch.randn(8, 5, generator=g, dtype=torch.float64)).dtype == torch.float64
