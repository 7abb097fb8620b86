"""The smallest model and dataset the trainer can train: frozen parts, a trainable bridge, LoRA adapters.

A test fixture (the trainer, checkpoint and distributed notebooks and tests/ use it), not part of the library:
notebooks in nbs/ import it with `sys.path.insert(0, "../tests")`."""
from __future__ import annotations
from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import nn

class ToyLoRALinear(nn.Module):
    "A frozen `Linear(dim, dim)` plus a trainable low-rank update `B @ A`, named the way peft names it."
    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.base = nn.Linear(dim, dim).requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(rank, dim) / dim ** 0.5)
        self.lora_B = nn.Parameter(torch.zeros(dim, rank))  # zero: the adapter starts as a no-op, as in LoRA

    def forward(self, x):  # (B, T, D)
        return self.base(x) + x @ self.lora_A.T @ self.lora_B.T

class ToyBridge(nn.Module):
    "Trainable latents `(L, D)` pooled into one vector: stands in for the resampler."
    def __init__(self, dim: int, latents: int, dropout: float = 0.0):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(latents, dim) * 0.02)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self): return self.drop(self.proj(self.latents)).mean(0)  # (D,)

@dataclass
class ToyOutput:
    "What the toy returns (a dataclass, like transformers' outputs, so DDP can find its tensors)."
    loss: torch.Tensor
    logits: torch.Tensor

class ToyVLM(nn.Module):
    "Frozen embeddings and head, a trainable `bridge`, LoRA adapters in `mix`; `forward(**batch) -> .loss`."
    def __init__(self, vocab: int = 32, dim: int = 16, latents: int = 4, rank: int = 2,
                 dropout: float = 0.0, # dropout in the bridge (makes the RNG state matter on resume)
                 nan_after: int | None = None): # training forwards after which the loss turns NaN (for tests)
        super().__init__()
        self.embed = nn.Embedding(vocab, dim).requires_grad_(False)
        self.bridge = ToyBridge(dim, latents, dropout)
        self.mix = ToyLoRALinear(dim, rank)
        self.head = nn.Linear(dim, vocab).requires_grad_(False)
        self.nan_after, self.calls = nan_after, 0

    @classmethod
    def from_config(cls, cfg, **kw):
        "A toy whose shapes come from `cfg` (`llm.vocab_size`, `llm.hidden`, `resampler.latents`, `lora.r`)."
        return cls(cfg.llm.vocab_size, cfg.llm.hidden, cfg.resampler.latents, cfg.lora.r, cfg.resampler.dropout, **kw)

    def forward(self, input_ids, attention_mask, labels=None):  # (B, T) each
        h = self.embed(input_ids) + self.bridge()                # (B, T, D)
        logits = self.head(torch.tanh(self.mix(h)))              # (B, T, V)
        if labels is None: return ToyOutput(None, logits)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        if self.training:
            self.calls += 1
            if self.nan_after is not None and self.calls > self.nan_after: loss = loss * float("nan")
        return ToyOutput(loss, logits)

class ToySeqs(torch.utils.data.Dataset):
    "`n` right-padded counting sequences in AnyMAL's batch format (`input_ids`, `attention_mask`, `labels`, `sample_ids`)."
    def __init__(self, n: int = 64, seq_len: int = 12, pad: int = 4, vocab: int = 32, stride: int = 3, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(0, vocab, (n,), generator=g)
        self.seq_len, self.pad, self.vocab, self.stride = seq_len, pad, vocab, stride

    def __len__(self): return len(self.starts)
    def lengths(self) -> list[int]: return self.starts.tolist()  # a stand-in size per sample, for `train.group_by_length`

    def __getitem__(self, i):
        ids = (self.starts[i] + self.stride * torch.arange(self.seq_len)) % self.vocab
        mask = torch.ones(self.seq_len + self.pad, dtype=torch.long)
        mask[self.seq_len:] = 0
        ids = torch.cat([ids, torch.zeros(self.pad, dtype=torch.long)])  # (T,) right-padded
        return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100),
                    sample_ids=torch.tensor(i))
