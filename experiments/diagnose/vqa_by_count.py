"""Official-answer exact match of a demo's test predictions, per question type and number of objects in the scene;
then the count questions' answer -> prediction table, counting all shapes vs counting a colour or shape.

    python experiments/diagnose/vqa_by_count.py RUN_DIR        # RUN_DIR: an `anymal demo --out` folder (eval/ and world/)

A colour question about a one-object scene needs no lookup; if the model gets those right but not shape questions
about one-object scenes, it cannot see shapes (docs/tiny-recipe.md).
"""
import json, sys, collections
run = sys.argv[1]
res = {r["question_id"]: r["answer"] for r in json.load(open(f"{run}/eval/vqa_test_none.json"))}
ann = json.load(open(f"{run}/world/vqa/v2_shapes_test_annotations.json"))["annotations"]
scenes = {s["image_id"]: s for s in json.load(open(f"{run}/world/scenes/test.json"))["scenes"]}
st = collections.defaultdict(lambda: [0, 0])
for a in ann:
    if a["question_id"] not in res: continue
    k = (a["question_type"], len(scenes[a["image_id"]]["objects"]))
    st[k][0] += res[a["question_id"]] == a["multiple_choice_answer"]; st[k][1] += 1
for t in ("color", "shape", "count", "position", "exists"):
    print(json.dumps({"type": t, **{f"{n} objects": round(100 * st[(t, n)][0] / st[(t, n)][1], 1) for n in (1, 2, 3, 4) if st[(t, n)][1]}}))
# Count questions split by what they count: all shapes ("How many shapes are there?") need no lookup; a colour or a
# shape ("How many green shapes", "How many circles") needs one. The (answer -> prediction) table shows whether the
# model counts at all: a model that cannot look objects up answers the same number whatever the truth.
qs = {q["question_id"]: q["question"] for q in json.load(open(f"{run}/world/vqa/v2_OpenEnded_shapes_test_questions.json"))["questions"]}
conf = {k: collections.Counter() for k in ("all shapes", "by attribute")}
for a in ann:
    if a["question_id"] in res and a["question_type"] == "count":
        k = "all shapes" if qs[a["question_id"]] == "How many shapes are there?" else "by attribute"
        conf[k][f"{a['multiple_choice_answer']}->{res[a['question_id']]}"] += 1
for k, c in conf.items():
    n = sum(c.values()); ok = sum(v for t, v in c.items() if t.split("->")[0] == t.split("->")[1])
    print(json.dumps({"count questions": k, "n": n, "right": round(100 * ok / max(n, 1), 1), "answer->prediction": dict(sorted(c.items()))}))
