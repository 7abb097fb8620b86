"""Linear probe for each quadrant's shape on a trained checkpoint's bridge outputs (and on its encoder's tokens).

    python experiments/diagnose/probe_trained_bridge.py CHECKPOINT WORLD_ROOT
"""
import json, sys, time
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
from PIL import Image
from anymal.checkpoint import load_for_inference
from anymal.world import SHAPES, COLORS, QUADRANTS
torch.set_num_threads(1); torch.manual_seed(0)
ck, W = sys.argv[1], sys.argv[2]
inf = load_for_inference(ck, device="cpu"); model = inf.model if hasattr(inf, "model") else inf[0]
model.eval()
def load(split, n):
    sc = json.load(open(f"{W}/scenes/{split}.json"))["scenes"][:n]
    px = [Image.open(f"{W}/images/{s['file_name']}").convert("RGB") for s in sc]
    ysh = torch.zeros(len(sc), 4, dtype=torch.long)
    for i, s in enumerate(sc):
        for o in s["objects"]: ysh[i, QUADRANTS.index(o["quadrant"])] = 1 + SHAPES.index(o["shape"])
    return px, ysh
tr, va = load("train", 4000), load("val", 500)
pre = model.encoder.preprocess
@torch.no_grad()
def feats(px):
    out_e, out_b = [], []
    for i in range(0, len(px), 250):
        x = torch.stack([pre(p) for p in px[i:i+250]])
        e = model.encoder(x); out_e.append(e); out_b.append(model.bridge(e))
    return torch.cat(out_e), torch.cat(out_b)
(etr, btr), (eva, bva) = feats(tr[0]), feats(va[0])
print("shapes", etr.shape, btr.shape, flush=True)
for name, ftr, fva in (("bridge", btr, bva), ("encoder", etr, eva)):
    ftr, fva = F.layer_norm(ftr, ftr.shape[-1:]).flatten(1), F.layer_norm(fva, fva.shape[-1:]).flatten(1)
    m = nn.Linear(ftr.shape[1], 4 * 5); opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=1e-2)
    for step in range(1, 1501):
        i = torch.randint(len(ftr), (128,)); loss = F.cross_entropy(m(ftr[i]).view(-1, 5), tr[1][i].flatten())
        opt.zero_grad(); loss.backward(); opt.step()
        if step % 500 == 0:
            with torch.no_grad(): a = m(fva).view(-1, 4, 5)
            pres = va[1] > 0
            print(json.dumps({"feat": name, "step": step, "loss": round(loss.item(), 3),
                              "shape": round((a.argmax(-1) == va[1])[pres].float().mean().item() * 100, 1)}), flush=True)
