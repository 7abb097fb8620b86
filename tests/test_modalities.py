"""Any modality: one splice for images, audio and video (markers mixed in one sample), the audio encoder and bridge,
the video bridge, at tiny size (real forward on the CPU) and full size (meta device), and `anymal info`'s rows."""
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
    assert "[audio]\n  enabled = True\n  model = 'clap'" in r.stdout and "[video]\n  enabled = True" in r.stdout
    model = json.loads(r.stdout.split("[model]\n", 1)[1])
    assert model["audio"]["output"] == ["N", 65, 768] and model["audio"]["path"] == "laion/clap-htsat-unfused"
    assert model["audio_bridge"]["output"] == ["N", 32, 4096]
    assert model["audio_bridge"]["params"] == 768 * 32 * 4096 + 32 * 4096
    assert model["video_bridge"]["output"] == ["N", 32, 4096] and model["video_bridge"]["frames"] == 8
    assert 20e6 < model["audio"]["params"] < 40e6 and 50e6 < model["video_bridge"]["params"] < 100e6
