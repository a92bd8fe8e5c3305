"""torch.compile of the Linear modules: one graph (fullgraph=True), the same bits as eager, forward and backward.

Before, every FP8 layer broke its graph at each quantisation: validate_codebook's bool(isfinite().all()), the
sortedness check, and quantize's NaN/Inf list of data-dependent length (the ops' fake special_index and
special_value even had two unrelated lengths); Linear8bitLt broke it at its threshold's float32 rounding.
``aot_eager`` traces forward and backward as inductor does, without a C++ compiler; one test runs inductor.
"""
from __future__ import annotations

import shutil

import pytest
import torch

import fp8probe.functional as F
import fp8probe.nn as fnn
from fp8probe.formats import get_codebook

pytestmark = pytest.mark.filterwarnings("ignore")

LAYERS = [
    ("mixed", lambda: fnn.LinearFP8Mixed(96, 40)),
    ("global", lambda: fnn.LinearFP8Global(96, 40, bias=False)),
    ("switchback", lambda: fnn.SwitchBackLinear(96, 40)),
    ("int8-no-outliers", lambda: fnn.Linear8bitLt(96, 40, threshold=0.0, has_fp16_weights=True)),
]


def _eager_and_compiled(make, x: torch.Tensor, backend: str, seed: int):
    torch.manual_seed(seed)
    layer = make()
    results = []
    for run in (layer, torch.compile(layer, backend=backend, fullgraph=True)):
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = run(xi)
        (y.double().square().sum()).backward()
        results.append((y.detach(), xi.grad, layer.weight.grad))
    return results


@pytest.mark.parametrize("name,make", LAYERS, ids=[n for n, _ in LAYERS])
def test_a_compiled_layer_is_one_graph_with_the_eager_bits(name, make) -> None:
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(31)
    x = torch.randn(3, 7, 96, generator=gen) * 3
    x[0, 0, :4] = torch.tensor([0.0, -0.0, 1e-30, 50.0])
    (eager, compiled) = _eager_and_compiled(make, x, "aot_eager", seed=32)
    for a, b in zip(eager, compiled):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_nan_and_inf_inputs_keep_their_positions_when_compiled() -> None:
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(33)
    x = torch.randn(4, 64, generator=gen)
    x[1, 3], x[2, 5] = float("nan"), float("inf")
    layer = fnn.LinearFP8Mixed(64, 16, bias=False)
    with torch.no_grad():
        eager = layer(x)
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    assert torch.equal(eager.isnan(), compiled.isnan())
    finite = ~eager.isnan()
    assert torch.equal(eager[finite], compiled[finite])


def test_an_unsorted_codebook_and_a_non_finite_one_when_compiled() -> None:
    """Compiled, a codebook's order is not read (it is searched through its stable sort, the same result);
    its finiteness is an assertion inside the graph, so a NaN entry still fails, at run time."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(34)
    A = torch.randn(300, generator=gen)
    shuffled = get_codebook("bnb-e4m3")[torch.randperm(256, generator=gen)]
    fq = torch.compile(lambda a, c: F.fake_quantize(a, c, 64), backend="aot_eager", fullgraph=True)
    assert torch.equal(fq(A, shuffled), F.fake_quantize(A, shuffled, 64))
    bad = shuffled.clone()
    bad[7] = float("nan")
    with pytest.raises(RuntimeError, match="finite"):
        fq(A, bad)


def test_int8_outliers_compile_with_dynamic_output_shapes() -> None:
    """The outlier columns' count depends on the data: with dynamo's capture_dynamic_output_shape_ops the
    layer with a threshold is still one graph, with the eager bits."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(35)
    x = torch.randn(8, 64, generator=gen)
    x[:, 5] *= 9  # an outlier column
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        eager, compiled = _eager_and_compiled(lambda: fnn.Linear8bitLt(64, 24, threshold=3.3, has_fp16_weights=True),
                                              x, "aot_eager", seed=36)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None, reason="inductor needs a C++ compiler")
def test_inductor_quantises_to_the_eager_bits() -> None:
    """The quantisers are opaque ops, so inductor's casts are the eager bits; the GEMMs and the bias add
    around them are inductor's own code, which may round a sum in another order (1 ulp), as for any model."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(37)
    A = torch.randn(5, 96, generator=gen) * 10
    for blocksize in (None, 64):
        fq = torch.compile(lambda a: F.fake_quantize(a, "bnb-e4m3", blocksize), fullgraph=True)
        assert torch.equal(fq(A), F.fake_quantize(A, "bnb-e4m3", blocksize))
    eager, compiled = _eager_and_compiled(LAYERS[0][1], A, "inductor", seed=38)
    for a, b in zip(eager, compiled):  # (float32 rounding of sums, relative to the tensor's scale)
        assert (b - a).abs().max() <= 1e-5 * a.abs().max()


def test_the_threshold_rounds_up_to_float32_as_torch_does() -> None:
    """_op_threshold's float32 rounding moved from torch tensors to Python (struct): the same value for
    thresholds across the float32 range, subnormal, exact, just above FLT_MAX and beyond."""
    import math
    import random

    from fp8probe.functional import _op_threshold

    def torch_up(t: float) -> float:
        t32 = torch.tensor(t, dtype=torch.float64).to(torch.float32)
        if float(t32) < t:
            t32 = torch.nextafter(t32, torch.tensor(math.inf))
        return float(t32)

    rng = random.Random(39)
    values = [3.3, 6.0, 1e-45, 1e-46, 1.401298464324817e-45, 3.4028234663852886e38, 3.4028235e38, 3.40282357e38,
              1e39, 1e300, 0.1, 2.5] + [rng.uniform(0, 10) ** rng.uniform(-40, 40) for _ in range(5000)]
    for t in values:
        assert _op_threshold(t, "") == torch_up(t), t
        assert _op_threshold(t, "") >= t and _op_threshold(t, "bnb") == t
