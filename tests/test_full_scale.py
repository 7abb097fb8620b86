"""The dress rehearsal of a full-scale run (issue 20): what a user who follows the README types, end to end, through
the `anymal` command, on the full preset's own code path.

`anymal prepare weights` and `anymal prepare all --instruct mix665k` (LLaVA-1.5's mix, its realities included: image
paths with sub-folders per source, text-only records, `<image>` at the end of the turn, integer ids, grayscale, CMYK
and RGBA images, a ShareGPT answer longer than `data.max_len`); stage 1 under `torchrun` (two processes, DDP over
gloo); stage 2 on the mix, text-only records and the truncated long one included, stopped by SIGTERM (what a cloud
sends a machine it reclaims) and resumed with `--resume`; `anymal eval` (VQA with its blank / shuffled / text-only
controls, and captions); `anymal chat` on the result. The config is `--preset full`: LLaMA-3-8B-Instruct named by its
hub id and found in an HF cache with `HF_HUB_OFFLINE=1`, loaded in NF4 (frozen in stage 1; with LoRA and
`train.mode=small`, as `full()` sets it, in stage 2), CLIP named by an open_clip architecture.

The only differences from a real run are the sizes and where the bytes come from:

- the sizes: every `--set` in `SIZES` (a smaller open_clip architecture, a tiny resampler and LLaMA, a few steps of
  small batches) and `anymal prepare`'s `--val` and `--shard-size`;
- the bytes: the HF cache holds a tiny random LLaMA with a byte-level BPE that has LLaMA-3's special tokens and chat
  template, in the files of Meta's repo (`parts.llama3_folder`), where a real run has Meta's download; CLIP's weights
  are random ones in a file (`FILES`: `vision.pretrained`), saved as open_clip saves them, where a real run has
  `openai`'s from the cache; `anymal prepare` fetches small stand-ins of the public sources (`sources.StandInSources`)
  over HTTP from 127.0.0.1, through the downloaders a real run uses: the Hugging Face files through
  `huggingface_hub.hf_hub_download` from a stand-in of the Hub (`HF_ENDPOINT`; `HF_HUB_OFFLINE=0` for that one
  command), the others through `http_fetch` from stand-ins of their hosts (`--url NAME=URL`, at their real URLs'
  paths); OCR-VQA's images, which LLaVA's own script fetches, are put in place as that script would.

With ANYMAL_REHEARSAL_TRANSCRIPT=FILE set it also writes the transcript of the run (each command as the user types it
and what it printed) to FILE: `tools/rehearsal.py` regenerates docs/full-scale.md so."""
from __future__ import annotations
import json, os, re, shlex, signal, subprocess, sys, time
from pathlib import Path

from parts import CLI, LLAMA3_REPO, cli_env, hub_cache_snapshot, llama3_folder, open_clip_weights
from sources import StandInSources

CLIP_ARCH = "ViT-S-32-alt"  # open_clip's smallest ViT; the real run's is ViT-L-14 (`full()`)
SIZES = [  # the full preset's sizes, shrunk; nothing else is changed
    f"vision.model={CLIP_ARCH}", "vision.width=384", "vision.layers=12", "vision.patch_size=32", "vision.embed_dim=256",
    "vision.text_width=256", "vision.text_heads=4", "vision.text_layers=10",
    "resampler.latents=8", "resampler.layers=1", "resampler.heads=2", "resampler.dim_head=32",
    "llm.hidden=64", "llm.layers=2", "llm.heads=4", "llm.kv_heads=2", "llm.intermediate=128", "llm.vocab_size=512",
    "data.num_workers=2", "train.batch_size=4", "train.grad_accum=1", "train.warmup=2", "train.log_every=1",
    "train.eval_every=2", "train.eval_batches=1", "stage1.steps=4", "stage1.save_every=2", "stage2.steps=12",
    "stage2.save_every=2",
]
CONTROLS = ["none", "blank", "shuffled", "text_only"]
TEXT = ["Describe the image briefly.", "Answer the question using a single word or phrase.", "What is it?",
        "A square.", "What is in the picture?", "red", "caption 12"] * 20  # the tokenizer's training text


def sets(*items) -> list[str]: return [a for s in items for a in ("--set", s)]


def metrics(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]


def train_rows(run: Path) -> list[dict]: return [r for r in metrics(run) if r["split"] == "train"]


class Shell:
    "Runs the user's commands in `<root>/work` and keeps what each printed, for the assertions and the transcript."
    def __init__(self, root: Path, env: dict, words: dict):
        self.root, self.cwd, self.env, self.words, self.steps = root, root / "work", env, words, []
        self.subst = {}  # text -> the shell variable the transcript shows for it
        self.cwd.mkdir()

    def argv(self, shown: list[str]) -> tuple[list[str], dict]:
        """What runs for the command line `shown` (`anymal` and `torchrun` as this Python runs them; $WORDS expanded),
        and its environment (with the `NAME=value` words it starts with, as a shell reads them)."""
        env = dict(self.env)
        while "=" in shown[0] and not shown[0].startswith("-"):
            k, v = shown[0].split("=", 1)
            env[k], shown = v, shown[1:]
        real = [a for w in shown for a in (self.words[w] if w in self.words else [w])]
        if real[0] == "anymal": return [*CLI, *real[1:]], env
        if real[0] == "torchrun": return [sys.executable, "-m", "torch.distributed.run", *real[1:]], env
        return real, env

    def record(self, title: str, shown: list[str], rc: int, out: bytes, err: bytes, t0: float,
               note: str = "") -> subprocess.CompletedProcess:
        "Keep what a command printed (decoded here: text mode would turn a progress bar's \\r into new lines)."
        out, err = out.decode(errors="replace"), err.decode(errors="replace")
        self.steps.append(dict(title=title, command=" ".join(w if w in self.words else shlex.quote(w) for w in shown),
                               stdout=out, stderr=err, rc=rc, seconds=round(time.time() - t0, 1), note=note))
        return subprocess.CompletedProcess(shown, rc, out, err)

    def run(self, title: str, *shown: str, expect: int = 0, note: str = "") -> subprocess.CompletedProcess:
        t0 = time.time()
        argv, env = self.argv(list(shown))
        p = subprocess.run(argv, capture_output=True, cwd=self.cwd, env=env, timeout=900)
        r = self.record(title, list(shown), p.returncode, p.stdout, p.stderr, t0, note)
        assert r.returncode == expect, f"{' '.join(shown)}: exit {r.returncode}\n{r.stderr[-3000:]}"
        return r

    def run_until(self, title: str, *shown: str, stop_when, note: str = "") -> subprocess.CompletedProcess:
        "Run a command and send it SIGTERM once `stop_when()` is true (as a cloud does to a machine it reclaims)."
        t0 = time.time()
        argv, env = self.argv(list(shown))
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=self.cwd, env=env)
        while p.poll() is None and not stop_when(): time.sleep(0.05)
        ended = p.poll() is not None
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=900)
        r = self.record(title, list(shown), p.returncode, out, err, t0, note)
        assert not ended, f"{' '.join(shown)} ended before it could be stopped: {r.stderr[-3000:]}"
        return r


def test_full_scale_rehearsal(tmp_path):
    # ---- the files a real run downloads, small: the HF cache, CLIP's weights, the public data sources ----
    from anymal import prepare as P
    from anymal.config import full, override
    cfg = override(full(), SIZES)
    snapshot = hub_cache_snapshot(llama3_folder(tmp_path / "llama", cfg.llm, TEXT), LLAMA3_REPO,
                                  tmp_path / "hf" / "hub")
    (tmp_path / "clip").mkdir()
    clip = open_clip_weights(tmp_path / "clip" / "open_clip_model.safetensors", CLIP_ARCH)
    import open_clip  # saved as open_clip saves them: its own loader takes the file
    open_clip.create_model(CLIP_ARCH, pretrained=str(clip), force_quick_gelu=True)
    src = StandInSources(tmp_path / "src")  # the public sources, small, their realities included
    files = [f"vision.pretrained={clip}"]
    env = {k: v for k, v in cli_env().items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", ANYMAL_CACHE=str(tmp_path / "cache"))
    sh = Shell(tmp_path, env, {"$SIZES": sets(*SIZES), "$FILES": sets(*files)})
    s1, s2 = sh.cwd / "runs/full/stage1", sh.cwd / "runs/full/stage2"  # full()'s run folders
    assert (cfg.llm.path, cfg.llm.quant, cfg.train.mode, cfg.stage2.init_from) == (LLAMA3_REPO, "nf4", "small",
                                                                                   "runs/full/stage1")

    # ---- the weights: `anymal prepare weights` finds them in the cache, by hub id, offline ----
    r = sh.run("The weights are in the HF cache", "anymal", "prepare", "weights", "$SIZES", "$FILES",
               note="A real run downloads them here (`HF_TOKEN` for Meta's gated repo); offline, the command finds "
                    "them where the loaders will.")
    assert json.loads(r.stdout) == {"llm": str(snapshot), "clip": str(clip)}

    # ---- the data: `anymal prepare all` lays out LLaVA-1.5's mix, LCS-558K captions, VQAv2 val, COCO captions,
    # fetched over HTTP by huggingface_hub (the Hub's files) and http_fetch (the rest) from the stand-in hosts ----
    src.user_files(sh.cwd / "data")  # OCR-VQA's images: LLaVA's script fetches them, not anymal prepare
    with src.serve() as srv:
        sh.env["HF_ENDPOINT"] = srv.endpoint
        sh.words["$URLS"] = [f"--url={k}={v}" for k, v in srv.urls.items()]
        sh.subst = {srv.endpoint: "$HUB", srv.hosts: "$HOSTS"}
        r = sh.run("The data", "HF_HUB_OFFLINE=0", "anymal", "prepare", "all", "--instruct", "mix665k", "--val", "2",
                   "--shard-size", "10", "$URLS",
                   note="The one command that downloads (`HF_HUB_OFFLINE=0`; a real run does not set it at all): "
                        "~95 GB at full scale, with the default --val and --shard-size. OCR-VQA's images, which come "
                        "in no archive, were put in `data/images/ocr_vqa/` first, as LLaVA's script puts them.")
        seen = list(srv.requests)
    done = {d["dataset"]: d for d in map(json.loads, r.stdout.splitlines())}
    assert list(done) == ["llava", "captions", "vqav2", "coco"] and done["captions"]["train"]
    hub = [(f.repo, f.filename) for n, f in P.SOURCES.items()
           if isinstance(f, P.HubFile) and n != "llava_instruct"]  # the mix's JSON and LCS-558K's two files
    asked = [p for r_, m, p, *_ in seen if r_ == "hub"]
    assert sorted(p for p in asked if "/resolve/" in p) == sorted(f"/datasets/{r_}/resolve/main/{f}" for r_, f in hub)
    assert [p for p in asked if "/resolve/" not in p] in ([], ["/api/agent-harnesses"])  # huggingface_hub's telemetry
    assert len([p for r_, m, p, *_ in seen if p.startswith("/lfs/")]) == len(hub)  # each from the Hub's storage
    assert (sh.cwd / "data/downloads/.cache/huggingface/download/llava_v1_5_mix665k.json.metadata").is_file()
    train = json.loads((sh.cwd / "data/llava/llava_instruct_train.json").read_text())
    val = json.loads((sh.cwd / "data/llava/llava_instruct_val.json").read_text())
    assert sorted(map(json.dumps, train + val)) == sorted(map(json.dumps, src.kept("mix665k")))  # records as they are
    text_only = [r_["id"] for r_ in train if "image" not in r_]
    assert done["llava"]["text_only"] == 3 and len(text_only) == 2 and "Hq4xT2m_0" in text_only  # the long one too
    assert {r_["image"].split("/")[0] for r_ in train if "image" in r_} == {"coco", "gqa", "ocr_vqa", "textvqa", "vg"}
    assert (sh.cwd / "data/vqa/v2_OpenEnded_mscoco_val2014_questions.json").is_file()

    # ---- stage 1 under torchrun: two processes, the LLM frozen in NF4, only the bridge trains ----
    r = sh.run("Stage 1: align the bridge (two processes)", "torchrun", "--standalone", "--nproc_per_node=2", "-m",
               "anymal.cli", "train", "--preset", "full", "--stage", "1", "$SIZES", "$FILES",
               note="On N GPUs: --nproc_per_node=N.")
    [res] = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]  # one result line, from rank 0
    assert res == {"stage": 1, "final": "runs/full/stage1/final", "out_dir": "runs/full/stage1"}
    from anymal.checkpoint import latest_checkpoint, load_train_state, read_meta
    assert load_train_state(latest_checkpoint(s1))["world"] == 2
    m1 = read_meta(s1)
    assert m1["step"] == 4 and not any("lora_" in k for k in m1["arch"]["tensors"])
    assert m1["config"]["llm"]["path"] == LLAMA3_REPO and m1["config"]["llm"]["quant"] == "nf4"
    rows = train_rows(s1)
    assert [x["step"] for x in rows] == [1, 2, 3, 4] and any(x["split"] == "val" for x in metrics(s1))
    # the frozen NF4 LLM passes the bridge its gradient, after a validation (eval mode) too: on a CPU it once did not
    assert all(x["grad_norm"] > 0 for x in rows), rows

    # ---- stage 2 on the mix: LoRA on the NF4 LLM, stopped by SIGTERM after a few steps, then resumed ----
    def past_step_3():
        try: return any(x["step"] >= 3 for x in train_rows(s2))
        except (FileNotFoundError, json.JSONDecodeError): return False  # not written yet, or a line half written
    r = sh.run_until("Stage 2: instruction tuning, stopped", "anymal", "train", "--preset", "full", "--stage", "2",
                     "$SIZES", "$FILES", stop_when=past_step_3,
                     note="Stopped by SIGTERM once step 3 was logged, as a cloud stops a machine it reclaims.")
    assert r.returncode == 128 + signal.SIGTERM, r.stderr[-3000:]
    stopped = int(re.search(r"stopped by SIGTERM at step (\d+); checkpoint (\S+); continue with --resume",
                            r.stderr).group(1))
    assert 3 <= stopped < 12 and latest_checkpoint(s2).name == f"step-{stopped:08d}"
    before = [x for x in metrics(s2) if x["step"] <= stopped]
    r = sh.run("Stage 2, resumed", "anymal", "train", "--preset", "full", "--stage", "2", "--resume", "$SIZES",
               "$FILES")
    # the mix trains whole: no record skipped, the text-only ones among the 10 (in batches with the others), and the
    # long ShareGPT answer truncated to data.max_len, trained on, counted and said; not a stop (skip_bad=false here)
    ends = [x for x in metrics(s2) if x["split"] == "skipped"]  # each epoch's end, and each run's
    assert ends and all((x["train"], x["train_records"]) == (0, len(train)) for x in ends)
    assert max(x["train_truncated"] for x in ends) == 1 and ends[-1]["at"] == "end", ends
    said = sh.steps[-2]["stderr"] + r.stderr  # the stopped run's, the resumed one's
    assert (f": train 0 of {len(train)} records (0.0%); 1 truncated (first: llava_instruct_train.json#" in said and
            re.search(r" \(id=Hq4xT2m_0\): \d+ tokens, cut to 1024 \(data.max_len=1024\)\)", said)), said[-3000:]
    rows = train_rows(s2)
    assert metrics(s2)[:len(before)] == before  # the stopped run's log, kept as it was
    assert [x["step"] for x in rows] == list(range(1, 13))
    assert rows[stopped]["tokens"] > rows[stopped - 1]["tokens"]  # it counts on from the checkpoint, not from 0
    m2 = read_meta(s2)
    assert m2["step"] == 12 and any("lora_" in k for k in m2["arch"]["tensors"])
    assert m2["config"]["train"]["mode"] == "small" and m2["config"]["train"]["init_from"] == "runs/full/stage1"
    groups = load_train_state(latest_checkpoint(s2))["optimizer"]["param_groups"]
    assert {g["optim"] for g in groups} == {"adamw8bit"} and len(groups) == 2  # small mode's; bridge and LoRA groups

    # ---- evaluation: VQAv2 val with its controls, COCO captions ----
    r = sh.run("Evaluate", "anymal", "eval", "--checkpoint", "runs/full/stage2", "--split", "val2014",
               "--caption-split", "val2017", "--control", *CONTROLS, "--captions",
               note="The model is random and trained for 16 steps: the numbers say only that every part ran.")
    summary, end = json.JSONDecoder().raw_decode(r.stdout)
    assert summary["layout"] == "VQAv2/COCO" and summary["step"] == 12 and summary["stage"] == 2
    questions = json.loads((sh.cwd / "data/vqa/v2_OpenEnded_mscoco_val2014_questions.json").read_text())["questions"]
    assert list(summary["vqa"]) == CONTROLS and all(v["n"] == len(questions) for v in summary["vqa"].values())
    assert list(summary["captions"]) == CONTROLS and all("CIDEr" in v for v in summary["captions"].values())
    assert "| **overall** |" in r.stdout[end:]  # the accuracy table

    # ---- chat with the result ----
    r = sh.run("Ask it", "anymal", "chat", "--checkpoint", "runs/full/stage2", "--image",
               "data/coco/val2017/000000000001.jpg", "--prompt", "What is in the picture?", "--max-new-tokens", "16")
    assert "loaded runs/full/stage2 (stage 2, step 12) on cpu" in r.stderr and r.stdout.endswith("\n")  # its answer

    if os.environ.get("ANYMAL_REHEARSAL_TRANSCRIPT"):
        write_transcript(Path(os.environ["ANYMAL_REHEARSAL_TRANSCRIPT"]), sh, tmp_path)


# ---- the transcript (docs/full-scale.md) ----

def _vars(text: str, subst: dict) -> str:
    "`text` with each key of `subst` written as its shell variable (the longest first: one may start another)."
    for k in sorted(subst, key=len, reverse=True): text = text.replace(k, subst[k])
    return text


def _screen(text: str, subst: dict) -> list[str]:
    "The lines a terminal is left showing of `text`: a progress bar's last frame (none if it cleared itself); $R..."
    last = [line.split("\r")[-1].rstrip() for line in _vars(text, subst).split("\n")]
    return [l for l in last if l.strip()]


def _trim(lines: list[str], head: int = 24, tail: int = 8) -> list[str]:
    if len(lines) <= head + tail + 1: return lines
    return [*lines[:head], f"[... {len(lines) - head - tail} lines ...]", *lines[-tail:]]


HEADER = """# A full-scale run, rehearsed

This is the transcript of one run of `tests/test_full_scale.py`, the dress rehearsal of a full-scale run: the
commands a user who follows the README types, and what each printed (stderr, then stdout; a progress bar as the
terminal is left showing it; long outputs cut in the middle). Regenerate it with `.venv/bin/python tools/rehearsal.py`.

The run uses `--preset full` and the full preset's own code path: LLaMA-3-8B-Instruct named by its hub id and found
in the HF cache offline, loaded in NF4 (LoRA and `train.mode=small` in stage 2), CLIP named by an open_clip
architecture, the data laid out by `anymal prepare` (LLaVA-1.5's 665K mix for stage 2, as it is: image paths with a
sub-folder per source, text-only ShareGPT records, `<image>` at the end of a turn, integer ids, grayscale, CMYK and
RGBA images, a ShareGPT answer longer than `data.max_len`), stage 1 under `torchrun`, stage 2 stopped by SIGTERM and
resumed. **The only differences from a real run are the sizes and where the bytes come from:**

- the sizes: `$SIZES` below (open_clip's ViT-S-32-alt instead of ViT-L-14, a one-layer resampler of 8 latents, a
  2-layer LLaMA of width 64, batches of 4, a few steps) and `anymal prepare`'s `--val` and `--shard-size`;
- the bytes: the HF cache (`$R/hf`) holds a tiny random LLaMA, in the files of Meta's repo, with a byte-level BPE
  that has LLaMA-3's special tokens and chat template; CLIP's weights are random ones in a file (`$FILES`), where a
  real run has `openai`'s; `anymal prepare` downloads small stand-ins of the public sources (`tests/sources.py`) over
  HTTP from this machine, through the downloaders of a real run: the Hugging Face files through
  `huggingface_hub.hf_hub_download` from a stand-in of the Hub (`$HUB`, as `HF_ENDPOINT`: it answers as
  huggingface.co does, a redirect to its storage on another origin), the COCO, VQAv2, GQA, TextVQA and Visual Genome
  archives through `anymal.prepare.http_fetch` from stand-ins of their hosts (`$HOSTS`, at their real URLs' paths:
  `$URLS`). OCR-VQA's images, which LLaVA's script fetches and no archive holds, are put in place as it puts them.

So the numbers mean nothing (a random model, 16 steps): the run shows that every step works end to end, and what
each one says. `$R` is the test's folder; the commands run in `$R/work`, on a 2-core CPU.

Beyond each exit status the test checks what a user relies on: the weights are found by hub id, offline; the Hub's
three files came through `hf_hub_download` (a HEAD to the Hub, the bytes from its storage) and the mix's records are
laid out as they are, text-only ones and every image source included; under torchrun both processes trained (the
checkpoint's world size is 2) and one result line is printed; the frozen NF4 LLM passes the bridge a gradient after
a validation (on a CPU it once did not: issue 20); stage 2 skips no record of the mix and trains on the long answer
truncated to `data.max_len`, counting and saying so (with `data.skip_bad=false`, as the full preset has it, it once
stopped there); the stopped run saved its step and the resumed one counts on from it (its log kept, its token count
not from 0); stage 2 has LoRA tensors and `train.mode=small`; eval reports every control for every question, and the
captions.

## Setup

```console
$ export HF_HOME=$R/hf HF_HUB_OFFLINE=1   # the cache holding {repo}
$ export HF_ENDPOINT=$HUB                  # HUB={hub}: the stand-in Hub
$ SIZES="{sizes}"
$ FILES="{files}"
$ URLS="{urls}"                            # HOSTS={hosts}
$ cd $R/work
```

At full scale: `anymal prepare weights` and `anymal prepare all --instruct mix665k` without the sizes, `$FILES`,
`$URLS`, `HF_ENDPOINT` and `HF_HUB_OFFLINE`, then the same commands without `$SIZES $FILES` (on Modal:
`anymal.cloud.submit`, lesson 8)."""


def write_transcript(path: Path, sh: Shell, root: Path):
    "docs/full-scale.md: the commands of the rehearsal as a user types them, and what each printed."
    subst = {str(root): "$R", **sh.subst}
    q = lambda ws: _vars(" ".join(ws), subst)  # no spaces in them: a shell variable's text
    named = {v: k for k, v in sh.subst.items()}  # $HUB and $HOSTS: the stand-in Hub's and hosts' addresses
    out = [HEADER.format(repo=LLAMA3_REPO, sizes=q(sh.words["$SIZES"]), files=q(sh.words["$FILES"]),
                         urls=q(sh.words["$URLS"]), hub=named["$HUB"], hosts=named["$HOSTS"])]
    for i, s in enumerate(sh.steps, 1):
        shown = _trim(_screen(s["stderr"], subst)) + _trim(_screen(s["stdout"], subst), 40, 12)
        out += ["", f"## {i}. {s['title']}", ""]
        if s["note"]: out += [s["note"], ""]
        out += ["```console", f"$ {s['command']}", *shown, "```", "", f"Exit status {s['rc']}, {s['seconds']} s."]
    total, load = sum(s["seconds"] for s in sh.steps), os.getloadavg()[0]
    out += ["", f"In all {total:.0f} s of commands ({len(sh.steps)} of them), wall-clock, on {os.cpu_count()} CPU "
                f"cores with a load average of {load:.1f} at the end (whatever else ran shared them).", ""]
    path.write_text("\n".join(out))
