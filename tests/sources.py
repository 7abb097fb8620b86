"""Stand-ins for the public sources of `anymal prepare`: small files in the real layouts, and the two downloaders that
serve them, so that `anymal prepare` runs the code it runs against the network, without one; or the hosts themselves
(`StandInSources.serve()`), so that the real downloaders fetch them over HTTP.

- `hf_hub_download` has `huggingface_hub.hf_hub_download`'s signature and behaviour for what `anymal.prepare` uses: it
  answers only `repo_type="dataset"` (without it the Hub looks for a *model* and answers 401), writes the file into
  `local_dir` with huggingface_hub's bookkeeping in `local_dir/.cache/huggingface/`, and refuses the way the Hub does
  (`GatedRepoError` for a repo in `gated`, `RepositoryNotFoundError`, `RemoteEntryNotFoundError`,
  `LocalEntryNotFoundError` when `offline`).
- `fetch(url, dest)` serves the real COCO / VQAv2 / GQA / TextVQA / Visual Genome URLs of `anymal.prepare.SOURCES`
  (and any `file://` URL) through `anymal.prepare.http_fetch`, and answers 404 for any other URL.
- `serve()` puts them on 127.0.0.1 instead, for the real `huggingface_hub.hf_hub_download` and `http_fetch`, in a
  process of their own too (`anymal prepare` as a user types it): a stand-in of the Hub (`HF_ENDPOINT`) that answers
  as huggingface.co answers for a dataset's file, and a stand-in of the other hosts (COCO, VQA, ... and the Hub's
  storage) at their URLs' paths (`--url NAME=URL`). `HubServer` says what the Hub sends and what it leaves out.

The files hold what the real ones hold, in miniature, realities included:

- LLaVA-Instruct-150K: COCO file names as images, several records per image and id, `<image>` at the start or at the
  end of the first human turn, grayscale and CMYK JPEGs among the images, and three bad records;
- LLaVA-1.5's mix665k: image paths with sub-folders per source (`coco/train2017/`, `gqa/images/`, `ocr_vqa/images/`,
  `textvqa/train_images/`, `vg/VG_100K/`, `vg/VG_100K_2/`), text-only records with no `image` key (ShareGPT's, with
  their `"model": ""`; one with an answer of 12,000 characters, longer than the full preset's `data.max_len`),
  `<image>` at the end of the first human turn, integer ids, ids shared by several records, grayscale, CMYK and RGBA
  images (OCR-VQA's PNGs named `.jpg`), and bad records of each kind;
- LCS-558K (`blip_laion_cc_sbu_558k.json` + `images.zip` of `00000/000000012.jpg`), VQAv2 val questions and
  annotations, COCO captions val 2017, in their official structures.

`EXPECT[instruct]` says what `prepare_llava` must make of each record: kept (`"image"` or `"text"`), or skipped with a
reason containing the given text. Test helpers, not part of the library: `from sources import StandInSources`."""
from __future__ import annotations
import hashlib, io, json, re, shutil, threading, urllib.error, urllib.parse, zipfile
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image

from anymal import prepare as P

HUB_REPOS = {"liuhaotian/LLaVA-Instruct-150K": ["llava_instruct_150k.json", "llava_v1_5_mix665k.json"],
             "liuhaotian/LLaVA-Pretrain": ["blip_laion_cc_sbu_558k.json", "images.zip"]}


def image_bytes(seed: int, mode: str = "RGB", fmt: str = "JPEG", size=(8, 8)) -> bytes:
    "A small image of one colour (from `seed`) in `mode` (L, CMYK, RGBA, ...), encoded as `fmt`."
    rgb = (seed * 40 % 256, 30 + seed % 7 * 20, 90)
    im = Image.new("RGB", size, rgb).convert(mode)
    b = io.BytesIO()
    im.save(b, fmt)
    return b.getvalue()


def turns(*pairs) -> list[dict]:
    "LLaVA's `conversations`: human/gpt turns from (question, answer) pairs."
    return [t for q, a in pairs for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]


SHORT = "Answer the question using a single word or phrase."
LONG_QUESTION = "Write a detailed guide to planting a vegetable garden, step by step."
LONG_ANSWER = "\n\n".join(f"Step {i}: prepare the bed for the {v}, water it every morning, and keep a note of how "
                           f"the {v} grow through the season, so that next year's garden does better." for i, v in
                           enumerate(["tomatoes", "beans", "carrots", "onions", "peppers", "lettuce"] * 12, 1))


def llava150k() -> tuple[list, list, dict]:
    "(records, their fates, {train2017 member: bytes}) of LLaVA-Instruct-150K in miniature."
    recs, fates = [], []
    def add(rec, fate):
        recs.append(rec)
        fates.append(fate)
    for i in range(1, 9):
        add({"id": f"{i:012d}", "image": f"{i:012d}.jpg",
             "conversations": turns(("<image>\nWhat is in the picture?", f"Thing number {i}."),
                                    ("What colour is it?", "Red."))}, "image")
    for i in (1, 2):  # detail_23k: the same id and image again, <image> at the end of the turn
        add({"id": f"{i:012d}", "image": f"{i:012d}.jpg",
             "conversations": turns(("Describe the image in detail.\n<image>", f"A detailed view of thing {i}."))},
            "image")
    add({"id": "000000000099", "image": "000000000099.jpg", "conversations": turns(("<image>\nWhat?", "A."))},
        "not in train2017.zip")
    add({"id": "000000000001", "image": "000000000001.jpg", "conversations": turns(("<image>\nWhat?", "A."))[:1]},
        "no assistant turn")
    add({"id": "000000000002", "image": "000000000002.jpg", "conversations": turns(("<image><image>\nWhat?", "A."))},
        "2 <image> markers for one image")
    modes = {3: "L", 4: "CMYK"}  # COCO has grayscale and CMYK JPEGs
    zipped = {f"train2017/{i:012d}.jpg": image_bytes(i, modes.get(i, "RGB")) for i in range(1, 11)}
    return recs, fates, zipped


def mix665k() -> tuple[list, list, dict, dict]:
    "(records, fates, {archive source: {member: bytes}}, {path under images/: bytes} a user fetched) of the 665K mix."
    recs, fates = [], []
    def add(rec, fate):
        recs.append(rec)
        fates.append(fate)
    add({"id": "000000000001", "image": "coco/train2017/000000000001.jpg",
         "conversations": turns(("<image>\nWhat is the man holding?", "A kite in the park."))}, "image")
    add({"id": "000000000001", "image": "coco/train2017/000000000001.jpg",  # VQAv2 questions of the same image
         "conversations": turns((f"What color is the kite?\n<image>\n{SHORT}", "Red"), (f"How many?\n{SHORT}", "2"))},
        "image")
    add({"id": "000000000003", "image": "coco/train2017/000000000003.jpg",
         "conversations": turns((f"<image>\nIs it gray?\n{SHORT}", "Yes"))}, "image")
    add({"id": "2354786", "image": "gqa/images/2354786.jpg",
         "conversations": turns((f"<image>\nIs there a cat?\n{SHORT}", "No"))}, "image")
    add({"id": "2354787", "image": "gqa/images/2354787.jpg",
         "conversations": turns((f"Which side is the car on?\n<image>\n{SHORT}", "Left"))}, "image")
    add({"id": "689852649", "image": "ocr_vqa/images/689852649.jpg",
         "conversations": turns(("Who wrote this book?\n<image>", "Frank Herbert"), ("Is it a novel?", "Yes"))},
        "image")
    add({"id": "140031996", "image": "ocr_vqa/images/140031996.jpg",
         "conversations": turns(("What is the title of this book?\n<image>", "Dune"))}, "OCR-VQA's images come in no archive")
    add({"id": "0a0bc91825468c45", "image": "textvqa/train_images/0a0bc91825468c45.jpg",
         "conversations": turns((f"<image>\nWhat does the sign say?\nReference OCR token: STOP\n{SHORT}", "stop"))},
        "image")
    add({"id": 2345, "image": "vg/VG_100K/2345.jpg",
         "conversations": turns(("<image>\nPlease provide a short description for this region: [0.1, 0.2, 0.5, 0.6]",
                                 "A white dog."))}, "image")
    add({"id": 1, "image": "vg/VG_100K_2/1.jpg",
         "conversations": turns(("<image>\nPlease provide the bounding box coordinate of the region this sentence "
                                 "describes: a tree.", "[0.0, 0.1, 0.3, 0.9]"))}, "image")
    add({"id": "i6IyJda_0", "model": "",
         "conversations": turns(("How to tell if a customer segment is well segmented? In 3 bullet points.",
                                 "1. Homogeneity\n2. Distinctiveness\n3. Stability"), ("Thanks!", "You are welcome."))},
        "text")
    add({"id": 40690, "model": "", "conversations": turns(("Write a haiku about rain.", "Soft rain on the roof."))},
        "text")
    add({"id": "Hq4xT2m_0", "model": "", "conversations": turns((LONG_QUESTION, LONG_ANSWER), ("Thanks.", "Welcome."))},
        "text")  # a long ShareGPT answer: thousands of tokens, past the full preset's data.max_len of 1024
    add({"id": "QWJhYvA_0", "model": "", "conversations": [{"from": "gpt", "value": "Hello! How can I help?"},
                                                          {"from": "human", "value": "Hi."}]},
        "turns are not human/gpt alternating")
    add({"id": "sa_1", "image": "sam/images/sa_1.jpg", "conversations": turns(("<image>\nWhat?", "A."))},
        "no known source")
    add({"id": "999", "image": "gqa/images/999.jpg", "conversations": turns(("<image>\nWhat?", "A."))},
        "not in images.zip")
    zips = {
        "gqa_images": {"images/2354786.jpg": image_bytes(21, "L"), "images/2354787.jpg": image_bytes(22)},
        "textvqa_images": {"train_images/0a0bc91825468c45.jpg": image_bytes(23, "CMYK")},
        "vg_images": {"VG_100K/2345.jpg": image_bytes(24)},
        "vg_images2": {"VG_100K_2/1.jpg": image_bytes(25, "L")},
    }
    user = {"ocr_vqa/images/689852649.jpg": image_bytes(26, "RGBA", "PNG")}  # LLaVA's script names PNGs .jpg
    return recs, fates, zips, user


def lcs558k() -> tuple[list, dict]:
    "(records, {member: bytes}) of LCS-558K: 25 good records, one without a caption, one PNG, one missing image."
    def rec(i, q): return {"id": f"{i:09d}", "image": f"00000/{i:09d}.jpg", "conversations": turns((q, f"caption {i}"))}
    recs = [rec(i, "<image>\nWrite a terse but informative summary of the picture." if i % 2 else
                "Render a clear and concise summary of the photo.\n<image>") for i in range(25)]
    recs += [{"id": "nocap", "image": "00000/nocap.jpg", "conversations": turns(("<image>\nDescribe.", "x"))[:1]},
             {"id": "png", "image": "00000/png.jpg", "conversations": turns(("<image>\nDescribe.", "a png"))},
             {"id": "lost", "image": "00000/lost.jpg", "conversations": turns(("<image>\nDescribe.", "lost"))}]
    zipped = {r["image"]: image_bytes(int(r["id"]), "L" if int(r["id"]) % 5 == 0 else "RGB") for r in recs[:25]}
    zipped["00000/png.jpg"] = image_bytes(0, "RGB", "PNG")
    return recs, zipped


VQA_IDS = [3, 1, 2, 5]  # COCO val2014 image ids; image 5 is missing from val2014.zip


def vqav2_val() -> tuple[dict, dict]:
    "(questions, annotations) in VQAv2's official structure: two questions per image."
    qs = {"info": {"description": "VQA v2"}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {},
          "data_subtype": "val2014",
          "questions": [{"image_id": i, "question": q, "question_id": i * 1000 + k}
                        for i in VQA_IDS for k, q in enumerate(("Is there a kite?", "How many dogs are there?"))]}
    answers = {0: ["yes"] * 9 + ["no"], 1: ["2"] * 7 + ["two", "3", "2"]}
    an = {"info": {"description": "VQA v2"}, "license": {}, "data_subtype": "val2014", "annotations": [
        {"image_id": i, "question_id": i * 1000 + k, "question_type": ("is there a", "how many")[k],
         "answer_type": ("yes/no", "number")[k], "multiple_choice_answer": answers[k][0],
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(answers[k])]}
        for i in VQA_IDS for k in (0, 1)]}
    return qs, an


def coco_captions_val() -> dict:
    "COCO's `captions_val2017.json` structure: images with their file names, five captions each."
    return {"info": {"description": "COCO 2017"}, "licenses": [],
            "images": [{"license": 1, "file_name": f"{i:012d}.jpg", "coco_url": "", "height": 8, "width": 8,
                        "date_captured": "2013-11-14 17:02:52", "flickr_url": "", "id": i} for i in VQA_IDS],
            "annotations": [{"image_id": i, "id": 100 * i + k, "caption": f"A picture number {i}, caption {k}."}
                            for i in VQA_IDS for k in range(5)]}


def _zip(path: Path, members: dict):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items(): z.writestr(name, data if isinstance(data, bytes) else json.dumps(data))


def _hub_error(kind: str, repo: str, filename: str):
    "The exception huggingface_hub raises for `kind`, built as it builds them."
    from huggingface_hub import errors
    if kind == "offline":
        return errors.LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub and we "
                                              "cannot find the requested files in the local cache.")
    try: import httpx2 as httpx  # what huggingface_hub 2.x uses
    except ImportError: import httpx
    url = f"https://huggingface.co/datasets/{repo}/resolve/main/{filename}"
    code, cls, msg = {"gated": (401, errors.GatedRepoError, f"Cannot access gated repo for url {url}."),
                      "repo": (401, errors.RepositoryNotFoundError, f"Repository Not Found for url: {url}."),
                      "file": (404, errors.RemoteEntryNotFoundError, f"Entry Not Found for url: {url}.")}[kind]
    return cls(f"{code} Client Error. {msg}", response=httpx.Response(code, request=httpx.Request("GET", url)))


class StandInSources:
    "Every public source of `anymal prepare`, written under `d`, and the downloaders that serve them."
    def __init__(self, d, gated=(), offline: bool = False):
        self.dir, self.gated, self.offline = Path(d), set(gated), offline
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hub_calls, self.http_calls = [], []  # (repo_id, filename, repo_type), url
        self.records, self.expect = {}, {}
        f = {}  # source name -> local file
        recs, self.expect["llava150k"], train2017 = llava150k()
        self.records["llava150k"] = recs
        mix, self.expect["mix665k"], zips, self.user = mix665k()
        self.records["mix665k"] = mix
        for name, obj in (("llava_instruct", recs), ("llava_mix665k", mix)):
            f[name] = self.dir / P.download_name(name)
            f[name].write_text(json.dumps(obj))
        lcs, lcs_images = lcs558k()
        f["lcs558k_json"] = self.dir / "blip_laion_cc_sbu_558k.json"
        f["lcs558k_json"].write_text(json.dumps(lcs))
        qs, an = vqav2_val()
        members = {
            "coco_train2017": train2017, "lcs558k_images": lcs_images, **zips,
            "vqav2_questions_val": {"v2_OpenEnded_mscoco_val2014_questions.json": qs},
            "vqav2_annotations_val": {"v2_mscoco_val2014_annotations.json": an},
            "coco_val2014": {f"val2014/COCO_val2014_{i:012d}.jpg": image_bytes(i) for i in VQA_IDS[:3]},
            "coco_annotations2017": {"annotations/captions_val2017.json": coco_captions_val()},
            "coco_val2017": {f"val2017/{i:012d}.jpg": image_bytes(i, "L" if i == 2 else "RGB") for i in VQA_IDS},
        }
        for name, m in members.items():
            f[name] = self.dir / P.download_name(name)
            f[name].parent.mkdir(parents=True, exist_ok=True)
            _zip(f[name], m)
        assert set(f) == set(P.SOURCES), set(P.SOURCES) ^ set(f)
        self.files = f
        self.hub = {(s.repo, s.filename): f[n] for n, s in P.SOURCES.items() if isinstance(s, P.HubFile)}
        self.http = {s: f[n] for n, s in P.SOURCES.items() if isinstance(s, str)}
        assert {r for r, _ in self.hub} == set(HUB_REPOS)

    def hf_hub_download(self, repo_id: str, filename: str, *, repo_type: str | None = None, local_dir=None,
                        token=None, revision: str | None = None, **kw) -> str:
        "`huggingface_hub.hf_hub_download` of the stand-in Hub, into `local_dir` (the only mode `anymal` uses)."
        self.hub_calls.append((repo_id, filename, repo_type))
        if self.offline: raise _hub_error("offline", repo_id, filename)
        if repo_type != "dataset" or repo_id not in HUB_REPOS: raise _hub_error("repo", repo_id, filename)
        if repo_id in self.gated: raise _hub_error("gated", repo_id, filename)
        if (repo_id, filename) not in self.hub: raise _hub_error("file", repo_id, filename)
        if local_dir is None: raise TypeError("the stand-in Hub downloads into local_dir only")
        meta = Path(local_dir) / ".cache" / "huggingface" / "download"
        meta.mkdir(parents=True, exist_ok=True)
        tmp = meta / f"{filename}.standin.incomplete"
        shutil.copyfile(self.hub[repo_id, filename], tmp)
        (meta / f"{filename}.metadata").write_text(f"{'0' * 40}\n{'e' * 64}\n0.0\n")
        out = Path(local_dir) / filename
        tmp.replace(out)
        return str(out)

    def fetch(self, url: str, dest) -> Path:
        "`anymal.prepare.http_fetch` of a real source URL (served from the local copy) or of a `file://` URL."
        self.http_calls.append(url)
        if url.startswith("file://"): return P.http_fetch(url, dest)
        if url not in self.http: raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)
        return P.http_fetch(self.http[url].as_uri(), dest)

    def user_files(self, root):
        "Put in place what a user fetches by hand: OCR-VQA's images (LLaVA's script), under `root/images/`."
        for rel, data in self.user.items():
            p = Path(root) / "images" / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)

    def prepare(self, *argv) -> int:
        "`anymal prepare ARGV` against these sources (`anymal.prepare.prepare_main` with both downloaders replaced)."
        return P.prepare_main([str(a) for a in argv], fetch=self.fetch, hub_download=self.hf_hub_download)

    def kept(self, instruct: str) -> list:
        "The records of `instruct` that `prepare_llava` keeps."
        return [r for r, f in zip(self.records[instruct], self.expect[instruct]) if f in ("image", "text")]

    @contextmanager
    def serve(self):
        "These sources over HTTP on 127.0.0.1 while in the block: a `HubServer` (`.endpoint`, `.urls`, `.requests`)."
        with HubServer(self) as srv: yield srv


def _sha256(path: Path) -> str: return hashlib.sha256(path.read_bytes()).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    "One request to `server.owner` (a `HubServer`), which answers it as the Hub or as the hosts do."
    protocol_version = "HTTP/1.0"  # one request a connection: nothing left open when the servers stop

    def log_message(self, *a): pass  # no line on stderr per request
    def do_HEAD(self): self.server.owner.answer(self, self.server.role, body=False)
    def do_GET(self): self.server.owner.answer(self, self.server.role, body=True)


class HubServer:
    """The stand-in Hub and hosts, on two ports of 127.0.0.1 (two origins, as huggingface.co and its storage are).

    The Hub (`endpoint`, for `HF_ENDPOINT`) answers `HEAD`/`GET /datasets/{repo}/resolve/{revision}/{file}` as
    huggingface.co answers for a file kept in LFS, to a client without a token: `302 Found` to the file on the
    other origin, with `X-Repo-Commit`, `ETag` (the pointer's), `X-Linked-Etag` (the file's sha256) and
    `X-Linked-Size`; for a repo that is not there, a model repo's path or a gated repo, `401` with `X-Error-Code:
    RepoNotFound` or `GatedRepo`; for a file that is not there, `404` with `X-Error-Code: EntryNotFound`; all of it in
    the headers, as a `HEAD` has no body. It sends no `X-Xet-Hash`, so `hf_hub_download` takes the plain HTTP path,
    not Xet's (the Hub serves these repos through Xet storage now, to clients with `hf_xet` installed). Anything
    else (`huggingface_hub` asks `/api/agent-harnesses` for its telemetry, once a day) is a 404, which it ignores.

    The hosts (`urls`) serve each non-Hub source at `/{host}{path}` of its real URL, and the Hub's files at
    `/lfs/{sha256}`, with `Content-Length`, `ETag` and byte ranges (`206`), as S3 and CloudFront do. `requests`
    lists `(role, method, path, Range, Authorization)` of every request, for a test to see what went where."""

    def __init__(self, src: StandInSources, gated=None):
        self.src, self.gated = src, src.gated if gated is None else set(gated)
        self.requests, self.commit = [], hashlib.sha1(b"stand-in commit").hexdigest()
        self.blobs = {_sha256(f): f for f in src.hub.values()}
        self._servers = []

    def __enter__(self):
        for role in ("hub", "hosts"):
            httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
            httpd.owner, httpd.role, httpd.daemon_threads = self, role, True
            threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True).start()  # quick to stop
            self._servers.append(httpd)
        self.endpoint, self.hosts = (f"http://127.0.0.1:{h.server_address[1]}" for h in self._servers)
        self.paths = {"/" + u.split("://", 1)[1]: self.src.http[u] for u in P.SOURCES.values() if isinstance(u, str)}
        self.urls = {n: self.hosts + "/" + u.split("://", 1)[1] for n, u in P.SOURCES.items() if isinstance(u, str)}
        return self

    def __exit__(self, *exc):
        for h in self._servers:
            h.shutdown()
            h.server_close()

    def answer(self, h: _Handler, role: str, body: bool):
        path = urllib.parse.unquote(urllib.parse.urlsplit(h.path).path)
        self.requests.append((role, h.command, path, h.headers.get("Range"), h.headers.get("Authorization")))
        if role == "hub": return self._hub(h, path)
        if path.startswith("/lfs/") and path[5:] in self.blobs: return self._file(h, self.blobs[path[5:]], body)
        if path in self.paths: return self._file(h, self.paths[path], body)
        self._reply(h, 404, {"Content-Type": "text/plain"})

    def _hub(self, h: _Handler, path: str):
        m = re.fullmatch(r"/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m is None: return self._reply(h, 404, {"Content-Type": "text/plain"})
        dataset, repo, _, filename = m.groups()
        if not dataset or repo not in HUB_REPOS:  # a model repo's path: the Hub cannot tell missing from private
            return self._reply(h, 401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
        if repo in self.gated:
            return self._reply(h, 401, {"X-Error-Code": "GatedRepo", "X-Error-Message": f"Access to dataset {repo} "
                                        "is restricted. You must have access to it and be authenticated to access it."})
        if (repo, filename) not in self.src.hub:
            return self._reply(h, 404, {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found",
                                        "X-Repo-Commit": self.commit})
        f = self.src.hub[repo, filename]
        sha = _sha256(f)
        self._reply(h, 302, {"Location": f"{self.hosts}/lfs/{sha}", "X-Repo-Commit": self.commit,
                             "ETag": f'"{hashlib.sha1(sha.encode()).hexdigest()}"', "X-Linked-Etag": f'"{sha}"',
                             "X-Linked-Size": str(f.stat().st_size), "Content-Length": "0"})

    def _file(self, h: _Handler, f: Path, body: bool):
        data, start = f.read_bytes(), 0
        if (r := re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range") or "")):
            start = int(r.group(1))
            if start >= len(data): return self._reply(h, 416, {"Content-Range": f"bytes */{len(data)}"})
        head = {"Content-Length": str(len(data) - start), "ETag": f'"{_sha256(f)}"', "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream"}
        if start: head["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self._reply(h, 206 if start else 200, head, data[start:] if body else b"")

    @staticmethod
    def _reply(h: _Handler, code: int, headers: dict, data: bytes = b""):
        h.send_response(code)
        for k, v in headers.items(): h.send_header(k, v)
        if "Content-Length" not in headers: h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if data: h.wfile.write(data)
