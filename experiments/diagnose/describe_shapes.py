"""Ask a stage-2 checkpoint to describe the one-object test scenes; how often it names their colour and shape.

    python experiments/diagnose/describe_shapes.py CHECKPOINT WORLD_ROOT     # e.g. runs/demo/stage2/final runs/demo/world
"""
import json, sys, collections, re
from anymal.demo import memo_assistant
from anymal.world import SHAPES, COLORS
ck, W = sys.argv[1], sys.argv[2]
a = memo_assistant(ck)
sc = [s for s in json.load(open(f"{W}/scenes/test.json"))["scenes"]]
one = [s for s in sc if len(s["objects"]) == 1][:150]
outs = a.answer_batch([[f"{W}/images/{s['file_name']}"] for s in one], ["Describe the image in detail."] * len(one))
st = collections.Counter()
for s, o in zip(one, outs):
    ob = s["objects"][0]
    words = re.findall(r"[a-z]+", o.lower())
    sh = [w for w in words if w in SHAPES]; co = [w for w in words if w in COLORS]
    st["n"] += 1; st["shape_ok"] += bool(sh) and sh[0] == ob["shape"]; st["color_ok"] += bool(co) and co[0] == ob["color"]
print(dict(st)); print(outs[:5]); print([s["description"] for s in one[:5]])
