"""Score a pretrained tiny LLaMA (a stand-in cache entry) on text-only lookup: each of the first 150 test scenes'
questions with the scene's description in context, teacher-forced, answer exactly right, per question type.

    python experiments/diagnose/lm_text_score.py WORLD_ROOT LLM_DIR    # e.g. runs/demo/world ~/.cache/anymal/llm-...

The same scoring as lm_text_lookup.py's --score, against today's library (anymal.standins, anymal.tokenizer).
"""
import json, sys, collections, torch
from anymal.config import tiny
from anymal.tokenizer import load_tokenizer, encode_chat
from anymal.standins import _chat
from transformers import LlamaForCausalLM
W, L = sys.argv[1], sys.argv[2]
cfg = tiny(); tok = load_tokenizer(L); VP = cfg.data.vqa_prompt
sc = json.load(open(f"{W}/scenes/test.json"))["scenes"][:150]
ev = []
for s in sc:
    for q in s["qa"]:
        e = encode_chat(tok, _chat(s["description"], [(f"{q['question']}\n{VP}", q["answer"])]), 1)
        ev.append((e["input_ids"], e["labels"], q["type"]))
T = max(len(e[0]) for e in ev)
EI = torch.tensor([e[0] + [0] * (T - len(e[0])) for e in ev]); EL = torch.tensor([e[1] + [-100] * (T - len(e[1])) for e in ev])
m = LlamaForCausalLM.from_pretrained(L).eval(); ok = []
with torch.no_grad():
    for i in range(0, len(EI), 250):
        lg = m(input_ids=EI[i:i+250]).logits[:, :-1].argmax(-1); lb = EL[i:i+250, 1:]
        ok += (((lg == lb) | (lb == -100)).all(1)).tolist()
c = collections.defaultdict(list)
for (_, _, t), o in zip(ev, ok): c[t].append(o)
print(json.dumps({"llm": L, **{t: round(100 * sum(v) / len(v), 1) for t, v in c.items()}, "all": round(100 * sum(ok) / len(ok), 1)}))
