"""Capture: names from module paths in eager and exported models, reused modules, gradients from the real backward."""
from __future__ import annotations

import torch
from torch import nn

from fp8probe.analysis.capture import capture_batch, is_exported_graph
from fp8probe.analysis.loading import Batch
from fp8probe.analysis.pipeline import analyze


class Shared(nn.Module):
    """The same Linear applied twice, plus a Linear whose output never reaches the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.dead = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.dead(x)
        return self.lin(torch.relu(self.lin(x)))


def _collect(model, batch: Batch) -> list:
    calls = []
    capture_batch(model, batch, calls.append)
    return calls


def test_gradients_match_autograd_and_reuse_is_named() -> None:
    torch.manual_seed(0)
    model = Shared()
    x = torch.randn(2, 5, 8)
    calls = {c.name: c for c in _collect(model, Batch((x,), {}))}
    # Streaming: calls arrive as their gradients do (last first), then the one no gradient reached;
    # ``index`` keeps the forward order.
    assert list(calls) == ["lin#1", "lin", "dead"]
    assert sorted(calls, key=lambda n: calls[n].index) == ["dead", "lin", "lin#1"]
    assert calls["dead"].grad_output is None  # not on the path to the loss: fprop only
    # Surrogate loss mean(y²): dL/dy = 2y/numel for the second application.
    y = model(x)
    expected = (2 * y / y.numel()).reshape(-1, 8)
    torch.testing.assert_close(calls["lin#1"].grad_output, expected, rtol=1e-6, atol=1e-9)
    assert calls["lin"].activation.shape == (10, 8) and torch.equal(calls["lin"].activation, x.reshape(10, 8))
    # Parameters are left as they were: no .grad written, requires_grad flags restored.
    assert all(p.grad is None for p in model.parameters())
    res = analyze(model, Batch((x,), {}), "global")
    dead = res.tables["gemm"][res.tables["gemm"]["layer"] == "dead"]
    assert dead["gemm"].tolist() == ["fprop"]


def test_exported_names_equal_eager(tiny_model, tiny_batches) -> None:
    tokens, targets = tiny_batches[0]
    ep = torch.export.export(tiny_model, (tokens, targets))
    gm = ep.module()
    assert is_exported_graph(gm) and not is_exported_graph(tiny_model)
    eager = _collect(tiny_model, Batch((tokens, targets), {}))
    exported = _collect(gm, Batch((tokens,), {"targets": targets}))  # kwargs are bound to the signature
    assert [c.name for c in eager] == [c.name for c in exported]
    for a, b in zip(eager, exported):
        assert torch.equal(a.activation, b.activation) and torch.equal(a.grad_output, b.grad_output), a.name
