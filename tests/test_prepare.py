"""Full-scale data preparation (anymal.prepare) against small local fakes of the public sources: no network."""
import hashlib, io, json, tarfile
from pathlib import Path

import pytest

from anymal import prepare as P
from anymal.cli import main as cli_main
from parts import LLAMA3_REPO as REPO, fake_sources, hub_cache_snapshot, jpeg, llama3_folder


@pytest.fixture
def sources(tmp_path):
    "Fake copies of every public source, as file:// URLs; returns (urls, dir)."
    urls = fake_sources(tmp_path / "src")
    assert set(urls) == set(P.SOURCES)
    return urls, tmp_path / "src"


def url_args(urls): return [f"--url={k}={v}" for k, v in urls.items()]


def sha(p): return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def run_all(root, urls, *extra):
    return cli_main(["prepare", "all", "--root", str(root), "--val", "2", "--shard-size", "10", *url_args(urls), *extra])


def test_layout_counts_and_manifest(tmp_path, sources, capsys):
    urls, _ = sources
    root = tmp_path / "data"
    assert run_all(root, urls) == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [l["dataset"] for l in lines] == ["llava", "captions", "vqav2", "coco"]
    # LLaVA: 8 good records, 3 bad ones skipped with their reasons; 2 held out; the images they need extracted
    man = json.loads((root / "manifests/llava.json").read_text())
    assert (man["counts"]["train"], man["counts"]["val"], man["counts"]["skipped"]) == (6, 2, 3)
    reasons = {s["id"]: s["reason"] for s in man["skipped"]}
    assert reasons == {"no-image": "image 000000000099.jpg not in train2017.zip", "no-answer": "no assistant turn",
                       "two-markers": "2 <image> markers for one image"}
    train = json.loads((root / "llava/llava_instruct_train.json").read_text())
    val = json.loads((root / "llava/llava_instruct_val.json").read_text())
    assert len(train) == 6 and len(val) == 2 and not {r["id"] for r in train} & {r["id"] for r in val}
    assert all((root / "images" / r["image"]).read_bytes() == jpeg(int(r["image"][:12])) for r in train + val)
    assert sorted(p.name for p in (root / "images").iterdir()) == [f"{i:012d}.jpg" for i in range(1, 9)]
    for rel, rec in man["files"].items():
        assert rec == {"size": (root / rel).stat().st_size, "sha256": sha(root / rel)}, rel
    # captions: webdataset shards in img2dataset's layout
    man = json.loads((root / "manifests/captions.json").read_text())
    assert (man["counts"]["train"], man["counts"]["val"], man["counts"]["skipped"]) == (23, 2, 3)
    assert {s["reason"] for s in man["skipped"]} == {"no caption", "image is not a JPEG", "image 00000/lost.jpg not in the zip"}
    shards = sorted((root / "captions").glob("train-*.tar"))
    assert [s.name for s in shards] == ["train-00000.tar", "train-00001.tar", "train-00002.tar"]  # 23 samples, 10 per shard
    with tarfile.open(shards[0]) as tf:
        names = tf.getnames()
        key = names[0].split(".")[0]
        assert names[:3] == [f"{key}.jpg", f"{key}.txt", f"{key}.json"] and key == "000000000"
        meta = json.loads(tf.extractfile(f"{key}.json").read())
        assert tf.extractfile(f"{key}.txt").read().decode() == meta["caption"] == f"caption {int(meta['id'])}"
        assert tf.extractfile(f"{key}.jpg").read() == jpeg(int(meta["id"]))
    # VQAv2: the official names and structure; questions of the image missing from the zip skipped
    man = json.loads((root / "manifests/vqav2.json").read_text())
    qs = json.loads((root / "vqa/v2_OpenEnded_mscoco_val2014_questions.json").read_text())
    assert qs["data_subtype"] == "val2014" and len(qs["questions"]) == 6 and man["counts"]["skipped"] == 2
    assert sorted(p.name for p in (root / "coco/val2014").iterdir()) == [f"COCO_val2014_{i:012d}.jpg" for i in (1, 2, 3)]
    caps = json.loads((root / "coco/captions_val2017.json").read_text())
    assert len(caps["images"]) == 4 and all((root / "coco/val2017" / im["file_name"]).exists() for im in caps["images"])


def test_second_run_fetches_and_rewrites_nothing(tmp_path, sources):
    urls, _ = sources
    root = tmp_path / "data"
    calls = []
    def fetch(url, dest): calls.append(url); return P.http_fetch(url, dest)
    for ds in P.PREPARERS: P.prepare(ds, root, urls=urls, fetch=fetch, **({"shard_size": 10} if ds == "captions" else {}))
    assert len(calls) == len(P.SOURCES)
    outputs = [p for p in root.rglob("*") if p.is_file() and "manifests" not in p.parts]
    before = {p: (p.stat().st_mtime_ns, sha(p)) for p in outputs}
    m1 = {ds: json.loads((root / f"manifests/{ds}.json").read_text()) for ds in P.PREPARERS}
    calls.clear()
    for ds in P.PREPARERS: P.prepare(ds, root, urls=urls, fetch=fetch, **({"shard_size": 10} if ds == "captions" else {}))
    assert calls == []
    untouched = [p for p in outputs if p.suffix == ".tar" or "images" in p.parts or "downloads" in p.parts or "val2014" in p.parts]
    assert len(untouched) > 20 and all(p.stat().st_mtime_ns == before[p][0] for p in untouched)
    assert all(sha(p) == before[p][1] for p in outputs)  # and the rest is byte-identical
    m2 = {ds: json.loads((root / f"manifests/{ds}.json").read_text()) for ds in P.PREPARERS}
    assert m1 == m2  # the same counts, files and skipped records


def test_damaged_outputs_are_rebuilt(tmp_path, sources):
    urls, _ = sources
    root = tmp_path / "data"
    P.prepare_captions(root, urls, shard_size=10, val=2)
    shard, other = root / "captions/train-00001.tar", root / "captions/train-00000.tar"
    good, t_other = shard.read_bytes(), other.stat().st_mtime_ns
    shard.write_bytes(good[:100])  # truncated: the size check catches it
    P.prepare_captions(root, urls, shard_size=10, val=2)
    assert shard.read_bytes() == good and other.stat().st_mtime_ns == t_other
    bad = bytearray(good); bad[600] ^= 1; shard.write_bytes(bytes(bad))  # same size: only --verify catches it
    P.prepare_captions(root, urls, shard_size=10, val=2)
    assert shard.read_bytes() == bytes(bad)
    P.prepare_captions(root, urls, shard_size=10, val=2, verify=True)
    assert shard.read_bytes() == good


def test_changed_options_rebuild_outputs_but_keep_downloads(tmp_path, sources):
    urls, _ = sources
    root = tmp_path / "data"
    calls = []
    def fetch(url, dest): calls.append(url); return P.http_fetch(url, dest)
    P.prepare_llava(root, urls, fetch, val=2)
    man = P.prepare_llava(root, urls, fetch, val=3, limit=9)
    assert len(calls) == 2 and (man["counts"]["train"], man["counts"]["val"]) == (5, 3)


def test_interrupted_download_resumes(tmp_path, sources):
    urls, src = sources
    root = tmp_path / "data"
    def dying_fetch(url, dest):  # writes half of the file to .part, then the connection drops
        data = Path(url[len("file://"):]).read_bytes()
        Path(str(dest) + ".part").parent.mkdir(parents=True, exist_ok=True)
        Path(str(dest) + ".part").write_bytes(data[: len(data) // 2])
        raise ConnectionResetError("connection reset")
    with pytest.raises(ConnectionResetError): P.prepare_llava(root, urls, dying_fetch)
    assert not (root / "downloads/llava_instruct_150k.json").exists()  # never a half file under the final name
    man = P.prepare_llava(root, urls, val=2)
    assert man["counts"]["train"] == 6 and not list((root / "downloads").glob("*.part"))
    assert sha(root / "downloads/llava_instruct_150k.json") == sha(src / "llava_instruct_150k.json")


class FakeResponse(io.BytesIO):
    def __init__(self, data, status, length):
        super().__init__(data); self.status, self.headers = status, {"Content-Length": str(length)}
    def __enter__(self): return self
    def __exit__(self, *a): self.close()


def test_http_fetch_continues_with_a_range_request(tmp_path, monkeypatch):
    data = bytes(range(256)) * 40
    dest = tmp_path / "f.bin"; Path(str(dest) + ".part").write_bytes(data[:1000])
    seen = []
    def urlopen(req, timeout=None):
        seen.append(req.get_header("Range"))
        start = int(req.get_header("Range")[6:-1])
        return FakeResponse(data[start:], 206, len(data) - start)
    monkeypatch.setattr(P.urllib.request, "urlopen", urlopen)
    P.http_fetch("https://example.org/f.bin", dest)
    assert seen == ["bytes=1000-"] and dest.read_bytes() == data
    # a short body is an error that leaves the .part for the next attempt
    monkeypatch.setattr(P.urllib.request, "urlopen", lambda req, timeout=None: FakeResponse(data[:50], 200, len(data)))
    with pytest.raises(IOError, match="run the same command again"): P.http_fetch("https://example.org/g.bin", tmp_path / "g.bin")
    assert (tmp_path / "g.bin.part").stat().st_size == 50 and not (tmp_path / "g.bin").exists()


def test_bad_arguments_are_clear(tmp_path, capsys):
    with pytest.raises(SystemExit): P.prepare_main(["llava", "--root", str(tmp_path), "--url", "nope=file:///x"])
    assert "--url needs NAME=URL" in capsys.readouterr().err
    with pytest.raises(ValueError, match="shard_size"): P.prepare_captions(tmp_path, shard_size=20000)


# ---- real weights: the full preset through the real loading code, on a fake hub cache of the real layout ----

CLIP_REPO = "timm/vit_large_patch14_clip_224.openai"


@pytest.fixture
def fake_hub(tmp_path):
    "A stand-in for the hub: snapshot_download and open_clip's download write the real cache layout from local files."
    from anymal.config import LLMConfig
    shape = LLMConfig(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab_size=300)
    src = llama3_folder(tmp_path / "llama", shape, ["What is it? A square."] * 20)  # files and tokens as Meta's
    names = sorted(p.name for p in src.iterdir())
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"} <= set(names)
    assert sum(n.startswith("model-") and n.endswith(".safetensors") for n in names) >= 2
    clip = tmp_path / "clip"; clip.mkdir(); (clip / "open_clip_model.safetensors").write_bytes(b"weights")
    calls = []
    def snapshot(repo, allow_patterns=None, cache_dir=None, token=None):
        calls.append(("llm", repo, token)); return hub_cache_snapshot(src, repo, Path(cache_dir))
    def clip_download(tag, cache_dir=None):
        repo = tag["hf_hub"].rstrip("/"); calls.append(("clip", repo, None))
        return hub_cache_snapshot(clip, repo, Path(cache_dir)) / "open_clip_model.safetensors"
    return snapshot, clip_download, calls


def test_full_preset_loads_prepared_weights_through_the_real_code(tmp_path, fake_hub, monkeypatch):
    from anymal.config import full
    from anymal.llm import build_llm
    from anymal.tokenizer import load_tokenizer
    snapshot, clip_download, calls = fake_hub
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    cfg = full()
    assert (cfg.llm.path, cfg.llm.quant, cfg.vision.pretrained) == (REPO, "nf4", "openai")
    out = P.prepare_weights(cfg, str(cache), snapshot, clip_download)
    assert calls == [("llm", REPO, "hf_test"), ("clip", CLIP_REPO, None)]
    assert Path(out["llm"]).parent.name == "snapshots" and out["clip"].endswith("open_clip_model.safetensors")
    llm = build_llm(cfg, stage=2, cache_dir=str(cache))  # hub id -> cache snapshot -> NF4 + LoRA, as on the GPU
    base = llm.get_base_model()
    assert type(base).__name__ == "LlamaForCausalLM" and base.config.hidden_size == 64
    assert any(type(m).__name__ == "Linear4bit" for m in base.modules())
    assert {n for n, p in llm.named_parameters() if p.requires_grad} and all("lora_" in n for n, p in llm.named_parameters() if p.requires_grad)
    tok = load_tokenizer(cfg.llm.path, str(cache))
    assert tok.eos_token == "<|eot_id|>"


def test_missing_weights_say_what_to_do(tmp_path, fake_hub):
    from anymal.config import full
    from anymal.llm import build_llm
    snapshot, clip_download, _ = fake_hub
    cache = tmp_path / "hf-cache"
    cfg = full()
    with pytest.raises(FileNotFoundError, match=r"hf download meta-llama/Meta-Llama-3-8B-Instruct") as e:
        build_llm(cfg, stage=1, cache_dir=str(cache))  # nothing prepared
    assert "HF_TOKEN" in str(e.value) and "never downloads" in str(e.value)
    snap = Path(P.prepare_weights(cfg, str(cache), snapshot, clip_download)["llm"])
    shard = sorted(snap.glob("model-*.safetensors"))[1]; shard.unlink()  # one weight file lost
    with pytest.raises(FileNotFoundError, match=shard.name):  # the loader names the file
        build_llm(cfg, stage=1, cache_dir=str(cache))
    with pytest.raises(FileNotFoundError, match=r"missing .*run `anymal prepare weights` again") as e:  # and the check says what to do
        P.prepare_weights(cfg, str(cache), lambda *a, **k: None, clip_download)
    assert shard.name in str(e.value) and REPO in str(e.value)


def test_gated_download_without_token_is_one_clear_message(tmp_path, monkeypatch):
    import httpx
    from huggingface_hub.errors import GatedRepoError
    from anymal.config import full
    monkeypatch.delenv("HF_TOKEN", raising=False)
    def snapshot(repo, **kw):
        raise GatedRepoError("401 Client Error", response=httpx.Response(401, request=httpx.Request("GET", "https://huggingface.co")))
    with pytest.raises(RuntimeError) as e: P.prepare_weights(full(), str(tmp_path), snapshot, lambda *a, **k: None)
    msg = str(e.value)
    assert "HF_TOKEN is not set" in msg and f"https://huggingface.co/{REPO}" in msg and "modal secret create huggingface" in msg


def test_prepared_data_feeds_the_real_loaders(tmp_path, sources):
    "What `anymal prepare` writes is what `anymal.data` reads, for both stages, with every kept record usable."
    from anymal.config import override, tiny
    from anymal.data import build_dataset
    from anymal.tokenizer import train_tokenizer
    urls, _ = sources
    root = tmp_path / "data"
    assert run_all(root, urls) == 0
    cfg = override(tiny(), [f"data.root={root}"])
    tok = train_tokenizer(["What is it? A square. caption Describe the image briefly."] * 20, vocab_size=400)
    for stage, man, splits in ((1, "captions", ("train", "val")), (2, "llava", ("train", "val"))):
        counts = json.loads((root / f"manifests/{man}.json").read_text())["counts"]
        for split in splits:
            ds = build_dataset(cfg, tok, stage, split)
            assert len(ds) == counts[split] and not ds.skipped, (stage, split, ds.summary())
            s = ds[0]
            assert s["n_images"] == 1 and s["pixels"].shape == (1, 3, 64, 64), (stage, split)
            assert s["input_ids"].shape == s["labels"].shape and (s["labels"] != -100).any()
