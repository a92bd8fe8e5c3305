"""Low-precision recipes replayed on one captured GEMM's operands: fprop, dgrad and wgrad as each recipe computes them."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from fp8probe import autograd as AG
from fp8probe import functional as F
from fp8probe.backends import cpu as _cpu
from fp8probe.backends import reference as _ref
from fp8probe.backends.int8_gemm import F32_EXACT_K
from fp8probe.formats import FORMATS, INV_127_SQ, get_codebook

from .accumulation import Accumulation, matmul_limited
from .delayed import DelayedScaling, DelayedState
from .metrics import memoized, tensor_key

GEMMS = ("fprop", "dgrad", "wgrad")
OPERANDS = ("activation", "weight", "grad_output")
# DeepSeek-V3-style tiles: activations/gradients 1×128 along the contraction dim, weights 128×128.
TILE = 128
_F32 = torch.float32


# Per-tile records of one scaled cast of a 2-D operand, tiles in row-major order (quantize_scaled's scale
# layout): (scale [tiles] float32 (NVFP4: block scale x tensor scale), zero_block [tiles] bool (no finite
# nonzero element), nonzero [tiles] int64 (finite nonzero elements), underflow [tiles] int64 (of those,
# quantised to 0), clipped [tiles] bool (a saturated element)): what block_scales._records computes.
BlockRecords = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class StrategyOutput:
    """What a recipe produced for one layer and one batch.

    ``gemms``: name → low-precision result (fprop Y [tokens, out], dgrad dA [tokens, in], wgrad dW
    [out, in]); dgrad/wgrad are absent when no output gradient was captured.
    ``operands``: operand name → (x, q, saturated mask or None): the operand as captured and as the
    recipe quantised it (dequantised, same shape); operands the recipe leaves in 16/32-bit are absent.
    ``blocks``: operand → one BlockRecords per slice (one for a 2-D GEMM) of the cast that made q, or None
    for a slice without them; block_scales.update_block_stats reads them instead of recomputing the
    scales and counts (absent / None: it recomputes). Filled by the OCP/MX/NVFP4 recipes (_Scaled) and for
    the blockwise operands of mixed (_fq_blocks).
    """

    gemms: dict[str, torch.Tensor]
    operands: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
    blocks: dict[str, list[BlockRecords | None]] = dataclasses.field(default_factory=dict)


Runner = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", float, bool], StrategyOutput]
# How every recipe treats a GEMM whose second operand is an activation (QKᵀ, PV, matmul/bmm):
# every rule text below holds it word for word (the report's Methods states it once for all of them), and
# run_strategy() applies it slice by slice.
BATCHED_RULE = ("Batched GEMMs (attention heads, bmm, grouped convolutions) run as one 2-D GEMM per slice "
                "of the leading dim, each with its own scales.")

WeightFn = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor | None]"]


@dataclass(frozen=True)
class WeightQuantizer:
    """How a recipe quantises the fprop weight W [out, in]: the one function its runner calls for the
    ``weight`` operand, shared with the weights-only analysis (analysis/weights_only.py).

    ``scaling``: "tensor" (one scale for all of W), "row" (one per output row) or "block" (one per
    ``block`` = (rows, cols) tile). ``quantize(W) -> (q, saturated mask or None)`` as in
    StrategyOutput.operands: q dequantised, W's shape.
    """

    scaling: str
    block: tuple[int, int] | None
    quantize: WeightFn
    #: True when the blocks' scales also depend on one per-tensor scale (NVFP4's global scale): a
    #: chunked weights-only analysis must then see the tensor's absmax in every chunk.
    tensor_scale: bool = False
# linear(x [..., in], W [out, in], bias [out] | None, threshold, b_is_weight) -> y [..., out],
# differentiable: the recipe's fprop in forward and its dgrad/wgrad in backward (what the end-to-end
# mode swaps in for a GEMM; b_is_weight as for Runner).
LinearFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Strategy:
    """A named recipe: ``run(A [tokens, in], W [out, in], G [tokens, out] | None, threshold, b_is_weight)``
    replays it on captured operands; ``linear(x, W, bias, threshold, b_is_weight=True)`` computes the GEMM
    with it inside a running model (forward and backward), from the same autograd functions / quantisers.

    ``b_is_weight`` False: the second operand is an activation (K of QKᵀ, Vᵀ of PV); ``rules``
    says how the recipe quantises it.
    """

    name: str
    rules: str
    formats: tuple[str, ...]
    run: Runner
    linear: LinearFn
    #: The GEMMs whose operands the recipe quantises (at least one of the two); the others run in the
    #: captured precision and sit at float32 rounding level (compare does not gate them).
    quantized_gemms: tuple[str, ...] = GEMMS
    #: Recipes with state across batches (delayed scaling): ``new_state()`` makes the state of one pass
    #: over the batches, and ``run``/``linear`` then take keywords ``state=`` and ``site=`` (a stable key
    #: of the GEMM site: (layer name, slice index or None)). None = stateless.
    new_state: Callable[[], Any] | None = None
    #: ``run`` also takes batched operands [Bt, M, K] / [Bt, N, K] / [Bt, M, N] and returns exactly what
    #: running it slice by slice and stacking would (tests/analysis/test_strategies.py checks every
    #: strategy); False: run_strategy loops over the slices. Every OCP/MX recipe's replay (_Scaled.run)
    #: and the bnb runners in _BNB_BATCHED do, whatever this says (see runs_batched).
    batched: bool = False

    @property
    def runs_batched(self) -> bool:
        """Whether run_strategy hands batched operands to ``run`` in one call."""
        run = self.run.func if isinstance(self.run, functools.partial) else self.run
        return self.batched or run in _BNB_BATCHED or isinstance(getattr(run, "__self__", None), _Scaled)


def reference_gemms(A: torch.Tensor, W: torch.Tensor, G: torch.Tensor | None,
                    grads: tuple[bool, bool] = (True, True)) -> dict[str, torch.Tensor]:
    """float64 fprop A·Wᵀ, dgrad G·W, wgrad Gᵀ·A (dgrad/wgrad only with G, each only when ``grads`` says
    training runs it: GemmCall.grads); batched over a leading dim when A is [Bt, M, K] (wgrad is then the
    gradient of the second operand, [Bt, N, K])."""
    # float64 copies of the operands: torch has no float32 x float32 -> float64 GEMM, and the reference must
    # hold every product exactly (two float32 mantissas: 48 bits) and sum in float64
    a, w = A.to(torch.float64), W.to(torch.float64)
    out = {"fprop": a @ w.mT}
    if G is not None:
        g = G.to(torch.float64)
        if grads[0]:
            out["dgrad"] = g @ w
        # W's float64 copy is freed before the W-sized wgrad is made: an LM head's [49152, 576] each take
        # 216 MiB, and the site's peak is this function's
        del w
        if grads[1]:
            out["wgrad"] = g.mT @ a
    return out


def _check(A: torch.Tensor, W: torch.Tensor, G: torch.Tensor | None) -> None:
    batched = A.dim() == 3 and W.dim() == 3 and A.shape[0] == W.shape[0]
    if not (batched or (A.dim() == 2 and W.dim() == 2)) or A.shape[-1] != W.shape[-1]:
        raise ValueError(f"expected A [tokens, in] and W [out, in] (or [Bt, M, K] and [Bt, N, K]) with the same "
                         f"contraction size, got {list(A.shape)} and {list(W.shape)}")
    expect = (*A.shape[:-1], W.shape[-2])
    if G is not None and tuple(G.shape) != expect:
        raise ValueError(f"expected G [tokens, out] = {list(expect)}, got {list(G.shape)}")


def _autograd_gemms(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], A: torch.Tensor, W: torch.Tensor,
                    G: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Run an fp8probe autograd function forward (and backward with G as the upstream gradient)."""
    with torch.enable_grad():
        a = A.detach().clone().requires_grad_(G is not None)
        w = W.detach().clone().requires_grad_(G is not None)
        y = fn(a, w)
        out = {"fprop": y.detach()}
        if G is not None:
            da, dw = torch.autograd.grad(y, (a, w), G.to(y.dtype))
            out["dgrad"], out["wgrad"] = da.detach(), dw.detach()
    return out


# --------------------------------------------------------------------------------------------
# bitsandbytes recipes: the fp8probe autograd functions themselves (SPEC §6, §7.2)
# --------------------------------------------------------------------------------------------
def _fq_code(x: torch.Tensor, book: str, blocksize: int | None) -> torch.Tensor:
    # The global quantiser reads float32 only (SPEC §3); the research matmuls cast the same way. The codebook by
    # name, as the autograd functions pass it: functional knows a named one valid and sorted, where a codebook
    # tensor new to it is checked again (two host waits on a GPU, per operand and recipe).
    return F.fake_quantize(x.float(), book, blocksize).to(x.dtype)


def _weight_bnb_global(W: torch.Tensor) -> tuple[torch.Tensor, None]:
    """MatMulFP8Global / MatMulFP8Mixed weight: bnb-e4m3, one absmax for the whole tensor (SPEC §7.2)."""
    return _fq_code(W, "bnb-e4m3", None), None


def _run_global(A: torch.Tensor, W: torch.Tensor, G: torch.Tensor | None, threshold: float,
                b_is_weight: bool = True) -> StrategyOutput:
    if _stackable(A, W, G):
        return _run_fp8_batched(A, W, G, None)
    if _stackable(A[None], W[None], G):
        return _one_slice(_run_fp8_batched, A, W, G, None)
    gemms = _autograd_gemms(lambda a, w: AG.matmul_fp8_global(a, w.t()), A, W, G)
    ops = {"activation": (A, _fq_code(A, "bnb-e4m3", None), None), "weight": (W, *_weight_bnb_global(W))}
    if G is not None:
        ops["grad_output"] = (G, _fq_code(G, "bnb-e5m2", None), None)
    return StrategyOutput(gemms, ops)


def _run_mixed(A: torch.Tensor, W: torch.Tensor, G: torch.Tensor | None, threshold: float,
               b_is_weight: bool = True, blocks: tuple[int, int] | None = None) -> StrategyOutput:
    if _stackable(A, W, G):
        return _run_fp8_batched(A, W, G, blocks or AG.get_block_sizes(A[0], W[0]))
    if _stackable(A[None], W[None], G):
        return _one_slice(_run_fp8_batched, A, W, G, blocks or AG.get_block_sizes(A, W))
    bsz, bsz2 = blocks or AG.get_block_sizes(A, W)
    gemms = _autograd_gemms(lambda a, w: AG.matmul_fp8_mixed(a, w.t(), bsz=bsz, bsz2=bsz2), A, W, G)
    ops = {"activation": (A, _fq_code(A, "bnb-e4m3", bsz), None), "weight": (W, *_weight_bnb_global(W))}
    if G is not None:
        ops["grad_output"] = (G, _fq_code(G, "bnb-e5m2", bsz2), None)
    return StrategyOutput(gemms, ops)


# Batched replay of the bnb recipes (Strategy.runs_batched): operands [Bt, M, K] / [Bt, N, K] / [Bt, M, N]
# in one quantiser call per operand where every slice's blocks (rows) are blocks (rows) of the stacked
# tensor, the matmuls slice by slice (_mm), each step the one the autograd function runs on one slice,
# so the result is the slice-by-slice run bit for bit (tests/analysis/test_strategies.py). A call costs
# ~0.1 ms of dispatch and an autograd replay a few more; a 9-head attention site ran 9 of each per recipe.
def _stackable(A: torch.Tensor, W: torch.Tensor, G: torch.Tensor | None) -> bool:
    """Batched, non-empty operands (empty ones take the autograd functions' zero-size path)."""
    return A.dim() == 3 and A.numel() > 0 and W.numel() > 0 and (G is None or G.numel() > 0)


def _one_slice(run: Callable[..., StrategyOutput], A: torch.Tensor, W: torch.Tensor, G: torch.Tensor | None,
               *args: Any) -> StrategyOutput:
    """A batched replay on 2-D operands as a stack of one slice: its steps on one slice are the autograd
    function's own (tests/analysis/test_bnb_replay.py), without _autograd_gemms' operand clones and graph:
    global/mixed/switchback on A [256, 576], W [576, 576] took 11.2/11.2/9.0 ms that way, 8.5/9.2/8.1 ms so
    (CPU time, one thread, fused fake-quantisation in both)."""
    out = run(A[None], W[None], None if G is None else G[None], *args)
    originals = {"activation": A, "weight": W, "grad_output": G}
    return StrategyOutput({k: v[0] for k, v in out.gemms.items()},
                          {k: (originals[k], q[0], None if sat is None else sat[0])
                           for k, (_, q, sat) in out.operands.items()}, out.blocks)


def _fq_code_slices(x: torch.Tensor, book: str, blocksize: int | None, as_float: bool = True) -> torch.Tensor:
    """fake_quantize of each slice of x [Bt, R, C] with ``blocksize`` (None: one absmax per slice) over the
    flattened slice, as _fq_code (``as_float``) or MatMulFP8Mixed's _fq_blockwise (in x's dtype) does it on
    one slice. One blockwise call over the flattened stack when the slices' blocks line up (a per-tensor
    absmax is the block of the whole slice; the CPU quantisers compute it identically, the CUDA kernels take
    power-of-two blocks only), else slice by slice."""
    per = x[0].numel()
    block = per if blocksize is None else blocksize
    if per % block == 0 and (blocksize is not None or x.device.type == "cpu"):
        src = x.float() if as_float else x
        return F.fake_quantize(src.contiguous(), book, block).to(x.dtype)
    if as_float:
        return torch.stack([_fq_code(x[i], book, blocksize) for i in range(x.shape[0])])
    return torch.stack([F.fake_quantize(x[i], book, blocksize) for i in range(x.shape[0])])


def _fq_blocks(x: torch.Tensor, book: str, blocksize: int) -> tuple[torch.Tensor, list[BlockRecords] | None]:
    """_fq_code_slices(x, book, blocksize, as_float=False) for x [Bt, R, C] plus each slice's BlockRecords
    (blocks of ``blocksize`` over the flattened slice, scale = block absmax: what block_scales._codebook_records
    computes from x and q) counted by the same C pass (backends.cpu.fake_quantize_records). Records None
    where that pass does not run (CUDA, FP8PROBE_BACKEND=reference, NaN/±Inf): q then comes from
    _fq_code_slices and block_scales recomputes them."""
    bt, per = x.shape[0], x[0].numel()
    code = get_codebook(book, x.device)
    # one call over the stack where the slices' blocks are its blocks (as _fq_code_slices), else per slice
    parts = [x.contiguous()] if per % blocksize == 0 else [x[i] for i in range(bt)]
    done = []
    for part in parts:
        res = _cpu.fake_quantize_records(part, code, blocksize)
        if res is None:
            return _fq_code_slices(x, book, blocksize, as_float=False), None
        done.append(res)
    if len(done) == 1:
        q, absmax, counts = done[0]
        pieces = list(zip(absmax.view(bt, -1), counts.view(3, bt, -1).unbind(1)))
    else:
        q = torch.stack([d[0] for d in done])
        pieces = [(d[1], d[2]) for d in done]
    recs = [(absmax, nz == 0, nz, under, clipped > 0) for absmax, (nz, under, clipped) in pieces]
    return q.view(x.shape), recs


def _fq_weight_t(W: torch.Tensor) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
    """(qW, fp8Wt) for W [Bt, N, K]: qW the fake-quantised W in row-major (the reported operand) and
    fp8Wt() the contiguous [Bt, K, N] fake-quantised wᵀ the autograd function multiplies by (its B = w.t()
    quantised), made on first call only (_relaid may not need it). One absmax per slice and elementwise
    rounding: fq(Wᵀ) = fq(W)ᵀ, so whichever of W and Wᵀ is contiguous is quantised and the other layout
    made by a copy of the result."""
    if W.is_contiguous() or not W.mT.is_contiguous():
        qW = _fq_code_slices(W, "bnb-e4m3", None)
        return qW, functools.cache(lambda: _cpu.contiguous(qW.mT))  # the C transpose on CPU
    fp8Wt = _fq_code_slices(W.mT, "bnb-e4m3", None)
    return _cpu.contiguous(fp8Wt.mT), lambda: fp8Wt


# (GEMM, operand shapes and strides, device, threads) → whether the replay's layouts gave the autograd
# function's bits on the probe operands (see _relaid).
_RELAID_EXACT: dict[tuple, bool] = {}
_ALIGN = 64  # bytes: the CPU allocator's alignment; MKL may pick other kernels for other alignments


def _same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    if x.shape != y.shape or x.dtype != y.dtype:
        return False
    ints = {4: torch.int32, 2: torch.int16, 8: torch.int64, 1: torch.int8}[x.element_size()]
    return bool(torch.equal(x.contiguous().view(ints), y.contiguous().view(ints)))


#: Elements of one probe pattern, repeated over a probe operand (prime: rows of any width start at
#: different offsets of it, so no two outputs see the same terms).
_PROBE_PERIOD = 4099
#: Operands (elements of a and b together) above which a layout is not probed: the probe costs about one
#: replay of the GEMM (an LM head's 28M-element weight: ~1 s a key) and the copy it would save is a few
#: per cent of such a GEMM, so the reference layout is used.
_PROBE_MAX = 1 << 22


def _probe(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Values for an exactness probe in t's dtype, laid out like t (shape and strides), in fresh (aligned)
    memory: normal samples times 2^(-2..2) (a pattern of _PROBE_PERIOD repeated), so that the terms of a
    sum have comparable magnitudes and full mantissas and almost every change of summation order changes
    some output's rounding. (Values spread over many binades do not: each sum is then its largest term
    and the order never shows.)"""
    base = torch.randn(_PROBE_PERIOD, generator=gen) * torch.exp2(torch.randint(-2, 3, (_PROBE_PERIOD,), generator=gen).float())
    n = t.numel()
    vals = base.repeat(-(-n // _PROBE_PERIOD))[:n].view(t.shape)
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(vals.to(t.device))


def _overlapping(t: torch.Tensor) -> bool:
    """Whether two elements of t share memory (a stride 0 from expand, or strides smaller than the extents they
    step over)."""
    reach = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda p: p[1]):
        if size == 1:
            continue
        if stride < reach:
            return True
        reach = stride * size
    return False


def _agree(key: tuple, a: torch.Tensor, b: torch.Tensor, one: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
           other: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> bool:
    """Whether ``one`` and ``other`` give the same bits on probe pairs shaped and strided like (a, b), up
    to 16 until 256 outputs were compared (a one-output product whose two orders differ in one late
    addition showed it in ~1 probe of 4)."""
    if _overlapping(a) or _overlapping(b):  # (an expanded gradient, stride 0): no probe of that layout can be made
        return False
    gen = _probe_gen(key)
    compared = probes = 0
    while compared < 256 and probes < 16:
        pa, pb = _probe(a, gen), _probe(b, gen)
        x = one(pa, pb)
        if not _same_bits(x, other(pa, pb)):
            return False
        compared, probes = compared + x.numel(), probes + 1
    return True


def _probe_gen(key: tuple) -> torch.Generator:
    """A generator seeded from the key itself (not from how many keys were seen before, nor str hashing),
    so every run and every worker thread probes a key with the same values."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _relaid(tag: str, a: torch.Tensor, b: torch.Tensor, fast: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
            autograd: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
            actual: Callable[[], torch.Tensor] | None = None, shared: bool = False) -> torch.Tensor:
    """A GEMM of the autograd function, ``autograd(a, b)`` (it re-lays a or b as the function does: the
    contiguous fq(w.t()), a result transposed back), computed as ``fast(a, b)``: the same values multiplied
    in the layouts the replay already has, without transposed copies of W [N, K] or of the wgrad.
    ``actual``: autograd(a, b) from re-laid operands the replay keeps (one copy of fq(w.t()) for two GEMMs).
    ``shared``: ``fast(a, b)`` is _mm(a, b), which another recipe of a shared_site() block may have computed.

    A BLAS's summation order depends on shapes, strides, dtype, alignment and threads, not on values (_mm's
    premise), but a transposed operand can change it (MKL on [7, 33]·[33, 65] with two threads and on
    one-row products gave other bits). So ``fast`` serves a key only if, when first seen, both ways gave the
    same bits on probe pairs of its shapes and strides (_agree, _probe: a change of summation order shows;
    the call's own data could hide one, and did for fp16 outputs). float32 operands at the allocator's alignment,
    up to _PROBE_MAX elements, only; everything else takes ``autograd``."""
    slow = actual or (lambda: autograd(a, b))
    if not (a.dtype == b.dtype == _F32 and a.data_ptr() % _ALIGN == 0 and b.data_ptr() % _ALIGN == 0) \
            or a.numel() + b.numel() > _PROBE_MAX:
        return slow()
    key = (tag, tuple(a.shape), a.stride(), tuple(b.shape), b.stride(), a.device.type, torch.get_num_threads())
    exact = _RELAID_EXACT.get(key)
    if exact is None:
        exact = _RELAID_EXACT[key] = _agree(key, a, b, fast, autograd)
    if not exact:
        return slow()
    return _shared("mm", lambda: fast(a, b), a, b) if shared else fast(a, b)


def _dgrad_autograd(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return _mm(g, w.mT.contiguous().mT)  # G · fp8B.t(): fp8B = fq(w.t()) is contiguous [K, N]


def _wgrad_autograd(gt: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return _mm(a.mT, gt.mT).mT  # grad_B = Aᵀ · G [K, N], transposed back to W's [N, K]


def _fp8_cast_a(A: torch.Tensor, blocks: tuple[int, int] | None, records: bool = True
                ) -> tuple[torch.Tensor, list[BlockRecords | None] | None]:
    """(fp8A, its per-slice records or None): A [Bt, M, K] as MatMulFP8Global (blocks None: one absmax per
    slice, _fq_code's float32 cast) / MatMulFP8Mixed (blocks (bsz, bsz2): blocks of bsz in A's dtype) quantise it."""
    if blocks is None:
        return _fq_code_slices(A, "bnb-e4m3", None), None
    if not records:
        return _fq_code_slices(A, "bnb-e4m3", blocks[0], as_float=False), None
    return _fq_blocks(A, "bnb-e4m3", blocks[0])


def _fp8_fprop(fp8A: torch.Tensor, qW: torch.Tensor, fp8Wt: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The forward product fp8A · fq(w.t()) of MatMulFP8Global / MatMulFP8Mixed (_fq_weight_t's qW, fp8Wt)."""
    return _relaid("fprop", fp8A, qW.mT, _mm, lambda a, b: _mm(a, b.contiguous()), lambda: _mm(fp8A, fp8Wt()))


def _fp8_grads(A: torch.Tensor, G: torch.Tensor, y_dtype: torch.dtype, fp8A: torch.Tensor | None, qW: torch.Tensor,
               fp8Wt: Callable[[], torch.Tensor], blocks: tuple[int, int] | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[BlockRecords | None] | None]:
    """(dgrad, wgrad, g, fp8G, G's records) of MatMulFP8Global (blocks None; fp8A: _fp8_cast_a's) / MatMulFP8Mixed
    (fp8A unused: its wgrad is the unquantised Gᵀ·A) for the upstream gradient G; g = G in the output's dtype."""
    g = G.to(y_dtype)
    if blocks is not None:
        fp8G, recG = _fq_blocks(g, "bnb-e5m2", blocks[1])
        g8 = fp8G.to(qW.dtype)
        dgrad = _relaid("dgrad", g8, qW, _mm, _dgrad_autograd, lambda: _mm(g8, fp8Wt().mT)).to(A.dtype)
        gA = g.to(A.dtype)
        wgrad = _relaid("wgrad", gA.mT, A, _mm, _wgrad_autograd, shared=True).to(qW.dtype)
        return dgrad, wgrad, g, fp8G, recG
    fp8G = _fq_code_slices(g, "bnb-e5m2", None).to(fp8A.dtype)
    dgrad = _relaid("dgrad", fp8G, qW, _mm, _dgrad_autograd, lambda: _mm(fp8G, fp8Wt().mT)).to(fp8A.dtype)
    wgrad = _relaid("wgrad", fp8G.mT, fp8A, _mm, _wgrad_autograd).to(qW.dtype)
    return dgrad, wgrad, g, fp8G, None


def _run_fp8_batched(A: torch.Tensor, W: torch.Tensor, G: torch.Tensor | None,
                     blocks: tuple[int, int] | None) -> StrategyOutput:
    """MatMulFP8Global (blocks None) / MatMulFP8Mixed (blocks = (bsz, bsz2)) on every slice, as
    _autograd_gemms(matmul_fp8_*(a, w.t())) computes them."""
    mixed = blocks is not None
    recs: dict[str, list[BlockRecords | None]] = {}
    fp8A, recA = _fp8_cast_a(A, blocks)
    qW, fp8Wt = _fq_weight_t(W)
    y = _fp8_fprop(fp8A, qW, fp8Wt)
    gemms = {"fprop": y}
    # The reported operands are _fq_code's (quantised in float32, cast back). Where that is the tensor a
    # GEMM already used it is reused: float32 operands of mixed, every operand of global, and W (one
    # absmax per slice, elementwise rounding: fq(Wᵀ) = fq(W)ᵀ); and 16-bit operands of mixed that the C
    # pass quantised (records present: finite data), whose output is the RNE cast of the same float32
    # value fl32(code·absmax) that _fq_code casts (only NaN bits could differ, and those take the ops).
    if mixed and A.dtype != _F32 and recA is None:
        qA = _fq_code_slices(A, "bnb-e4m3", blocks[0])
    else:
        qA = fp8A
    if recA is not None:
        recs["activation"] = recA
    ops = {"activation": (A, qA, None), "weight": (W, qW, None)}
    if G is not None:
        gemms["dgrad"], gemms["wgrad"], g, fp8G, recG = _fp8_grads(A, G, y.dtype, fp8A, qW, fp8Wt, blocks)
        if mixed:
            # g is G itself when the dtypes agree; else the reported operand and its records are G's own
            same = G.dtype == g.dtype and (G.dtype == _F32 or recG is not None)
            ops["grad_output"] = (G, fp8G if same else _fq_code_slices(G, "bnb-e5m2", blocks[1]), None)
            if recG is not None and G.dtype == g.dtype:
                recs["grad_output"] = recG
        else:
            same = G.dtype == g.dtype == fp8A.dtype
            ops["grad_output"] = (G, fp8G if same else _fq_code_slices(G, "bnb-e5m2", None), None)
    return StrategyOutput(gemms, ops, recs)


class _StackedFp8(torch.autograd.Function):
    """MatMulFP8Global (blocks None) / MatMulFP8Mixed (blocks (bsz, bsz2)) of each slice of a [Bt, M, K] and
    b [Bt, N, K] (a · bᵀ; b plays w, quantised as the function's B = w.t()), forward and backward from the
    replay's own steps (_fp8_cast_a, _fp8_fprop, _fp8_grads: the autograd functions' bits,
    tests/analysis/test_bnb_replay.py). Saves a and b only: the backward quantises them again (the same bits)
    instead of holding a float32 fp8 copy of every weight through a model's pass, as the library's functions
    do (Llama-135M end to end: the peak of the whole e2e part)."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor, blocks: tuple[int, int] | None) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        # detached: the fused C quantisers decline tensors that require grad (no graph is built here anyway)
        a, b = a.detach(), b.detach()
        fp8A, _ = _fp8_cast_a(a, blocks, records=False)
        qW, fp8Wt = _fq_weight_t(b)
        y = _fp8_fprop(fp8A, qW, fp8Wt)
        ctx.blocks, ctx.y_dtype = blocks, y.dtype
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        a, b = (t.detach() for t in ctx.saved_tensors)
        grad = grad.detach()
        with torch.no_grad():
            fp8A = _fp8_cast_a(a, None)[0] if ctx.blocks is None else None  # (mixed's wgrad is unquantised)
            qW, fp8Wt = _fq_weight_t(b)
            dgrad, wgrad, *_ = _fp8_grads(a, grad, ctx.y_dtype, fp8A, qW, fp8Wt, ctx.blocks)
        return (dgrad if ctx.needs_input_grad[0] else None, wgrad if ctx.needs_input_grad[1] else None, None)


def _fp8_linear(x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None,
                blocks: tuple[int, int] | None) -> torch.Tensor:
    """``matmul_fp8_global(x, W.t())`` (blocks None) / ``matmul_fp8_mixed(x, W.t(), *blocks)`` (-1: get_block_sizes'
    size) plus the bias in x's precision, for x [..., in] and W [out, in], by _StackedFp8 on the one-slice stack
    of x's rows: the functions' values and gradients (tests/analysis/test_e2e.py), without their saved fp8 copy
    of W. Empty operands take the functions themselves."""
    if x.numel() == 0 or W.numel() == 0:
        if blocks is None:
            return _plus_bias(AG.matmul_fp8_global(x, W.t()), bias)
        return _plus_bias(AG.matmul_fp8_mixed(x, W.t(), bsz=blocks[0], bsz2=blocks[1]), bias)
    if blocks is not None:  # (-1: get_block_sizes', as the function resolves them)
        blocks = AG._resolve_blocks(x, W.t(), blocks[0], blocks[1], None)
    y = _StackedFp8.apply(x.reshape(1, -1, x.shape[-1]), W[None], blocks)
    return _plus_bias(y.reshape(*x.shape[:-1], W.shape[0]), bias)


# --------------------------------------------------------------------------------------------
# Sub-results recipes share on one GEMM call: int8 (MatMul8bitLt) and switchback (SwitchBackBnb) quantise
# W to the same int8 row codes, compute the same dgrad G·deq(W), and the same forward product wherever A's
# row codes agree (no outlier column); mixed (MatMulFP8Mixed) and switchback the same unquantised wgrad
# Gᵀ·A (where mixed's layout probe chose _mm's). Replayed in one shared_site() block (the pipeline runs
# such recipes one after the other in one task, SHARING), a later one reuses an earlier one's tensors:
# the values it would compute itself, bit for bit (tests/analysis/test_shared_replay.py).
# --------------------------------------------------------------------------------------------
#: Groups of recipes (by name) that share sub-results when replayed in one shared_site() block.
SHARING = (("mixed", "int8", "switchback"),)
_SITE = threading.local()


@contextlib.contextmanager
def shared_site() -> Iterator[None]:
    """Recipes replayed in this block by this thread, all on the operands of one GEMM call, reuse each
    other's identical sub-results (and the metrics their sums, site_memo); a nested block joins the outer."""
    if getattr(_SITE, "memo", None) is not None:
        yield
        return
    _SITE.memo = {}
    try:
        yield
    finally:
        _SITE.memo = None


def replay_groups(strategies: list[Strategy]) -> list[list[int]]:
    """``strategies`` (indices) cut into runs to replay one after the other in one shared_site() block: a
    run is a maximal sequence of neighbours of one SHARING group, every other recipe a run of its own."""
    group_of = {name: k for k, names in enumerate(SHARING) for name in names}
    runs: list[list[int]] = []
    for i, strat in enumerate(strategies):
        k = group_of.get(strat.name)
        if runs and k is not None and group_of.get(strategies[runs[-1][-1]].name) == k:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def site_memo() -> dict | None:
    """The memo of this thread's shared_site() block, None outside one."""
    return getattr(_SITE, "memo", None)


def _shared(tag: str, make: Callable[[], Any], *tensors: torch.Tensor) -> Any:
    """make(), or what it returned earlier in this shared_site() block for the same tensors."""
    return memoized(site_memo(), tag, make, *tensors, keep_alive=True)


def _int8_weight(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(CB, SCB, deq(CB, SCB) float32) of a 2-D W: int8 row codes with threshold 0, shared on a site."""
    def make() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        CB, SCB, _ = F.int8_vectorwise_quant(W.contiguous(), 0.0)
        return CB, SCB, F.int8_vectorwise_dequant(CB, SCB)
    return _shared("int8-w", make, W)


def _int8_fprop(A: torch.Tensor, W: torch.Tensor, CA: torch.Tensor, SCA: torch.Tensor, CB: torch.Tensor,
                SCB: torch.Tensor) -> torch.Tensor:
    """F.int8_scaled_mm(CA, CB, SCA, SCB, A.dtype) for 2-D A, W (CB, SCB: _int8_weight(W)'s), or the product
    another recipe of the site computed from the same A, W where its row codes and scales equal CA, SCA."""
    memo, key = site_memo(), ("int8-fprop", tensor_key(A), tensor_key(W))
    seen = memo.get(key) if memo is not None else None
    if seen is not None and _same_bits(seen[1][0], CA) and _same_bits(seen[1][1], SCA):
        return seen[1][2]
    y = F.int8_scaled_mm(CA, CB, SCA, SCB, dtype=A.dtype)
    if memo is not None:
        memo[key] = ((A, W), (CA, SCA, y))
    return y


def _int8_dgrad(G: torch.Tensor, W: torch.Tensor, W32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """G·deq(W) in ``dtype`` (W32: _int8_weight(W)'s), shared on a site."""
    return _shared(f"int8-dgrad-{dtype}", lambda: torch.matmul(G.to(dtype), W32.to(dtype)), G, W)


def _int8_rows(x: torch.Tensor, threshold: float, row_scale: str = "bnb") -> torch.Tensor:
    """x as LLM.int8 sees it: int8 row codes dequantised, outlier columns kept in x's precision."""
    q, stats, cols = F.int8_vectorwise_quant(x, threshold, row_scale=row_scale)
    deq = F.int8_vectorwise_dequant(q, stats).to(x.dtype)
    if cols is not None and cols.numel():
        deq[:, cols] = x[:, cols]
    return deq


def _weight_int8(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MatMul8bitLt / SwitchBack weight: int8 per output row (row absmax/127), no outlier columns (SPEC §6.2)."""
    return _int8_rows(W, 0.0), _unclipped(W)


def _unclipped(x: torch.Tensor) -> torch.Tensor:
    """The saturation mask of an int8 operand: none. Absmax scaling (by row, column or with outlier columns left in
    16-bit) maps every element into [-127, 127]; the generic test (|x| > the largest |q|, OperandAccumulator) counted
    the element setting the scale whenever fl(fl(x·127/s)·s/127) landed 1 ulp below it (the demo's qkv weight: 8e-5)."""
    return torch.zeros_like(x, dtype=torch.bool)


def _int8_cols(x: torch.Tensor) -> torch.Tensor:
    """x column-quantised to int8 (the gradient operand of the correct MatMul8bitLt grad_B, SPEC §6.3 / Q10)."""
    _, q_col, _, col_stats, _ = F.int8_double_quant(x, 0.0)
    return (q_col.float() * col_stats.float()[None, :] / 127.0).to(x.dtype)


def _nan_lines(t: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """AG.nan_lines of a site's operand, once per shared_site() block (int8 and switchback read the same A and W)."""
    return None if t is None else _shared("nan-lines", lambda: (AG.nan_lines(t),), t)[0]  # (a tuple: None is kept)


def _int8_nans(out: StrategyOutput, A: torch.Tensor, W: torch.Tensor, G: torch.Tensor | None,
               int8_wgrad: bool) -> StrategyOutput:
    """A direct int8 replay's GEMMs with the NaN the autograd functions put where the float products have one
    (AG.nan_lines / AG.with_nans, per slice of a batched site): fprop on the NaN rows of A and W, dgrad on W's
    NaN columns and, where wgrad is an int8 product (MatMul8bitLt, not SwitchBack), wgrad on G's and A's."""
    a, w = _nan_lines(A), _nan_lines(W)
    g = _nan_lines(G) if int8_wgrad else None
    gemms = out.gemms
    if a is not None or w is not None:
        gemms["fprop"] = AG.with_nans(gemms["fprop"], a and a[0], w and w[0])
    if w is not None and "dgrad" in gemms:
        gemms["dgrad"] = AG.with_nans(gemms["dgrad"], None, w[1])
    if int8_wgrad and (a is not None or g is not None) and "wgrad" in gemms:
        gemms["wgrad"] = AG.with_nans(gemms["wgrad"], g and g[1], a and a[1])
    return out


def _run_int8(A: torch.Tensor, W: torch.Tensor, G: torch.Tensor | None, threshold: float,
              b_is_weight: bool = True, row_scale: str = "bnb") -> StrategyOutput:
    if A.dim() == 2 and A.numel() > 0 and W.numel() > 0:
        return _int8_nans(_run_int8_direct(A, W, G, threshold, row_scale), A, W, G, int8_wgrad=True)
    if A.dim() == 3 and A.shape[0] > 0:  # a batched site (_BNB_BATCHED): one call per step where it can
        out = _run_int8_stacked(A, W, G, threshold, row_scale) if _stackable(A, W, G) else None
        out = None if out is None else _int8_nans(out, A, W, G, int8_wgrad=True)
        return out if out is not None else _slice_by_slice(_run_int8, A, W, G, threshold, b_is_weight, row_scale)
    gemms = _autograd_gemms(lambda a, w: AG.matmul(a, w, threshold=threshold, row_scale=row_scale), A, W, G)
    ops = {"activation": (A, _int8_rows(A, threshold, row_scale), _unclipped(A)), "weight": (W, *_weight_int8(W))}
    if G is not None:
        ops["grad_output"] = (G, _int8_cols(G), _unclipped(G))
    return StrategyOutput(gemms, ops)


def _run_int8_direct(A: torch.Tensor, W: torch.Tensor, G: torch.Tensor | None, threshold: float,
                     row_scale: str) -> StrategyOutput:
    """MatMul8bitLt (default mode, a fresh MatmulLtState, SPEC §6.2-6.3) on A [tokens, in], W [out, in]: the
    functional calls its forward and backward make, in their order, without the autograd graph, so the
    GEMMs are _autograd_gemms(AG.matmul ...)'s bit for bit (tests/analysis/test_bnb_replay.py). The
    reported operands reuse the codes the GEMMs computed (they are _int8_rows / _weight_int8 / _int8_cols's)."""
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    t = float(threshold)
    # forward: row codes of A (and its column codes when a gradient follows), the weight's row codes
    if G is not None:
        CA, CAt, SCA, SCAt, cols = F.int8_double_quant(A, t, row_scale=row_scale)
    else:
        CA, SCA, cols = F.int8_vectorwise_quant(A, t, row_scale=row_scale)
    CB, SCB, W32 = _int8_weight(W)
    outliers = t > 0.0 and cols is not None and cols.numel() > 0
    if outliers:
        y, subA = F.int8_mixed_scaled_mm(A, CA, CB, SCA, SCB, cols)
    else:
        y = _int8_fprop(A, W, CA, SCA, CB, SCB)
    gemms = {"fprop": y}
    qA = F.int8_vectorwise_dequant(CA, SCA).to(A.dtype)
    if cols is not None and cols.numel():
        qA[:, cols] = A[:, cols]
    ops = {"activation": (A, qA, _unclipped(A)), "weight": (W, W32.to(W.dtype), _unclipped(W))}
    if G is not None:
        # backward: grad_B from column codes of G and A (outlier columns in A's precision), grad_A = G·deq(W)
        grad2 = G.to(y.dtype)
        _, Cg_col, _, Sg_col, _ = F.int8_double_quant(grad2, 0.0)
        QA_col = CAt
        if outliers:
            QA_col = CAt.clone()
            QA_col[:, cols] = 0
        # Transposed views, not int8 copies: the product is exact whatever the layout (int8_linear_matmul),
        # and the float32 int8 GEMM (int8_gemm.int8_gemm_float) takes them as they are.
        dW = F.int8_scaled_mm(Cg_col.t(), QA_col.t(), Sg_col, SCAt, dtype=_F32)
        if outliers:
            dW[:, cols] += torch.matmul(grad2.to(subA.dtype).t(), subA).float()
        gemms["dgrad"] = _int8_dgrad(grad2, W, W32, A.dtype)
        gemms["wgrad"] = dW.to(W.dtype)
        if G.dtype == grad2.dtype:
            qG = (Cg_col.float() * Sg_col.float()[None, :] / 127.0).to(G.dtype)  # _int8_cols(G)
        else:
            qG = _int8_cols(G)
        ops["grad_output"] = (G, qG, _unclipped(G))
    return StrategyOutput(gemms, ops)


def _int8_scaled_mm_stacked(CA: torch.Tensor, CB: torch.Tensor, SCA: torch.Tensor, SCB: torch.Tensor,
                            dtype: torch.dtype) -> torch.Tensor:
    """``torch.stack([F.int8_scaled_mm(CA[i], CB[i], SCA[i], SCB[i], dtype=dtype) for i])`` (default mode, no
    bias) for CA [Bt, M, K], CB [Bt, N, K], SCA [Bt, M], SCB [Bt, N], bit for bit. Up to F32_EXACT_K products a
    float32 sum of int8 products is an exact integer whatever its order (|sum| <= 1024·127² < 2^24), so one
    float32 bmm gives each slice's int32 product exactly, and the dequantisation is SPEC §5.5's
    ``fl32(fl32(fl32(C·row)·col)·INV_127_SQ)`` elementwise, the reference's expression. Longer contractions: the
    per-slice calls."""
    if CA.shape[-1] > F32_EXACT_K:
        return torch.stack([F.int8_scaled_mm(CA[i], CB[i], SCA[i], SCB[i], dtype=dtype) for i in range(CA.shape[0])])
    c = torch.bmm(CA.to(_F32), CB.to(_F32).mT)
    return (c * SCA.to(_F32)[..., None] * SCB.to(_F32)[:, None, :] * INV_127_SQ).to(dtype)


def _int8_cols_stacked(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_col, col_stats) of F.int8_double_quant(x[i], 0.0) for every slice of x [Bt, M, C], stacked: [Bt, M, C]
    int8 and [Bt, C] float32. One call on x laid out as [M, Bt·C]: its columns are the slices' columns, each
    quantised by its own absmax over the same M elements (the row half of that call is not used)."""
    bt, m, c = x.shape
    _, q_col, _, col_stats, _ = F.int8_double_quant(x.permute(1, 0, 2).reshape(m, bt * c), 0.0)
    return q_col.view(m, bt, c).permute(1, 0, 2), col_stats.view(bt, c)


def _int8_outlier_slices(A: torch.Tensor, threshold: float) -> list[int]:
    """The slices of A [Bt, M, K] with an element at or above the threshold (the ops' own float32 test,
    functional._op_threshold; NaN never is): LLM.int8's outlier columns there; none at threshold 0."""
    if threshold <= 0:
        return []
    outlier = A.abs().to(_F32) >= F._op_threshold(float(threshold), "")
    return outlier.flatten(1).any(1).nonzero().flatten().tolist()


def _run_int8_stacked(A: torch.Tensor, W: torch.Tensor, G: torch.Tensor | None, threshold: float,
                      row_scale: str) -> StrategyOutput | None:
    """_run_int8_direct on every slice of A [Bt, M, K], W [Bt, N, K], G [Bt, M, N], stacked, in one call per step
    where the int8 GEMMs contract over at most F32_EXACT_K (K and M: _int8_scaled_mm_stacked); None otherwise, or
    when every slice has an outlier (the caller goes slice by slice).

    A slice with no element reaching the threshold has no outlier column: its rows' codes and scales are those
    of threshold 0 (either row scale), each row's own, the same in the stack as in the slice. So the stack is
    quantised and multiplied at threshold 0, and the slices with outliers (an element at or above the ops'
    threshold, functional._op_threshold) are then replayed one by one (_run_int8_direct) over their part of every
    result."""
    bt, m, k = A.shape
    n = W.shape[1]
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    if k > F32_EXACT_K or (G is not None and m > F32_EXACT_K):
        return None
    dirty = _int8_outlier_slices(A, threshold)
    if len(dirty) == bt:
        return None
    CA, SCA, _ = F.int8_vectorwise_quant(A.reshape(bt * m, k), 0.0)
    CB, SCB, _ = F.int8_vectorwise_quant(W.contiguous().reshape(bt * n, k), 0.0)
    W32 = F.int8_vectorwise_dequant(CB, SCB).view(bt, n, k)
    CA, SCA, CB, SCB = CA.view(bt, m, k), SCA.view(bt, m), CB.view(bt, n, k), SCB.view(bt, n)
    y = _int8_scaled_mm_stacked(CA, CB, SCA, SCB, A.dtype)
    gemms = {"fprop": y}
    ops = {"activation": (A, F.int8_vectorwise_dequant(CA, SCA).to(A.dtype), _unclipped(A)),
           "weight": (W, W32.to(W.dtype), _unclipped(W))}
    if G is not None:
        grad2 = G.to(y.dtype)
        QA_col, SCAt = _int8_cols_stacked(A)
        Cg_col, Sg_col = _int8_cols_stacked(grad2)
        # grad_B[n, k] = Σ_m Qg[m, n]·QA[m, k] · colmax_g[n]·colmax_A[k] / 127² (the transposed int8 product)
        gemms["dgrad"] = _mm(grad2.to(A.dtype), W32.to(A.dtype))
        gemms["wgrad"] = _int8_scaled_mm_stacked(Cg_col.mT, QA_col.mT, Sg_col, SCAt, _F32).to(W.dtype)
        if G.dtype == grad2.dtype:
            qG = (Cg_col.float() * Sg_col.float()[:, None, :] / 127.0).to(G.dtype)  # _int8_cols(G) per slice
        else:
            qG = torch.stack([_int8_cols(G[i]) for i in range(bt)])
        ops["grad_output"] = (G, qG, _unclipped(G))
    for i in dirty:  # (every result above is a fresh tensor: written in place)
        one = _run_int8_direct(A[i], W[i], None if G is None else G[i], float(threshold), row_scale)
        for key, part in one.gemms.items():
            gemms[key][i] = part
        for key, (_, q, _) in one.operands.items():
            ops[key][1][i] = q
    return StrategyOutput(gemms, ops)


def _stacked(outs: list[StrategyOutput]) -> StrategyOutput:
    """The slices' replays as one batched StrategyOutput: every GEMM and operand stacked (no block records)."""
    gemms = {key: torch.stack([o.gemms[key] for o in outs]) for key in outs[0].gemms}
    operands = {}
    for key in outs[0].operands:
        x, q, sat = zip(*(o.operands[key] for o in outs))
        operands[key] = (torch.stack(x), torch.stack(q), None if sat[0] is None else torch.stack(sat))
    return StrategyOutput(gemms, operands)


def _slice_by_slice(run: Callable[..., StrategyOutput], A: torch.Tensor, W: torch.Tensor, G: torch.Tensor | None,
                    *args: Any) -> StrategyOutput:
    """``run`` on each slice of batched operands, stacked (run_strategy's own loop)."""
    return _stacked([run(A[i], W[i], None if G is None else G[i], *args) for i in range(A.shape[0])])


def _run_switchback(A: torch.Tensor, W: torch.Tensor, G: torch.Tensor | None, threshold: float,
                    b_is_weight: bool = True) -> StrategyOutput:
    # SwitchBack (Wortsman et al. 2023) has no outlier decomposition: threshold 0 whatever --threshold says.
    if A.shape[-1] <= F.INT8_MATMUL_MAX_K:
        if _stackable(A, W, G):
            return _int8_nans(_run_switchback_batched(A, W, G), A, W, G, int8_wgrad=False)
        if _stackable(A[None], W[None], G):
            return _int8_nans(_one_slice(_run_switchback_batched, A, W, G), A, W, G, int8_wgrad=False)
    gemms = _autograd_gemms(lambda a, w: AG.switchback_bnb(a, w), A, W, G)
    ops = {"activation": (A, _int8_rows(A, 0.0), _unclipped(A)), "weight": (W, *_weight_int8(W))}
    return StrategyOutput(gemms, ops)


def _run_switchback_batched(A: torch.Tensor, W: torch.Tensor, G: torch.Tensor | None) -> StrategyOutput:
    """SwitchBackBnb (threshold 0) on every slice: int8 row codes of the stacked rows (a row's codes and
    scale are its own), the int32 GEMM and its dequantisation per slice, the unquantised backward."""
    bt, m, k = A.shape
    n = W.shape[1]
    CA, SCA, _ = F.int8_vectorwise_quant(A.reshape(bt * m, k), 0.0)
    if bt == 1:  # one GEMM (_one_slice): W's codes, the forward product and the dgrad as int8 computes them
        CB, SCB, qW = (t[None] for t in _int8_weight(W[0]))
    else:
        CB, SCB, _ = F.int8_vectorwise_quant(W.contiguous().reshape(bt * n, k), 0.0)
    CA, SCA, CB, SCB = CA.view(bt, m, k), SCA.view(bt, m), CB.view(bt, n, k), SCB.view(bt, n)
    if bt == 1:
        y = _int8_fprop(A[0], W[0], CA[0], SCA[0], CB[0], SCB[0])[None]
    else:
        y = _int8_scaled_mm_stacked(CA, CB, SCA, SCB, A.dtype)
        qW = F.int8_vectorwise_dequant(CB, SCB)
    gemms = {"fprop": y}
    if G is not None:
        g = G.to(y.dtype)
        gemms["dgrad"] = _int8_dgrad(g[0], W[0], qW[0], A.dtype)[None] if bt == 1 else _mm(g.to(A.dtype), qW.to(A.dtype))
        gt = g.to(A.dtype).mT
        gemms["wgrad"] = _shared("mm", lambda: _mm(gt, A), gt, A).to(W.dtype)   # (mixed's unquantised wgrad too)
    ops = {"activation": (A, F.int8_vectorwise_dequant(CA, SCA).to(A.dtype), _unclipped(A)),
           "weight": (W, qW.to(W.dtype), _unclipped(W))}
    return StrategyOutput(gemms, ops)


# In-model versions of the bnb runners above (Strategy.linear). ``b_is_weight`` is accepted and
# ignored: these recipes quantise a second activation exactly like a weight (rule texts below).
def _plus_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # The FP8 research matmuls take no bias: it is added in the activations' precision, as nn.Linear would.
    return y if bias is None else y + bias.to(y.dtype)


def _linear_global(x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None, threshold: float,
                   b_is_weight: bool = True) -> torch.Tensor:
    return _fp8_linear(x, W, bias, None)  # MatMulFP8Global's bits (_fp8_linear)


def _linear_mixed(x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None, threshold: float,
                  b_is_weight: bool = True, blocks: tuple[int, int] = (-1, -1)) -> torch.Tensor:
    return _fp8_linear(x, W, bias, blocks)  # MatMulFP8Mixed's bits (_fp8_linear)


def _int8_in_model(fn: Callable[..., torch.Tensor], x: torch.Tensor, W: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """fn (AG.matmul or AG.switchback_bnb) on a fresh state that keeps no int8 copy of W from the forward to the
    backward (MatmulLtState.save_weight_codes; the backward quantises W again, the same bits) and drops its own
    cache of it after the call: an end-to-end pass over a model holds activations, not an int8 second model (as
    _ScaledLinear and _StackedFp8 recast in the backward too)."""
    state = AG.MatmulLtState(save_weight_codes=False)
    y = fn(x, W, state=state, **kwargs)
    state.CB = state.SCB = None
    return y


def _linear_int8(x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None, threshold: float,
                 b_is_weight: bool = True, row_scale: str = "bnb") -> torch.Tensor:
    return _int8_in_model(AG.matmul, x, W, threshold=threshold, bias=bias, row_scale=row_scale)


def _linear_switchback(x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None, threshold: float,
                       b_is_weight: bool = True) -> torch.Tensor:
    return _int8_in_model(AG.switchback_bnb, x, W, bias=bias)  # no outlier decomposition, as in _run_switchback


# --------------------------------------------------------------------------------------------
# OCP FP8 / MX recipes: fake-quantise each GEMM's operands along its contraction dimension
# (the last dim of the 2-D operand as passed here), matmul in float32.
# --------------------------------------------------------------------------------------------
def _tile_sums(mask: torch.Tensor, br: int, bc: int) -> torch.Tensor:
    """[R, C] bool → element count per (br × bc) tile (partial edge tiles), tiles in row-major order,
    the tiling of functional.quantize_scaled's scales."""
    R, C = mask.shape
    if br == 1:  # tiles of one row (bnb blockwise, 1xN): sum the full tiles in place, then the partial one
        full = C // bc * bc
        parts = [mask[:, :full].reshape(R, -1, bc).sum(dim=2, dtype=torch.int64)]
        if full < C:
            parts.append(mask[:, full:].sum(dim=1, dtype=torch.int64, keepdim=True))
        return torch.cat(parts, dim=1).reshape(-1)
    nbr, nbc = -(-R // br), -(-C // bc)
    t = torch.nn.functional.pad(mask.to(torch.int32), (0, nbc * bc - C, 0, nbr * br - R))
    return t.reshape(nbr, br, nbc, bc).sum(dim=(1, 3), dtype=torch.int64).reshape(-1)


def tile_records(x2: torch.Tensor, q2: torch.Tensor, sat2: torch.Tensor | None, scale: torch.Tensor, tile: tuple[int, int]
             ) -> tuple[torch.Tensor, ...]:
    """BlockRecords (scale, zero_block, nonzero, underflow, clipped) per tile of the 2-D operand x2, its dequantised
    q2 and saturation mask sat2 (None: nothing clipped), with the tiles' ``scale`` (the cast's own): what
    analysis.block_scales accumulates."""
    R, C = x2.shape
    br, bc = min(tile[0], R), min(tile[1], C)
    nonzero = torch.isfinite(x2) & (x2 != 0)
    under = nonzero & (q2 == 0)
    n_nz = _tile_sums(nonzero, br, bc)
    clipped = _tile_sums(sat2, br, bc) > 0 if sat2 is not None else torch.zeros_like(n_nz, dtype=torch.bool)
    return scale.reshape(-1), n_nz == 0, n_nz, _tile_sums(under, br, bc), clipped


def _saturated(values: torch.Tensor, x32: torch.Tensor, q: torch.Tensor, fmt: str) -> torch.Tensor:
    """The clipped elements of a scaled cast: stored value at ±fmt_max and |x| > |q|. NaN compares False and
    ±Inf never sits at exactly ±fmax in data, so no isfinite mask is needed."""
    return (values.abs() == FORMATS[fmt].max) & (x32.abs() > q.abs())


def _split_records(rec: BlockRecords | None, bt: int) -> list[BlockRecords | None]:
    """A stacked cast's records as one BlockRecords per slice: its tiles are the slices' tiles, slice after slice."""
    if rec is None or bt == 1:  # (a stack of one, _one_slice: the records as they are, no views to make)
        return [rec] * bt
    return list(zip(*(r.view(bt, -1).unbind(0) for r in rec)))


def _fused_records(fused: _cpu.FusedScaled) -> BlockRecords:
    """The BlockRecords of a fused C cast, from its scales (times the NVFP4 tensor scale, 0-D or per row) and
    per-tile counts."""
    scale = fused.scale if fused.global_scale is None else fused.scale * fused.global_scale
    nonzero, underflow, saturated = fused.counts.unbind(0)  # (one call: iterating the tensor costs twice as much)
    return scale.reshape(-1), nonzero == 0, nonzero, underflow, saturated > 0


def _cast(x: torch.Tensor, fmt: str, granularity: str, block: tuple[int, int] | None,
          scale_rule: str = "floor", sr_seed: int | None = None, records: bool = True
          ) -> tuple[torch.Tensor, torch.Tensor, BlockRecords | None]:
    """_fq_scaled of a 2-D x plus its per-tile BlockRecords. On CPU with the C extension enabled, one
    fused C call (backends.cpu.fused_scaled: the cast, its dequantisation, the mask and the tile counts,
    bit-identical to the ops below); elsewhere (CUDA, FP8PROBE_BACKEND=reference, no extension, NaN
    results) quantize_scaled + dequantize_scaled, the mask from their outputs and the records from its scales
    (tile_records; None for an empty x or one that is not 2-D). Arguments
    quantize_scaled rejects raise its ValueError either way. ``sr_seed``: stochastic rounding with this
    seed (quantize_scaled's rounding="stochastic"; 4/6-bit formats, the fused C call too), None: nearest.
    ``records`` False: the caller drops them (_fq_slices, a model's pass), so neither path makes them (None)."""
    tile = F.scaled_tile(x.shape, fmt, granularity, block, scale_rule)[1]
    sr = {} if sr_seed is None else {"rounding": "stochastic", "seed": sr_seed}
    fused = _cpu.fused_scaled(x, fmt, *tile, scale_rule, **sr) if x.dim() == 2 else None
    if fused is not None:
        return fused.q, fused.saturated, _fused_records(fused) if records else None
    x32 = x.to(_F32).contiguous()
    st = F.quantize_scaled(x32, fmt, granularity, block, scale_rule=scale_rule, **sr)
    q = F.dequantize_scaled(st, _F32)
    saturated = _saturated(st.element_values(), x32, q, fmt)
    if not (records and x.dim() == 2 and x.numel()):
        return q, saturated, None
    # the records from the cast's own scales (what block_scales would otherwise recompute per slice)
    scale = st.scale if st.global_scale is None else st.scale * st.global_scale
    return q, saturated, tile_records(x32, q, saturated, scale, tile)


def _fq_scaled(x: torch.Tensor, fmt: str, granularity: str, block: tuple[int, int] | None,
               scale_rule: str = "floor") -> tuple[torch.Tensor, torch.Tensor]:
    """(dequantised x in float32, saturated mask): clipped elements have |data| at the format max and |x| > |q|."""
    return _cast(x, fmt, granularity, block, scale_rule, records=False)[:2]


Gran = tuple[str, "tuple[int, int] | None"]


def _cast_slices(x: torch.Tensor, fmt: str, granularity: str, block: tuple[int, int] | None,
                 scale_rule: str = "floor", sr_seed: int | None = None, records: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor, list[BlockRecords | None]]:
    """_fq_slices plus one BlockRecords (or None) per slice (one for 2-D x): a stacked cast's tiles
    are the slices' tiles, slice after slice, so its records split into equal consecutive parts."""
    if x.dim() == 2:
        q, sat, rec = _cast(x, fmt, granularity, block, scale_rule, sr_seed, records)
        return q, sat, [rec]
    bt, rows, cols = x.shape
    if (sr_seed is not None or fmt == "nvfp4") and granularity == "block" and block is not None and block[0] == 1 \
            and x.numel():
        return _cast_stacked_rows(x, fmt, block, scale_rule, sr_seed, records)
    if fmt == "nvfp4" or sr_seed is not None:  # (stochastic rounding: each slice draws its own numbers from 0)
        tile: tuple[str, tuple[int, int] | None] | None = None
    elif granularity == "row" or (granularity == "block" and block[0] == 1):
        tile = (granularity, block)  # tiles of one row (MX 1x32 included)
    else:
        br, bc = (rows, cols) if granularity == "tensor" else block
        br, bc = min(br, rows), min(bc, cols)  # a tile larger than the slice is all of it (quantize_scaled)
        tile = ("block", (br, bc)) if rows and rows % br == 0 else None
    if tile is None or x.numel() == 0:
        q, sat, recs = zip(*(_cast(x[i], fmt, granularity, block, scale_rule, sr_seed, records) for i in range(bt)))
        return torch.stack(q), torch.stack(sat), list(recs)
    q, sat, rec = _cast(x.reshape(bt * rows, cols), fmt, *tile, scale_rule, records=records)
    return q.view(bt, rows, cols), sat.view(bt, rows, cols), _split_records(rec, bt)


def _cast_stacked_rows(x: torch.Tensor, fmt: str, block: tuple[int, int], scale_rule: str, sr_seed: int | None,
                       records: bool) -> tuple[torch.Tensor, torch.Tensor, list[BlockRecords | None]]:
    """_cast_slices' 1×bc cast of x [Bt, R, C] (stochastically rounded with ``sr_seed``, or NVFP4 rounded to
    nearest: sr_seed None) in one call over the stacked [Bt·R, C] view, bit for bit the slice-by-slice casts:
    every 1×bc tile lies in one row, each slice's rows get that slice's NVFP4 tensor scale (quantize_scaled's
    [R, 1] global_scale) and draw the slice's own random numbers from 0 (period_rows). On CPU with the
    extension, one fused C call (backends.cpu.fused_scaled); elsewhere (or NaN results) one reference call: a
    per-slice reference cast is ~40 small torch ops, and an attention site has one per head, operand and GEMM
    (BERT, nvfp4, 6 heads: the attention GEMMs' recipe replay took 0.65 s slice by slice)."""
    rounding = "nearest" if sr_seed is None else "stochastic"
    seed = 0 if sr_seed is None else sr_seed
    bt, rows, cols = x.shape
    F.scaled_tile((rows, cols), fmt, "block", block, scale_rule)  # its ValueError for arguments it rejects
    x2 = _cpu.contiguous(x).reshape(bt * rows, cols)
    g_rows = None
    if fmt == "nvfp4":  # each slice's tensor scale, as functional.quantize_scaled computes it for the slice
        g_rows = _cpu.nvfp4_global_scale(x2, slices=bt).repeat_interleave(rows).reshape(bt * rows, 1)
    fused = _cpu.fused_scaled(x2, fmt, 1, block[1], scale_rule, rounding, seed, rows, g_rows)
    if fused is not None:  # (its global_scale is g_rows)
        rec = _fused_records(fused) if records else None
        return fused.q.view(bt, rows, cols), fused.saturated.view(bt, rows, cols), _split_records(rec, bt)
    x32 = x2.to(_F32)
    data, scale = _ref.quantize_scaled(x32, fmt, 1, block[1], scale_rule, g_rows, rounding, seed,
                                       period_rows=rows)
    q = _ref.dequantize_scaled(data, scale, 1, block[1], _F32, fmt, g_rows)
    saturated = _saturated(_ref.element_values(data, fmt), x32, q, fmt)
    rec = tile_records(x32, q, saturated, scale if g_rows is None else scale * g_rows, (1, block[1])) \
        if records else None
    return q.view(bt, rows, cols), saturated.view(bt, rows, cols), _split_records(rec, bt)


def _fq_slices(x: torch.Tensor, fmt: str, granularity: str, block: tuple[int, int] | None,
               scale_rule: str = "floor", sr_seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """_fq_scaled on each 2-D slice of x [Bt, R, C] with its own scales (BATCHED_RULE), in one cast where
    the slices' tiles line up, else slice by slice; 2-D x is passed straight through.

    quantize_scaled cuts its [rows, C] view into tiles, and a tile of one slice (R rows: per-tensor =
    one R×C tile, per-row / 1×bc / MX 1×32 tiles of one row, br×bc blocks when br divides R or
    R ≤ br) is also a tile of the stacked [Bt·R, C] view: one cast of the stack computes the same
    scales and elements as Bt casts. A per-slice call costs ~0.1 ms of dispatch (custom op, checks),
    which for a 64-head attention site times 8 casts per recipe was most of the replay. NVFP4's float32
    tensor scale is per slice, so no stacked cast has it: slice by slice.
    """
    return _cast_slices(x, fmt, granularity, block, scale_rule, sr_seed, records=False)[:2]


# (shapes, strides, dtypes, device, threads) of a batched product → whether torch.bmm gave exactly the
# per-slice matmuls' result when first seen (see _mm).
_BMM_EXACT: dict[tuple, bool] = {}


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for 2-D operands; for [Bt, M, K] @ [Bt, K, N] exactly what one 2-D matmul per slice gives, stacked,
    so a batched replay computes what the slice-by-slice one does.

    torch.bmm is 2-4x faster on attention-sized slices (one call instead of Bt matmuls and a stack) and on
    the CPUs measured gives the same bits, but a bmm kernel may block the sums differently (torch's naive
    small-matrix loop, another BLAS batch routine). The summation order of a BLAS call depends on shapes,
    strides, dtype and thread count, not on the values: so when a key is first seen both ways run on two
    probe pairs of its shapes and strides (_agree: a change of summation order then shows; the call's own
    data could hide one) and bmm serves the key only if they agreed."""
    if a.dim() == 2:
        return a @ b
    if a.shape[0] == 1:  # a stack of one (_one_slice): the 2-D product itself, no check, no second copy
        return (a[0] @ b[0]).unsqueeze(0)
    key = (tuple(a.shape), a.stride(), tuple(b.shape), b.stride(), a.dtype, a.device.type, torch.get_num_threads())
    exact = _BMM_EXACT.get(key) if a.dtype == b.dtype and a.device == b.device and a.numel() + b.numel() <= _PROBE_MAX \
        else False
    if exact:
        return torch.bmm(a, b)
    if exact is None:
        exact = _BMM_EXACT[key] = _agree(key, a, b, torch.bmm, lambda x, y: torch.stack([x[i] @ y[i] for i in range(x.shape[0])]))
        if exact:
            return torch.bmm(a, b)
    return torch.stack([a[i] @ b[i] for i in range(a.shape[0])])


def _replay(recipe: Any, A: torch.Tensor, W: torch.Tensor, G: torch.Tensor | None, b_is_weight: bool,
            blocks: dict[str, list[BlockRecords | None]] | None = None) -> StrategyOutput:
    """The three GEMMs of a recipe object with fprop/dgrad/wgrad methods (_Scaled, _Delayed, _CodebookAccum):
    the dgrad reuses the forward's qW and the wgrad the forward's qA and the dgrad's qG, as the autograd
    function (_ScaledLinear) does in a model. ``blocks`` (a dict: the recipe's fprop/dgrad take it and
    fill it with BlockRecords) becomes StrategyOutput.blocks."""
    kw = {} if blocks is None else {"blocks": blocks}
    y, (qA, sA), (qW, sW) = recipe.fprop(A, W, b_is_weight, **kw)
    gemms = {"fprop": y}
    ops = {"activation": (A, qA, sA), "weight": (W, qW, sW)}
    if G is not None:
        gemms["dgrad"], (qG, sG) = recipe.dgrad(G, W, qW, b_is_weight, **kw)
        gemms["wgrad"] = recipe.wgrad(G, A, qG, qA)
        ops["grad_output"] = (G, qG, sG)
    return StrategyOutput(gemms, ops, blocks or {})


class _Recipe:
    """``run`` (the replay) and ``linear`` (in a model, via _ScaledLinear) of a stateless recipe object whose
    fprop/dgrad/wgrad methods compute its three GEMMs (_Scaled, _CodebookAccum)."""

    def run(self, A: torch.Tensor, W: torch.Tensor, G: torch.Tensor | None, threshold: float,
            b_is_weight: bool = True) -> StrategyOutput:
        return _replay(self, A, W, G, b_is_weight)

    def linear(self, x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None, threshold: float,
               b_is_weight: bool = True) -> torch.Tensor:
        return _ScaledLinear.apply(x, W, bias, self, b_is_weight)


@dataclass(frozen=True)
class _Scaled(_Recipe):
    """One OCP/MX recipe's three GEMMs; ``act``/``w`` = (granularity, block) for activations/gradients and
    for weights. The replay (``run``) and the in-model autograd function (``linear``) both call these.
    ``b_is_weight`` False: the second operand is an activation (K of QKᵀ, Vᵀ of PV) and gets the
    activation granularity, not the weight's. Operands may be 2-D or batched [Bt, M, K] / [Bt, N, K] /
    [Bt, M, N]: batched ones get per-slice scales (_fq_slices) and per-slice matmuls (_mm), bit-identical
    to running each slice alone."""

    act: Gran
    w: Gran
    fmt_fwd: str
    fmt_bwd: str
    accum: Accumulation | None = None  # None: float32 matmuls; else the simulated accumulator (accumulation.py)
    scale_rule: str = "floor"   # MX E8M0 scale rule (functional.quantize_scaled); "floor" for the rest
    # NVIDIA's NVFP4 training recipe: the random Hadamard transform on both wgrad operands along the tokens
    # (functional.hadamard_transform, signs from RHT_SEED) and stochastic rounding of the output gradient
    # in dgrad and wgrad (seeds SR_SEEDS; 4/6-bit formats)
    rht_wgrad: bool = False
    sr_grad: bool = False

    def _gemm(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x · yᵀ (y [N, K]): float32 (batched operands slice by slice, _mm), or the simulated
        limited-precision accumulator with ``accum``."""
        if self.accum is None:
            return _mm(x, y.mT)
        if x.dim() == 2:
            return matmul_limited(x, y, self.accum)
        return torch.stack([matmul_limited(x[i], y[i], self.accum) for i in range(x.shape[0])])

    def _gran_b(self, b_is_weight: bool) -> Gran:
        return self.w if b_is_weight else self.act

    def run(self, A: torch.Tensor, W: torch.Tensor, G: torch.Tensor | None, threshold: float,
            b_is_weight: bool = True) -> StrategyOutput:
        return _replay(self, A, W, G, b_is_weight, blocks={})

    def fprop(self, A: torch.Tensor, W: torch.Tensor, b_is_weight: bool = True,
              blocks: dict[str, list[BlockRecords | None]] | None = None) -> tuple[torch.Tensor, tuple, tuple]:
        """(A·Wᵀ from quantised operands, (qA, satA), (qW, satW)); A [tokens, in], W [out, in]. ``blocks``:
        receives the casts' BlockRecords per slice under "activation" and "weight"."""
        rec = blocks is not None  # (a model's pass, _ScaledLinear, takes no records)
        qA, sA, rA = _cast_slices(A, self.fmt_fwd, *self.act, self.scale_rule, records=rec)  # contraction over in
        qW, sW, rW = _cast_slices(W, self.fmt_fwd, *self._gran_b(b_is_weight), self.scale_rule,
                                  records=rec)  # W [out, in]: over in
        if blocks is not None:
            blocks["activation"], blocks["weight"] = rA, rW
        return self._gemm(qA, qW), (qA, sA), (qW, sW)

    def dgrad(self, G: torch.Tensor, W: torch.Tensor, qW: torch.Tensor | None, b_is_weight: bool = True,
              blocks: dict[str, list[BlockRecords | None]] | None = None) -> tuple[torch.Tensor, tuple]:
        """(G·W with G scaled along out, (qG, satG)); qW: the forward's quantised W, or None (cast again where it
        is used: the same bits). ``blocks``: receives G's BlockRecords per slice under "grad_output"."""
        gran_w = self._gran_b(b_is_weight)
        sr = SR_SEEDS["dgrad"] if self.sr_grad else None
        qG, sG, rG = _cast_slices(G, self.fmt_bwd, *self.act, self.scale_rule, sr,
                                  records=blocks is not None)  # dgrad contracts over out: G's rows
        if blocks is not None:
            blocks["grad_output"] = rG
        # Wᵀ [in, out] scaled along out. Per-tensor scales and square tiles (128x128) are the
        # same tiles transposed, so quantising Wᵀ would give exactly qWᵀ: reuse it.
        w_reusable = gran_w[0] == "tensor" or (gran_w[1] is not None and gran_w[1][0] == gran_w[1][1])
        if w_reusable and qW is None:
            qW = _fq_slices(W, self.fmt_fwd, *gran_w, self.scale_rule)[0]
        qWt = qW.mT if w_reusable else _fq_slices(W.mT, self.fmt_fwd, *gran_w, self.scale_rule)[0]
        return self._gemm(qG, qWt), (qG, sG)

    def _reuses_qA(self) -> bool:
        """Whether wgrad multiplies by the forward's qA (one per-tensor scale: transposing changes nothing)."""
        return self.act[0] == "tensor" and not (self.rht_wgrad or self.sr_grad)

    def wgrad(self, G: torch.Tensor, A: torch.Tensor, qG: torch.Tensor, qA: torch.Tensor | None) -> torch.Tensor:
        """Gᵀ·A with both scaled along tokens (the contraction dim); qG/qA: the dgrad's / forward's. With
        ``rht_wgrad`` both operands are first Hadamard-transformed along the tokens (zero-padded to whole
        runs of 16: padding adds zero terms), which leaves the exact product unchanged."""
        if self._reuses_qA():  # one scale: transposing changes nothing
            qGt, qAt = qG.mT, qA.mT
        else:                                                   # wgrad contracts over tokens: new casts
            Gt, At = G.mT, A.mT
            if self.rht_wgrad:
                Gt, At = F.hadamard_transform(Gt, RHT_SEED), F.hadamard_transform(At, RHT_SEED)
            qGt = _fq_slices(Gt, self.fmt_bwd, *self.act, self.scale_rule,
                             SR_SEEDS["wgrad"] if self.sr_grad else None)[0]
            qAt = _fq_slices(At, self.fmt_fwd, *self.act, self.scale_rule)[0]
        return self._gemm(qGt, qAt)


class _ScaledLinear(torch.autograd.Function):
    """``x·Wᵀ + bias`` with an OCP/MX recipe: fprop, dgrad and wgrad exactly as ``_Scaled`` replays them,
    in float32 (the result is cast back to x's dtype); the bias and its gradient stay unquantised.
    W may also be a stack [Bt, N, K] with x [Bt, M, K] (a batched site, no bias): the recipe's batched casts and
    matmuls give exactly what this function gives slice by slice, stacked (batched_linear).
    Saved for the backward (stateless recipes): x and W, and qA only where wgrad multiplies by it; the quantised
    W is cast again where dgrad reuses it (the same bits), so a model's pass does not hold a float32 copy of
    every weight. Delayed scaling saves qA and W's scale, and casts W again with that scale (DelayedState.recast: a
    second quantize would step its amax history)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None, recipe: _Scaled,
                b_is_weight: bool = True) -> torch.Tensor:
        A = x.reshape(-1, x.shape[-1]) if W.dim() == 2 else x
        y, (qA, _), (qW, _) = recipe.fprop(A, W, b_is_weight)
        # (delayed scaling keeps qA, and W's scale: the history has stepped, so only a recast with it gives qW again)
        delayed = isinstance(recipe, _Delayed)
        ctx.save_for_backward(A, W, qA if delayed or recipe._reuses_qA() else None)
        ctx.w_scale = recipe.weight_scale() if delayed else None
        ctx.recipe, ctx.x_shape, ctx.has_bias, ctx.b_is_weight = recipe, x.shape, bias is not None, b_is_weight
        y = y.to(x.dtype)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], W.shape[-2])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        A, W, qA = ctx.saved_tensors
        qW = None if ctx.w_scale is None else ctx.recipe.recast_weight(W, ctx.w_scale)
        G = grad.reshape(*A.shape[:-1], W.shape[-2])
        dgrad, (qG, _) = ctx.recipe.dgrad(G, W, qW, ctx.b_is_weight)
        grad_x = dgrad.to(A.dtype).reshape(ctx.x_shape) if ctx.needs_input_grad[0] else None
        grad_w = ctx.recipe.wgrad(G, A, qG, qA).to(W.dtype) if ctx.needs_input_grad[1] else None
        grad_b = G.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None


class _StackedBnb(torch.autograd.Function):
    """``a·bᵀ`` on stacks a [Bt, M, K], b [Bt, N, K] with a bnb recipe's batched replay runner (_BNB_BATCHED): the
    forward is the runner's fprop, the backward its dgrad and wgrad for the incoming gradient. The runners give
    what the recipe's autograd function gives slice by slice (tests/analysis/test_strategies.py), so this is
    ``torch.stack([strategy.linear(a[i], b[i]) ...])`` with its gradients, bit for bit (tests/analysis/test_e2e.py).
    The backward runs the runner again with the gradient (the forward casts and product once more): one
    call on the stack still costs less than Bt autograd functions of a few hundred elements each."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor, run: Runner, threshold: float,
                b_is_weight: bool) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        ctx.run, ctx.threshold, ctx.b_is_weight = run, threshold, b_is_weight
        return run(a.detach(), b.detach(), None, threshold, b_is_weight).gemms["fprop"]  # (detached: _StackedFp8)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        a, b = (t.detach() for t in ctx.saved_tensors)
        with torch.no_grad():
            gemms = ctx.run(a, b, grad.detach(), ctx.threshold, ctx.b_is_weight).gemms
        return (gemms["dgrad"] if ctx.needs_input_grad[0] else None,
                gemms["wgrad"] if ctx.needs_input_grad[1] else None, None, None, None)


def batched_linear(strategy: Strategy, a: torch.Tensor, b: torch.Tensor, threshold: float,
                   b_is_weight: bool) -> torch.Tensor | None:
    """``torch.stack([strategy.linear(a[i], b[i], None, ...) for i])`` in one autograd call: a stateless OCP/MX
    recipe's _ScaledLinear takes the stacks, global/mixed run _StackedFp8, int8/switchback their replay runner in
    _StackedBnb (bit for bit the same values and gradients; an attention site of a small model otherwise costs Bt
    autograd nodes and ~8 Bt casts of a few hundred elements); None for any other strategy (the caller then loops
    over the slices)."""
    if strategy.new_state is not None or a.dim() != 3 or b.dim() != 3:
        return None
    if type(getattr(strategy.linear, "__self__", None)) is _Scaled:
        return strategy.linear(a, b, None, threshold, b_is_weight)
    run = strategy.run
    base = run.func if isinstance(run, functools.partial) else run
    if base not in _BNB_BATCHED or not _stackable(a, b, None):
        return None
    if base is _run_global:
        return _StackedFp8.apply(a, b, None)
    if base is _run_mixed:  # (its fixed block sizes, else get_block_sizes of a slice, as _run_mixed)
        return _StackedFp8.apply(a, b, _mixed_blocks(run) or AG.get_block_sizes(a[0], b[0]))
    if base is _run_switchback and a.shape[-1] > F.INT8_MATMUL_MAX_K:
        return None
    # int8: where the stacked replay would go slice by slice (long contractions) or replay more than half of the
    # slices alone (outliers), twice in _StackedBnb (forward, then again with the gradient), the library's
    # autograd function per slice is cheaper (48 against 31 ms on a 32-head demo site with outliers in every head)
    if base is _run_int8 and (max(a.shape[1], a.shape[2]) > F32_EXACT_K
                              or 2 * len(_int8_outlier_slices(a, threshold)) > a.shape[0]):
        return None
    return _StackedBnb.apply(a, b, run, threshold, b_is_weight)


_TENSOR = ("tensor", None)
_ROW = ("row", None)
_TILE_1 = ("block", (1, TILE))
_TILE_2 = ("block", (TILE, TILE))
_MX = ("block", (1, 32))
_NV_1D = ("block", (1, 16))    # NVFP4 activations / gradients: 16 along the contraction dim
_NV_2D = ("block", (16, 16))   # NVFP4 weights: 16x16, so W and Wᵀ quantise identically (NVIDIA's recipe)
#: the sign seed of the random Hadamard transform (one fixed sign vector for every layer, as NVIDIA's recipe)
RHT_SEED = 0
#: stochastic-rounding seeds of the output gradient's two casts (dgrad along out, wgrad along tokens): the
#: numbers depend only on the seed and the element's index, so replays and distributed runs are reproducible
SR_SEEDS = {"dgrad": 1, "wgrad": 2}


def _scaled(act: Gran, w: Gran, fmt_fwd: str, fmt_bwd: str, scale_rule: str = "floor",
            **training: bool) -> tuple[Runner, LinearFn]:
    recipe = _Scaled(act, w, fmt_fwd, fmt_bwd, scale_rule=scale_rule, **training)
    return recipe.run, recipe.linear


@dataclass(frozen=True)
class _Delayed:
    """Delayed scaling (Transformer Engine's recipe, HYBRID formats): per-tensor E4M3FN A and W, E5M2 G,
    each operand's scale from its amax history at this GEMM site (the rule: delayed.DelayedScaling).
    ``state``/``site`` bind one pass's histories and the site key; the GEMM methods have _Scaled's
    signatures, so _ScaledLinear runs this recipe in a model too."""

    rule: DelayedScaling = DelayedScaling()
    accum: Accumulation | None = None
    state: DelayedState | None = None
    site: Any = None

    def new_state(self) -> DelayedState:
        return DelayedState(self.rule)

    def _mm(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x @ y.t() if self.accum is None else matmul_limited(x, y, self.accum)

    def _q(self, operand: str, x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.state is None:
            raise ValueError("expected a DelayedState for delayed scaling (Strategy.new_state()), got none")
        return self.state.quantize(self.site, operand, x, fmt)

    def fprop(self, A: torch.Tensor, W: torch.Tensor, b_is_weight: bool = True) -> tuple[torch.Tensor, tuple, tuple]:
        qA, sA = self._q("activation", A, "e4m3")
        qW, sW = self._q("weight", W, "e4m3")
        return self._mm(qA, qW), (qA, sA), (qW, sW)

    def weight_scale(self) -> float:
        """The scale of this site's last weight cast (fprop's): _ScaledLinear keeps it for recast_weight."""
        return self.state.scales[(self.site, "weight")]

    def recast_weight(self, W: torch.Tensor, scale: float) -> torch.Tensor:
        """fprop's qW again from W and its scale, the history untouched (DelayedState.recast)."""
        return self.state.recast(W, "e4m3", scale)

    def dgrad(self, G: torch.Tensor, W: torch.Tensor, qW: torch.Tensor,
              b_is_weight: bool = True) -> tuple[torch.Tensor, tuple]:
        qG, sG = self._q("grad_output", G, "e5m2")
        return self._mm(qG, qW.t()), (qG, sG)  # one scale per tensor: the cast of Wᵀ is qWᵀ

    def wgrad(self, G: torch.Tensor, A: torch.Tensor, qG: torch.Tensor, qA: torch.Tensor) -> torch.Tensor:
        return self._mm(qG.t(), qA.t())

    def run(self, A: torch.Tensor, W: torch.Tensor, G: torch.Tensor | None, threshold: float,
            b_is_weight: bool = True, *, state: DelayedState, site: Any) -> StrategyOutput:
        return _replay(dataclasses.replace(self, state=state, site=site), A, W, G, b_is_weight)

    def linear(self, x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None, threshold: float,
               b_is_weight: bool = True, *, state: DelayedState, site: Any) -> torch.Tensor:
        return _ScaledLinear.apply(x, W, bias, dataclasses.replace(self, state=state, site=site), b_is_weight)


@dataclass(frozen=True)
class _CodebookAccum(_Recipe):
    """``global`` / ``mixed`` with the simulated accumulator: the fake-quantised operands of MatMulFP8Global /
    MatMulFP8Mixed (SPEC §7.2, the same _fq_code calls as _run_global / _run_mixed), their FP8 products
    through matmul_limited; mixed's unquantised wgrad Aᵀ·G stays a float32 matmul. GEMM methods with
    _Scaled's signatures, so _ScaledLinear runs it in a model."""

    mixed: bool
    accum: Accumulation
    blocks: tuple[int, int] | None = None  # mixed: (bsz, bsz2); None = get_block_sizes per layer

    def _bsz(self, W: torch.Tensor) -> tuple[int | None, int | None]:
        if not self.mixed:
            return None, None
        return self.blocks or AG.get_block_sizes(W.shape[1], W.shape[0])

    def fprop(self, A: torch.Tensor, W: torch.Tensor, b_is_weight: bool = True) -> tuple[torch.Tensor, tuple, tuple]:
        qA, qW = _fq_code(A, "bnb-e4m3", self._bsz(W)[0]), _weight_bnb_global(W)[0]
        return matmul_limited(qA.float(), qW.float(), self.accum), (qA, None), (qW, None)

    def dgrad(self, G: torch.Tensor, W: torch.Tensor, qW: torch.Tensor | None,
              b_is_weight: bool = True) -> tuple[torch.Tensor, tuple]:
        qG = _fq_code(G, "bnb-e5m2", self._bsz(W)[1])
        qW = _weight_bnb_global(W)[0] if qW is None else qW  # (None: cast again, the same bits)
        return matmul_limited(qG.float(), qW.float().t(), self.accum), (qG, None)

    def _reuses_qA(self) -> bool:
        """Whether wgrad multiplies by the forward's qA (global: one absmax, fq(Aᵀ) = fq(A)ᵀ)."""
        return not self.mixed

    def wgrad(self, G: torch.Tensor, A: torch.Tensor, qG: torch.Tensor, qA: torch.Tensor | None) -> torch.Tensor:
        if self.mixed:
            return G.float().t() @ A.float()
        return matmul_limited(qG.float().t(), qA.float().t(), self.accum)  # one absmax: fq(Aᵀ) = fq(A)ᵀ


def _delayed_rules(rule: DelayedScaling) -> str:
    return ("Delayed scaling (Transformer Engine, HYBRID): OCP E4M3FN for A and W, E5M2 for G, one float32 scale "
            "per tensor from the amax history of earlier batches at the same GEMM site and operand: " + rule.describe()
            + "; round to nearest even with saturation, overflows counted in the delayed_scaling table; float32 "
            "matmuls. Two activations: both E4M3FN per tensor with their own histories. " + BATCHED_RULE
            + " Each slice keeps its own amax histories.")


_DELAYED = _Delayed()
# bnb runners that take batched operands themselves (their _stackable branches).
_BNB_BATCHED = (_run_global, _run_mixed, _run_switchback, _run_int8)

STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("global", "bnb-e4m3 codebook, one absmax per tensor for A and W (fprop, wgrad) and bnb-e5m2 one "
             "absmax for the output gradient (dgrad, wgrad); nearest code, ties to the even index; float32 "
             "matmuls of the fake-quantised tensors (bitsandbytes.research MatMulFP8Global). Two activations (QKᵀ, "
             "PV): the second one exactly like W, one "
             "absmax bnb-e4m3. " + BATCHED_RULE, ("bnb-e4m3", "bnb-e5m2"),
             _run_global, _linear_global),
    Strategy("mixed", "A blockwise bnb-e4m3 (block bsz over the flattened tensor), W one absmax bnb-e4m3, "
             "output gradient blockwise bnb-e5m2 (bsz2) for dgrad; wgrad Aᵀ·G unquantised; bsz/bsz2 from "
             "get_block_sizes (bitsandbytes.research MatMulFP8Mixed). Two activations: as MatMulFP8Mixed runs "
             "them, the "
             "first blockwise, the second like W (one absmax). " + BATCHED_RULE, ("bnb-e4m3", "bnb-e5m2"), _run_mixed,
             _linear_mixed, quantized_gemms=("fprop", "dgrad")),
    Strategy("int8", "LLM.int8(): A int8 per row (absmax/127, round half-even), columns with any |a| ≥ threshold "
             "kept in A's precision and multiplied by the dequantised weight; W int8 per output row; dgrad "
             "G·deq(W) with G unquantised; wgrad int8 column-quantised G and A (bitsandbytes MatMul8bitLt). Two "
             "activations: as MatMul8bitLt runs them, vector-wise int8 on both (rows along the contraction dim), "
             "outlier columns of the contraction dim found in the first, kept in its precision and multiplied by "
             "the dequantised second. " + BATCHED_RULE,
             ("int8",), _run_int8, _linear_int8),
    Strategy("switchback", "SwitchBack: fprop int8 per-row A × int8 per-row W (no outlier columns); dgrad "
             "G·deq(W) and wgrad Gᵀ·A unquantised (bitsandbytes.research SwitchBackBnb). Two activations: both "
             "int8 per "
             "row along the contraction dim. " + BATCHED_RULE, ("int8",), _run_switchback,
             _linear_switchback, quantized_gemms=("fprop", "dgrad")),
    Strategy("ocp-tensorwise", "OCP E4M3FN for A and W, E5M2 for G, one float32 scale amax/fmt_max per tensor, "
             "round to nearest even with saturation; float32 matmuls. Two activations: both E4M3FN per "
             "tensor. " + BATCHED_RULE, ("e4m3", "e5m2"),
             *_scaled(_TENSOR, _TENSOR, "e4m3", "e5m2")),
    Strategy("ocp-rowwise", "OCP E4M3FN for A and W, E5M2 for G, one float32 scale per row along each GEMM's "
             "contraction dim (A, W rows in fprop; G rows and W columns in dgrad; G, A columns in wgrad); "
             "float32 matmuls. Two activations: both E4M3FN per row along the contraction dim. " + BATCHED_RULE,
             ("e4m3", "e5m2"), *_scaled(_ROW, _ROW, "e4m3", "e5m2")),
    Strategy("ocp-blockwise", "OCP E4M3FN A / E5M2 G in 1x128 tiles along each GEMM's contraction dim, E4M3FN W "
             "in 128x128 blocks, float32 scale amax/fmt_max per tile (DeepSeek-V3 style); float32 matmuls. "
             "Two activations: both in 1x128 tiles along the contraction dim (no 128x128 weight blocks). "
             + BATCHED_RULE,
             ("e4m3", "e5m2"), *_scaled(_TILE_1, _TILE_2, "e4m3", "e5m2")),
    Strategy("mxfp8", "OCP MX: E4M3 elements for A and W, E5M2 for G, blocks of 32 along each GEMM's contraction "
             "dim with E8M0 power-of-two scales by the OCP FLOOR rule (floor(log2 amax) − emax), saturating; float32 matmuls. Two "
             "activations: both E4M3 in blocks of 32 along the contraction dim. " + BATCHED_RULE,
             ("mxfp8-e4m3", "mxfp8-e5m2"), *_scaled(_MX, _MX, "mxfp8-e4m3", "mxfp8-e5m2")),
    Strategy("delayed", _delayed_rules(_DELAYED.rule), ("e4m3", "e5m2"), _DELAYED.run, _DELAYED.linear,
             new_state=_DELAYED.new_state),
    Strategy("mxfp8-rceil", "OCP MX with NVIDIA's RCEIL scale rule (cuBLAS / Transformer Engine): E4M3 elements for "
             "A and W, E5M2 for G, blocks of 32 along each GEMM's contraction dim, E8M0 scale = the smallest power "
             "of two with amax/scale ≤ fmt_max (no block maximum saturates); float32 matmuls. Two activations: both "
             "E4M3 in blocks of 32 along the contraction dim. " + BATCHED_RULE,
             ("mxfp8-e4m3", "mxfp8-e5m2"), *_scaled(_MX, _MX, "mxfp8-e4m3", "mxfp8-e5m2", "rceil")),
    Strategy("nvfp4", "NVIDIA NVFP4: E2M1 elements for A, W and G in fprop, dgrad and wgrad; A and G in 1x16 blocks "
             "along each GEMM's contraction dim, W in 16x16 blocks; block scale = E4M3(block amax / (6·g)) with the "
             "per-tensor float32 scale g = tensor amax / 2688 (scale rule: E4M3 round-to-nearest of the ideal "
             "scale, so a block maximum can saturate); no random Hadamard transform, no stochastic rounding; "
             "float32 matmuls. Two activations: both in 1x16 blocks along the contraction dim. " + BATCHED_RULE,
             ("nvfp4",), *_scaled(_NV_1D, _NV_2D, "nvfp4", "nvfp4")),
    Strategy("nvfp4-train", "NVIDIA's NVFP4 training recipe (Pretraining LLMs with NVFP4, 2025): E2M1 elements, A "
             "and G in 1x16 blocks along each GEMM's contraction dim, W in 16x16 blocks, E4M3 block scales and the "
             "per-tensor float32 scale as nvfp4; A and W round to nearest even; the output gradient rounds "
             "stochastically (unbiased; counter-based random numbers from fixed seeds, reproducible) in dgrad and "
             "wgrad; the wgrad operands Gᵀ and Aᵀ are multiplied along the tokens by a 16-point random Hadamard "
             "transform (Sylvester H16/4 with one fixed random sign vector, tokens zero-padded to a multiple of 16) "
             "before their 1x16 casts; float32 matmuls. Per-GEMM errors of stochastically rounded operands are "
             "larger than round-to-nearest's (the recipe trades variance for no bias). Two activations: both "
             "in 1x16 blocks along the contraction dim, the gradient rounded as above. " + BATCHED_RULE,
             ("nvfp4",), *_scaled(_NV_1D, _NV_2D, "nvfp4", "nvfp4", rht_wgrad=True, sr_grad=True)),
    Strategy("mxfp4", "OCP MX FP4: E2M1 elements for A, W and G, blocks of 32 along each GEMM's contraction dim, "
             "E8M0 scale by the OCP FLOOR rule (floor(log2 amax) − 2); no Hadamard transform, no stochastic "
             "rounding; float32 matmuls. Two activations: both E2M1 in blocks of 32 along the contraction dim. "
             + BATCHED_RULE, ("mxfp4-e2m1",), *_scaled(_MX, _MX, "mxfp4-e2m1", "mxfp4-e2m1")),
    Strategy("mxfp6-e2m3", "OCP MX FP6 E2M3 (max 7.5) for A, W and G, blocks of 32 along each GEMM's contraction "
             "dim, E8M0 scale by the OCP FLOOR rule (floor(log2 amax) − 2); float32 matmuls. Two activations: both "
             "in blocks of 32 along the contraction dim. " + BATCHED_RULE,
             ("mxfp6-e2m3",), *_scaled(_MX, _MX, "mxfp6-e2m3", "mxfp6-e2m3")),
    Strategy("mxfp6-e3m2", "OCP MX FP6 E3M2 (max 28) for A, W and G, blocks of 32 along each GEMM's contraction "
             "dim, E8M0 scale by the OCP FLOOR rule (floor(log2 amax) − 4); float32 matmuls. Two activations: both "
             "in blocks of 32 along the contraction dim. " + BATCHED_RULE,
             ("mxfp6-e3m2",), *_scaled(_MX, _MX, "mxfp6-e3m2", "mxfp6-e3m2")),
)}



def mixed_with_blocksize(blocksize: int) -> Strategy:
    """The "mixed" recipe (MatMulFP8Mixed) with one block size for activations and output gradients in
    every layer, instead of get_block_sizes' per-layer pick: the model-wide block size under test."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    base = STRATEGIES["mixed"]
    blocks = (blocksize, blocksize)
    return Strategy(f"mixed bs={blocksize}", base.rules.replace("bsz/bsz2 from get_block_sizes", f"bsz = bsz2 = "
                                                                f"{blocksize} in every layer"), base.formats,
                    functools.partial(_run_mixed, blocks=blocks), functools.partial(_linear_mixed, blocks=blocks),
                    base.quantized_gemms)

def _weight_scaled(fmt: str, gran: tuple[str, tuple[int, int] | None], scale_rule: str = "floor") -> WeightQuantizer:
    return WeightQuantizer(gran[0], gran[1], lambda W: _fq_scaled(W, fmt, *gran, scale_rule), fmt == "nvfp4")


# The fprop weight quantiser of every strategy: the same functions and (format, granularity) pairs
# the runners above use (tests/analysis/test_strategies.py checks each against run_strategy's
# weight operand bit for bit).
WEIGHT_QUANTIZERS: dict[str, WeightQuantizer] = {
    "global": WeightQuantizer("tensor", None, _weight_bnb_global),
    "mixed": WeightQuantizer("tensor", None, _weight_bnb_global),
    "int8": WeightQuantizer("row", None, _weight_int8),
    "switchback": WeightQuantizer("row", None, _weight_int8),
    "ocp-tensorwise": _weight_scaled("e4m3", _TENSOR),
    "ocp-rowwise": _weight_scaled("e4m3", _ROW),
    "ocp-blockwise": _weight_scaled("e4m3", _TILE_2),
    "mxfp8": _weight_scaled("mxfp8-e4m3", _MX),
    # A weight has one amax, so its history holds that amax only: the per-tensor cast (the first batch's, too).
    "delayed": _weight_scaled("e4m3", _TENSOR),
    "mxfp8-rceil": _weight_scaled("mxfp8-e4m3", _MX, "rceil"),
    "nvfp4": _weight_scaled("nvfp4", _NV_2D),
    "nvfp4-train": _weight_scaled("nvfp4", _NV_2D),  # weights round to nearest in the training recipe too
    "mxfp4": _weight_scaled("mxfp4-e2m1", _MX),
    "mxfp6-e2m3": _weight_scaled("mxfp6-e2m3", _MX),
    "mxfp6-e3m2": _weight_scaled("mxfp6-e3m2", _MX),
}


# --------------------------------------------------------------------------------------------
# Run-wide options: LLM.int8 row scale, simulated accumulation, delayed-scaling history
# --------------------------------------------------------------------------------------------
ROW_SCALE_RULES = {
    "bnb": "Row absmax (int8 row scale 'bnb', bitsandbytes): the max over non-outlier elements, so sub-threshold "
           "values in outlier columns still set it (bitsandbytes int8_vectorwise_quant).",
    "paper": "Row absmax (int8 row scale 'paper', LLM.int8 paper): outlier columns are left out of it entirely.",
}


@dataclass(frozen=True)
class RecipeOptions:
    """Run-wide recipe settings (CLI --int8-row-scale, --accum-bits/--promote-every, --amax-history/
    --amax-compute/--margin). The defaults are the recipes as STRATEGIES lists them.

    ``int8_row_scale``: "bnb" | "paper" (ROW_SCALE_RULES), for int8 and the threshold sweep.
    ``accumulation``: None (float32 matmuls) or the simulated accumulator for every FP8 GEMM of the FP8
    recipes (ocp-*, mxfp8, delayed, and the bnb-codebook global / mixed; int8 and switchback are exact
    int32). ``delayed``: the rule of the delayed strategy.
    """

    int8_row_scale: str = "bnb"
    accumulation: Accumulation | None = None
    delayed: DelayedScaling = DelayedScaling()

    def __post_init__(self) -> None:
        F.check_row_scale(self.int8_row_scale)
        if self.accumulation is not None and not isinstance(self.accumulation, Accumulation):
            raise TypeError(f"expected an Accumulation or None, got {type(self.accumulation).__name__}")
        if not isinstance(self.delayed, DelayedScaling):
            raise TypeError(f"expected a DelayedScaling, got {type(self.delayed).__name__}")

    def metadata(self) -> dict:
        """The ``recipe_options`` block of results metadata."""
        return {"int8_row_scale": self.int8_row_scale,
                "accumulation": None if self.accumulation is None else self.accumulation.metadata(),
                "delayed_scaling": self.delayed.metadata()}


def _mixed_blocks(run: Runner) -> tuple[int, int] | None | bool:
    """For a "mixed" runner: its fixed (bsz, bsz2), or None (get_block_sizes per layer); False for any other."""
    if run is _run_mixed:
        return None
    if isinstance(run, functools.partial) and run.func is _run_mixed:
        return run.keywords.get("blocks")
    return False


def with_options(strategies: list[Strategy], options: RecipeOptions | None) -> list[Strategy]:
    """``strategies`` with ``options`` applied (names unchanged; each rule text says what was used)."""
    options = options or RecipeOptions()
    out = []
    for s in strategies:
        recipe = getattr(s.run, "__self__", None)
        if isinstance(recipe, (_Scaled, _Delayed)):
            rules = s.rules
            if isinstance(recipe, _Delayed):
                recipe = dataclasses.replace(recipe, rule=options.delayed)
                rules = _delayed_rules(options.delayed)
            if options.accumulation is not None:
                recipe = dataclasses.replace(recipe, accum=options.accumulation)
                rules += " " + options.accumulation.describe()
            s = dataclasses.replace(s, rules=rules, run=recipe.run, linear=recipe.linear,
                                    new_state=recipe.new_state if isinstance(recipe, _Delayed) else None)
        elif options.accumulation is not None and (s.run is _run_global or _mixed_blocks(s.run) is not False):
            blocks = None if s.run is _run_global else _mixed_blocks(s.run)
            recipe = _CodebookAccum(s.run is not _run_global, options.accumulation, blocks)
            s = dataclasses.replace(s, rules=s.rules + " " + options.accumulation.describe(), run=recipe.run,
                                    linear=recipe.linear)
        elif s.run is _run_int8:
            rs = options.int8_row_scale
            s = dataclasses.replace(s, rules=s.rules + " " + ROW_SCALE_RULES[rs],
                                    run=functools.partial(_run_int8, row_scale=rs),
                                    linear=functools.partial(_linear_int8, row_scale=rs))
        out.append(s)
    return out


def resolve(names: str | list[str] | tuple[str, ...]) -> list[Strategy]:
    """Strategies for ``"all"``, one name, a comma-separated list or a sequence of names (order kept, no duplicates)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    elif not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"strategy must be a name, a comma-separated string or a list of names, got {names!r}")
    out: list[Strategy] = []
    for n in names:
        if n == "all":
            chosen = list(STRATEGIES.values())
        elif n in STRATEGIES:
            chosen = [STRATEGIES[n]]
        else:
            raise ValueError(f"strategy must be 'all' or one of {', '.join(STRATEGIES)}, got {n!r}")
        out += [s for s in chosen if s not in out]
    if not out:
        raise ValueError("at least one strategy is required, got none")
    return out


def site_kwargs(strategy: Strategy, state: Any, site: str, index: int | None) -> dict:
    """Keywords for a stateful recipe (Strategy.new_state): its state and the site key (layer, slice).
    No state: a fresh one for this call alone (a delayed recipe then sees its first batch)."""
    if strategy.new_state is None:
        return {}
    return {"state": strategy.new_state() if state is None else state, "site": (site, index)}


def quantisable(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` as the recipes read it: a float64 tensor (a float64 model's operand) as float32, the widest format
    the quantisers take (float32 / float16 / bfloat16); anything else as it is. The references stay float64 of
    the operands themselves, so a recipe's error includes the float32 rounding (~1e-7, far below any recipe's)."""
    return t.float() if t is not None and t.dtype == torch.float64 else t


def run_strategy(strategy: Strategy, A: torch.Tensor, W: torch.Tensor, G: torch.Tensor | None,
                 threshold: float = 6.0, *, b_is_weight: bool = True, state: Any = None,
                 site: str = "") -> StrategyOutput:
    """Replay ``strategy`` on A [tokens, in], W [out, in], G [tokens, out] (or None: fprop only).

    Batched GEMMs: A [Bt, M, K], W [Bt, N, K], G [Bt, M, N] run slice by slice (BATCHED_RULE) and
    the results are stacked; a ``batched`` strategy does the same in one call. ``b_is_weight`` False: W
    is a second activation (see each rule text). ``state``/``site``: for a stateful strategy
    (``new_state``), one pass's state and the GEMM's name (state None: a fresh state for this call only;
    stateful strategies run slice by slice, each slice its own site).
    """
    _check(A, W, G)
    A, W, G = quantisable(A), quantisable(W), quantisable(G)
    with torch.no_grad():
        if A.dim() == 2 or (strategy.runs_batched and strategy.new_state is None):
            return strategy.run(A, W, G, threshold, b_is_weight, **site_kwargs(strategy, state, site, None))
        return _stacked([strategy.run(A[i], W[i], None if G is None else G[i], threshold, b_is_weight,
                                      **site_kwargs(strategy, state, site, i))
                         for i in range(A.shape[0])])
