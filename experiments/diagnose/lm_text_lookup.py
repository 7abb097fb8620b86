"""Pretrain the tiny LLaMA on the world's chat documents; every K steps, teacher-forced answer accuracy per type on
test-scene text QA (description in context). Or score one already pretrained (a stand-in cache entry).

    python experiments/diagnose/lm_text_lookup.py WORLD_ROOT STEPS LR [config overrides]   # e.g. runs/demo/world 1500 1e-3
    python experiments/diagnose/lm_text_lookup.py WORLD_ROOT --score LLM_DIR                # e.g. ~/.cache/anymal/llm-...

Ported to today's library (anymal.standins, anymal.trainer, `standins.*`) for "Three seeds of the recipe"; the rows of
docs/tiny-recipe.md before that section ran the versions before it (experiments/README.md).
"""
import json, sys, time, torch
from anymal.config import tiny, override
from anymal.tokenizer import load_tokenizer
from anymal.standins import lm_documents, lm_batches, _schedule, reading_probe
from anymal.llm import random_llm
from anymal.trainer import autocast_for
torch.set_num_threads(1); torch.manual_seed(0)
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # a GPU when there is one
W, score = sys.argv[1], sys.argv[2] == "--score"
steps, lr = (0, 0.0) if score else (int(sys.argv[2]), float(sys.argv[3]))
cfg = override(tiny(), [f"data.root={W}"] + ([] if score else sys.argv[4:]))
tok = load_tokenizer(sys.argv[3] if score else f"{W}/tokenizer")  # a pretrained LLaMA's own tokenizer when scoring
if not score:  # the training documents, only to train
    docs = lm_documents(W, cfg, tok)
    draw = lm_batches(docs, cfg.standins, tok.pad_token_id, 0)
    print("docs", len(docs), "rows", cfg.standins.lm_rows, flush=True)
evaluate = reading_probe(W, cfg, tok, scenes=150)  # the library's probe (anymal.standins), on the first 150 test scenes
if score:
    from transformers import LlamaForCausalLM
    m = LlamaForCausalLM.from_pretrained(sys.argv[3]).to(dev)
    print(json.dumps({"llm": sys.argv[3], **evaluate(m)})); sys.exit(0)
m = random_llm(cfg.llm).to(dev).train()
opt = torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
sched, g = _schedule(opt, steps, cfg.standins.warmup), torch.Generator().manual_seed(0)
t0 = time.time(); every = max(steps // 6, 50)
for step in range(1, steps + 1):
    with autocast_for(dev, cfg.standins.lm_bf16): loss = m(**{k: v.to(dev) for k, v in draw(g).items()}).loss
    opt.zero_grad(set_to_none=True); loss.backward(); torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step(); sched.step()
    if step % every == 0 or step == steps:
        print(json.dumps({"step": step, "loss": round(loss.item(), 3), "s": round(time.time() - t0), **evaluate(m)}), flush=True)
