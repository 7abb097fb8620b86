"""Pretrain the tiny LLaMA stand-in as `anymal demo --seed N` would (its seed's world, `tiny()` plus overrides) and print
its reading curve (anymal.standins.reading_probe, 100 test scenes) as JSON lines, with the seconds it took.

    OMP_NUM_THREADS=1 python experiments/lm_seeds.py SEED [config overrides]   # e.g. 1 llm.heads=8
    MIN_OBJECTS=3 OMP_NUM_THREADS=1 python experiments/lm_seeds.py SEED ...      # text-only scenes of 3+ objects only
    QA_ONLY=1 OMP_NUM_THREADS=1 python experiments/lm_seeds.py SEED ...          # text-only scenes: question chats only

Used for "A reading that every seed learns" in docs/tiny-recipe.md. The world is the seed's cached one (`shared_world`).
"""
import json, sys, time, torch
from anymal.config import tiny, override
from anymal.demo import shared_world
from anymal.tokenizer import load_tokenizer
from anymal.standins import train_tiny_llama

seed, sets = int(sys.argv[1]), sys.argv[2:]
least = int(__import__("os").environ.get("MIN_OBJECTS", "0"))
if least:  # the text-only scenes (anymal.standins.text_scenes) drawn again until they hold `least` objects or more
    import anymal.standins as S
    draw = S.sample_scene
    def fuller(rng, *a, **k):
        while len((s := draw(rng, *a, **k))["objects"]) < least: pass
        return s
    S.sample_scene = fuller
    sets = [*sets, f"(min objects {least})"]
if __import__("os").environ.get("QA_ONLY"):  # text-only scenes give only their question chats (no caption, no describe)
    import anymal.standins as S
    chats = S.scene_chats
    def qa_only(scene, *a, **k):
        out = chats(scene, *a, **k)
        return out[2:] if str(scene["image_id"]).startswith("text") else out
    S.scene_chats = qa_only
    sets = [*sets, "(text-only scenes: questions only)"]
torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))
cfg = shared_world(override(tiny(), [f"train.seed={seed}", f"data.world_seed={seed}", *[x for x in sets if "=" in x]]))
tok = load_tokenizer(f"{cfg.data.root}/tokenizer")
t0 = time.time()
def log(rec):
    if "reading" in rec: print(json.dumps(dict(seed=seed, sets=sets, s=round(time.time() - t0), **rec)), flush=True)
train_tiny_llama(cfg, cfg.data.root, tok, progress=False, log=log)
