"""Seconds per step of the tiny LLaMA's pretraining, fp32 against bf16 autocast (`pretrain.lm_bf16`), on this CPU.

    python experiments/bench_cpu_bf16.py [THREADS ...] [--set KEY=VALUE ...] [--full-head]     # default threads: 2 1

Prints one JSON line per (threads, precision). A small world is written to a temporary folder; the rows are the
demo's (64 documents a step, world and text-only scenes); the model is random (speed does not depend on training).
bf16 is only used where the CPU multiplies it natively (AVX512-BF16 or AMX): elsewhere both lines measure fp32.
`--set` changes the demo's config (e.g. `--set llm.attn=sdpa --set pretrain.lm_block=256`, the rows before the
demo's); `--full-head` runs the LM head on every position (`model(**rows).loss`) instead of the answers' (`lm_loss`).
"""
import argparse, json, shutil, tempfile, time
import torch
from anymal.config import tiny, override
from anymal.demo import DEMO_RECIPES
from anymal.llm import random_llm
from anymal.pretrain import lm_batches, lm_documents, lm_loss
from anymal.tokenizer import load_tokenizer
from anymal.train import autocast_for, cpu_has_bf16
from anymal.world import world_main

ap = argparse.ArgumentParser(); ap.add_argument("threads", type=int, nargs="*", default=[2, 1])
ap.add_argument("--set", dest="sets", action="append", default=[]); ap.add_argument("--full-head", action="store_true")
args = ap.parse_args(); threads = args.threads
root = tempfile.mkdtemp()
cfg = override(tiny(), [*DEMO_RECIPES["tiny"][0], "data.world_images=400", "data.world_val_images=50", "pretrain.lm_scenes=2000",
                        f"data.root={root}", *args.sets])
assert world_main(["--out", root, "--set", "data.world_images=400", "--set", "data.world_val_images=50"]) == 0
tok = load_tokenizer(f"{root}/tokenizer")
draw = lm_batches(lm_documents(root, cfg, tok), cfg.pretrain, tok.pad_token_id, 0)
g = torch.Generator().manual_seed(0)
rows = [draw(g) for _ in range(25)]
for n in threads:
    torch.set_num_threads(n)
    for bf16 in (False, True):
        torch.manual_seed(0)
        m = random_llm(cfg.llm).train(); opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        for i, b in enumerate(rows):
            if i == 5: t0 = time.perf_counter()  # 5 warm-up steps
            with autocast_for(torch.device("cpu"), bf16): loss = m(**b).loss if args.full_head else lm_loss(m, b)
            opt.zero_grad(); loss.backward(); opt.step()
        real = sum(int((b["input_ids"] != tok.pad_token_id).sum()) for b in rows[5:]) // (len(rows) - 5)  # non-pad tokens
        print(json.dumps(dict(threads=n, bf16=bf16 and cpu_has_bf16(), s_per_step=round((time.perf_counter() - t0) / (len(rows) - 5), 4),
                              docs_per_step=cfg.pretrain.lm_batch, tokens_per_step=real,
                              attn=cfg.llm.attn, lm_block=cfg.pretrain.lm_block, head="all" if args.full_head else "answers")), flush=True)
shutil.rmtree(root)
