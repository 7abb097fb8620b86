"""Training on sound and motion (anymal.demo_av): the tokenizer, records, dataset, feature tables, controls, CLI."""
import json

import pytest
import torch

from anymal.cli import main
from anymal.config import ConfigError, DataError, override, tiny
from anymal.tokenizer import BadRecord, PLACEHOLDERS, encode_chat, modality_token_ids, train_tokenizer
from anymal.world import ensure_world
from anymal.world_av import SILENCE, av_paths, generate_av, shuffle_frames
from anymal.demo_av import (MediaDataset, add_placeholders, audio_caption_records, av_records, caption_records,
                            is_describe, stage2_records,
                            collate_media, media_messages, media_tables, prepare_media, question_files,
                            video_caption_records, with_modalities, TinyCLAP, train_audio_tower)
from anymal.vision import ImageEncoder

CFG = override(tiny(), data__world_images=16, data__world_val_images=4, audio__enabled=True, video__enabled=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    "A tiny world with sound and motion, and its tokenizer with every placeholder."
    root = tmp_path_factory.mktemp("avtrain") / "world"
    ensure_world(CFG, root)  # the scenes and the world's tokenizer
    generate_av(root, CFG)
    from anymal.tokenizer import load_tokenizer
    tok = add_placeholders(load_tokenizer(root / "tokenizer"), vocab_size=CFG.llm.vocab_size)
    return root, tok


def test_placeholders_follow_the_old_ids():
    tok = train_tokenizer(["a red circle moves left", "One tone: a loud low red tone on the left."], vocab_size=300)
    before = {t: i for t, i in tok.get_vocab().items()}
    add_placeholders(tok, vocab_size=512)
    ids = modality_token_ids(tok)
    assert {t: i for t, i in tok.get_vocab().items() if t in before} == before  # every old id kept
    assert sorted([ids["audio"], ids["video"]]) == [len(before), len(before) + 1]
    assert tok.decode([ids["audio"], ids["video"]], skip_special_tokens=True) == ""
    with pytest.raises(ConfigError, match="more than llm.vocab_size=10"):
        add_placeholders(train_tokenizer(["x"], vocab_size=300), vocab_size=10)


def test_modalities_are_checked():
    c = with_modalities(tiny(), ["image", "audio"])
    assert (c.audio.enabled, c.video.enabled) == (True, False)
    for bad in (["image", "sound"], ["audio", "video"]):
        with pytest.raises(ConfigError, match="choose from"): with_modalities(tiny(), bad)


def test_record_errors_name_the_record_and_modality():
    rec = {"id": 7, "audio": "a.wav", "conversations": [{"from": "human", "value": "Describe the sound."},
                                                        {"from": "gpt", "value": "One tone."}]}
    with pytest.raises(BadRecord, match=r"rec 7: 0 <audio> markers for 1 audio file"): media_messages(rec, "rec 7")
    with pytest.raises(BadRecord, match="'video' must be a path"): media_messages(dict(rec, audio=[], video=3), "rec 7")


def test_caption_files_become_records(world, tmp_path):
    root, _ = world
    p = av_paths("train")
    a, v = audio_caption_records(root / p["audio_captions"]), video_caption_records(root / p["video_captions"])
    assert len(a) == len(v) == 16
    assert a[0]["conversations"][0]["value"].startswith("<audio>\n") and a[0]["audio"].endswith(".wav")
    assert v[0]["conversations"][0]["value"].startswith("<video>\n") and v[0]["video"].endswith(".gif")
    bad = tmp_path / "caps.json"
    bad.write_text(json.dumps({"data": [{"id": 1, "audio": "x.wav"}]}))
    with pytest.raises(DataError, match=r"caps.json: record 0 lacks"): audio_caption_records(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(DataError, match="not a WavCaps-style JSON"): audio_caption_records(bad)


def test_dataset_samples_carry_every_modality(world):
    root, tok = world
    ds = MediaDataset(av_records(root, "train", ("image", "audio", "video")), root, tok, CFG, "av train")
    batch = collate_media([ds[i] for i in range(len(ds))], tok.pad_token_id)
    ids = modality_token_ids(tok)
    for m, L in (("audio", CFG.audio.tokens), ("video", CFG.video.tokens)):
        per_row = (batch["input_ids"] == ids[m]).sum(1)
        assert torch.equal(per_row, batch[f"n_{m}"] * L)  # every marker became L placeholders
        assert len(batch[f"{m}_keys"]) == int(batch[f"n_{m}"].sum()) > 0
    assert int(batch["n_images"].sum()) == len(batch["image_keys"]) > 0  # the cross-modal ones: image and sound


def test_missing_files_are_counted_or_named(world):
    root, tok = world
    recs = caption_records(root, "train", ("image", "audio"))
    recs[3] = dict(recs[3], audio="audio/train/nope.wav")
    with pytest.raises(BadRecord, match=r"#3 \(id=audio-.*audio file .*nope.wav not found"):
        MediaDataset(recs, root, tok, CFG, "caps", skip_bad=False)
    ds = MediaDataset(recs, root, tok, CFG, "caps", skip_bad=True)
    assert len(ds) == len(recs) - 1 and ds.skipped == {"missing audio": 1}


def test_tables_and_controls(world):
    root, tok = world
    ds = MediaDataset(av_records(root, "train", ("image", "audio", "video")), root, tok, CFG, "av train")
    keys = ds.keys()
    keys["audio"] = sorted({*keys["audio"], SILENCE})
    tower = TinyCLAP(CFG, len(tok), 0, tok.pad_token_id).audio.eval()
    tables = media_tables(keys, root, CFG, ImageEncoder(CFG.vision), tower)
    v = CFG.vision
    assert tables["video"].feats.shape[1:] == (CFG.video.frames, v.num_tokens, v.width)
    assert tables["audio"].feats.shape[1:] == (1, CFG.audio.width)  # the pooled token: all the linear bridge reads
    batch = collate_media([ds[i] for i in range(len(ds))], tok.pad_token_id)
    plain, silent, shuffled = (prepare_media(batch, "cpu", tables, c) for c in ("none", "silent", "shuffled"))
    assert not torch.equal(plain["audio_feats"], silent["audio_feats"])
    assert torch.equal(silent["audio_feats"], silent["audio_feats"][:1].expand_as(silent["audio_feats"]))
    k = batch["video_keys"][0]
    assert torch.equal(shuffled["video_feats"][0], shuffle_frames(plain["video_feats"][0], k))
    assert not torch.equal(shuffled["video_feats"][0], plain["video_feats"][0])
    assert torch.equal(plain["image_feats"], silent["image_feats"])


def test_question_files():
    q = {"image_id": 5, "question_id": 1, "question": "?", "modalities": ["image", "audio"]}
    assert question_files(q, "test") == {"image": ["test/5.png"], "audio": ["audio/test/5.wav"]}
    assert question_files({"image_id": 5}, "test") == {"image": ["test/5.png"]}


def test_audio_tower_learns(world):
    "Thirty contrastive steps on 16 clips halve the loss (clips and captions meet)."
    root, tok = world
    logs = []
    c = override(CFG, audio__tower_steps=30, audio__tower_batch=16, audio__tower_lr=3e-3)
    train_audio_tower(c, root, tok, progress=False, log=logs.append)
    first, last = logs[0]["loss"], sum(l["loss"] for l in logs[-5:]) / 5
    assert first > 2 and last < first / 2, (first, last)


def test_cli_names_a_wrong_modality(capsys):
    assert main(["demo", "--modalities", "image,smell", "--set", "data.world_images=8"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("anymal demo: error: --modalities image,smell") and "'smell' is not one" in err


def test_stage2_mix(world):
    "Stage 2: every image instruction, the sound and motion questions (no captions), motion ones repeated."
    root, _ = world
    c = override(CFG, video__stage2_repeat=3)
    mix = stage2_records(root, c, "train", ("image", "audio", "video"))
    images = json.loads((root / c.data.instruct_json.format(split="train")).read_text())
    qa = av_records(root, "train", ("image", "audio", "video"), describe=False)
    every = av_records(root, "train", ("image", "audio", "video"))
    assert not any(is_describe(r) for r in qa) and any(is_describe(r) for r in every)
    video = [r for r in qa if "video" in r]
    assert len(mix) == len(images) + len(qa) + 2 * len(video) and video
    assert sum(r["id"] == video[0]["id"] for r in mix) == 3
    assert len(stage2_records(root, c, "val", ("image", "audio"))) == len(
        json.loads((root / c.data.instruct_json.format(split="val")).read_text())) + len(
        av_records(root, "val", ("image", "audio"), describe=False))  # no video, no repeats outside train
