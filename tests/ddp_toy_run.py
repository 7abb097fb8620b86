"""Train `toy.ToyVLM (tests/toy.py)` with `anymal.trainer.fit`: `python tests/ddp_toy_run.py OUT_DIR [--resume] [KEY=VALUE ...]`.

tests/test_train.py starts it under `torchrun --nproc_per_node=2` (and calls `toy_cfg`/`train_toy` in-process).
`TOY_SIGNAL=RANK:STEP` makes that rank send itself SIGTERM after that step, as a scheduler would.
"""
import os, signal, sys
import torch
from anymal.config import tiny, override
from toy import ToyVLM, ToySeqs
from anymal.trainer import Interrupted, fit


def toy_cfg(out, *sets):
    "A toy run: 32 tokens, 64 wide, LoRA r=8; short schedule; every step logged; fp32 (the tests compare sums)."
    return override(tiny(), ["train.steps=12", "train.batch_size=8", "train.grad_accum=1", "train.warmup=3",
                             "train.eval_every=6", "train.eval_batches=100", "train.save_every=4", "train.log_every=1",
                             "train.lr=3e-2", "train.lora_lr=1e-2", "train.cpu_bf16=false", f"train.out_dir={out}",
                             "llm.vocab_size=32", "llm.hidden=64", "lora.r=8", "resampler.latents=4", *sets])


def train_toy(out, *sets, n=64, resume=False, on_step=None, nan_after=None, precision=None, hook=None):
    "Build the toy (seed 0) and fit it; returns (final checkpoint dir, model). `hook`: on the bridge's gradient."
    cfg = toy_cfg(out, *sets)
    torch.manual_seed(0)
    model = ToyVLM.from_config(cfg, nan_after=nan_after)
    if hook is not None: model.bridge.latents.register_hook(hook)
    final = fit(cfg, model, ToySeqs(n), ToySeqs(32, seed=1), resume=resume, progress=False, on_step=on_step,
                precision=precision)
    return final, model


def signal_at(spec: str):
    "An on_step that sends this process SIGTERM after step STEP if it is rank RANK (`spec` = 'RANK:STEP')."
    rank, step = map(int, spec.split(":"))
    def on_step(s, m):
        if s == step and int(os.environ.get("RANK", 0)) == rank: os.kill(os.getpid(), signal.SIGTERM)
    return on_step


if __name__ == "__main__":
    out, args = sys.argv[1], sys.argv[2:]
    spec = os.environ.get("TOY_SIGNAL")
    try: train_toy(out, *[a for a in args if a != "--resume"], resume="--resume" in args,
                   on_step=signal_at(spec) if spec else None)
    except Interrupted as e:  # as `anymal` does: one line, the signal's exit code
        print(f"rank {os.environ.get('RANK', 0)}: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
