"""How the video bridge learns motion: train on the sound-and-motion world's video records only and print the motion
accuracy (official VQA metric, test questions) every few hundred steps, as JSON lines.

    python experiments/av_motion.py DEMO_OUT STEPS [init] [key=value ...]
    QA_ONLY=1 python experiments/av_motion.py ...   # train on the motion questions only

DEMO_OUT is a finished `anymal demo --modalities image,audio,video` folder (its results_av.json names the config and
runs). init: "av2" (the demo's stage 2, default), "image" (the image stage 2 with a fresh video bridge) or
"image+copy" (the same, the video bridge's resampler copied from the image bridge). Used for "Motion" in
docs/tiny-recipe.md.
"""
import json, sys, time
from pathlib import Path
import torch
from anymal.cache import cache_root
from anymal.config import from_dict, override
from anymal.demo_av import (AV, MediaCollator, MediaDataset, answer_questions, av_records, load_parts, media_tables,
                            prepare_media, audio_tower, add_placeholders, av_stage_config)
from anymal.model import AnyMAL
from anymal.tokenizer import load_tokenizer
from anymal.vision import ImageEncoder
from anymal.world_av import av_paths
from anymal.trainer import fit, seed_all
from anymal.metrics import vqa_accuracy

out, steps, init, sets = Path(sys.argv[1]), int(sys.argv[2]), (sys.argv[3:4] or ["av2"])[0], sys.argv[4:]
res = json.loads((out / "results_av.json").read_text())
cfg = override(from_dict(res["config"]), sets)
root = Path(cfg.data.root)
tok = add_placeholders(load_tokenizer(root / "tokenizer"), AV, cfg.llm.vocab_size)
recs = {s: [r for r in av_records(root, s, ["image", "video"]) if "video" in r] for s in ("train", "val")}
if __import__("os").environ.get("QA_ONLY"):  # the motion questions only, without the describe-the-motion chats
    recs = {s: [r for r in v if "Describe" not in r["conversations"][0]["value"]] for s, v in recs.items()}
    sets = [*sets, "(questions only)"]
ds = {s: MediaDataset(recs[s], root, tok, cfg, s) for s in recs}
qs = [q for q in json.loads((root / av_paths("test")["questions"]).read_text())["questions"]
      if q["modalities"] == ["video"]][:500]
keys = {"image": [], "audio": [], "video": sorted({k for d in ds.values() for k in d.keys()["video"]}
                                                  | {av_paths("test")["video"].format(image_id=q["image_id"]) for q in qs})}
t0 = time.time()
tables = media_tables(keys, root, cfg, ImageEncoder(cfg.vision), None)
print(json.dumps(dict(features_s=round(time.time() - t0))), flush=True)
runs = cache_root() / "runs"
seed_all(cfg.train.seed)
model = AnyMAL.build(cfg, tok, 2, encoder=False)
if init == "av2": load_parts(model, runs / res["runs"]["av_stage2"], ("bridge.", "audio_bridge.", "video_bridge.", "llm."))
else:
    load_parts(model, runs / res["runs"]["image_stage2"], ("bridge.", "llm."))
    if init == "image+copy":
        src, dst = dict(model.bridge.named_parameters()), dict(model.video_bridge.named_parameters())
        with torch.no_grad():
            for n, p in src.items():
                q = dst["body.resampler." + n[5:]] if n.startswith("body.") else dst[n]
                q.copy_(p[:len(q)] if n == "body.latents" else p)
model.bridge.requires_grad_(False)
if cfg.audio.enabled: model.audio_bridge.requires_grad_(False)
afile = root / av_paths("test")["annotations"]

n_objects = {r["image_id"]: len(r["objects"])
             for r in json.loads((root / av_paths("test")["scenes"]).read_text())["scenes"]}

def score(tag):
    model.eval()
    r = vqa_accuracy(answer_questions(model, tok, cfg, qs, "test", tables), None, afile)
    sh = vqa_accuracy(answer_questions(model, tok, cfg, qs, "test", tables, "shuffled"), None, afile)
    by = {}
    for q in qs: by.setdefault(n_objects[q["image_id"]], []).append(r["evalQA"][q["question_id"]])
    print(json.dumps(dict(at=tag, init=init, sets=sets, motion=r["overall"], shuffled=sh["overall"],
                          by_objects={k: round(sum(v) / len(v), 1) for k, v in sorted(by.items())},
                          s=round(time.time() - t0))), flush=True)

score(0)
c = override(av_stage_config(cfg, 2, f"/tmp/av_motion/{init}-{'-'.join(sets)}"), [f"train.steps={steps}",
                                                                                  "train.save_every=100000"])
fit(c, model, ds["train"], ds["val"], MediaCollator(tok.pad_token_id), prepare=lambda b, d: prepare_media(b, d, tables),
    progress=False, on_step=lambda step, m: score(step) if step % max(steps // 3, 1) == 0 else None)
