"""Ask a stage-2 checkpoint to describe test scenes of 1-4 objects; how many descriptions are exact, and how many
objects are named with the right size, colour, shape and quadrant, by number of objects in the scene.

    python experiments/diagnose/describe_scenes.py CHECKPOINT WORLD_ROOT [N]   # e.g. runs/demo/stage2/final runs/demo/world

Describing reads the image tokens in order, one object after another; answering a question has to find the one
object the question names. A model that describes well but answers badly can see and cannot look up.
"""
import json, sys, collections, torch
from anymal.demo import memo_assistant
torch.set_num_threads(1)
ck, W, n = sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 200
a = memo_assistant(ck)
sc = json.load(open(f"{W}/scenes/test.json"))["scenes"][:n]
outs = a.answer_batch([[f"{W}/images/{s['file_name']}"] for s in sc], ["Describe the image in detail."] * len(sc), max_new_tokens=48)
st = collections.defaultdict(collections.Counter)
for s, o in zip(sc, outs):
    k = len(s["objects"]); st[k]["scenes"] += 1; st[k]["exact"] += o.strip() == s["description"]
    for ob in s["objects"]:
        st[k]["objects"] += 1
        st[k]["object right"] += f"{ob['size']} {ob['color']} {ob['shape']} at the {ob['quadrant']}" in o
for k in sorted(st):
    c = st[k]
    print(json.dumps({"objects in scene": k, "scenes": c["scenes"], "exact %": round(100 * c["exact"] / c["scenes"], 1),
                      "objects right %": round(100 * c["object right"] / c["objects"], 1)}))
for s, o in list(zip(sc, outs))[:6]: print(f"truth: {s['description']}\nmodel: {o}")
