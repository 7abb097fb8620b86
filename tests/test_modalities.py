"""Any modality: one splice for images, audio and video (markers mixed in one sample), the audio encoder and bridge,
the video bridge, at tiny size (real forward on the CPU) and full size (meta device), and `anymal info`'s rows; a tiny
AnyMAL holding them: one forward over an image, a clip and a video, the bridges' keys, save and load, generation."""
import json, subprocess, sys
from pathlib import Path
import pytest, torch
from anymal.audio import AudioEncoder, build_audio_bridge, build_audio_tower, n_frames
from anymal.config import full, override, stage_config, tiny
from anymal.model import Media, splice, splice_images
from anymal.tokenizer import MARKERS, encode_chat, modality_token_ids, train_tokenizer
from anymal.video import build_video_bridge, encode_frames
from anymal.vision import ImageEncoder

BIN = Path(sys.executable).parent
TOKENS = {"image": 4, "audio": 3, "video": 2}  # placeholder tokens per item of each modality
TEXTS = ["what is in the picture and what is that sound? a red circle and a bell", "no", "yes"] * 10


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=512, modalities=("image", "audio", "video"))


def _batch(tok, contents: list[str]):
    "Padded ids of one user turn each, and the items per modality of every sample."
    encs = [encode_chat(tok, [{"role": "user", "content": c}, {"role": "assistant", "content": "yes"}], TOKENS)
            for c in contents]
    T = max(len(e["input_ids"]) for e in encs)
    ids = torch.tensor([e["input_ids"] + [0] * (T - len(e["input_ids"])) for e in encs])
    return ids, {m: torch.tensor([e["n_media"][m] for e in encs]) for m in TOKENS}


def _media(tok, counts: dict, D: int) -> dict:
    "Every item's tokens filled with a value of its own: modality k's item j is 100 * (k + 1) + j, a token's rank added."
    pid = modality_token_ids(tok)
    out = {}
    for k, (m, L) in enumerate(TOKENS.items()):
        N = int(counts[m].sum())
        vals = 100.0 * (k + 1) + torch.arange(N)[:, None] + torch.arange(L)[None] / 10  # (N, L)
        out[m] = Media(pid[m], vals[..., None].expand(N, L, D).clone(), counts[m])
    return out


def test_splice_puts_each_modalitys_tokens_on_its_own_placeholders(tok):
    contents = ["<image> then <audio>, and <image> again", "<video> <audio> <image> <audio>: same?", "no media"]
    ids, counts = _batch(tok, contents)
    assert {m: c.tolist() for m, c in counts.items()} == {"image": [2, 1, 0], "audio": [1, 2, 0], "video": [0, 1, 0]}
    D = 6
    text = torch.randn(*ids.shape, D)
    media = _media(tok, counts, D)
    out = splice(text.clone(), ids, media)
    pid = modality_token_ids(tok)
    for m, x in media.items():  # each modality's placeholders hold its items, in order, token by token
        at = ids == pid[m]
        assert torch.equal(out[at], x.tokens.reshape(-1, D)), m
    is_media = sum(ids == i for i in pid.values()).bool()
    assert torch.equal(out[~is_media], text[~is_media])  # text untouched
    # sample 1 reads video, audio, image, audio: in order, its placeholders hold those items
    row = out[1][is_media[1], 0].round().long().tolist()  # the item at each placeholder (hundreds: the modality)
    order = [v for i, v in enumerate(row) if i == 0 or v != row[i - 1]]
    assert order == [300, 201, 102, 202], order  # video 0, audio 1, image 2, audio 2 (items counted over the batch)


def test_splice_images_is_the_image_case(tok):
    ids, counts = _batch(tok, ["<image> and <image>", "<image>"])
    D = 5
    x = _media(tok, counts, D)["image"]
    emb = torch.randn(*ids.shape, D)
    assert torch.equal(splice_images(emb, ids, x.tokens, x.counts, x.token_id), splice(emb, ids, {"image": x}))


@pytest.mark.parametrize("modality, words", [("image", "image(s) x 4 latents"), ("audio", "audio clip(s) x 3 tokens"),
                                             ("video", "video(s) x 2 tokens")])
def test_a_count_mismatch_names_the_modality_and_the_sample(tok, modality, words):
    ids, counts = _batch(tok, ["<image> <audio> <video>", "<video> <audio> <image>"])
    media = _media(tok, counts, 4)
    m = media[modality]
    wrong = dict(media, **{modality: Media(m.token_id, m.tokens, torch.tensor([2, 0]))})  # sample b's item moved to a
    with pytest.raises(ValueError) as e: splice(torch.zeros(*ids.shape, 4), ids, wrong, ["a", "b"])
    L = TOKENS[modality]
    assert f"sample 'a' has {L} {modality} placeholder tokens but 2 {words} = {2 * L}" in str(e.value)
    assert f"sample 'b' has {L} {modality} placeholder tokens but 0 {words} = 0" in str(e.value)
    others = [o for o in TOKENS if o != modality]
    assert not any(f"{o} placeholder" in str(e.value) for o in others)  # only the wrong modality is named


def test_a_marker_without_its_placeholder_in_the_tokenizer_names_the_modality():
    plain = train_tokenizer(TEXTS, vocab_size=512)  # the default: images only, as every tiny tokenizer so far
    with pytest.raises(Exception, match="no audio placeholder"):
        encode_chat(plain, [{"role": "user", "content": MARKERS["audio"]}, {"role": "assistant", "content": "x"}],
                    {"audio": 3})


def test_tiny_encoders_real_forward():
    torch.manual_seed(0)
    cfg = override(tiny(), ["audio.seconds=0.5"])  # shapes follow the config
    a = cfg.audio
    enc = AudioEncoder(a)
    waves = torch.randn(3, 7000)  # shorter than the clip: padded
    feats = torch.stack([enc.preprocess(w) for w in waves])
    assert feats.shape == (3, n_frames(a), a.n_mels) == (3, 51, 32)
    tokens = enc(feats)
    assert tokens.shape == (3, 1 + 51 // a.patch, a.width) and not tokens.requires_grad
    out = build_audio_bridge(cfg)(tokens)
    assert out.shape == (3, a.tokens, cfg.llm.hidden) and out.requires_grad  # trainable
    frames = torch.randn(2, cfg.video.frames, 3, cfg.vision.image_size, cfg.vision.image_size)
    media = encode_frames(ImageEncoder(cfg.vision), frames)
    assert media.shape == (2, cfg.video.frames, cfg.vision.num_tokens, cfg.vision.width)
    assert build_video_bridge(cfg)(media).shape == (2, cfg.video.tokens, cfg.llm.hidden)


def test_full_size_shapes_on_the_meta_device():
    cfg = full()
    with torch.device("meta"):
        enc = AudioEncoder(cfg.audio, build_audio_tower(cfg.audio, weights=False), weights=False)  # nothing loaded
        tokens = enc(torch.empty(2, 1, n_frames(cfg.audio), cfg.audio.n_mels))
        assert tokens.shape == (2, 65, 768)
        assert build_audio_bridge(cfg)(tokens).shape == (2, 32, 4096)
        assert build_video_bridge(cfg)(torch.empty(2, 8, 257, 1024)).shape == (2, 32, 4096)


def test_a_modality_that_is_off_leaves_run_keys_alone(tmp_path):
    from anymal.demo import run_key
    (tmp_path / "world.json").write_text('{"images": 1}')
    c = stage_config(override(tiny(), [f"data.root={tmp_path}"]), 1)
    assert run_key(override(c, ["audio.tokens=7", "video.frames=2"])) == run_key(c)
    assert run_key(override(c, ["audio.enabled=true"])) != run_key(c) != run_key(override(c, ["video.enabled=true"]))


def test_info_full_shows_audio_and_video():
    r = subprocess.run([str(BIN / "anymal"), "info", "--preset", "full"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "[audio]\n  enabled = False\n  model = 'clap'" in r.stdout and "[video]\n  enabled = False" in r.stdout
    model = json.loads(r.stdout.split("[model]\n", 1)[1])  # off in full(): listed, marked, left out of the total
    assert not model["audio"]["enabled"] and not model["video_bridge"]["enabled"]
    assert model["total"]["trainable"]["stage1"] == model["bridge"]["params"]
    assert model["audio"]["output"] == ["N", 65, 768] and model["audio"]["path"] == "laion/clap-htsat-unfused"
    assert model["audio_bridge"]["output"] == ["N", 32, 4096]
    assert model["audio_bridge"]["params"] == 768 * 32 * 4096 + 32 * 4096
    assert model["video_bridge"]["output"] == ["N", 32, 4096] and model["video_bridge"]["frames"] == 8
    assert 20e6 < model["audio"]["params"] < 40e6 and 50e6 < model["video_bridge"]["params"] < 100e6


# ---- AnyMAL with audio and video: a tiny one, random weights, the tokenizer above

AV = ["audio.enabled=true", "video.enabled=true"]


def _anymal(tok, sets=(), stage=1, seed=0):
    from anymal.model import AnyMAL
    torch.manual_seed(seed)
    return AnyMAL.build(override(tiny(), list(sets)), tok, stage=stage)


@pytest.fixture(scope="module")
def av(tok):
    return _anymal(tok, AV)


def _per_item(m) -> dict:
    "Placeholder tokens per item of each modality the model reads."
    return {"image": m.num_tokens, "audio": m.audio_bridge.num_tokens, "video": m.video_bridge.num_tokens}


def _av_batch(tok, m, contents=("<image> <audio> <video> what is in the picture and what is that sound?",
                                "what is that sound?")):
    "Right-padded ids and labels of one turn each; an image, a one-second clip and a video per marker."
    encs = [encode_chat(tok, [{"role": "user", "content": c}, {"role": "assistant", "content": "a red circle"}],
                        _per_item(m)) for c in contents]
    T = max(len(e["input_ids"]) for e in encs)
    pad = lambda x, v: [x + [v] * (T - len(x))]
    ids = torch.cat([torch.tensor(pad(e["input_ids"], 0)) for e in encs])
    am = torch.cat([torch.tensor(pad([1] * len(e["input_ids"]), 0)) for e in encs])
    labels = torch.cat([torch.tensor(pad(e["labels"], -100)) for e in encs])
    n = {k: [e["n_media"][k] for e in encs] for k in ("image", "audio", "video")}
    g = torch.Generator().manual_seed(0)
    c, S = m.cfg, m.cfg.audio.sample_rate
    media = dict(pixels=torch.randn(sum(n["image"]), 3, 64, 64, generator=g), n_images=n["image"],
                 audio=torch.randn(sum(n["audio"]), S, generator=g), n_audio=n["audio"],
                 frames=torch.randn(sum(n["video"]), c.video.frames, 3, 64, 64, generator=g), n_video=n["video"])
    return dict(input_ids=ids, attention_mask=am, labels=labels, **media)


def test_anymal_builds_audio_and_video_parts_with_the_tokenizers_ids(tok, av):
    ids = modality_token_ids(tok)
    assert (av.image_token_id, av.audio_token_id, av.video_token_id) == (ids["image"], ids["audio"], ids["video"])
    assert av.modalities == ("image", "audio", "video")
    assert not any(p.requires_grad for p in av.audio_encoder.parameters())  # frozen
    assert all(p.requires_grad for b in ("bridge", "audio_bridge", "video_bridge") for p in getattr(av, b).parameters())
    img = _anymal(tok)  # audio and video off: none of their parts
    assert img.modalities == ("image",) and img.audio_bridge is img.video_bridge is img.audio_encoder is None
    plain = train_tokenizer(TEXTS, vocab_size=512)  # images only
    with pytest.raises(Exception, match="no audio placeholder"): _anymal(plain, AV)


def test_one_forward_with_an_image_a_clip_and_a_video_and_one_text_only_sample(tok, av):
    batch = _av_batch(tok, av)
    assert batch["n_audio"] == [1, 0] and batch["n_video"] == [1, 0] and batch["n_images"] == [1, 0]
    av.zero_grad()
    loss = av(**batch, sample_ids=["av", "text"]).loss
    loss.backward()
    assert torch.isfinite(loss)
    for b in ("bridge", "audio_bridge", "video_bridge"):  # the loss reaches every bridge
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(av, b).parameters()), b
    assert all(p.grad is None for e in (av.audio_encoder, av.encoder) for p in e.parameters())  # frozen


def test_a_text_only_batch_keeps_every_bridge_in_the_graph(tok, av):
    b = _av_batch(tok, av, ["no media here", "what is that sound?"])
    av.zero_grad()
    av(b["input_ids"], b["attention_mask"], b["labels"]).loss.backward()
    for name in ("bridge", "audio_bridge", "video_bridge"):  # a gradient of exactly zero (DDP waits for each)
        assert all(p.grad is not None and not p.grad.any() for p in getattr(av, name).parameters()), name


def test_trainable_keys_image_only_unchanged_and_audio_video_under_their_prefixes(tok, av):
    img = _anymal(tok)
    keys = list(img.trainable_state_dict())
    assert keys and all(k.startswith("bridge.") for k in keys)
    assert keys == [n for n, p in img.named_parameters() if p.requires_grad]  # what an image-only build trains
    assert not any(k.split(".")[0] in ("audio_encoder", "audio_bridge", "video_bridge") for k in img.state_dict())
    avk = list(av.trainable_state_dict())
    assert [k for k in avk if k.startswith("bridge.")] == keys  # the image bridge's keys, as before
    rest = [k for k in avk if not k.startswith("bridge.")]
    assert {k.split(".")[0] for k in rest} == {"audio_bridge", "video_bridge"}
    assert rest == [f"audio_bridge.{n}" for n, _ in av.audio_bridge.named_parameters()] + \
        [f"video_bridge.{n}" for n, _ in av.video_bridge.named_parameters()]
    s2 = _anymal(tok, AV, stage=2).trainable_state_dict()
    assert {k.split(".")[0] for k in s2 if "lora_" not in k} == {"bridge", "audio_bridge", "video_bridge"}


def test_save_and_load_the_bridges(tok, av, tmp_path):
    a = _anymal(tok, AV, seed=1)
    with torch.no_grad():
        for p in a.parameters():
            if p.requires_grad: p.add_(torch.randn_like(p) * 0.1)  # "trained"
    torch.save(a.trainable_state_dict(), tmp_path / "trained.pt")
    b = _anymal(tok, AV, seed=1)
    sd = torch.load(tmp_path / "trained.pt")
    b.load_trainable_state_dict(sd)
    assert all(torch.equal(v, b.trainable_state_dict()[k]) for k, v in sd.items())
    batch = _av_batch(tok, a)
    a.eval()
    b.eval()
    with torch.no_grad(): assert torch.equal(a(**batch).loss, b(**batch).loss)
    img = _anymal(tok)
    with pytest.raises(KeyError, match="missing from the state dict: \\['audio_bridge"):  # an image-only file
        b.load_trainable_state_dict(img.trainable_state_dict())
    with pytest.raises(KeyError, match="not trainable parts of this model: \\['audio_bridge"):
        img.load_trainable_state_dict(sd)


@pytest.mark.parametrize("modality, n", [("audio", "n_audio"), ("video", "n_video"), ("image", "n_images")])
def test_a_count_mismatch_in_anymal_names_the_modality(tok, av, modality, n):
    batch = _av_batch(tok, av)
    batch[n] = [0, 1]  # sample 0's item given to sample 1
    with pytest.raises(ValueError, match=f"sample 'av' has [0-9]+ {modality} placeholder tokens but 0 ") as e:
        av(**batch, sample_ids=["av", "text"])
    assert len(str(e.value).splitlines()) == 1


def test_a_model_without_audio_refuses_audio(tok):
    img = _anymal(tok)
    ids = torch.tensor([[300, 301, 302]])  # text ids
    with pytest.raises(ValueError, match="no audio bridge"): img(ids, audio=torch.randn(1, 16000), n_audio=[1])
    with pytest.raises(ValueError, match="no video bridge"): img(ids, n_video=[1])
    img.eval()
    assert img(ids, n_audio=[0], n_video=[0]).logits.shape == (1, 3, 512)  # zero counts: fine


def test_generation_with_an_audio_clip(tok, av):
    enc = encode_chat(tok, [{"role": "user", "content": "<audio> what is that sound?"}], _per_item(av),
                      add_generation_prompt=True)
    assert enc["n_media"]["audio"] == 1
    prompt = torch.tensor([enc["input_ids"]])
    clip = torch.randn(1, av.cfg.audio.sample_rate)
    out = av.generate(prompt, audio=clip, n_audio=[1], max_new_tokens=4)
    again = av.generate(prompt, audio=clip, n_audio=[1], max_new_tokens=4, use_cache=False)
    assert out == again and len(out) == 1 and len(out[0]) <= 4
    steps = list(av.stream(prompt, audio=[clip[0]], n_audio=[1], max_new_tokens=4))  # a list of waveforms
    assert [int(s[0]) for s in steps][:len(out[0])] == out[0]
