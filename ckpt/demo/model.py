"""The demo's model, data and schedule: everything a rank needs to train, as pure functions.

The data of step ``s`` is a function of ``(seed, s)`` alone and every rank
builds the whole global batch before taking its slice, so the token stream
does not depend on the world size: a job resumed on another number of ranks
sees exactly the batches the killed job would have seen. The learning rate is
a function of the step too, so the schedule needs no state of its own: warmup,
then constant, the regime where averaging the last checkpoints pays off (the
iterates wander around a valley that their mean sits closer to).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class ModelConfig:
    """A small pre-norm decoder-only transformer and the synthetic language it learns."""

    vocab: int = 64
    dim: int = 256
    layers: int = 4
    heads: int = 4
    seq: int = 64
    batch: int = 12  # sequences per step, split across ranks: divisible by every world size used
    lr: float = 2e-3
    warmup: int = 10
    successors: int = 6  # tokens that may follow a token in the synthetic language
    seed: int = 0

    @property
    def hidden(self) -> int:
        return 4 * self.dim


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.attn_norm = nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.mlp_norm = nn.LayerNorm(cfg.dim)
        self.up = nn.Linear(cfg.dim, cfg.hidden, bias=False)
        self.down = nn.Linear(cfg.hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.out(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.mlp_norm(x))))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.pos = nn.Parameter(torch.zeros(cfg.seq, cfg.dim))
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(
                    p, std=0.02 / math.sqrt(2 * cfg.layers) if name.endswith(("out.weight", "down.weight")) else 0.02
                )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def n_params(cfg: ModelConfig) -> int:
    d, h = cfg.dim, cfg.hidden
    per_layer = 4 * d + 3 * d * d + d * d + 2 * d * h
    return 2 * cfg.vocab * d + cfg.seq * d + cfg.layers * per_layer + 2 * d


# --- the synthetic language ------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def language(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """A Markov chain over the vocabulary: each token has ``successors`` possible next
    tokens with fixed, uneven probabilities. Its entropy (the best achievable loss)
    is well below ln(vocab), so the loss curve has somewhere to go."""
    g = torch.Generator().manual_seed(cfg.seed * 7919 + 17)
    succ = torch.stack([torch.randperm(cfg.vocab, generator=g)[: cfg.successors] for _ in range(cfg.vocab)])
    probs = torch.softmax(1.5 * torch.randn(cfg.vocab, cfg.successors, generator=g), dim=1)
    return succ, probs


def entropy(cfg: ModelConfig) -> float:
    """The language's per-token entropy in nats (stationary weighting approximated as uniform)."""
    _, probs = language(cfg)
    return float(-(probs * probs.log()).sum(1).mean())


def sample(cfg: ModelConfig, n: int, seed: int) -> torch.Tensor:
    """``n`` sequences of ``seq + 1`` tokens (inputs and shifted targets)."""
    succ, probs = language(cfg)
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(cfg.vocab, (n,), generator=g)
    out = [tok]
    for _ in range(cfg.seq):
        pick = torch.multinomial(probs[tok], 1, generator=g).squeeze(1)
        tok = succ[tok, pick]
        out.append(tok)
    return torch.stack(out, dim=1)


def batch(cfg: ModelConfig, step: int, rank: int, world: int) -> torch.Tensor:
    """This rank's slice of the global batch of ``step`` (identical whatever the world size)."""
    if cfg.batch % world:
        raise ValueError(f"batch {cfg.batch} does not split over {world} ranks")
    full = sample(cfg, cfg.batch, seed=(cfg.seed << 32) + 1_000_003 * (step + 1))
    per = cfg.batch // world
    return full[rank * per : (rank + 1) * per]


def eval_tokens(cfg: ModelConfig) -> torch.Tensor:
    """A fixed held-out set (a seed no training step uses)."""
    return sample(cfg, cfg.batch, seed=(cfg.seed << 32) + 12345)


def lr_at(cfg: ModelConfig, step: int) -> float:
    """Learning rate of step ``step`` (1-based): linear warmup, then constant."""
    return cfg.lr * min(1.0, step / cfg.warmup)


def token_loss_sum(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over ``tokens`` (sum, so ranks can add theirs up)."""
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="sum")


@torch.no_grad()
def evaluate(model: nn.Module, cfg: ModelConfig) -> float:
    """Mean held-out loss of a plain (unsharded) model, in this process."""
    tokens = eval_tokens(cfg)
    return token_loss_sum(model, tokens).item() / (tokens.shape[0] * cfg.seq)
