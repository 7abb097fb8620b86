"""Train `toy.ToyVLM (tests/toy.py)` with `anymal.trainer.fit`: `python tests/ddp_toy_run.py OUT_DIR [KEY=VALUE ...]`.

tests/test_train.py starts it under `torchrun --nproc_per_node=2` (and calls `toy_cfg`/`train_toy` in-process).
"""
import sys
import torch
from anymal.config import tiny, override
from toy import ToyVLM, ToySeqs
from anymal.trainer import fit


def toy_cfg(out, *sets):
    "A toy run: 32 tokens, 64 wide, LoRA r=8; short schedule; every step logged."
    return override(tiny(), ["train.steps=12", "train.batch_size=8", "train.grad_accum=1", "train.warmup=3",
                             "train.eval_every=6", "train.eval_batches=100", "train.save_every=4", "train.log_every=1",
                             "train.lr=3e-2", "train.lora_lr=1e-2", f"train.out_dir={out}",
                             "llm.vocab_size=32", "llm.hidden=64", "lora.r=8", "resampler.latents=4", *sets])


def train_toy(out, *sets, n=64, resume=False, on_step=None, nan_after=None):
    "Build the toy (seed 0) and fit it; returns (final checkpoint dir, model)."
    cfg = toy_cfg(out, *sets)
    torch.manual_seed(0)
    model = ToyVLM.from_config(cfg, nan_after=nan_after)
    final = fit(cfg, model, ToySeqs(n), ToySeqs(32, seed=1), resume=resume, progress=False, on_step=on_step)
    return final, model


if __name__ == "__main__":
    train_toy(sys.argv[1], *sys.argv[2:])
