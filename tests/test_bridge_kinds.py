"""The three bridge kinds (`resampler.kind`): LLaVA-1.5's per-patch MLP beside the Perceiver Resampler and pooling +
linear: its shapes at tiny and full size, its one-hot attention, the latents it requires, and an AnyMAL that trains
through it. Random weights only; nothing is downloaded."""
import json
import pytest
import torch
import torch.nn.functional as F
from anymal.config import RULES, ConfigError, check_config, from_dict, full, override, tiny, to_dict
from anymal.cli import info_main
from anymal.model import AnyMAL, describe
from anymal.resampler import bridge_text, build_bridge

MLP = ["resampler.kind=mlp", "resampler.latents=256"]  # 256 patches at both scales: 64 px / 4, 224 px / 14
IMG, PAD, EOS = 5, 0, 2


def _params(m) -> int: return sum(p.numel() for p in m.parameters())


def test_mlp_bridge_tiny_shapes_and_one_hot_attention():
    cfg = override(tiny(), MLP)
    torch.manual_seed(0)
    b = build_bridge(cfg)
    media = torch.randn(2, 1 + 256, cfg.vision.width)
    out, attn = b(media, return_attn=True)
    assert b.num_tokens == 256 and out.shape == (2, 256, cfg.llm.hidden)
    assert attn.shape == (2, 1, 1, 256, 257)  # (N, layers, heads, L, 1+P), as the other kinds
    assert torch.equal(attn[0, 0, 0], F.pad(torch.eye(256), (1, 0)))  # token i looks at patch i; CLS column zero
    assert torch.equal(out, b(media))  # the maps do not change the output
    # token i is the MLP of patch i alone: changing one patch changes exactly its own token
    m2 = media.clone()
    m2[:, 1 + 7] += 1.0
    changed = (b(m2) - out).abs().amax(dim=(0, 2)) > 0
    assert changed.nonzero().flatten().tolist() == [7]
    # Linear -> GELU -> Linear, no norm (LLaVA-1.5's mlp2x_gelu)
    assert [type(m).__name__ for m in b.proj] == ["Linear", "GELU", "Linear"]
    assert _params(b) == 2 * (128 * 128 + 128)
    with pytest.raises(ValueError, match="built for 256 patches"):
        b(torch.randn(1, 1 + 64, cfg.vision.width))


def test_mlp_bridge_full_size_on_meta():
    with torch.device("meta"):
        b = build_bridge(override(full(), MLP))
        out, attn = b(torch.empty(2, 257, 1024), return_attn=True)
    assert out.shape == (2, 256, 4096) and attn.shape == (2, 1, 1, 256, 257)
    assert _params(b) == 1024 * 4096 + 4096 + 4096 * 4096 + 4096  # 21.0M


def test_three_kinds_side_by_side():
    sets = {"perceiver": [], "linear": ["resampler.kind=linear"], "mlp": MLP}
    assert set(RULES["resampler.kind"].choices) == set(sets)  # every kind the config allows is built here
    with torch.device("meta"):
        bridges = {k: build_bridge(override(full(), s)) for k, s in sets.items()}
        for b in bridges.values():
            out, attn = b(torch.empty(1, 257, 1024), return_attn=True)
            assert out.shape == (1, b.num_tokens, 4096) and attn.shape[3:] == (b.num_tokens, 257)
    n = {k: _params(b) for k, b in bridges.items()}
    assert n["linear"] < n["mlp"] < n["perceiver"]
    assert {k: b.num_tokens for k, b in bridges.items()} == {"perceiver": 64, "linear": 64, "mlp": 256}


def test_latents_must_be_the_patch_count():
    c = tiny()
    c.resampler.kind = "mlp"  # set directly: no override checked it, so the config check and the bridge do
    for make in (lambda: override(tiny(), ["resampler.kind=mlp"]), lambda: from_dict(to_dict(c)),
                 lambda: check_config(c), lambda: build_bridge(c)):
        with pytest.raises(ConfigError, match=r"^resampler\.latents=16: resampler\.kind='mlp' passes one token") as e:
            make()
        assert str(e.value).endswith("set resampler.latents=256") and "\n" not in str(e.value)
    c.vision.patch_size = 8  # 8x8 patches: the number follows the vision config
    with pytest.raises(ConfigError, match="set resampler.latents=64$"):
        build_bridge(c)
    with pytest.raises(ConfigError, match="resampler.latents=64: .*set resampler.latents=256"):
        override(full(), ["resampler.kind=mlp"])  # full: ViT-L/14 at 224 px
    assert override(tiny(), ["resampler.latents=3"]).resampler.latents == 3  # the other kinds take any number


def test_describe_reports_the_mlp_bridge(capsys):
    d = describe(override(tiny(), MLP))
    assert d["bridge"]["kind"] == "mlp" and d["bridge"]["output"] == ["N", 256, 128]
    assert d["bridge"]["params"] == 2 * (128 * 128 + 128) == d["total"]["trainable"]["stage1"]
    assert info_main(["--set", "resampler.kind=mlp", "--set", "resampler.latents=256", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["bridge"] == d["bridge"]  # `anymal info` says the same


def test_anymal_with_mlp_bridge_trains():
    cfg = override(tiny(), MLP + ["llm.max_positions=1024"])  # 256 image tokens: more than the tiny preset's room
    torch.manual_seed(0)
    m = AnyMAL.build(cfg, stage=1, image_token_id=IMG, pad_id=PAD, eos_id=EOS)
    assert m.num_tokens == 256
    g = torch.Generator().manual_seed(0)
    samples = [[1] + [IMG] * (n * 256) + torch.randint(10, 500, (6,), generator=g).tolist() for n in (1, 2)]
    T = max(map(len, samples))
    ids = torch.tensor([s + [PAD] * (T - len(s)) for s in samples])
    am = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in samples])
    labels = torch.full_like(ids, -100)
    for b, s in enumerate(samples): labels[b, len(s) - 4:len(s)] = ids[b, len(s) - 4:len(s)]
    pix = torch.randn(3, 3, 64, 64, generator=g)
    m.train()
    loss = m(ids, am, labels, pixels=pix, n_images=[1, 2]).loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad for n, p in m.bridge.named_parameters()}
    assert grads and all(gr is not None and gr.abs().sum() > 0 for gr in grads.values()), grads.keys()
    assert all(p.grad is None for n, p in m.named_parameters() if not n.startswith("bridge."))  # stage 1: bridge only


def test_bridge_text_names_each_kind():
    assert bridge_text(override(full(), MLP)) == ("every patch (256 tokens) through LLaVA-1.5's MLP: Linear 1024 -> 4096, "
                                                  "GELU, Linear 4096 -> 4096")
    assert bridge_text(full()).startswith("a Perceiver Resampler (6 layers, 64 latents) + LayerNorm + Linear 1024 -> 4096")
    assert "average-pooled to 16 tokens" in bridge_text(override(tiny(), ["resampler.kind=linear"]))
