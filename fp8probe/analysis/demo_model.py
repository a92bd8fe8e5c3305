"""A small, seeded pre-LN transformer encoder with planted outlier feature dimensions, for demos and tests."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class DemoConfig:
    """Shape and outlier plan of the demo encoder.

    ``outlier_dims``/``outlier_magnitudes`` plant LLM.int8-style outlier features: every LayerNorm in
    front of a linear (``ln1`` → qkv, ``ln2`` → fc1) gets bias = magnitude and weight = magnitude/8 at
    those feature indices, so the linear's input column sits at |x| ≈ magnitude ± 3·magnitude/8
    (all tokens, always ≥ magnitude·5/8 > 6 for magnitudes ≥ 10), while every other column stays a
    unit-scale LayerNorm output (|x| < 6 in practice: max of ~10⁵ N(0,1) draws ≈ 4.5).
    """

    vocab: int = 128
    d_model: int = 64
    n_heads: int = 4
    d_ff: int = 128
    n_layers: int = 2
    seq: int = 32
    seed: int = 0
    outlier_dims: tuple[int, ...] = (5, 19, 42)
    outlier_magnitudes: tuple[float, ...] = (24.0, -36.0, 52.0)

    def __post_init__(self) -> None:
        for field in ("vocab", "d_model", "n_heads", "d_ff", "n_layers", "seq"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model must be a multiple of n_heads, got {self.d_model} and {self.n_heads}")
        if len(self.outlier_dims) != len(self.outlier_magnitudes):
            raise ValueError(f"one magnitude per outlier dim expected, got {len(self.outlier_dims)} dims "
                             f"and {len(self.outlier_magnitudes)} magnitudes")
        if any(not 0 <= d < self.d_model for d in self.outlier_dims) or len(set(self.outlier_dims)) != len(self.outlier_dims):
            raise ValueError(f"outlier_dims must be distinct indices in [0, {self.d_model}), got {self.outlier_dims}")
        if any(abs(m) < 10 for m in self.outlier_magnitudes):
            raise ValueError(f"outlier magnitudes must satisfy |m| >= 10 so the column always exceeds the "
                             f"LLM.int8 threshold 6, got {self.outlier_magnitudes}")


class Attention(nn.Module):
    """Multi-head self-attention (no mask: an encoder) with a fused qkv linear and an output projection."""

    def __init__(self, cfg: DemoConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        shape = (b, t, self.n_heads, d // self.n_heads)
        q, k, v = (z.reshape(shape).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.n_heads)
        y = att.softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-LN encoder block: x + attn(ln1(x)), then x + fc2(gelu(fc1(ln2(x))))."""

    def __init__(self, cfg: DemoConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class DemoEncoder(nn.Module):
    """Token + position embedding, ``n_layers`` pre-LN blocks, final LayerNorm, vocabulary head.

    ``forward(tokens [B, T] int64)`` returns logits [B, T, vocab]; ``forward(tokens, targets [B, T])``
    returns the mean token cross-entropy (a scalar), so analysis can use the model's own loss.
    """

    def __init__(self, cfg: DemoConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab)
        self._init_weights(cfg)

    @torch.no_grad()
    def _init_weights(self, cfg: DemoConfig) -> None:
        gen = torch.Generator().manual_seed(cfg.seed)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
            elif ".ln" in name or name.startswith("ln_f"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 2 and not name.startswith(("tok", "pos")):
                # std 0.01 (half of GPT-2's 0.02): keeps every linear *output* below the threshold 6 even
                # when its input carries the planted |x| ≈ 72 columns (measured max |fc1 out| ≈ 3 with 0.01, 6.1 with 0.02).
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
            else:
                p.copy_(torch.randn(p.shape, generator=gen))
        dims = torch.tensor(cfg.outlier_dims, dtype=torch.long)
        mags = torch.tensor(cfg.outlier_magnitudes, dtype=torch.float32)
        for block in self.blocks:
            for ln in (block.ln1, block.ln2):
                ln.bias[dims] = mags
                ln.weight[dims] = mags.abs() / 8

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok(tokens) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def build_model(cfg: DemoConfig | None = None) -> DemoEncoder:
    """The demo encoder for ``cfg`` (default DemoConfig()), deterministic from ``cfg.seed``, in eval mode."""
    return DemoEncoder(cfg or DemoConfig()).eval()


def make_batches(n: int, batch: int, seq: int, seed: int = 0, vocab: int = DemoConfig.vocab) -> list[Batch]:
    """``n`` batches of (tokens, targets), both int64 [batch, seq] in [0, vocab), from ``seed``.

    Targets are the tokens shifted by one (the next token; the last position wraps), so the loss is
    a real language-model loss rather than noise.
    """
    for label, value in (("n", n), ("batch", batch), ("seq", seq), ("vocab", vocab)):
        if value < 1:
            raise ValueError(f"{label} must be >= 1, got {value}")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, vocab, (batch, seq), generator=gen)
        out.append((tokens, tokens.roll(-1, dims=1)))
    return out


def planted_outliers(model: DemoEncoder, threshold: float = 6.0) -> dict[str, list[int]]:
    """Per linear layer name (module path), the feature indices of its input planted at |x| ≥ ``threshold``.

    qkv and fc1 read the planted LayerNorm outputs; proj, fc2 and head read unplanted tensors ([]).
    """
    cfg = model.cfg
    planted = sorted(d for d, m in zip(cfg.outlier_dims, cfg.outlier_magnitudes) if abs(m) * 5 / 8 >= threshold)
    out: dict[str, list[int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            out[name] = list(planted) if name.endswith(("attn.qkv", "fc1")) else []
    return out


def build_demo(n_batches: int = 4, batch: int = 8, seed: int = 0, **config: object) -> tuple[DemoEncoder, list[Batch]]:
    """Factory for ``--factory fp8probe.analysis.demo_model:build_demo``: (model, batches)."""
    cfg = DemoConfig(seed=seed, **config)  # type: ignore[arg-type]
    return build_model(cfg), make_batches(n_batches, batch, cfg.seq, seed=seed + 1, vocab=cfg.vocab)
