"""One demo run of tools/gpu_sweep.sh: the tiny LLaMA's pretraining on the GPU (patched in here, not in the library),
stages on the GPU (the trainer picks CUDA), evaluation on the CPU. Usage: python tools/gpu_sweep_run.py OUT [anymal demo args]"""
import sys, time, json, torch
import anymal.pretrain as P
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")

def pretrain_llm(cfg, world_root, tok, progress=True, log=None):
    p = cfg.pretrain
    P.seed_all(cfg.train.seed)
    draw = P.lm_batches(P.lm_documents(world_root, cfg, tok), p, tok.pad_token_id, cfg.train.seed)
    model = P.random_llm(cfg.llm).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=p.lm_lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched, g = P._schedule(opt, p.lm_steps, p.warmup), torch.Generator().manual_seed(cfg.train.seed)
    t0 = time.time()
    for step in range(p.lm_steps):
        loss = model(**{k: v.to(dev) for k, v in draw(g).items()}).loss
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); sched.step()
        if log and (step + 1) % 10 == 0: log(dict(step=step + 1, loss=loss.item(), lr=sched.get_last_lr()[0]))
    print(f"[sweep] LLaMA pretraining {p.lm_steps} steps on {dev} in {time.time() - t0:.1f} s", flush=True)
    return model.cpu().eval()

P.pretrain_llm = pretrain_llm
from anymal.demo import demo_main
out = sys.argv[1]
t0 = time.time()
rc = demo_main(["--out", out, "--no-progress", *sys.argv[2:]])
print(f"[sweep] demo finished rc={rc} in {time.time() - t0:.1f} s", flush=True)
