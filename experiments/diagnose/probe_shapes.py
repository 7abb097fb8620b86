"""Probe: can a small cross-attention reader recover each quadrant's shape and colour from frozen CLIP tokens?

    python experiments/diagnose/probe_shapes.py WORLD_ROOT [config overrides ...] [x.enc=pixels]

WORLD_ROOT is a shapes world (e.g. runs/demo/world). Overrides are `--set`-style `key=value` for the tiny preset
(e.g. vision.layers=4, vision.pretrained=PATH/clip.safetensors); `x.enc=pixels` probes raw 8x8 pixel patches
instead of CLIP tokens. Prints JSON lines: step, loss, and validation accuracy on present objects
(see docs/tiny-recipe.md).
"""
import json, sys, time, math, dataclasses
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
from PIL import Image
from anymal.config import tiny, override
from anymal.vision import ImageEncoder
from anymal.world import SHAPES, COLORS, QUADRANTS
from anymal.resampler import add_pos2d
torch.set_num_threads(1); torch.manual_seed(0)
W = sys.argv[1]
sets = sys.argv[2:]
cfg = override(tiny(), [s for s in sets if not s.startswith("x.")])
opts = dict(s[2:].split("=") for s in sets if s.startswith("x."))
def load(split, n):
    sc = json.load(open(f"{W}/scenes/{split}.json"))["scenes"][:n]
    px = torch.stack([torch.from_numpy(np.array(Image.open(f"{W}/images/{s['file_name']}").convert("RGB"))).permute(2,0,1).float()/255 for s in sc])
    ysh = torch.zeros(len(sc), 4, dtype=torch.long); ycol = torch.zeros(len(sc), 4, dtype=torch.long)
    for i, s in enumerate(sc):
        for o in s["objects"]:
            q = QUADRANTS.index(o["quadrant"]); ysh[i, q] = 1 + SHAPES.index(o["shape"]); ycol[i, q] = 1 + list(COLORS).index(o["color"])
    return px, ysh, ycol
t0 = time.time()
tr, va = load("train", 4000), load("val", 500)
if opts.get("enc", "clip") == "pixels":
    p = cfg.vision.patch_size
    def enc(x):
        u = F.unfold(x, p, stride=p).transpose(1, 2)  # (N, P, 3p^2)
        return torch.cat([u.mean(1, keepdim=True), u], 1)
else:
    e = ImageEncoder(cfg.vision)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1,3,1,1); std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1,3,1,1)
    def enc(x): return torch.cat([e((x[i:i+500]-mean)/std) for i in range(0, len(x), 500)])
ftr, fva = enc(tr[0]), enc(va[0])
print(json.dumps({"features": list(ftr.shape), "seconds": round(time.time() - t0, 1)}), flush=True)
D = ftr.shape[-1]
class Reader(nn.Module):
    def __init__(s, D, d=128):
        super().__init__(); s.inp = nn.Linear(D, d); s.q = nn.Parameter(torch.randn(4, d)); s.att = nn.MultiheadAttention(d, 4, batch_first=True)
        s.mlp = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2*d), nn.GELU(), nn.Linear(2*d, d)); s.sh = nn.Linear(d, 5); s.col = nn.Linear(d, 7)
    def forward(s, f):
        f = add_pos2d(F.layer_norm(f, f.shape[-1:]), 1.0) if opts.get("pos", "1") == "1" else f
        x = s.inp(f); h, _ = s.att(s.q.expand(len(x), -1, -1), x, x); h = h + s.mlp(h); return s.sh(h), s.col(h)
m = Reader(D); opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
for step in range(1, 1201):
    i = torch.randint(len(ftr), (128,)); a, b = m(ftr[i]); loss = F.cross_entropy(a.flatten(0,1), tr[1][i].flatten()) + F.cross_entropy(b.flatten(0,1), tr[2][i].flatten())
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 300 == 0:
        with torch.no_grad(): a, b = m(fva)
        pres = va[1] > 0
        print(json.dumps({"step": step, "loss": round(loss.item(), 3), "shape": round((a.argmax(-1) == va[1])[pres].float().mean().item() * 100, 1),
                          "colour": round((b.argmax(-1) == va[2])[pres].float().mean().item() * 100, 1),
                          "empty": round(((a.argmax(-1) == 0) == (~pres)).float().mean().item() * 100, 1), "seconds": round(time.time() - t0)}), flush=True)
