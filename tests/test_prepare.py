"""Full-scale data preparation (anymal.prepare) against stand-ins of the public sources (tests/sources.py): the real
layouts and their realities, the Hugging Face files through an `hf_hub_download` of the same signature, the rest
through `http_fetch` of local copies. No network."""
import hashlib, io, json, tarfile, zipfile
from collections import Counter
from pathlib import Path

import pytest

from anymal import prepare as P
from anymal.cli import main as cli_main
from anymal.config import UserError
from parts import LLAMA3_REPO as REPO, hub_cache_snapshot, llama3_folder
from sources import StandInSources, image_bytes


@pytest.fixture
def src(tmp_path):
    return StandInSources(tmp_path / "src")


def sha(p): return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def run_all(src, root, *extra):
    return src.prepare("all", "--root", root, "--val", "2", "--shard-size", "10", *extra)


def read(root, rel): return json.loads((Path(root) / rel).read_text())


def check_llava(src, root, instruct):
    "The llava manifest and outputs against what the stand-in says of each record; returns (manifest, train, val)."
    man = read(root, "manifests/llava.json")
    fates, recs = src.expect[instruct], src.records[instruct]
    train, val = read(root, "llava/llava_instruct_train.json"), read(root, "llava/llava_instruct_val.json")
    c = man["counts"]
    assert c["records"] == len(recs) == c["train"] + c["val"] + c["skipped"]  # every record: kept or skipped
    assert (c["train"], c["val"]) == (len(train), len(val)) and c["val"] >= 2
    assert c["text_only"] == fates.count("text") == sum("image" not in r for r in train + val)
    assert sum(c["by_source"].values()) == len(train) + len(val) and c["by_source"].get("text_only", 0) == c["text_only"]
    assert sorted(map(json.dumps, train + val)) == sorted(map(json.dumps, src.kept(instruct)))  # kept exactly as they are
    want = sorted((str(r["id"]), f) for r, f in zip(recs, fates) if f not in ("image", "text"))
    got = sorted((str(s["id"]), s["reason"]) for s in man["skipped"])
    assert len(got) == len(want) and all(i == j and why in reason for (i, why), (j, reason) in zip(want, got)), got
    groups = lambda rs: {r.get("image") or f"id {r['id']}" for r in rs}
    assert not groups(train) & groups(val)  # no image in both splits
    for r in train + val:
        if "image" in r: assert (Path(root) / "images" / r["image"]).is_file(), r["image"]
    for rel, rec in man["files"].items():
        assert rec == {"size": (Path(root) / rel).stat().st_size, "sha256": sha(Path(root) / rel)}, rel
    return man, train, val


def test_layout_counts_and_manifest(tmp_path, src, capsys):
    root = tmp_path / "data"
    assert run_all(src, root) == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [l["dataset"] for l in lines] == ["llava", "captions", "vqav2", "coco"]
    # LLaVA-Instruct-150K: bad records skipped with their reasons, the split by image, the images extracted
    man, train, val = check_llava(src, root, "llava150k")
    assert man["counts"]["text_only"] == 0 and man["counts"]["by_source"] == {"coco": len(train) + len(val)}
    assert sorted(p.name for p in (root / "images").iterdir()) == [f"{i:012d}.jpg" for i in range(1, 9)]
    with zipfile.ZipFile(src.files["coco_train2017"]) as z:
        assert all((root / "images" / r["image"]).read_bytes() == z.read(f"train2017/{r['image']}") for r in train + val)
    # captions: webdataset shards in img2dataset's layout
    man = read(root, "manifests/captions.json")
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
        assert tf.extractfile(f"{key}.jpg").read() == image_bytes(int(meta["id"]), "L" if int(meta["id"]) % 5 == 0 else "RGB")
    # VQAv2: the official names and structure; questions of the image missing from the zip skipped
    man = read(root, "manifests/vqav2.json")
    qs = read(root, "vqa/v2_OpenEnded_mscoco_val2014_questions.json")
    assert qs["data_subtype"] == "val2014" and len(qs["questions"]) == 6 and man["counts"]["skipped"] == 2
    assert sorted(p.name for p in (root / "coco/val2014").iterdir()) == [f"COCO_val2014_{i:012d}.jpg" for i in (1, 2, 3)]
    caps = read(root, "coco/captions_val2017.json")
    assert len(caps["images"]) == 4 and all((root / "coco/val2017" / im["file_name"]).exists() for im in caps["images"])


def test_hub_files_come_through_hf_hub_download(tmp_path, src):
    "The four Hugging Face files through `hf_hub_download(repo_type='dataset')`, everything else over HTTP."
    root = tmp_path / "data"
    assert run_all(src, root) == 0
    assert src.prepare("llava", "--root", root, "--instruct", "mix665k", "--val", "2") == 0
    assert sorted(src.hub_calls) == sorted((s.repo, s.filename, "dataset") for s in P.SOURCES.values()
                                           if isinstance(s, P.HubFile))
    assert not [u for u in src.http_calls if "huggingface.co" in u]
    assert sorted(src.http_calls) == sorted(s for s in P.SOURCES.values() if isinstance(s, str))  # each once
    assert (root / "downloads/.cache/huggingface").is_dir()  # huggingface_hub's own bookkeeping, beside the files
    for name in P.SOURCES: assert (root / "downloads" / P.download_name(name)).is_file(), name
    # --url sends a Hub file over HTTP instead (e.g. for http_fetch's resume), to the same place
    other = tmp_path / "other"
    src.hub_calls.clear()
    url = src.files["llava_instruct"].as_uri()
    assert src.prepare("llava", "--root", other, "--val", "2", f"--url=llava_instruct={url}") == 0
    assert src.hub_calls == [] and url in src.http_calls
    assert sha(other / "downloads/llava_instruct_150k.json") == sha(src.files["llava_instruct"])


@pytest.mark.parametrize("kind", ["gated", "repo", "file", "offline", "model"])
def test_hub_refusals_are_one_line_user_errors(tmp_path, src, monkeypatch, capsys, kind):
    "What the Hub says becomes one line naming the repo and the file, and what to do; the command exits 1 with it."
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    f = P.SOURCES["llava_instruct"]
    if kind == "gated": src.gated.add(f.repo)
    if kind == "offline": src.offline = True
    if kind == "repo": f = P.HubFile("liuhaotian/No-Such-Dataset", f.filename)
    if kind == "file": f = P.HubFile(f.repo, "llava_instruct_151k.json")
    download = src.hf_hub_download
    if kind == "model":  # the same call without repo_type="dataset": the Hub looks for a model and answers 401
        download = lambda repo, filename, **kw: src.hf_hub_download(repo, filename, **{**kw, "repo_type": None})
    with pytest.raises(UserError) as e: P.hub_fetch(f, tmp_path / "downloads" / f.filename, download, "llava_instruct")
    msg = str(e.value)
    assert "\n" not in msg and f.repo in msg and f.filename in msg, msg
    assert {"gated": "Accept its terms on https://huggingface.co/datasets/liuhaotian/LLaVA-Instruct-150K",
            "repo": "does not exist or is private", "file": "has no file llava_instruct_151k.json (404)",
            "offline": "cannot reach the Hugging Face Hub", "model": "does not exist or is private"}[kind] in msg
    if kind in ("gated", "repo", "model"): assert "HF_TOKEN is not set" in msg and "hf auth login" in msg
    if kind != "gated": assert "--url llava_instruct=URL" in msg
    assert not (tmp_path / "downloads" / f.filename).exists()
    # through the command: exit status 1 and the one line (huggingface_hub.hf_hub_download is what it calls)
    if kind in ("gated", "offline"):
        monkeypatch.setattr("huggingface_hub.hf_hub_download", src.hf_hub_download)
        capsys.readouterr()
        assert cli_main(["prepare", "llava", "--root", str(tmp_path / "data")]) == 1
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and msg in err and "Traceback" not in err, err


def quiet_hub(monkeypatch):
    """In this process the stand-in Hub is passed as `endpoint=` (huggingface_hub reads HF_ENDPOINT at import), and
    nothing else may go to huggingface.co: HF_HUB_DISABLE_TELEMETRY (`constants`, read at each call) keeps its user
    agent from asking `{HF_ENDPOINT}/api/agent-harnesses` for the AI agents it names (tests/test_full_scale.py sees
    that request reach the stand-in, in a process of its own). Fails if the constant goes."""
    import huggingface_hub.constants as C
    assert hasattr(C, "HF_HUB_DISABLE_TELEMETRY")
    monkeypatch.setattr(C, "HF_HUB_DISABLE_TELEMETRY", True)


def test_prepare_through_the_real_downloaders_over_http(tmp_path, src, monkeypatch):
    """The real `huggingface_hub.hf_hub_download` against a stand-in of the Hub on 127.0.0.1 (a 302 to its storage on
    another origin, as huggingface.co answers for an LFS file), and `http_fetch` against stand-ins of the other hosts:
    the same layouts as through the Python stand-ins, the token sent to the Hub and not to its storage."""
    from functools import partial
    from huggingface_hub import hf_hub_download
    quiet_hub(monkeypatch)
    root, other = tmp_path / "data", tmp_path / "llava150k"
    src.user_files(root)
    with src.serve() as srv:
        dl = partial(hf_hub_download, endpoint=srv.endpoint, token="hf_test")
        urls = [f"--url={k}={v}" for k, v in srv.urls.items()]
        assert P.prepare_main(["all", "--root", str(root), "--val", "2", "--shard-size", "10", "--instruct", "mix665k",
                               *urls], hub_download=dl) == 0
        assert P.prepare_main(["llava", "--root", str(other), "--val", "2", *urls], hub_download=dl) == 0
        seen = list(srv.requests)
        assert P.prepare_main(["all", "--root", str(root), "--val", "2", "--shard-size", "10", "--instruct", "mix665k",
                               *urls], hub_download=dl) == 0
        assert srv.requests == seen  # a second run asks for nothing
    check_llava(src, root, "mix665k")
    check_llava(src, other, "llava150k")
    hub = [(s.repo, s.filename) for s in P.SOURCES.values() if isinstance(s, P.HubFile)]
    heads = sorted((m, p, a) for r, m, p, _, a in seen if r == "hub" and "/resolve/" in p)
    assert heads == sorted(("HEAD", f"/datasets/{r}/resolve/main/{f}", "Bearer hf_test") for r, f in hub)
    lfs = [(m, p, a) for r, m, p, _, a in seen if r == "hosts" and p.startswith("/lfs/")]
    assert sorted(lfs) == sorted(("GET", f"/lfs/{sha(src.hub[k])}", None) for k in hub)  # no token off the Hub
    plain = [p for r, m, p, _, a in seen if r == "hosts" and not p.startswith("/lfs/")]
    path = lambda name: "/" + P.SOURCES[name].split("://", 1)[1]  # a host's URL, as the stand-in serves it
    assert sorted(plain) == sorted([*(path(n) for n, u in P.SOURCES.items() if isinstance(u, str)),
                                    path("coco_train2017")])  # each host's file once for each root that needs it
    for name in P.SOURCES:  # every file as the source has it
        r = other if name == "llava_instruct" else root
        assert sha(r / "downloads" / P.download_name(name)) == sha(src.files[name]), name
    meta = (root / "downloads/.cache/huggingface/download/llava_v1_5_mix665k.json.metadata").read_text().split()
    assert meta[:2] == [srv.commit, sha(src.files["llava_mix665k"])]  # huggingface_hub's record: commit, etag


@pytest.mark.parametrize("kind", ["gated", "repo", "file", "model"])
def test_hub_refusals_through_the_real_hf_hub_download(tmp_path, src, monkeypatch, kind):
    "What the stand-in Hub answers over HTTP, as huggingface.co does, becomes the same one line as from the stand-in."
    from functools import partial
    from huggingface_hub import hf_hub_download
    quiet_hub(monkeypatch)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    f = P.SOURCES["llava_instruct"]
    if kind == "repo": f = P.HubFile("liuhaotian/No-Such-Dataset", f.filename)
    if kind == "file": f = P.HubFile(f.repo, "llava_instruct_151k.json")
    with src.serve() as srv:
        if kind == "gated": srv.gated.add(f.repo)
        download = partial(hf_hub_download, endpoint=srv.endpoint)
        if kind == "model":  # without repo_type="dataset": the Hub looks for a model and answers 401
            download = lambda repo, filename, **kw: hf_hub_download(repo, filename, **{**kw, "repo_type": None},
                                                                    endpoint=srv.endpoint)
        with pytest.raises(P.HubAccessError) as e:
            P.hub_fetch(f, tmp_path / "downloads" / f.filename, download, "llava_instruct")
    msg = str(e.value)
    assert "\n" not in msg and f.repo in msg and f.filename in msg, msg
    assert {"gated": "Accept its terms on https://huggingface.co/datasets/liuhaotian/LLaVA-Instruct-150K",
            "repo": "does not exist or is private", "file": "has no file llava_instruct_151k.json (404)",
            "model": "does not exist or is private"}[kind] in msg
    assert type(e.value.__cause__).__name__ == {"gated": "GatedRepoError", "repo": "RepositoryNotFoundError",
                                                "file": "RemoteEntryNotFoundError",
                                                "model": "RepositoryNotFoundError"}[kind]
    assert not (tmp_path / "downloads" / f.filename).exists()


def test_the_installed_hf_hub_download_takes_the_call(tmp_path, monkeypatch):
    """`hub_fetch` against the real `huggingface_hub.hf_hub_download`, offline (its request hook refuses to send
    anything): a changed signature fails here, and its offline error becomes the one line."""
    import huggingface_hub.constants as C
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))  # no copy to find in the user's cache
    dest = tmp_path / "downloads/llava_v1_5_mix665k.json"
    with pytest.raises(P.HubAccessError, match=r"cannot reach the Hugging Face Hub .*HF_HUB_OFFLINE is set") as e:
        P.hub_fetch(P.SOURCES["llava_mix665k"], dest, name="llava_mix665k")
    assert type(e.value.__cause__).__name__ == "LocalEntryNotFoundError" and not dest.exists()


def test_hub_download_interrupted_leaves_no_file_and_the_next_run_completes(tmp_path, src):
    root = tmp_path / "data"
    def dying(repo_id, filename, **kw):  # huggingface_hub deletes its partial file when a download is interrupted
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt): P.prepare_llava(root, fetch=src.fetch, hub_download=dying)
    assert not (root / "downloads/llava_instruct_150k.json").exists()
    man = P.prepare_llava(root, fetch=src.fetch, hub_download=src.hf_hub_download, val=2)
    assert man["counts"]["train"] + man["counts"]["val"] == len(src.kept("llava150k"))


def test_mix665k_realities(tmp_path, src, capsys):
    "LLaVA-1.5's mix: sub-folders per source, text-only records, <image> at the end, int ids, every image mode."
    root = tmp_path / "data"
    src.user_files(root)  # the OCR-VQA images a user fetched with LLaVA's script
    assert src.prepare("llava", "--root", root, "--instruct", "mix665k", "--val", "2") == 0
    line = json.loads(capsys.readouterr().out.splitlines()[-1])
    man, train, val = check_llava(src, root, "mix665k")
    assert line["text_only"] == 3 and line["by_source"] == man["counts"]["by_source"]
    kinds = Counter(r["image"].split("/")[0] if "image" in r else "text_only" for r in src.kept("mix665k"))
    assert man["counts"]["by_source"] == dict(kinds) and set(kinds) == {"coco", "gqa", "ocr_vqa", "textvqa", "vg", "text_only"}
    kept = train + val
    assert {type(r["id"]) for r in kept} == {str, int}  # integer ids stay integers
    assert {r["image"].split("/")[0] for r in kept if "image" in r} == {"coco", "gqa", "ocr_vqa", "textvqa", "vg"}
    assert any(r["conversations"][0]["value"].endswith("<image>") for r in kept)
    assert Counter(r["id"] for r in kept)["000000000001"] == 2  # two records of one image, one id
    on_disk = sorted(str(p.relative_to(root / "images")) for p in (root / "images").rglob("*") if p.is_file())
    assert on_disk == sorted({r["image"] for r in kept if "image" in r})
    # a second run with the OCR-VQA image gone: that record is skipped too, the rest unchanged
    (root / "images/ocr_vqa/images/689852649.jpg").unlink()
    man2 = P.prepare_llava(root, fetch=src.fetch, hub_download=src.hf_hub_download, val=2, instruct="mix665k")
    assert man2["counts"]["skipped"] == man["counts"]["skipped"] + 1 and man2["counts"]["by_source"].get("ocr_vqa", 0) == 0


def test_second_run_fetches_and_rewrites_nothing(tmp_path, src):
    root = tmp_path / "data"
    kw = dict(fetch=src.fetch, hub_download=src.hf_hub_download)
    for ds in P.PREPARERS: P.prepare(ds, root, **kw, **({"shard_size": 10} if ds == "captions" else {}))
    mix_only = {P.INSTRUCT["mix665k"][0]} | {row[2] for row in P.INSTRUCT["mix665k"][1] if row[2] != "coco_train2017"}
    assert len(src.http_calls) + len(src.hub_calls) == len(set(P.SOURCES) - mix_only)  # each source of the four, once
    outputs = [p for p in root.rglob("*") if p.is_file() and "manifests" not in p.parts]
    before = {p: (p.stat().st_mtime_ns, sha(p)) for p in outputs}
    m1 = {ds: read(root, f"manifests/{ds}.json") for ds in P.PREPARERS}
    src.http_calls.clear()
    src.hub_calls.clear()
    for ds in P.PREPARERS: P.prepare(ds, root, **kw, **({"shard_size": 10} if ds == "captions" else {}))
    assert src.http_calls == [] and src.hub_calls == []
    untouched = [p for p in outputs if p.suffix == ".tar" or "images" in p.parts or "downloads" in p.parts or "val2014" in p.parts]
    assert len(untouched) > 20 and all(p.stat().st_mtime_ns == before[p][0] for p in untouched)
    assert all(sha(p) == before[p][1] for p in outputs)  # and the rest is byte-identical
    m2 = {ds: read(root, f"manifests/{ds}.json") for ds in P.PREPARERS}
    assert m1 == m2  # the same counts, files and skipped records


def test_damaged_outputs_are_rebuilt(tmp_path, src):
    root = tmp_path / "data"
    kw = dict(fetch=src.fetch, hub_download=src.hf_hub_download, shard_size=10, val=2)
    P.prepare_captions(root, **kw)
    shard, other = root / "captions/train-00001.tar", root / "captions/train-00000.tar"
    good, t_other = shard.read_bytes(), other.stat().st_mtime_ns
    shard.write_bytes(good[:100])  # truncated: the size check catches it
    P.prepare_captions(root, **kw)
    assert shard.read_bytes() == good and other.stat().st_mtime_ns == t_other
    bad = bytearray(good); bad[600] ^= 1; shard.write_bytes(bytes(bad))  # same size: only --verify catches it
    P.prepare_captions(root, **kw)
    assert shard.read_bytes() == bytes(bad)
    P.prepare_captions(root, **kw, verify=True)
    assert shard.read_bytes() == good


def test_changed_options_rebuild_outputs_but_keep_downloads(tmp_path, src):
    root = tmp_path / "data"
    kw = dict(fetch=src.fetch, hub_download=src.hf_hub_download)
    P.prepare_llava(root, val=2, **kw)
    man = P.prepare_llava(root, val=3, limit=9, **kw)
    assert len(src.hub_calls) + len(src.http_calls) == 2 and man["counts"]["records"] == 9
    assert man["counts"]["val"] >= 3 and man["counts"]["train"] + man["counts"]["val"] == 9


def test_interrupted_download_resumes(tmp_path, src):
    root = tmp_path / "data"
    def dying_fetch(url, dest):  # writes half of the file to .part, then the connection drops
        data = src.http[url].read_bytes()
        Path(str(dest) + ".part").parent.mkdir(parents=True, exist_ok=True)
        Path(str(dest) + ".part").write_bytes(data[: len(data) // 2])
        raise ConnectionResetError("connection reset")
    with pytest.raises(ConnectionResetError): P.prepare_vqav2(root, fetch=dying_fetch)
    assert not (root / "downloads/v2_Questions_Val_mscoco.zip").exists()  # never a half file under the final name
    man = P.prepare_vqav2(root, fetch=src.fetch)
    assert man["counts"]["questions"] == 6 and not list((root / "downloads").glob("*.part"))
    assert sha(root / "downloads/v2_Questions_Val_mscoco.zip") == sha(src.files["vqav2_questions_val"])


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
    with pytest.raises(SystemExit): P.prepare_main(["llava", "--root", str(tmp_path), "--instruct", "mix1m"])
    assert "invalid choice: 'mix1m'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="shard_size"): P.prepare_captions(tmp_path, shard_size=20000)
    with pytest.raises(ValueError, match="instruct must be one of"): P.prepare_llava(tmp_path, instruct="mix1m")


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
    assert isinstance(e.value, UserError)  # the command prints it as one line, without a traceback
    msg = str(e.value)
    assert "HF_TOKEN is not set" in msg and f"https://huggingface.co/{REPO}" in msg and "modal secret create huggingface" in msg




@pytest.mark.parametrize("instruct", ["llava150k", "mix665k"])
def test_prepared_data_feeds_the_real_loaders(tmp_path, src, instruct):
    """What `anymal prepare` writes is what `anymal.data` reads, for both stages, with every kept record usable:
    text-only records as samples without images, `<image>` where the record puts it, images of every mode as RGB;
    and a batch of text-only records trains (every trainable parameter gets a gradient, as DDP needs)."""
    import torch
    from PIL import Image
    from anymal.config import override, tiny
    from anymal.data import Collator, build_dataset, decode_image
    from anymal.model import AnyMAL
    from anymal.tokenizer import IMAGE_TOKEN, train_tokenizer
    root = tmp_path / "data"
    if instruct == "mix665k": src.user_files(root)  # the OCR-VQA images a user fetched with LLaVA's script
    assert run_all(src, root, "--instruct", instruct) == 0
    cfg = override(tiny(), [f"data.root={root}"])
    words = [t["value"] for r in src.records[instruct] for t in r["conversations"]] + [cfg.data.stage1_prompt]
    tok = train_tokenizer(words * 5 + [f"caption {i}" for i in range(30)], vocab_size=cfg.llm.vocab_size)
    img_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    for stage, man, split in ((1, "captions", "train"), (1, "captions", "val"), (2, "llava", "train"), (2, "llava", "val")):
        counts = read(root, f"manifests/{man}.json")["counts"]
        ds = build_dataset(cfg, tok, stage, split)
        assert len(ds) == counts[split] and not ds.skipped, (stage, split, ds.summary())
        samples = [ds[i] for i in range(len(ds))]  # every record reads: its images decode, its text encodes
        for s in samples:
            n = s["n_images"]
            assert (s["pixels"] is None) if n == 0 else (s["pixels"].shape == (n, 3, 64, 64)), (stage, split)
            assert (s["input_ids"] == img_id).sum() == n * cfg.resampler.latents and (s["labels"] != -100).any()
        if stage == 2:
            recs = read(root, f"llava/llava_instruct_{split}.json")
            assert Counter(s["n_images"] for s in samples) == Counter(int("image" in r) for r in recs)
            assert f"({sum('image' not in r for r in recs)} text-only)" in ds.summary()
    images = [p for p in (root / "images").rglob("*") if p.is_file()]
    modes = {Image.open(p).mode for p in images}
    assert {"L", "CMYK"} <= modes and ({"RGBA"} <= modes) == (instruct == "mix665k")
    assert {decode_image(p).mode for p in images} == {"RGB"}
    ds = build_dataset(cfg, tok, 2, "train") if instruct == "mix665k" else None
    if ds is None: return
    ds_all = [ds, build_dataset(cfg, tok, 2, "val")]
    at_end = [(d, i) for d in ds_all for i, r in enumerate(d.records) if r[2][0]["content"].endswith("<image>")]
    assert at_end
    for d, i in at_end:  # the image tokens follow the question's words, as the record has them
        ids = d[i]["input_ids"].tolist()
        before = tok.decode(ids[:ids.index(img_id)])
        assert d.records[i][2][0]["content"].split("\n")[0].split()[-1] in before, before
    torch.manual_seed(0)
    model = AnyMAL.build(cfg, tok, stage=2)
    every = [d[i] for d in ds_all for i in range(len(d))]
    text = [s for s in every if s["n_images"] == 0]
    with_images = [s for s in every if s["n_images"]]
    for batch in (text[:1] + with_images[:2], text):  # a mixed batch, then one of text only
        b = Collator(tok.pad_token_id)(batch)
        model.zero_grad()
        out = model(b["input_ids"], b["attention_mask"], b["labels"], pixels=b["pixels"], n_images=b["n_images"],
                    sample_ids=b["sample_ids"])
        out.loss.backward()
        assert torch.isfinite(out.loss)
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert b["pixels"] is None and int(b["n_images"].sum()) == 0
    if instruct != "mix665k": return
    [(d, i)] = [(d, i) for d in ds_all for i, r in enumerate(d.records) if r[1] == "Hq4xT2m_0"]  # the long answer
    s = d[i]  # truncated to max_len, the part of its answer that fits trained on, and said so
    assert len(s["input_ids"]) == cfg.data.max_len and (s["labels"] != -100).sum() > 50
    assert [k for _, k, _ in s["truncated"]] == ["truncated"]
    assert "cut to 160 (data.max_len=160)" in s["truncated"][0][2]


def test_mix665k_trains_with_cached_features(tmp_path, src, monkeypatch):
    """Stage 2 on the prepared mix665k with `train.cache_features` (the frozen CLIP's features computed once, looked up
    by the batches' image keys): the text-only records, which have no features, train beside the others, in a batch
    of their own too, and the long ShareGPT answer is trained on truncated and counted so."""
    import math
    from anymal.data import Collator
    from anymal.runlog import read_metrics
    from anymal.stages import build_stage, stage_config
    from anymal.tokenizer import train_tokenizer
    from anymal.trainer import fit
    from anymal.config import tiny
    monkeypatch.setenv("ANYMAL_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "data"
    src.user_files(root)
    assert src.prepare("llava", "--root", root, "--instruct", "mix665k", "--val", "2") == 0
    words = [t["value"] for r in src.records["mix665k"] for t in r["conversations"]]
    train_tokenizer(words * 5, 512, root / "tokenizer")
    n = len(read(root, "llava/llava_instruct_train.json"))
    cfg = stage_config(tiny(), 2, [
        f"data.root={root}", "standins.enabled=false", "train.cache_features=true", "train.init_from=",
        "train.allow_random_resampler=true", f"train.out_dir={tmp_path / 'run'}", f"train.batch_size={n}",
        "train.steps=2", "train.warmup=1", "train.log_every=1", "train.eval_every=0", "train.save_every=0"])
    cfg, model, tok, train_ds, val_ds, prepare = build_stage(cfg, progress=False)
    text = [i for i, r in enumerate(train_ds.records) if not r[3]]
    assert len(text) == 2 and len(train_ds) == n > len(text)  # and one in val
    inputs = prepare(Collator(tok.pad_token_id)([train_ds[i] for i in text]), "cpu")  # text only: nothing to look up
    assert "image_feats" not in inputs and int(inputs["n_images"].sum()) == 0
    loss = model(**inputs).loss
    loss.backward()
    assert math.isfinite(loss.item())
    fit(cfg, model, train_ds, val_ds, Collator(tok.pad_token_id), prepare=prepare, progress=False)
    rows = read_metrics(tmp_path / "run", "train")  # each step: one batch of every record, text-only ones included
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    end = read_metrics(tmp_path / "run", "skipped")[-1]
    assert (end["train"], end["train_records"], end["train_truncated"]) == (0, n, 1)
