"""The demo encoder: deterministic from its seed, planted outliers where it says, its own loss, valid configs only."""
from __future__ import annotations

import pytest
import torch

from fp8probe.analysis.demo_model import DemoConfig, build_demo, build_model, make_batches, planted_outliers


def test_deterministic_from_seed() -> None:
    a, b = build_model(DemoConfig(seed=5)), build_model(DemoConfig(seed=5))
    c = build_model(DemoConfig(seed=6))
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.head.weight, c.head.weight)


def test_planted_layernorm_parameters() -> None:
    cfg = DemoConfig(outlier_dims=(1, 9), outlier_magnitudes=(30.0, -45.0))
    m = build_model(cfg)
    for block in m.blocks:
        for ln in (block.ln1, block.ln2):
            assert ln.bias[[1, 9]].tolist() == [30.0, -45.0]
            assert ln.weight[[1, 9]].tolist() == [30.0 / 8, 45.0 / 8]
    names = planted_outliers(m)
    assert names["blocks.0.attn.qkv"] == [1, 9] and names["blocks.1.fc1"] == [1, 9]
    assert names["blocks.0.fc2"] == [] and names["head"] == []


def test_own_loss_and_logits() -> None:
    model, batches = build_demo(n_batches=2, batch=3, seed=2, d_model=32, d_ff=64, seq=8, vocab=40,
                                outlier_dims=(3,), outlier_magnitudes=(20.0,))
    tokens, targets = batches[0]
    assert tokens.shape == (3, 8) and torch.equal(targets, tokens.roll(-1, dims=1))
    assert model(tokens).shape == (3, 8, 40)
    with torch.no_grad():
        loss = model(tokens, targets)
    assert loss.dim() == 0 and 2.0 < float(loss) < 6.0  # ≈ ln(40) = 3.7 for an untrained model


def test_make_batches_seeded() -> None:
    a, b = make_batches(2, 4, 8, seed=1), make_batches(2, 4, 8, seed=1)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    assert not torch.equal(a[0][0], make_batches(1, 4, 8, seed=2)[0][0])
    with pytest.raises(ValueError, match="batch must be >= 1"):
        make_batches(1, 0, 8)


@pytest.mark.parametrize("kwargs, message", [
    ({"d_model": 30, "n_heads": 4}, "multiple of n_heads"),
    ({"outlier_dims": (1, 2), "outlier_magnitudes": (20.0,)}, "one magnitude per outlier dim"),
    ({"outlier_dims": (64,), "outlier_magnitudes": (20.0,)}, "distinct indices"),
    ({"outlier_dims": (1,), "outlier_magnitudes": (3.0,)}, "threshold 6"),
    ({"n_layers": 0}, "n_layers must be >= 1"),
])
def test_bad_config(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        DemoConfig(**kwargs)
