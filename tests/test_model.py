"""Model checks that cross modules or are too slow for a lesson: QLoRA AnyMAL end to end, random NF4, gradient
checkpointing equivalence, checkpoint round trip through a file, `describe` as JSON."""
import json
import pytest
import torch
from anymal.config import tiny, full, override
from anymal.llm import load_llm
from anymal.model import AnyMAL, describe, position_ids

IMG, PAD, EOS = 5, 0, 2

def _batch(L: int, n_images=(1, 2, 3), seed: int = 0):
    "Right-padded ids with `n * L` placeholders per sample, labels on each sample's last 4 tokens, random pixels."
    g = torch.Generator().manual_seed(seed)
    samples = [[1] + [IMG] * (n * L) + torch.randint(10, 500, (4 + n,), generator=g).tolist() for n in n_images]
    T = max(map(len, samples))
    ids = torch.tensor([s + [PAD] * (T - len(s)) for s in samples])
    am = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in samples])
    labels = torch.full_like(ids, -100)
    for b, s in enumerate(samples): labels[b, len(s) - 4:len(s)] = ids[b, len(s) - 4:len(s)]
    return ids, am, labels, torch.randn(sum(n_images), 3, 64, 64, generator=g), None, list(n_images)

def _build(cfg, stage, seed=0):
    torch.manual_seed(seed)
    return AnyMAL.build(cfg, stage=stage, image_token_id=IMG, pad_id=PAD, eos_id=EOS)

def _step_changes(m, batch):
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)  # every parameter offered to the optimizer
    m.train(); m(*batch).loss.backward(); opt.step()
    return {k for k, v in m.state_dict().items() if not torch.equal(v, before[k])}, before

@pytest.fixture(scope="module")
def tiny_llm_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny-llama")
    load_llm(tiny().llm).save_pretrained(d)
    return str(d)

def _nf4(path: str = ""):
    cfg = tiny()
    cfg.llm.path, cfg.llm.quant, cfg.llm.dtype = path, "nf4", "bfloat16"
    return cfg

def test_qlora_stage2_trains_only_bridge_and_lora(tiny_llm_dir):
    m = _build(_nf4(tiny_llm_dir), stage=2)
    assert type(m.decoder.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    batch = _batch(m.num_tokens)
    changed, before = _step_changes(m, batch)
    assert changed == {k for k in before if k.startswith("bridge.") or "lora_" in k}
    assert any("lora_" in k for k in changed) and any(k.startswith("bridge.") for k in changed)

def test_qlora_loss_matches_builtin_and_generates(tiny_llm_dir):
    m = _build(_nf4(tiny_llm_dir), stage=2).eval()
    ids, am, labels, pix, _, n = _batch(m.num_tokens)
    with torch.no_grad():
        emb = m.embed(ids, pixels=pix, n_images=n)
        assert emb.dtype == torch.bfloat16  # latents are cast to the LLM's dtype when spliced
        ref = m.llm(inputs_embeds=emb, attention_mask=am, position_ids=position_ids(am), labels=labels).loss
        assert torch.allclose(m(ids, am, labels, pixels=pix, n_images=n).loss, ref.float(), atol=1e-2)
    n0 = int(am[0].sum()) - 4  # sample 0 without its answer, left-padded by 3
    prompt = torch.cat([torch.full((1, 3), PAD), ids[:1, :n0]], 1)
    pam = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, n0, dtype=torch.long)], 1)
    out = m.generate(prompt, pam, pixels=pix[:1], n_images=[1], max_new_tokens=4)
    assert len(out) == 1 and len(out[0]) <= 4 and all(0 <= t < 512 for t in out[0])

def test_random_nf4_without_checkpoint():
    m = _build(_nf4(""), stage=2)
    assert type(m.decoder.layers[-1].mlp.down_proj.base_layer).__name__ == "Linear4bit"
    loss = m(*_batch(m.num_tokens)).loss
    assert torch.isfinite(loss)

def test_grad_ckpt_same_loss_and_grads():
    cfg_ck = tiny(); cfg_ck.llm.grad_ckpt = True
    a, b = _build(tiny(), stage=2), _build(cfg_ck, stage=2)
    b.load_state_dict(a.state_dict())
    batch = _batch(a.num_tokens)
    for m in (a, b): m.train(); m(*batch).loss.backward()
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and (pa.grad is None) == (pb.grad is None)
        if pa.grad is not None: assert torch.allclose(pa.grad, pb.grad, atol=1e-6), na

def test_trainable_state_dict_file_round_trip(tmp_path):
    a = _build(tiny(), stage=2)
    _step_changes(a, _batch(a.num_tokens))
    torch.save(a.trainable_state_dict(), tmp_path / "trained.pt")
    b = _build(tiny(), stage=2)  # same seed: same frozen parts
    b.load_trainable_state_dict(torch.load(tmp_path / "trained.pt"))
    batch = _batch(a.num_tokens, seed=1)
    a.eval(); b.eval()
    with torch.no_grad(): assert torch.equal(a(*batch).loss, b(*batch).loss)

def test_describe_full_json():
    d = json.loads(json.dumps(describe(full())))
    assert abs(d["vision"]["params"] - 304e6) < 1e6 and d["vision"]["output"] == ["N", 257, 1024]
    assert abs(d["llm"]["params"] - 8.03e9) < 1e7
    assert d["bridge"]["params"] < 100e6 and d["bridge"]["output"] == ["N", 64, 4096]
    assert d["total"]["trainable"] == {"stage1": d["bridge"]["params"], "stage2": d["bridge"]["params"] + d["lora"]["params"]}
    assert d["total"]["params"] == sum(d[k]["params"] for k in d if k not in ("preset", "total"))
    on = describe(override(full(), ["audio.enabled=true", "video.enabled=true"]))  # what build would build: every bridge
    bridges = sum(on[k]["params"] for k in ("bridge", "audio_bridge", "video_bridge"))
    assert on["total"]["trainable"] == {"stage1": bridges, "stage2": bridges + on["lora"]["params"]}

def test_with_tiny_tokenizer_end_to_end(tmp_path):
    "The data side's tokenizer and chat encoding feed AnyMAL: ids and end ids come from the tokenizer."
    from anymal.tokenizer import train_tokenizer, encode_chat, IMAGE_TOKEN, PAD_TOKEN, EOT, END
    texts = ["a red circle left of a blue square", "two green triangles", "what colour is the circle? red"] * 20
    tok = train_tokenizer(texts, vocab_size=512)
    torch.manual_seed(0)
    m = AnyMAL.build(tiny(), tok, stage=2)
    assert m.image_token_id == tok.convert_tokens_to_ids(IMAGE_TOKEN) and m.pad_id == tok.convert_tokens_to_ids(PAD_TOKEN)
    assert m.eos_ids[0] == tok.convert_tokens_to_ids(EOT) and tok.convert_tokens_to_ids(END) in m.eos_ids
    msgs = [{"role": "user", "content": "<image>\n<image>\nwhat colour is the circle?"}, {"role": "assistant", "content": "red"}]
    enc = encode_chat(tok, msgs, m.num_tokens)
    assert enc["n_images"] == 2
    ids, labels = torch.tensor([enc["input_ids"]]), torch.tensor([enc["labels"]])
    pix = torch.randn(2, 3, 64, 64)
    out = m(ids, torch.ones_like(ids), labels, pixels=pix, n_images=[2], sample_ids=["q1"])
    assert torch.isfinite(out.loss) and out.n_targets == sum(l != -100 for l in enc["labels"]) - (enc["labels"][0] != -100)
    prompt = encode_chat(tok, msgs[:1], m.num_tokens, add_generation_prompt=True)["input_ids"]
    gen = m.generate(torch.tensor([prompt]), pixels=pix, n_images=[2], max_new_tokens=5)
    assert len(gen[0]) <= 5 and not set(gen[0]) & set(m.eos_ids)


# ---- packed rows (anymal.data.pack + AnyMAL.forward(position_ids)) equal padded batches ----

def _samples(L: int, seed: int = 0):
    "Samples of varied length with 0, 1 or 2 images and two supervised spans each, in the data pipeline's format."
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (n_img, n_text) in enumerate([(1, 30), (0, 12), (2, 7), (1, 45), (0, 3), (2, 20)]):
        ids = [1] + [IMG] * (n_img * L) + torch.randint(10, 500, (n_text + 8,), generator=g).tolist()
        labels = [-100] * len(ids)
        for a, b in ((len(ids) - 8, len(ids) - 5), (len(ids) - 3, len(ids))): labels[a:b] = ids[a:b]  # two answers
        out.append(dict(input_ids=torch.tensor(ids), labels=torch.tensor(labels), n_images=n_img, image_keys=[],
                        sample_id=f"s{i}", pixels=torch.randn(n_img, 3, 64, 64, generator=g) if n_img else None))
    return out

KEYS = ("input_ids", "attention_mask", "labels", "pixels", "n_images", "position_ids", "sample_ids")

def _loss_grads(m, batch):
    m.zero_grad()
    loss = m(**{k: batch[k] for k in KEYS if k in batch}).loss  # the trainer's loss: the mean over supervised tokens
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

@pytest.mark.parametrize("attn", ["eager", "sdpa", "varlen"])
def test_packed_equals_padded_loss_and_grads(attn):
    "fp32, stage 2: the packed batch's loss and the gradients of the resampler and LoRA equal the padded batch's."
    from anymal.data import collate, pack
    from anymal.config import override
    m = _build(override(tiny(), [f"llm.attn={attn}", "llm.dtype=float32", "lora.dropout=0.0"]), stage=2).train()
    with torch.no_grad():  # LoRA's B starts at zero; give it values so that A's gradients are not zero too
        for n, p in m.named_parameters():
            if "lora_B" in n: p.normal_(0, 0.02)
    samples = _samples(m.num_tokens)
    padded, packed = collate(samples, PAD), pack(samples, PAD, capacity=100)
    assert packed["input_ids"].shape[0] < len(samples) and packed["input_ids"].numel() < padded["input_ids"].numel()
    assert packed["input_ids"].shape[1] <= 100 and (packed["position_ids"] == 0).sum() > packed["input_ids"].shape[0]
    (l_pad, g_pad), (l_pack, g_pack) = _loss_grads(m, padded), _loss_grads(m, packed)
    assert torch.allclose(l_pack, l_pad, rtol=1e-6, atol=1e-6), (l_pack, l_pad)
    assert {n for n in g_pad if "lora_" in n} and {n for n in g_pad if n.startswith("bridge.")}
    for n in g_pad:
        err = (g_pack[n] - g_pad[n]).norm() / g_pad[n].norm().clamp_min(1e-12)
        assert g_pad[n].norm() > 0 and err < 1e-4, (n, err.item())

def test_packed_rows_without_positions_leak_across_samples():
    "The same rows without `position_ids` are one sequence per row: samples see each other and the loss moves."
    from anymal.data import collate, pack
    m = _build(tiny(), stage=1)
    samples = _samples(m.num_tokens)
    packed = pack(samples, PAD, capacity=100)
    with torch.no_grad():
        good = m(**{k: packed[k] for k in KEYS}).loss
        leak = m(**{k: packed[k] for k in KEYS if k != "position_ids"}).loss
        pad = m(**{k: v for k, v in collate(samples, PAD).items() if k in KEYS}).loss
    assert torch.allclose(good, pad, atol=1e-5) and not torch.allclose(leak, pad, atol=1e-3)

def test_eager_adds_its_mask_so_packed_rows_get_an_additive_one():
    "Why eager gets a float mask and SDPA a boolean one: eager adds the mask, so a boolean one (0/1) hides nothing."
    from anymal.model import block_causal_mask, packed_attention, segment_ids
    from anymal.config import override
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])
    x = torch.randn(1, 10, tiny().llm.hidden)
    out = {}
    for attn in ("eager", "sdpa"):
        m = _build(override(tiny(), [f"llm.attn={attn}"]), stage=1).eval()
        with torch.no_grad():
            for name, mask in (("bool", block_causal_mask(segment_ids(pos), additive=False)),
                               ("float", block_causal_mask(segment_ids(pos))),
                               ("chosen", packed_attention(attn, pos)["attention_mask"])):
                out[attn, name] = m.decoder(inputs_embeds=x, attention_mask=mask, position_ids=pos).last_hidden_state
    assert torch.allclose(out["eager", "float"], out["sdpa", "float"], atol=1e-5)
    assert torch.allclose(out["sdpa", "bool"], out["sdpa", "float"], atol=1e-5)
    assert not torch.allclose(out["eager", "bool"], out["eager", "float"], atol=1e-3)  # added as 0/1: a leak
    assert torch.allclose(out["eager", "chosen"], out["eager", "float"]) and torch.allclose(out["sdpa", "chosen"], out["sdpa", "bool"])


def _ddp_text_only_worker(rank: int, out: str):
    "One of two gloo processes: stage-2 AnyMAL under DDP (as the trainer wraps it); rank 1's second batch has no image."
    import os
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["ANYMAL_TEST_PORT"])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    m = _build(tiny(), stage=2)
    ddp = DDP(m, broadcast_buffers=False, find_unused_parameters=False)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    for step in range(3):
        text_only = rank == 1 and step == 1
        ids, am, labels, pix, _, n = _batch(m.num_tokens, n_images=(0, 0) if text_only else (1, 2), seed=step)
        ddp(ids, am, labels, pixels=None if text_only else pix, n_images=n).loss.backward()
        opt.step()
        opt.zero_grad()
    torch.save(m.trainable_state_dict(), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_trains_through_a_batch_without_images(tmp_path, monkeypatch):
    """A rank whose batch is all text (LLaVA-1.5's ShareGPT records) still gives every trainable parameter a gradient:
    without it DDP's reducer fails the next step ("Expected to have finished reduction ...") and the other rank hangs."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("ANYMAL_TEST_PORT", str(s.getsockname()[1]))
    mp.start_processes(_ddp_text_only_worker, args=(str(tmp_path),), nprocs=2, start_method="fork")  # no re-imports
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert a.keys() == b.keys() and any(k.startswith("bridge.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the ranks stayed in step
