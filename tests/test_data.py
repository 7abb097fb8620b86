"""The shapes world, the tiny tokenizer's chat format and the data loaders, end to end.

world (CLI) -> files on disk -> loaders -> batches, for both stages; masking token by token against the real
LLaMA-3-8B-Instruct chat template (tests/fixtures/llama3_instruct_chat.json); every bad-input case.
"""
import io, json, re, tarfile, time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest, torch
from PIL import Image
from torch.utils.data import DataLoader

from anymal.config import override, tiny
from anymal.data import (CaptionDataset, Collator, InstructDataset, PromptDataset, SkipTally, TooManySkipped,
                         build_dataset, build_loader, caption_prompts, collate, decode_image, load_image, vqa_prompts)
from anymal.vision import clip_preprocess
from anymal.tokenizer import (EOT, IMAGE_MARKER, IMAGE_TOKEN, PAD_TOKEN, BadRecord, LLAMA3_CHAT_TEMPLATE, encode_chat,
                              load_tokenizer, train_tokenizer)
from anymal.world import (COLORS, QUADRANTS, SHAPES, SIZES, generate_world, heldout_combos, iter_world_text,
                          world_main)

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "llama3_instruct_chat.json").read_text())
SPLITS = ("train", "val", "test", "heldout")
L = tiny().resampler.latents


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    "The full tiny world, written by the CLI entry point (with its tokenizer); returns (root, seconds)."
    root = tmp_path_factory.mktemp("w") / "world"
    t0 = time.time()
    assert world_main(["--out", str(root), "--preset", "tiny"]) == 0
    return root, time.time() - t0

@pytest.fixture(scope="module")
def root(world): return world[0]

@pytest.fixture(scope="module")
def tok(root): return load_tokenizer(root / "tokenizer")

@pytest.fixture(scope="module")
def cfg(root): return override(tiny(), data__root=str(root))

def _load(p): return json.loads(Path(p).read_text())

def _scenes(root, split): return {s["image_id"]: s for s in _load(root / f"scenes/{split}.json")["scenes"]}


# ---------------------------------------------------------------- the world
def test_world_is_fast_and_complete(world):
    root, secs = world
    print(f"tiny world + tokenizer in {secs:.1f} s")
    assert secs < 90, f"generating the tiny world took {secs:.0f} s"  # seconds, not minutes (CI has 2 shared cores)
    info = _load(root / "world.json")
    assert {s: info["splits"][s]["images"] for s in SPLITS} == dict(train=4000, val=500, test=500, heldout=500)
    for s in SPLITS:
        assert len(list((root / "images" / s).glob("*.png"))) == info["splits"][s]["images"]
        for rel in (f"scenes/{s}.json", f"llava/llava_instruct_{s}.json", f"vqa/v2_OpenEnded_shapes_{s}_questions.json",
                    f"vqa/v2_shapes_{s}_annotations.json", f"coco/captions_{s}.json", f"text/lm_{s}.txt"):
            assert (root / rel).stat().st_size > 0, rel
    assert len(list((root / "captions").glob("train-*.tar"))) == 4


def test_world_is_deterministic(tmp_path):
    cfg = override(tiny(), data__world_images=40, data__world_val_images=8)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_world(a, cfg); generate_world(b, cfg); generate_world(c, override(cfg, data__world_seed=1))
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != "world.json")
    assert len(files) > 90  # 64 images + 8 files per split
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)  # byte-identical, shards included
    assert (a / "scenes/train.json").read_bytes() != (c / "scenes/train.json").read_bytes()


def _oracle(q: str, objs: list) -> str:
    "Answer a world question from the ground-truth objects alone (independently of how questions are made)."
    def find(size, color, shape):
        return [o for o in objs if (not size or o["size"] == size) and (not color or o["color"] == color)
                and (not shape or o["shape"] == shape)]
    sz, co, sh = f"({'|'.join(SIZES)})", f"({'|'.join(COLORS)})", f"({'|'.join(SHAPES)})"
    if m := re.fullmatch(f"What color is the (?:{sz} )?{sh}\\?", q):
        (o,) = find(m[1], None, m[2]); return o["color"]  # exactly one: the question is unambiguous
    if m := re.fullmatch(f"What shape is the (?:{sz} )?{co} object\\?", q):
        (o,) = find(m[1], m[2], None); return o["shape"]
    if m := re.fullmatch(f"Where is the (?:{sz} )?{co} {sh}\\?", q):
        (o,) = find(m[1], m[2], m[3]); return o["quadrant"]
    if q == "How many shapes are there?": return str(len(objs))
    if m := re.fullmatch(f"How many {sh}s are there\\?", q): return str(len(find(None, None, m[1])))
    if m := re.fullmatch(f"How many {co} shapes are there\\?", q): return str(len(find(None, m[1], None)))
    if m := re.fullmatch(f"Is there an? (?:{sz} )?{co} {sh}\\?", q): return "yes" if find(m[1], m[2], m[3]) else "no"
    raise AssertionError(f"unexpected question form: {q!r}")


@pytest.mark.parametrize("split", SPLITS)
def test_answers_match_ground_truth(root, split):
    scenes = _scenes(root, split)
    qs = {q["question_id"]: q for q in _load(root / f"vqa/v2_OpenEnded_shapes_{split}_questions.json")["questions"]}
    anns = _load(root / f"vqa/v2_shapes_{split}_annotations.json")["annotations"]
    assert len(qs) == len(anns) > 0
    for a in anns[:6000]:
        q = qs[a["question_id"]]
        assert q["image_id"] == a["image_id"]
        assert _oracle(q["question"], scenes[q["image_id"]]["objects"]) == a["multiple_choice_answer"], q


def test_pixels_match_ground_truth(root):
    for s in list(_scenes(root, "val").values())[:200]:
        im = Image.open(root / "images" / s["file_name"]).convert("RGB")
        assert im.size == (64, 64)
        g = s["background"]
        assert all(abs(v - g) <= 1 for v in im.getpixel((0, 0)))  # corners are never covered
        for o in s["objects"]:
            px = im.getpixel(tuple(int(round(v)) for v in o["center"]))
            assert max(abs(a - b) for a, b in zip(px, COLORS[o["color"]])) <= 14, (o, px)
            x, y, w, h = o["bbox"]
            qx, qy = QUADRANTS.index(o["quadrant"]) % 2, QUADRANTS.index(o["quadrant"]) // 2
            assert qx * 32 <= x and x + w <= qx * 32 + 32 and qy * 32 <= y and y + h <= qy * 32 + 32  # inside its quadrant


def test_official_formats(root):
    qf, af = _load(root / "vqa/v2_OpenEnded_shapes_val_questions.json"), _load(root / "vqa/v2_shapes_val_annotations.json")
    for f in (qf, af): assert {"info", "license", "data_type", "data_subtype"} <= set(f)
    assert set(qf["questions"][0]) == {"image_id", "question", "question_id"}
    a = af["annotations"][0]
    assert set(a) == {"question_id", "image_id", "question_type", "answer_type", "multiple_choice_answer", "answers"}
    for a in af["annotations"]:
        assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
        assert set(a["answers"][0]) == {"answer", "answer_confidence", "answer_id"}
        assert Counter(x["answer"] for x in a["answers"]).most_common(1)[0][0] == a["multiple_choice_answer"]
    assert len({q["question_id"] for q in qf["questions"]}) == len(qf["questions"])
    coco = _load(root / "coco/captions_val.json")
    assert set(coco["images"][0]) == {"id", "file_name", "height", "width"}
    assert set(coco["annotations"][0]) == {"id", "image_id", "caption"}
    assert Counter(c["image_id"] for c in coco["annotations"]).most_common()[-1][1] >= 5  # several captions per image
    llava = _load(root / "llava/llava_instruct_val.json")
    for r in llava:
        assert set(r) == {"id", "image", "conversations"} and (root / "images" / r["image"]).is_file()
        c = r["conversations"]
        assert [t["from"] for t in c] == ["human", "gpt"] * (len(c) // 2)
        assert c[0]["value"].startswith("<image>\n") and all("<image>" not in t["value"] for t in c[1:])
    assert max(len(r["conversations"]) for r in llava) >= 6  # multi-turn


def test_caption_shards_are_img2dataset_style(root):
    scenes = _scenes(root, "train")
    with tarfile.open(root / "captions/train-00001.tar") as tar:
        names = tar.getnames()
        keys = sorted({n.split(".")[0] for n in names})
        assert len(names) == 3 * len(keys) == 3000 and keys[0] == "000010000"
        for k in keys[:50]:
            meta = json.loads(tar.extractfile(f"{k}.json").read())
            cap = tar.extractfile(f"{k}.txt").read().decode()
            assert meta["key"] == k and meta["status"] == "success" and meta["caption"] == cap
            assert cap in scenes[meta["image_id"]]["captions"]
            assert tar.extractfile(f"{k}.png").read() == (root / "images" / meta["url"]).read_bytes()
    stats = _load(root / "captions/train-00001_stats.json")
    assert stats["count"] == stats["successes"] == 1000


def test_heldout_combinations(root):
    held = {tuple(c) for c in _load(root / "world.json")["heldout_combos"]}
    assert len(held) == 4 and {s for _, s in held} == set(SHAPES)
    for split in ("train", "val", "test"):
        assert not any((o["color"], o["shape"]) in held for s in _scenes(root, split).values() for o in s["objects"])
    assert all(any((o["color"], o["shape"]) in held for o in s["objects"]) for s in _scenes(root, "heldout").values())
    text = (root / "text/lm_train.txt").read_text() + (root / "llava/llava_instruct_train.json").read_text()
    assert not any(re.search(f"\\b{c} {s}", text) for c, s in held)  # not even in training text


def test_question_mix_is_balanced(root):
    anns = _load(root / "vqa/v2_shapes_train_annotations.json")["annotations"]
    qs = {q["question_id"]: q for q in _load(root / "vqa/v2_OpenEnded_shapes_train_questions.json")["questions"]}
    types = Counter(a["question_type"] for a in anns)
    assert set(types) == {"color", "shape", "count", "position", "exists"}
    assert min(types.values()) > 0.9 * max(types.values()), types
    answers = {t: {a["multiple_choice_answer"] for a in anns if a["question_type"] == t} for t in types}
    assert answers == dict(color=set(COLORS), shape=set(SHAPES), count={"0", "1", "2", "3", "4"},
                           position=set(QUADRANTS), exists={"yes", "no"})
    yn = Counter(a["multiple_choice_answer"] for a in anns if a["question_type"] == "exists")
    assert abs(yn["yes"] - yn["no"]) < 0.05 * (yn["yes"] + yn["no"]), yn
    scenes, hard, no = _scenes(root, "train"), 0, 0
    for a in anns:
        if a["multiple_choice_answer"] != "no": continue
        *_, c, s = qs[a["question_id"]]["question"].rstrip("?").split()
        objs = scenes[a["image_id"]]["objects"]
        no += 1; hard += any(o["color"] == c or o["shape"] == s for o in objs)
    assert hard > 0.5 * no  # hard distractors: the colour or the shape is there, not the combination


def test_world_text_and_lm_corpus(root):
    texts = list(iter_world_text(root))
    assert "Describe the image briefly." in texts and "upper left" in texts
    lines = (root / "text/lm_train.txt").read_text().splitlines()
    s = _scenes(root, "train")[100000]
    assert lines[0].startswith(s["description"] + " ")
    assert f"{s['description']} {s['qa'][0]['question']} {s['qa'][0]['answer']}" in lines


# ---------------------------------------------------------------- tokenizer and chat format
def test_tokenizer_is_llama3_shaped(root, tok, tmp_path):
    assert len(tok) <= tiny().llm.vocab_size
    assert tok.chat_template == LLAMA3_CHAT_TEMPLATE == FIXTURE["chat_template"]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (FIXTURE["bos_token"], FIXTURE["eos_token"], PAD_TOKEN)
    for t in FIXTURE["special_token_ids"]:
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t
    assert IMAGE_TOKEN == "<|reserved_special_token_0|>" and IMAGE_MARKER == "<image>"
    assert tok("red")["input_ids"][0] == tok.bos_token_id  # like LLaMA-3, plain encoding starts with BOS
    ex = FIXTURE["example"]
    assert tok.apply_chat_template(ex["messages"], tokenize=False) == ex["rendered"]
    assert tok.apply_chat_template(ex["messages"][:2], tokenize=False, add_generation_prompt=True).endswith(ex["generation_suffix"])
    tok.save_pretrained(tmp_path / "again")
    again = load_tokenizer(tmp_path / "again")
    assert again("What color is the circle?")["input_ids"] == tok("What color is the circle?")["input_ids"]


def test_load_tokenizer_refuses_incomplete(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer '.*nothing' not found"): load_tokenizer(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no tokenizer_config.json"): load_tokenizer(tmp_path / "empty")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    t = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")); t.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", chat_template=LLAMA3_CHAT_TEMPLATE).save_pretrained(tmp_path / "t")
    with pytest.raises(ValueError, match="lacks"): load_tokenizer(tmp_path / "t")


def _reference_labels(tok, ids):
    "Labels by a different route: after each `<|start_header_id|>assistant<|end_header_id|>` and its newlines, up to and incl. <|eot_id|>."
    sh, eh, eot = tok.convert_tokens_to_ids(["<|start_header_id|>", "<|end_header_id|>", EOT])
    labels, i = [-100] * len(ids), 0
    while i < len(ids):
        if ids[i] == sh:
            j = ids.index(eh, i)
            role = tok.decode(ids[i + 1:j])
            k = j + 1
            while tok.decode([ids[k]]).strip() == "": k += 1  # the "\n\n" after the header
            end = ids.index(eot, k)
            if role == "assistant": labels[k:end + 1] = ids[k:end + 1]
            i = end + 1
        else: i += 1
    return labels


@pytest.mark.parametrize("template", ["tiny", "llama3-fixture"])
def test_masking_token_by_token(root, template):
    tok = load_tokenizer(root / "tokenizer")
    if template == "llama3-fixture": tok.chat_template = FIXTURE["chat_template"]
    msgs = FIXTURE["example"]["messages"]
    enc = encode_chat(tok, msgs, n_latents=3, name="fixture")
    expanded = [dict(m, content=m["content"].replace(IMAGE_MARKER, IMAGE_TOKEN * 3)) for m in msgs]
    assert enc["input_ids"] == tok.apply_chat_template(expanded)["input_ids"]
    assert tok.decode(enc["input_ids"]) == FIXTURE["example"]["rendered"].replace(IMAGE_MARKER, IMAGE_TOKEN * 3)
    assert enc["labels"] == _reference_labels(tok, enc["input_ids"])
    supervised = [i for i, l in zip(enc["input_ids"], enc["labels"]) if l != -100]
    assert tok.decode(supervised) == "red<|eot_id|>2<|eot_id|>"
    assert all(l in (-100, i) for i, l in zip(enc["input_ids"], enc["labels"]))
    assert enc["n_images"] == 1 and enc["input_ids"].count(tok.convert_tokens_to_ids(IMAGE_TOKEN)) == 3


def test_masking_on_world_conversations(root, tok):
    for r in _load(root / "llava/llava_instruct_val.json")[:200]:
        msgs = [dict(role={"human": "user", "gpt": "assistant"}[t["from"]], content=t["value"]) for t in r["conversations"]]
        enc = encode_chat(tok, msgs, L, name=r["id"])
        assert enc["labels"] == _reference_labels(tok, enc["input_ids"])
        sup = tok.decode([i for i, l in zip(enc["input_ids"], enc["labels"]) if l != -100])
        assert sup == "".join(t["value"] + EOT for t in r["conversations"][1::2])


def test_truncation_whole_turns_else_the_first_answer_in_part_never_images(tok):
    msgs = [dict(role="user", content="<image>\nWhat color is the circle?"), dict(role="assistant", content="red"),
            dict(role="user", content="And here? <image>"), dict(role="assistant", content="blue"),
            dict(role="user", content="How many shapes are there?"), dict(role="assistant", content="2")]
    full = encode_chat(tok, msgs, L)
    assert full["n_images"] == 2 and full["turns"] == 3
    img, eot, n = tok.convert_tokens_to_ids(IMAGE_TOKEN), tok.convert_tokens_to_ids(EOT), len(full["input_ids"])
    first_end = [i for i, t in enumerate(full["input_ids"]) if t == eot][1] + 1  # user turn's <|eot_id|>, then the answer's
    seen = set()
    for m in range(first_end, n + 1):
        e = encode_chat(tok, msgs, L, max_len=m)
        assert len(e["input_ids"]) <= m and e["input_ids"] == full["input_ids"][:len(e["input_ids"])]
        assert e["input_ids"][-1] == eot and e["labels"][-1] == eot
        assert e["input_ids"].count(img) == L * e["n_images"]
        seen.add((e["turns"], e["n_images"]))
    assert seen == {(1, 1), (2, 2), (3, 2)}
    start = next(i for i, l in enumerate(full["labels"]) if l != -100)  # the first answer's first token
    for m in range(start + 1, first_end):  # inside the first answer: cut there, the answer in part (as LLaVA cuts)
        e = encode_chat(tok, msgs, L, max_len=m)
        assert e["input_ids"] == full["input_ids"][:m] and e["labels"] == full["labels"][:m]
        assert (e["turns"], e["n_images"], e["length"]) == (0, 1, n) and e["labels"][-1] != -100
    with pytest.raises(BadRecord, match=rf"conv#9: {n} tokens, and its first answer starts at token {start}, "
                                        rf"beyond max_len={start}$") as ex:
        encode_chat(tok, msgs, L, max_len=start, name="conv#9")  # not one answer token fits
    assert ex.value.kind == "too long"


def test_generation_prompt(tok):
    e = encode_chat(tok, [dict(role="user", content="<image>\nWhat shape is the red object?")], L, add_generation_prompt=True)
    assert tok.decode(e["input_ids"]).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert set(e["labels"]) == {-100} and e["n_images"] == 1


# ---------------------------------------------------------------- loaders, round trip
def test_round_trip_stage2(root, tok, cfg):
    ds = build_dataset(cfg, tok, stage=2)
    recs = _load(root / "llava/llava_instruct_train.json")
    assert len(ds) == len(recs) and not ds.skipped
    batch = next(iter(build_loader(ds, tok, cfg, shuffle=False)))
    B = cfg.train.batch_size
    assert set(batch) == {"input_ids", "attention_mask", "labels", "n_images", "pixels", "image_keys", "sample_ids",
                          "skipped", "truncated"}
    assert batch["skipped"] == [] and batch["truncated"] == []
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[1] == batch["attention_mask"].sum(1).max() <= cfg.data.max_len  # dynamic padding
    assert batch["n_images"].tolist() == [1] * B and batch["pixels"].shape == (B, 3, 64, 64)
    assert batch["sample_ids"] == [r["id"] for r in recs[:B]] and batch["image_keys"] == [r["image"] for r in recs[:B]]
    tf = clip_preprocess(cfg.vision)
    assert torch.equal(batch["pixels"][3], tf(Image.open(root / "images" / recs[3]["image"]).convert("RGB")))
    img = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    for b in range(B):
        assert (batch["input_ids"][b] == img).sum() == L * batch["n_images"][b]
        sup = batch["labels"][b][batch["labels"][b] != -100]
        assert tok.decode(sup) == "".join(t["value"] + EOT for t in recs[b]["conversations"][1::2])
    keys_only = build_dataset(cfg, tok, stage=2, pixels=False)[5]
    assert keys_only["pixels"] is None and keys_only["image_keys"] == [recs[5]["image"]]


def test_round_trip_stage1(root, tok, cfg):
    ds = build_dataset(cfg, tok, stage=1)
    assert len(ds) == 4000
    loader = DataLoader(ds, batch_size=8, num_workers=2, collate_fn=Collator(tok.pad_token_id))  # picklable across workers
    batch = next(iter(loader))
    assert batch["pixels"].shape == (8, 3, 64, 64) and batch["n_images"].tolist() == [1] * 8
    assert batch["sample_ids"][0] == batch["image_keys"][0] == "train-00000/000000000"
    with tarfile.open(root / "captions/train-00000.tar") as tar:
        for b in range(8):
            key = batch["sample_ids"][b].split("/")[1]
            cap = tar.extractfile(f"{key}.txt").read().decode()
            sup = batch["labels"][b][batch["labels"][b] != -100]
            assert tok.decode(sup) == cap + EOT
            prompt = tok.decode(batch["input_ids"][b][batch["attention_mask"][b] == 1])
            assert cfg.data.stage1_prompt in prompt and prompt.startswith("<|begin_of_text|><|start_header_id|>user")
            im = Image.open(io.BytesIO(tar.extractfile(f"{key}.png").read())).convert("RGB")
            assert torch.equal(batch["pixels"][b], clip_preprocess(cfg.vision)(im))


def test_prompt_datasets_for_generation(root, tok, cfg):
    items = vqa_prompts(root / "vqa/v2_OpenEnded_shapes_val_questions.json", "val/{image_id}.png", cfg.data.vqa_prompt)
    ds = PromptDataset(items, root / "images", tok, cfg)
    b = collate([ds[0], ds[1], ds[2]], tok.pad_token_id, padding_side="left")
    assert b["attention_mask"][:, -1].tolist() == [1, 1, 1] and (b["labels"] == -100).all()
    assert b["sample_ids"] == [items[i][0] for i in range(3)]
    text = tok.decode(b["input_ids"][0][b["attention_mask"][0] == 1])
    q = _load(root / "vqa/v2_OpenEnded_shapes_val_questions.json")["questions"][0]["question"]
    assert text.endswith(f"{q}\n{cfg.data.vqa_prompt}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    caps = PromptDataset(caption_prompts(root / "coco/captions_val.json", "val", cfg.data.stage1_prompt), root / "images", tok, cfg)
    assert len(caps) == 500 and caps[0]["image_keys"] == ["val/200000.png"]


def test_multi_image_records_and_collation(root, tok, cfg, tmp_path):
    recs = [{"id": "two", "image": ["train/100000.png", "train/100001.png"],
             "conversations": [{"from": "human", "value": "<image> and <image>: how many shapes in all?"}, {"from": "gpt", "value": "5"}]},
            {"id": "none", "conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "yes"}]},
            {"id": "one", "image": "train/100002.png",  # no marker: LLaVA puts the image first
             "conversations": [{"from": "human", "value": "What color is the circle?"}, {"from": "gpt", "value": "red"}]}]
    (tmp_path / "m.json").write_text(json.dumps(recs))
    ds = InstructDataset(tmp_path / "m.json", root / "images", tok, cfg)
    b = collate([ds[0], ds[1], ds[2]], tok.pad_token_id)
    assert b["n_images"].tolist() == [2, 0, 1] and b["pixels"].shape[0] == 3
    assert b["image_keys"] == ["train/100000.png", "train/100001.png", "train/100002.png"]
    img = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert ((b["input_ids"] == img).sum(1) == b["n_images"] * L).all()
    lens = b["attention_mask"].sum(1)
    assert b["input_ids"].shape[1] == lens.max() and (b["input_ids"][1, lens[1]:] == tok.pad_token_id).all()
    assert (b["labels"][b["attention_mask"] == 0] == -100).all()


def test_packed_loader_yields_every_sample_once_with_its_images(root, tok, cfg):
    "train.pack_tokens: batches through DataLoader workers (the collator pickles), each sample once per epoch, in rows."
    from anymal.data import PackCollator, train_collator
    from anymal.config import ConfigError
    pcfg = override(cfg, [f"train.pack_tokens={2 * cfg.data.max_len}", "train.batch_size=8"])
    coll = train_collator(pcfg, tok.pad_token_id)
    assert coll == PackCollator(tok.pad_token_id, 2 * cfg.data.max_len)
    with pytest.raises(ConfigError, match="train.pack_tokens=10 is less than data.max_len"):
        train_collator(override(cfg, ["train.pack_tokens=10"]), tok.pad_token_id)
    ds = build_dataset(cfg, tok, 2, "val")
    n = min(len(ds), 40)
    sub = torch.utils.data.Subset(ds, range(n))
    seen, img = [], tok.convert_tokens_to_ids(IMAGE_TOKEN)
    for b in DataLoader(sub, batch_size=8, num_workers=1, collate_fn=coll):
        R, T = b["input_ids"].shape
        assert T <= 2 * cfg.data.max_len and b["pixels"].shape[0] == b["n_images"].sum() == len(b["image_keys"])
        assert ((b["input_ids"] == img).sum(1) == b["n_images"] * L).all()  # each row's images are its samples'
        starts = (b["position_ids"] == 0) & (b["attention_mask"] == 1)
        assert starts.sum() == len(b["sample_ids"]) and (b["labels"][starts] == -100).all()
        assert (b["labels"][b["attention_mask"] == 0] == -100).all()
        seen += b["sample_ids"]
    assert sorted(seen) == sorted(ds[i]["sample_id"] for i in range(n))


# ---------------------------------------------------------------- bad input
@pytest.fixture()
def good(root): return _load(root / "llava/llava_instruct_train.json")[1]

def _llava(tmp_path, recs):
    (tmp_path / "x.json").write_text(json.dumps(recs)); return tmp_path / "x.json"

BAD_UPFRONT = {  # found when the dataset is built
    "missing image": lambda g: dict(g, image="train/does-not-exist.png"),
    "malformed": lambda g: dict(g, conversations=[{"from": "robot", "value": "hi"}] + g["conversations"]),
    "no assistant turn": lambda g: dict(g, conversations=g["conversations"][:1]),
}

@pytest.mark.parametrize("kind", BAD_UPFRONT)
def test_bad_record_up_front(root, tok, cfg, good, tmp_path, kind):
    path = _llava(tmp_path, [good, good, BAD_UPFRONT[kind](dict(good, id="bad-one")), good])
    with pytest.raises(BadRecord, match=r"x\.json#2 \(id=bad-one\)") as ex:
        InstructDataset(path, root / "images", tok, cfg)
    assert ex.value.kind == kind
    ds = InstructDataset(path, root / "images", tok, cfg, skip_bad=True)
    assert len(ds) == 3 and ds.skipped == Counter({kind: 1}) and "bad-one" in ds.bad[0]
    assert "skipped 1" in ds.summary()


@pytest.mark.parametrize("bad", [
    "not a record", {"id": "x"}, {"id": "x", "conversations": "hello"},
    {"id": "x", "image": 3, "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]},
    {"id": "x", "image": "train/100000.png", "conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "a"}]},
    {"id": "x", "conversations": [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "a"}]},
    {"id": "x", "conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "a"}]},
    {"id": "x", "conversations": [{"from": "gpt", "value": "a"}]},
    {"id": "x", "conversations": [{"from": "human", "value": "<|eot_id|>"}, {"from": "gpt", "value": "a"}]},
])
def test_malformed_records(root, tok, cfg, good, tmp_path, bad):
    path = _llava(tmp_path, [good, bad])
    with pytest.raises(BadRecord, match=r"x\.json#1"):  # up front, or at the latest when read
        ds = InstructDataset(path, root / "images", tok, cfg)
        for i in range(len(ds)): ds[i]
    ds = InstructDataset(path, root / "images", tok, cfg, skip_bad=True)
    assert [ds[i]["sample_id"] for i in range(len(ds))] == [good["id"]] * len(ds)
    assert sum(ds.skipped.values()) == 1


def test_bad_json_files(root, tok, cfg, good, tmp_path):
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="broken.json: cannot read"): InstructDataset(tmp_path / "broken.json", root / "images", tok, cfg)
    (tmp_path / "obj.json").write_text("{}")
    with pytest.raises(ValueError, match="expected a JSON list"): InstructDataset(tmp_path / "obj.json", root / "images", tok, cfg)
    path = _llava(tmp_path, [BAD_UPFRONT["missing image"](good)])
    with pytest.raises(ValueError, match="no usable records"): InstructDataset(path, root / "images", tok, cfg, skip_bad=True)


@pytest.mark.parametrize("kind", ["corrupt image", "too long"])
def test_bad_record_at_read_time_is_replaced(root, tok, cfg, good, tmp_path, kind):
    (root / "images/corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    bad = dict(good, id="late", image="corrupt.png") if kind == "corrupt image" else \
          dict(good, id="late", conversations=[{"from": "human", "value": "<image>\n" + "Is it red? " * 80}, {"from": "gpt", "value": "no"}])
    path = _llava(tmp_path, [dict(good, id="a"), bad, dict(good, id="c")])
    strict = InstructDataset(path, root / "images", tok, cfg)
    assert len(strict) == 3  # passes the cheap checks
    if kind == "too long":  # not bad, too long to learn from at this max_len: left out and counted without skip_bad too
        assert strict[1]["sample_id"] == "c" and strict.skipped == Counter({kind: 1})
        assert strict.bad[0].startswith("x.json#1 (id=late): ") and "beyond max_len=" in strict.bad[0]
    else:
        with pytest.raises(BadRecord, match=r"x\.json#1 \(id=late\)"): strict[1]
    ds = InstructDataset(path, root / "images", tok, cfg, skip_bad=True)
    assert ds[1]["sample_id"] == "c"  # replaced by the next good record
    assert ds[1]["sample_id"] == "c" and ds.skipped == Counter({kind: 1})  # counted once
    batch = next(iter(DataLoader(ds, batch_size=3, collate_fn=Collator(tok.pad_token_id))))
    assert batch["sample_ids"] == ["a", "c", "c"]


def test_too_many_bad_records_in_a_row(root, tok, cfg, good, tmp_path):
    (root / "images/corrupt.png").write_bytes(b"not an image")
    path = _llava(tmp_path, [dict(good, image="corrupt.png")] * 5)
    ds = InstructDataset(path, root / "images", tok, cfg, skip_bad=True)
    with pytest.raises(TooManySkipped, match="bad records in a row"): ds[0]


def _shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name); info.size = len(data); tar.addfile(info, io.BytesIO(data))


def test_bad_caption_shards(root, tok, cfg, tmp_path):
    png = (root / "images/train/100000.png").read_bytes()
    _shard(tmp_path / "s-00000.tar", [("a.png", png), ("a.txt", b"A red circle."), ("a.json", b"{}"),
                                      ("b.png", png),                                    # no caption
                                      ("c.txt", b"no image"),                            # no image
                                      ("d.png", b"garbage"), ("d.txt", b"corrupt"),      # corrupt image
                                      ("e.png", png), ("e.txt", b"  "),                  # empty caption
                                      ("f.png", png), ("f.txt", b"\xff\xfe"),            # not UTF-8
                                      ("g.jpg", png), ("g.txt", b"A blue square.")])
    (tmp_path / "s-00001.tar").write_bytes(b"this is not a tar file" * 100)
    pattern = tmp_path / "s-*.tar"
    with pytest.raises(BadRecord, match="s-00000.tar/b: sample has no caption"): CaptionDataset(pattern, tok, cfg)
    ds = CaptionDataset(pattern, tok, cfg, skip_bad=True)
    assert len(ds) == 5 and ds.skipped == Counter({"malformed": 2, "corrupt shard": 1})
    got = [ds[i]["sample_id"] for i in range(len(ds))]
    assert got == ["s-00000/a", "s-00000/g", "s-00000/g", "s-00000/g", "s-00000/g"]
    assert ds.skipped == Counter({"malformed": 4, "corrupt shard": 1, "corrupt image": 1})
    strict = CaptionDataset([tmp_path / "s-00000.tar"], tok, cfg, skip_bad=True); strict.skip_bad = False
    with pytest.raises(BadRecord, match="s-00000.tar/d: cannot decode image"): strict[1]
    with pytest.raises(BadRecord, match="s-00000.tar/e: empty caption"): strict[2]
    with pytest.raises(BadRecord, match="s-00000.tar/f: caption is not UTF-8"): strict[3]
    with pytest.raises(FileNotFoundError, match="no caption shards"): CaptionDataset(tmp_path / "none-*.tar", tok, cfg)


def _bytes(im, fmt="PNG", **kw):
    b = io.BytesIO(); im.save(b, fmt, **kw); return b.getvalue()


def test_images_decode_as_a_viewer_shows_them(root, cfg):
    "16-bit, palette, CMYK, grayscale and alpha images become the RGB picture they show; EXIF orientation is applied."
    tf = clip_preprocess(cfg.vision)
    rgb = Image.open(root / "images/train/100000.png").convert("RGB")
    gray = np.asarray(rgb.convert("L"))
    deep = _bytes(Image.fromarray(gray.astype(np.uint16) * 257))  # the 8-bit picture with 16 bits per pixel
    assert Image.open(io.BytesIO(deep)).mode == "I;16"
    assert np.asarray(Image.open(io.BytesIO(deep)).convert("RGB")).mean() > 250 > gray.mean() + 100  # what PIL does
    x16, x8 = tf(decode_image(deep)), tf(decode_image(_bytes(Image.fromarray(gray))))
    assert torch.allclose(x16, x8, atol=1e-6)
    assert torch.allclose(tf(decode_image(_bytes(rgb.convert("L")))), x8, atol=1e-6)  # grayscale: the same three channels
    cmyk = np.asarray(decode_image(_bytes(rgb.convert("CMYK"), "JPEG", quality=95)), dtype=float)
    assert np.abs(cmyk - np.asarray(rgb, dtype=float)).mean() < 4  # JPEG's loss only
    rgba = rgb.convert("RGBA"); rgba.putpixel((0, 0), (0, 0, 0, 0)); rgba.putpixel((1, 0), (0, 0, 0, 128))
    out = decode_image(_bytes(rgba))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (127, 127, 127)  # onto white
    assert out.getpixel((9, 9)) == rgb.getpixel((9, 9))
    la = Image.merge("LA", [rgb.convert("L"), Image.new("L", rgb.size, 255)]); la.putpixel((0, 0), (0, 0))
    assert decode_image(_bytes(la)).getpixel((0, 0)) == (255, 255, 255) and decode_image(_bytes(la)).getpixel((9, 9))[0] == gray[9, 9]
    pal = rgb.quantize(8); bg = pal.getpixel((0, 0))
    out = decode_image(_bytes(pal, transparency=bg))
    assert out.getpixel((0, 0)) == (255, 255, 255)  # the transparent palette entry
    assert out.getpixel((32, 32)) == pal.convert("RGB").getpixel((32, 32)) or pal.getpixel((32, 32)) == bg
    assert decode_image(_bytes(pal)).getpixel((0, 0)) == pal.convert("RGB").getpixel((0, 0))  # opaque palette: as is
    half = Image.new("RGB", (16, 8), (255, 0, 0)); half.paste((0, 0, 255), (8, 0, 16, 8))  # red left, blue right
    exif = Image.Exif(); exif[0x0112] = 6  # stored rotated: turn 90 degrees clockwise to view
    up = decode_image(_bytes(half, "JPEG", exif=exif, quality=95))
    assert up.size == (8, 16)
    top, bottom = up.getpixel((4, 2)), up.getpixel((4, 13))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # red on top: turned clockwise, as a viewer shows it
    with pytest.raises(BadRecord, match="x.png: cannot decode image: OSError: .*truncated") as e:
        load_image(_bytes(rgb)[:300], "x.png")
    assert e.value.kind == "corrupt image"
    with pytest.raises(BadRecord, match="y: cannot decode image: UnidentifiedImageError") as e: load_image(b"garbage", "y")
    assert e.value.kind == "corrupt image"


def test_skips_are_counted_across_workers(root, tok, cfg, tmp_path):
    "Bad records found in DataLoader workers reach the training process in the batches, each counted once."
    png = (root / "images/train/100000.png").read_bytes()
    samples = [(f"{i:03d}.png", png[:200] if i % 5 == 0 else png) for i in range(40)]  # 8 truncated images
    _shard(tmp_path / "s-00000.tar", [x for name, data in samples for x in
                                      ((name, data), (name.replace("png", "txt"), b"A red circle."))])
    ds = CaptionDataset(tmp_path / "s-*.tar", tok, cfg, skip_bad=True)
    tally = SkipTally(ds)
    for b in DataLoader(ds, batch_size=4, num_workers=2, collate_fn=Collator(tok.pad_token_id)): tally.add(b["skipped"])
    assert not ds.skipped  # this process read nothing
    assert tally.counts() == Counter({"corrupt image": 8}) and tally.records == 40
    assert "s-00000.tar/000: cannot decode image" in tally.describe()
    with pytest.raises(TooManySkipped, match=r"skipped 8 of 40 records \(20.0%\): corrupt image 8; first: .*"
                                             r"more than data.max_skipped=0.1"):
        tally.check(0.1)
    strict = CaptionDataset(tmp_path / "s-*.tar", tok, cfg)  # not skipping: the first is an error naming it
    with pytest.raises(BadRecord) as e:
        for b in DataLoader(strict, batch_size=4, num_workers=2, collate_fn=Collator(tok.pad_token_id)): pass
    assert str(e.value).startswith("s-00000.tar/000: cannot decode image: OSError") and "\n" not in str(e.value)


def test_prompt_dataset_missing_image(root, tok, cfg):
    items = [("1", "val/200000.png", "<image>\nWhat?"), ("2", "val/missing.png", "<image>\nWhat?")]
    with pytest.raises(BadRecord, match="prompt 2: image file .*missing.png not found"): PromptDataset(items, root / "images", tok, cfg)
    ds = PromptDataset(items, root / "images", tok, cfg, skip_bad=True)
    assert len(ds) == 1 and ds.skipped == Counter({"missing image": 1})


def test_tokenizer_trains_within_budget(tmp_path):
    tok = train_tokenizer(["a red circle", "What color is the circle?"] * 10, vocab_size=300, out_dir=tmp_path / "t")
    assert len(tok) <= 300 and (tmp_path / "t/tokenizer.json").is_file()
    with pytest.raises(ValueError, match="more than vocab_size"):
        train_tokenizer(["x"], vocab_size=100)  # 256 bytes + specials cannot fit
