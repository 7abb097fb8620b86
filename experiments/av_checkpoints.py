"""Motion accuracy (official VQA metric, every test motion question, no control) of stage-2 checkpoints of the sound-and-
motion demo, one JSON line each: how motion grows with stage-2 steps.

    python experiments/av_checkpoints.py DEMO_OUT CHECKPOINT [CHECKPOINT ...]

DEMO_OUT is a finished `anymal demo --modalities image,audio,video` folder (its results_av.json names the config);
a CHECKPOINT is a run's `checkpoints/step-NNNNNNNN` folder (the av stage-2 run is `results_av.json`'s
runs.av_stage2, under the cache's runs/). Used for "Sound and motion" in docs/tiny-recipe.md.
"""
import json, sys
from pathlib import Path
from anymal.config import from_dict
from anymal.demo_av import AV, add_placeholders, answer_questions, load_parts, media_tables
from anymal.metrics import vqa_accuracy
from anymal.model import AnyMAL
from anymal.tokenizer import load_tokenizer
from anymal.vision import ImageEncoder
from anymal.world_av import av_paths

out = Path(sys.argv[1])
cfg = from_dict(json.loads((out / "results_av.json").read_text())["config"])
root = Path(cfg.data.root)
tok = add_placeholders(load_tokenizer(root / "tokenizer"), AV, cfg.llm.vocab_size)
qs = [q for q in json.loads((root / av_paths("test")["questions"]).read_text())["questions"]
      if q["modalities"] == ["video"]]
keys = {"image": [], "audio": [],
        "video": sorted({av_paths("test")["video"].format(image_id=q["image_id"]) for q in qs})}
tables = media_tables(keys, root, cfg, ImageEncoder(cfg.vision), None)
for ck in sys.argv[2:]:
    model = AnyMAL.build(cfg, tok, 2, encoder=False)
    load_parts(model, ck, ("bridge.", "audio_bridge.", "video_bridge.", "llm."))
    r = vqa_accuracy(answer_questions(model.eval(), tok, cfg, qs, "test", tables), None,
                     root / av_paths("test")["annotations"])
    print(json.dumps(dict(checkpoint=str(ck), motion=r["overall"], n_questions=len(qs))), flush=True)
