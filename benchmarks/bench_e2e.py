"""Verdict and wall time of ``analyze`` with its end-to-end part on a ~100M-parameter Llama-style LM (random init) on CPU.

Usage: ``python benchmarks/bench_e2e.py [--layers 12] [--d-model 768] [--d-ff 2048] [--vocab 16000]
[--batch 2] [--seq 64] [--batches 1] [--strategy all] [--sensitivity auto] [--threads N]``.
Prints the parameter count, the isolated analysis time, the end-to-end time (reference runs,
sensitivity, validation; ``metadata["e2e"]["seconds"]``), their ratio and the verdict lines.
The model follows the Hugging Face Llama layout and names (``layers.3.self_attn.q_proj``,
``layers.3.mlp.gate_proj``, ``lm_head``): RMSNorm, rotary positions, causal attention, SwiGLU MLP,
no biases; defaults give 12 blocks, d=768, d_ff=2048, vocab 16000: 110M parameters, 85 linear layers
(109 GEMMs with attention's QKᵀ and PV).
"""
from __future__ import annotations

import argparse
import math
import resource
import time

import torch
from torch import nn
from torch.nn import functional as F

from fp8probe.analysis.pipeline import analyze
from fp8probe.report.verdict import verdict_lines


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rotary(x: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding on [B, H, T, Dh] (rotate-half form, as HF Llama)."""
    t, dh = x.shape[-2], x.shape[-1]
    inv = theta ** (-torch.arange(0, dh, 2, dtype=torch.float32, device=x.device) / dh)
    ang = torch.arange(t, dtype=torch.float32, device=x.device)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(x.dtype), torch.cat([ang.sin()] * 2, -1).to(x.dtype)
    x1, x2 = x[..., : dh // 2], x[..., dh // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Attention(nn.Module):
    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = ((p(x).reshape(b, t, self.n_heads, d // self.n_heads).transpose(1, 2))
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(_rotary(q), _rotary(k), v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, d: int, d_ff: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, d_ff, bias=False), nn.Linear(d, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, d: int, n_heads: int, d_ff: int) -> None:
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(d), RMSNorm(d)
        self.self_attn, self.mlp = Attention(d, n_heads), MLP(d, d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyLlama(nn.Module):
    """forward(tokens [B, T], labels [B, T]) → next-token cross-entropy (scalar), like a HF causal LM."""

    def __init__(self, vocab: int, d: int, n_layers: int, n_heads: int, d_ff: int, seed: int = 0) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d, n_heads, d_ff) for _ in range(n_layers))
        self.norm = RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.dim() == 2:  # Llama's init: N(0, 0.02)
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(tokens)
        for block in self.layers:
            x = block(x)
        logits = self.lm_head(self.norm(x))
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--d-ff", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batches", type=int, default=1)
    ap.add_argument("--strategy", default="all")
    ap.add_argument("--sensitivity", default="auto", choices=["auto", "measured", "estimated"])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = TinyLlama(args.vocab, args.d_model, args.layers, args.heads, args.d_ff).eval()
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.batches):
        tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
        batches.append((tokens, tokens))
    n_params = sum(p.numel() for p in model.parameters())
    analyze(model, batches[:1], args.strategy, layers=r"^lm_head$", e2e=False)  # warm-up (one-off op setup)
    start = time.perf_counter()
    res = analyze(model, batches, args.strategy, sensitivity=args.sensitivity)
    total = time.perf_counter() - start
    e2e_s = res.metadata["e2e"]["seconds"]
    isolated = total - e2e_s
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(f"model: Llama-style, {n_params / 1e6:.1f}M parameters, {args.layers} blocks, d={args.d_model}, "
          f"d_ff={args.d_ff}, vocab {args.vocab}, {len(res.tables['layers'])} GEMMs; {args.batches} batch(es) "
          f"of {args.batch} x {args.seq} tokens; strategies: {', '.join(res.metadata['strategies'])}; "
          f"torch threads: {torch.get_num_threads()}; sensitivity: {res.metadata['e2e']['sensitivity']}, "
          f"{res.metadata['e2e']['forward_runs']} model runs, {res.metadata['e2e']['validation_runs']} validation runs")
    print("| isolated s | end-to-end s | ratio | total s | peak RSS MiB |")
    print("|---|---|---|---|---|")
    print(f"| {isolated:.1f} | {e2e_s:.1f} | {e2e_s / isolated:.2f} | {total:.1f} | {rss_mib:.0f} |")
    for line in verdict_lines(res.tables, res.metadata):
        print(line)
    rec = res.tables["recommendation"]
    for r in rec.to_dict("records"):
        print(f"  {r['strategy']}: keep {r['n_keep']} ({', '.join(r['keep_16bit'][:4])}{' ...' if r['n_keep'] > 4 else ''})"
              f" -> loss {100 * r['loss_rel_change']:+.3f} %, {100 * r['lp_flop_share']:.1f} % FLOPs low precision, "
              f"{'within' if r['within_budget'] else 'OVER'} budget")
    return 0 if math.isfinite(total) else 1


if __name__ == "__main__":
    raise SystemExit(main())
