"""Memory stays bounded: capture streams layer by layer, so peak RSS grows with the largest layer, not the layer count."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from torch import nn

from fp8probe.analysis.capture import capture_batch
from fp8probe.analysis.loading import Batch

# The child process: warm up (imports, allocator, one replay of a layer of the same width), build
# a 4-layer and an N-layer MLP, take ru_maxrss as the baseline, analyse the 4-layer model, then the
# N-layer one. ru_maxrss is a high-water mark, so the second growth is what N layers need beyond
# the 4-layer run's peak.
_CHILD = textwrap.dedent("""
    import json, resource, sys
    import torch
    from torch import nn
    from fp8probe.analysis.pipeline import analyze

    torch.set_num_threads(1)
    n_layers, width, tokens = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])

    def mlp(n):
        torch.manual_seed(0)
        return nn.Sequential(*[m for _ in range(n) for m in (nn.Linear(width, width), nn.ReLU())])

    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    # e2e=False: this measures capture's streaming; the end-to-end runs hold one training step's memory
    # (the high-precision and one recipe's parameter gradients), which grows with the model by design.
    analyze(mlp(1), torch.randn(tokens, width), "ocp-tensorwise", e2e=False)
    small, large, x = mlp(4), mlp(n_layers), torch.randn(tokens, width)
    base = peak()
    assert len(analyze(small, x, "ocp-tensorwise", e2e=False).tables["layers"]) == 4
    p4 = peak()
    assert len(analyze(large, x, "ocp-tensorwise", e2e=False).tables["layers"]) == n_layers
    print(json.dumps({"small_kib": p4 - base, "large_extra_kib": peak() - p4}))
""")

WIDTH = 768
TOKENS = 32
# What one layer's replay allocates at least: the float64 copies of W [768, 768] made by the
# reference GEMM, the weight's tensor statistics, its operand error (x and q) and the float64 wgrad
# reference dW — 5 × 768² × 8 bytes = 22.5 MiB (measured peak of one replay: ~30-40 MiB).
REPLAY_KIB = 5 * WIDTH * WIDTH * 8 // 1024


def _child(n_layers: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                       os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", _CHILD, str(n_layers), str(WIDTH), str(TOKENS)], env=env,
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_peak_rss_grows_with_the_largest_layer_not_the_layer_count() -> None:
    """Budget: analysing N layers of width 768 (32 tokens, fp32) needs the model's own autograd
    activations (32 × 768 × 4 B = 96 KiB per layer) plus ONE layer's replay (≥ 22.5 MiB, above)
    plus allocator slack. Holding every layer's replay would add ≥ 22.5 MiB per extra layer, i.e.
    ≥ 270 MiB from 4 to 16 layers; the test allows a quarter of that (67.5 MiB). Measured on the
    2-core CI box (glibc malloc, trimmed after each layer): see the numbers in the assertion message.
    """
    got = _child(16)
    extra_layers = 16 - 4
    assert got["large_extra_kib"] < extra_layers * REPLAY_KIB / 4, got


class _Marker(torch.autograd.Function):
    """Identity whose backward logs when autograd passes between two layers."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, log: list) -> torch.Tensor:
        ctx.log = log
        return x.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        ctx.log.append("backward passes between the layers")
        return g, None


def test_each_layer_is_handed_over_during_backward_and_released() -> None:
    """A layer is analysed as soon as its output gradient exists, before autograd reaches the layer below,
    and nothing handed over is kept alive by capture afterwards."""
    log: list[str] = []

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second = nn.Linear(16, 16), nn.Linear(16, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.second(_Marker.apply(torch.relu(self.first(x)), log))

    torch.manual_seed(0)
    model = Two()
    held = []

    def sink(call) -> None:
        log.append(f"analyse {call.name}")
        held.append(call.grad_output)

    capture_batch(model, Batch((torch.randn(5, 16),), {}), sink)
    assert log == ["analyse second", "backward passes between the layers", "analyse first"]
    assert [g.shape for g in held] == [torch.Size([5, 8]), torch.Size([5, 16])]
    assert all(p.grad is None for p in model.parameters())  # no wgrad computed or stored for the model
