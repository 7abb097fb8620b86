"""Train the tiny preset's bridge (+ a linear head) DIRECTLY on each quadrant's shape from frozen CLIP tokens:
how fast can the bridge learn to carry shape when nothing stands between it and the label? 900 steps of batch 32.

    python experiments/diagnose/probe_bridge_direct.py WORLD_ROOT [config overrides, e.g. vision.patch_size=4]
"""
import json, sys, time, torch, torch.nn as nn, torch.nn.functional as F, numpy as np
from PIL import Image
from anymal.config import tiny, override
from anymal.vision import ImageEncoder
from anymal.resampler import build_bridge
from anymal.world import SHAPES, QUADRANTS
torch.set_num_threads(1); torch.manual_seed(0)
W = sys.argv[1]; cfg = override(tiny(), sys.argv[2:])
enc = ImageEncoder(cfg.vision).eval()
def load(split, n):
    sc = json.load(open(f"{W}/scenes/{split}.json"))["scenes"][:n]
    x = torch.stack([enc.preprocess(Image.open(f"{W}/images/{s['file_name']}").convert("RGB")) for s in sc])
    y = torch.zeros(len(sc), 4, dtype=torch.long)
    for i, s in enumerate(sc):
        for o in s["objects"]: y[i, QUADRANTS.index(o["quadrant"])] = 1 + SHAPES.index(o["shape"])
    with torch.no_grad(): f = torch.cat([enc(x[i:i+500]) for i in range(0, len(x), 500)])
    return f, y
(ftr, ytr), (fva, yva) = load("train", 4000), load("val", 500)
br = build_bridge(cfg); head = nn.Linear(cfg.resampler.latents * cfg.llm.hidden, 20)
opt = torch.optim.AdamW(list(br.parameters()) + list(head.parameters()), lr=2e-3)
t0 = time.time()
for step in range(1, 901):
    i = torch.randint(len(ftr), (32,)); out = head(br(ftr[i]).flatten(1)).view(-1, 5)
    loss = F.cross_entropy(out, ytr[i].flatten()); opt.zero_grad(); loss.backward(); opt.step()
    if step % 150 == 0:
        with torch.no_grad(): a = head(br(fva).flatten(1)).view(-1, 4, 5).argmax(-1)
        pres = yva > 0
        print(json.dumps({"step": step, "loss": round(loss.item(), 3), "shape": round((a == yva)[pres].float().mean().item() * 100, 1), "s": round(time.time() - t0)}), flush=True)
