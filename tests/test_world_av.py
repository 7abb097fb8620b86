"""The shapes world's sound and motion (anymal.world_av): real formats, determinism, and answers the signals carry."""
import json, re, shutil, wave
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from anymal.config import override, tiny
from anymal.tokenizer import MARKERS, BadRecord
from anymal.world import COLORS, QUADRANTS, SHAPES, SIZES, generate_world
from anymal.world_av import (AV_JSON, AV_QUESTION_TYPES, FREQS, GAP, SHIFT, SILENCE, av_info, av_paths, ensure_av,
                             generate_av, load_gif, load_wav, shuffle_frames, wav_bytes)

CFG = override(tiny(), data__world_images=24, data__world_val_images=6)
SPLITS = ("train", "val", "test", "heldout")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    "A tiny image world (24 + 3 x 6 scenes), its files' bytes before sound and motion, then sound and motion."
    root = tmp_path_factory.mktemp("av") / "world"
    generate_world(root, CFG)
    before = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    generate_av(root, CFG)
    return root, before


def _load(root, split, key):
    return json.loads((root / av_paths(split)[key]).read_text())


def _scenes(root, split):
    "The image world's scenes (its ground truth), by image id."
    return {s["image_id"]: s for s in json.loads((root / f"scenes/{split}.json").read_text())["scenes"]}


def _answers(root, split):
    "(question, answer, type, image id) of every sound and motion question of a split, from the VQAv2 files."
    qs, anns = _load(root, split, "questions")["questions"], _load(root, split, "annotations")["annotations"]
    ans = {a["question_id"]: a for a in anns}
    return [(q["question"], ans[q["question_id"]]["multiple_choice_answer"], ans[q["question_id"]]["question_type"],
             q["image_id"]) for q in qs]


def test_the_image_world_is_untouched(world):
    root, before = world
    assert all((root / p).read_bytes() == b for p, b in before.items())
    new = {p.relative_to(root).parts[0] for p in root.rglob("*") if p.is_file() and p.relative_to(root) not in before}
    assert new == {"audio", "video", "av", "llava", "vqa", AV_JSON}, new


def test_files_in_their_formats(world):
    root, _ = world
    info = av_info(root)
    assert (info["sample_rate"], info["clip_seconds"], info["frames"]) == (16000, 1.0, 4)
    for split in SPLITS:
        scenes = _scenes(root, split)
        assert info["splits"][split]["clips"] == len(scenes)
        for iid in scenes:
            with wave.open(str(root / f"audio/{split}/{iid}.wav")) as w:
                assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (2, 2, 16000, 16000)
            with Image.open(root / f"video/{split}/{iid}.gif") as im:
                assert (im.format, im.n_frames, im.size) == ("GIF", 4, (64, 64))
        qs, anns = _load(root, split, "questions")["questions"], _load(root, split, "annotations")["annotations"]
        ids = [q["question_id"] for q in qs]
        assert len(set(ids)) == len(ids) == len(anns) == info["splits"][split]["questions"]
        image_ids = {q["question_id"] for q in json.loads((root / f"vqa/v2_OpenEnded_shapes_{split}_questions.json")
                                                              .read_text())["questions"]}
        assert not image_ids & set(ids)  # never an image question's id
        assert all(len(a["answers"]) == 10 for a in anns)
        assert {a["question_type"] for a in anns} <= set(AV_QUESTION_TYPES)
        caps = _load(root, split, "audio_captions")["data"]
        assert [c["id"] for c in caps] == [str(i) for i in scenes] and all((root / c["audio"]).exists() for c in caps)
        rows = (root / av_paths(split)["video_captions"]).read_text().splitlines()
        assert rows[0] == "videoid,contentUrl,duration,page_dir,name" and len(rows) == 1 + len(scenes)
    assert set(info["splits"]["train"]["question_types"]) == set(AV_QUESTION_TYPES)


def test_llava_records_name_one_file_per_marker(world):
    root, _ = world
    recs = _load(root, "train", "instruct")
    assert {tuple(m for m in MARKERS if m in r) for r in recs} == {("audio",), ("video",), ("image", "audio")}
    for r in recs:
        mods = [m for m in MARKERS if m in r]
        humans = [t["value"] for t in r["conversations"][::2]]
        assert humans[0].startswith("".join(MARKERS[m] + "\n" for m in mods)), r["id"]
        assert all(sum(h.count(MARKERS[m]) for h in humans) == (m in mods) for m in MARKERS), r["id"]
        for m in mods: assert (root / ("images" if m == "image" else "") / r[m]).is_file(), (r["id"], m)


def test_same_seed_same_bytes_and_ensure_av(world, tmp_path):
    root, _ = world
    b = tmp_path / "b"
    generate_world(b, CFG)
    generate_av(b, CFG)
    timed = (AV_JSON, "world.json")  # their `seconds` differ
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and p.name not in timed)
    assert len(files) > 4 * 42
    assert all((root / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert av_info(b) == av_info(root)
    mtime = (b / AV_JSON).stat().st_mtime_ns
    ensure_av(b, CFG)
    assert (b / AV_JSON).stat().st_mtime_ns == mtime  # already there for this world: nothing written
    generate_world(b, override(CFG, data__world_seed=1))  # another world in the same folder: its sound is stale
    ensure_av(b, CFG)
    assert av_info(b)["seed"] == 1 and av_info(b)["world"] != av_info(root)["world"]
    assert (b / "audio/train/100000.wav").read_bytes() != (root / "audio/train/100000.wav").read_bytes()


def decode_sounds(path) -> list[dict]:
    "The tones of a clip, read from its samples alone: per quarter second, an FFT peak, the louder channel, the level."
    x = load_wav(path, 16000).numpy()  # (2, S)
    slot, gap, out = x.shape[1] // 4, round(GAP * 16000), []
    for k in range(4):
        seg = x[:, k * slot + gap:(k + 1) * slot - gap]  # (2, n): the tone, if there is one
        mono = seg.mean(0)
        if np.abs(mono).max() < 0.01: continue
        spec = np.abs(np.fft.rfft(mono * np.hanning(len(mono))))
        f = spec.argmax() * 16000 / len(mono)
        color = min(FREQS, key=lambda c: abs(np.log(f / FREQS[c])))
        left, right = np.abs(seg).max(1)
        out.append(dict(color=color, slot=k, side="left" if left > right else "right",
                        size="large" if np.abs(mono).max() > 0.28 else "small", freq=f))
    return out


def answer_from_sound(q: str, sounds: list[dict], objects: list[dict]) -> str:
    "An audio (or audio + image) question answered from decoded tones and, for shapes, the image's objects."
    if q == "How many sounds are there?": return str(len(sounds))
    if m := re.fullmatch(r"How many (\w+) sounds are there\?", q): return str(sum(s["color"] == m[1] for s in sounds))
    if m := re.fullmatch(r"Is there an? (\w+) sound\?", q):
        return "yes" if any(s["color"] == m[1] for s in sounds) else "no"
    m = re.fullmatch(r"What (color|shape) (?:is|makes) the (highest|lowest) sound\?", q)
    assert m, q
    color = (max if m[2] == "highest" else min)(sounds, key=lambda s: s["freq"])["color"]
    if m[1] == "color": return color
    (o,) = [o for o in objects if o["color"] == color]
    return o["shape"]


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_sound_says_which_colours_sound_and_answers_its_questions(world, split):
    root, _ = world
    scenes, truth = _scenes(root, split), {r["image_id"]: r for r in _load(root, split, "scenes")["scenes"]}
    decoded = {iid: decode_sounds(root / f"audio/{split}/{iid}.wav") for iid in scenes}
    for iid, sounds in decoded.items():
        objs = {o["quadrant"]: o for o in scenes[iid]["objects"]}
        for s in sounds:  # a shape's tone has its colour and size; one from an empty quadrant, a colour not shown
            o = objs.get(QUADRANTS[s["slot"]])
            assert (o["color"], o["size"]) == (s["color"], s["size"]) if o else s["color"] not in (
                p["color"] for p in objs.values()), (iid, s)
        want = [(s["color"], s["slot"], s["side"], s["size"]) for s in truth[iid]["sounds"]]
        assert [(s["color"], s["slot"], s["side"], s["size"]) for s in sounds] == want
        assert all(abs(s["freq"] - t["freq"]) < 6 for s, t in zip(sounds, truth[iid]["sounds"]))
    asked = [(q, a, t, iid) for q, a, t, iid in _answers(root, split) if t.startswith("sound")]
    assert {t for _, _, t, _ in asked} == {"sound_count", "sound_exists", "sound_color", "sound_shape"}
    for q, a, _, iid in asked: assert answer_from_sound(q, decoded[iid], scenes[iid]["objects"]) == a, (iid, q)
    shown = Counter((a, q.split()[-2] in {o["color"] for o in scenes[iid]["objects"]})
                    for q, a, t, iid in asked if t == "sound_exists")
    assert shown[("no", True)] and shown[("yes", False)]  # the image alone cannot answer: seen but silent, heard unseen
    assert any(s["object"] is None for r in truth.values() for s in r["sounds"])  # some tones are off screen


def decode_motion(frames, objects) -> list[str]:
    "Each object's direction from a clip's pixels: where its colour is, near it, in the first and the last frame."
    px = frames.permute(0, 2, 3, 1).numpy() * 255  # (F, H, W, 3)
    ys, xs = np.mgrid[:px.shape[1], :px.shape[2]]
    out = []
    for o in objects:
        x, y, w, h = o["bbox"]
        near = (xs >= x - SHIFT - 1) & (xs <= x + w + SHIFT + 1) & (ys >= y - SHIFT - 1) & (ys <= y + h + SHIFT + 1)
        cents = []
        for f in (px[0], px[-1]):
            mask = near & (np.abs(f - COLORS[o["color"]]).max(-1) < 50)
            cents.append(np.array([xs[mask].mean(), ys[mask].mean()]))
        dx, dy = cents[1] - cents[0]
        out.append(("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up"))
    return out


def _the(phrase: str, objects: list[dict]) -> dict:
    "The one object that 'the small red circle' / 'the red object' / 'the circle' names."
    words = phrase.split()
    keys = [("size", SIZES), ("color", COLORS), ("shape", SHAPES)]
    (o,) = [o for o in objects if all(o[k] in words for k, vals in keys if any(w in vals for w in words))]
    return o


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_frames_show_which_way_each_shape_moves(world, split):
    root, _ = world
    scenes, truth = _scenes(root, split), {r["image_id"]: r for r in _load(root, split, "scenes")["scenes"]}
    wrong = 0
    for iid, sc in scenes.items():
        frames = load_gif(root / f"video/{split}/{iid}.gif", 4)
        assert decode_motion(frames, sc["objects"]) == [m["direction"] for m in truth[iid]["motion"]], iid
        shuffled = decode_motion(shuffle_frames(frames, iid), sc["objects"])
        wrong += sum(a != m["direction"] for a, m in zip(shuffled, truth[iid]["motion"]))
    assert wrong > 0  # shuffled frames lose the answer (for some shapes: a shuffle can keep first and last in order)
    asked = [(q, a, iid) for q, a, t, iid in _answers(root, split) if t == "motion"]
    assert len(asked) == 2 * len(scenes)
    for q, a, iid in asked:
        phrase = re.fullmatch(r"Which way does (the .+) move\?", q)[1]
        objs = scenes[iid]["objects"]
        o = _the(phrase, objs)
        assert decode_motion(load_gif(root / f"video/{split}/{iid}.gif"), [o]) == [a], (iid, q)


def test_shapes_stay_in_the_image_apart_and_centred_on_the_still(world):
    root, _ = world
    for split in SPLITS:
        scenes = _scenes(root, split)
        for r in _load(root, split, "scenes")["scenes"]:
            objs, boxes = scenes[r["image_id"]]["objects"], []
            for o, m in zip(objs, r["motion"]):
                rad, cs = o["bbox"][2] / 2, np.array(m["centers"])  # (F, 2)
                assert cs.min() - rad >= -1e-6 and cs.max() + rad <= 64 + 1e-6, (r["image_id"], m)
                assert np.allclose(cs.mean(0), o["center"], atol=0.02)  # the still is the clip's midpoint
                half_way = np.abs(cs[-1] - cs[0]).max() / 2
                assert 1.85 <= half_way <= SHIFT + 1e-6  # moves visibly, at most SHIFT px either side
                boxes.append((cs.min(0) - rad, cs.max(0) + rad))  # the box it sweeps
            for i, (lo, hi) in enumerate(boxes):
                for lo2, hi2 in boxes[:i]:
                    assert (lo >= hi2).any() or (lo2 >= hi).any(), r["image_id"]  # apart on some axis


def test_controls(world):
    root, _ = world
    clip, silence = load_wav(root / "audio/val/200000.wav"), load_wav(root / SILENCE, 16000)
    assert silence.shape == clip.shape and silence.abs().max() == 0 and clip.abs().max() > 0.1
    frames = load_gif(root / "video/val/200000.gif")
    s = shuffle_frames(frames, 200000)
    assert (s == shuffle_frames(frames, 200000)).all()  # deterministic
    order = [next(i for i in range(4) if (f == frames[i]).all()) for f in s]
    assert sorted(order) == [0, 1, 2, 3] and order != [0, 1, 2, 3]  # a permutation, never the original order
    assert len({tuple(int(v) for v in shuffle_frames(np.arange(4), k)) for k in range(20)}) > 3


def test_bad_files_are_one_line_errors_naming_them(world, tmp_path):
    root, _ = world
    good = (root / "audio/val/200000.wav").read_bytes()
    cases = {"text.wav": b"not a wav file", "short.wav": good[:1000], "head.wav": good[:20],
             "byte.wav": wav_bytes(np.zeros((1, 100)), 16000).replace(b"\x02\x00\x10\x00", b"\x01\x00\x08\x00", 1)}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(BadRecord) as e: load_wav(tmp_path / name)
        assert str(tmp_path / name) in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(BadRecord, match="22050 Hz expected"): load_wav(root / "audio/val/200000.wav", 22050)
    with pytest.raises(BadRecord, match="missing.wav: audio file not found"): load_wav(tmp_path / "missing.wav")
    shutil.copy(root / "images/val/200000.png", tmp_path / "still.gif")
    with pytest.raises(BadRecord, match="still.gif: cannot decode GIF: .*PNG"): load_gif(tmp_path / "still.gif")
    with pytest.raises(BadRecord, match="missing.gif: video file not found"): load_gif(tmp_path / "missing.gif")
    with pytest.raises(BadRecord, match="4 frames; 8 asked for"): load_gif(root / "video/val/200000.gif", 8)
