"""The dress rehearsal of a full-scale run (issue 20): what a user who follows the README types, end to end, through
the `anymal` command, on the full preset's own code path.

`anymal prepare weights` and `anymal prepare all`; stage 1 under `torchrun` (two processes, DDP over gloo); stage 2
stopped by SIGTERM (what a cloud sends a machine it reclaims) and resumed with `--resume`; `anymal eval` (VQA with its
blank / shuffled / text-only controls, and captions); `anymal chat` on the result. The config is `--preset full`:
LLaMA-3-8B-Instruct named by its hub id and found in an HF cache with `HF_HUB_OFFLINE=1`, loaded in NF4 (frozen in
stage 1; with LoRA and `train.mode=small`, as `full()` sets it, in stage 2), CLIP named by an open_clip architecture.

The only differences from a real run are the sizes and where the bytes come from:

- the sizes: every `--set` in `SIZES` (a smaller open_clip architecture, a tiny resampler and LLaMA, a few steps of
  small batches) and `anymal prepare`'s `--val` and `--shard-size`;
- the bytes: the HF cache holds a tiny random LLaMA with a byte-level BPE that has LLaMA-3's special tokens and chat
  template, in the files of Meta's repo (`parts.llama3_folder`), where a real run has Meta's download; CLIP's weights
  are random ones in a file (`FILES`: `vision.pretrained`), saved as open_clip saves them, where a real run has
  `openai`'s from the cache; `anymal prepare` fetches small fake copies of the public sources from file:// URLs
  (`--url`, `parts.fake_sources`).

With ANYMAL_REHEARSAL_TRANSCRIPT=FILE set it also writes the transcript of the run (each command as the user types it
and what it printed) to FILE: `tools/rehearsal.py` regenerates docs/full-scale.md so."""
from __future__ import annotations
import json, os, re, shlex, signal, subprocess, sys, time
from pathlib import Path

from parts import CLI, LLAMA3_REPO, cli_env, fake_sources, hub_cache_snapshot, llama3_folder, open_clip_weights

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
        self.cwd.mkdir()

    def argv(self, shown: list[str]) -> list[str]:
        "What runs for the command line `shown` (`anymal` and `torchrun` as this Python runs them; $WORDS expanded)."
        real = [a for w in shown for a in (self.words[w] if w in self.words else [w])]
        if real[0] == "anymal": return [*CLI, *real[1:]]
        if real[0] == "torchrun": return [sys.executable, "-m", "torch.distributed.run", *real[1:]]
        return real

    def record(self, title: str, shown: list[str], rc: int, out: bytes, err: bytes, t0: float,
               note: str = "") -> subprocess.CompletedProcess:
        "Keep what a command printed (decoded here: text mode would turn a progress bar's \\r into new lines)."
        out, err = out.decode(errors="replace"), err.decode(errors="replace")
        self.steps.append(dict(title=title, command=" ".join(w if w in self.words else shlex.quote(w) for w in shown),
                               stdout=out, stderr=err, rc=rc, seconds=round(time.time() - t0, 1), note=note))
        return subprocess.CompletedProcess(shown, rc, out, err)

    def run(self, title: str, *shown: str, expect: int = 0, note: str = "") -> subprocess.CompletedProcess:
        t0 = time.time()
        p = subprocess.run(self.argv(list(shown)), capture_output=True, cwd=self.cwd, env=self.env, timeout=900)
        r = self.record(title, list(shown), p.returncode, p.stdout, p.stderr, t0, note)
        assert r.returncode == expect, f"{' '.join(shown)}: exit {r.returncode}\n{r.stderr[-3000:]}"
        return r

    def run_until(self, title: str, *shown: str, stop_when, note: str = "") -> subprocess.CompletedProcess:
        "Run a command and send it SIGTERM once `stop_when()` is true (as a cloud does to a machine it reclaims)."
        t0 = time.time()
        p = subprocess.Popen(self.argv(list(shown)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=self.cwd,
                             env=self.env)
        while p.poll() is None and not stop_when(): time.sleep(0.05)
        ended = p.poll() is not None
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=900)
        r = self.record(title, list(shown), p.returncode, out, err, t0, note)
        assert not ended, f"{' '.join(shown)} ended before it could be stopped: {r.stderr[-3000:]}"
        return r


def test_full_scale_rehearsal(tmp_path):
    # ---- the files a real run downloads, small: the HF cache, CLIP's weights, the public data sources ----
    from anymal.config import full, override
    cfg = override(full(), SIZES)
    snapshot = hub_cache_snapshot(llama3_folder(tmp_path / "llama", cfg.llm, TEXT), LLAMA3_REPO,
                                  tmp_path / "hf" / "hub")
    (tmp_path / "clip").mkdir()
    clip = open_clip_weights(tmp_path / "clip" / "open_clip_model.safetensors", CLIP_ARCH)
    import open_clip  # saved as open_clip saves them: its own loader takes the file
    open_clip.create_model(CLIP_ARCH, pretrained=str(clip), force_quick_gelu=True)
    urls = fake_sources(tmp_path / "src")
    files = [f"vision.pretrained={clip}"]
    env = {k: v for k, v in cli_env().items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", ANYMAL_CACHE=str(tmp_path / "cache"))
    sh = Shell(tmp_path, env, {"$SIZES": sets(*SIZES), "$FILES": sets(*files),
                               "$URLS": [f"--url={k}={v}" for k, v in urls.items()]})
    s1, s2 = sh.cwd / "runs/full/stage1", sh.cwd / "runs/full/stage2"  # full()'s run folders
    assert (cfg.llm.path, cfg.llm.quant, cfg.train.mode, cfg.stage2.init_from) == (LLAMA3_REPO, "nf4", "small",
                                                                                   "runs/full/stage1")

    # ---- the weights: `anymal prepare weights` finds them in the cache, by hub id, offline ----
    r = sh.run("The weights are in the HF cache", "anymal", "prepare", "weights", "$SIZES", "$FILES",
               note="A real run downloads them here (`HF_TOKEN` for Meta's gated repo); offline, the command finds "
                    "them where the loaders will.")
    assert json.loads(r.stdout) == {"llm": str(snapshot), "clip": str(clip)}

    # ---- the data: `anymal prepare all` lays out LLaVA-Instruct, LCS-558K captions, VQAv2 val, COCO captions ----
    r = sh.run("The data", "anymal", "prepare", "all", "--val", "2", "--shard-size", "10", "$URLS",
               note="A real run fetches ~50 GB here, and keeps the default --val and --shard-size.")
    done = {d["dataset"]: d for d in map(json.loads, r.stdout.splitlines())}
    assert list(done) == ["llava", "captions", "vqav2", "coco"] and done["llava"]["train"] and done["captions"]["train"]
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

    # ---- stage 2: LoRA on the NF4 LLM, stopped by SIGTERM after a few steps, then resumed ----
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
    sh.run("Stage 2, resumed", "anymal", "train", "--preset", "full", "--stage", "2", "--resume", "$SIZES", "$FILES")
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

def _screen(text: str, root: Path) -> list[str]:
    "The lines a terminal is left showing of `text`: a progress bar's last frame (none if it cleared itself), $R."
    last = [line.split("\r")[-1].rstrip() for line in text.replace(str(root), "$R").split("\n")]
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
architecture, the data laid out by `anymal prepare`, stage 1 under `torchrun`, stage 2 stopped by SIGTERM and
resumed. **The only differences from a real run are the sizes and where the bytes come from:**

- the sizes: `$SIZES` below (open_clip's ViT-S-32-alt instead of ViT-L-14, a one-layer resampler of 8 latents, a
  2-layer LLaMA of width 64, batches of 4, a few steps) and `anymal prepare`'s `--val` and `--shard-size`;
- the bytes: the HF cache (`$R/hf`) holds a tiny random LLaMA, in the files of Meta's repo, with a byte-level BPE
  that has LLaMA-3's special tokens and chat template; CLIP's weights are random ones in a file (`$FILES`), where a
  real run has `openai`'s; `anymal prepare` fetches small fake copies of the public sources (`$URLS`).

So the numbers mean nothing (a random model, 16 steps): the run shows that every step works end to end, and what
each one says. `$R` is the test's folder; the commands run in `$R/work`, on a 2-core CPU.

Beyond each exit status the test checks what a user relies on: the weights are found by hub id, offline; under
torchrun both processes trained (the checkpoint's world size is 2) and one result line is printed; the frozen NF4
LLM passes the bridge a gradient after a validation (on a CPU it once did not: issue 20); the stopped run saved its
step and the resumed one counts on from it (its log kept, its token count not from 0); stage 2 has LoRA tensors and
`train.mode=small`; eval reports every control for every question, and the captions.

## Setup

```console
$ export HF_HOME=$R/hf HF_HUB_OFFLINE=1   # the cache holding {repo}
$ SIZES="{sizes}"
$ FILES="{files}"
$ URLS="{urls}"
$ cd $R/work
```

At full scale: `anymal prepare weights` and `anymal prepare all` without the sizes, `$FILES` and `$URLS`, then the
same commands without `$SIZES $FILES` (on Modal: `anymal.cloud.submit`, lesson 8)."""


def write_transcript(path: Path, sh: Shell, root: Path):
    "docs/full-scale.md: the commands of the rehearsal as a user types them, and what each printed."
    q = lambda ws: " ".join(w.replace(str(root), "$R") for w in ws)  # no spaces in them: a shell variable's text
    out = [HEADER.format(repo=LLAMA3_REPO, sizes=q(sh.words["$SIZES"]), files=q(sh.words["$FILES"]),
                         urls=q(sh.words["$URLS"]))]
    for i, s in enumerate(sh.steps, 1):
        shown = _trim(_screen(s["stderr"], root)) + _trim(_screen(s["stdout"], root), 40, 12)
        out += ["", f"## {i}. {s['title']}", ""]
        if s["note"]: out += [s["note"], ""]
        out += ["```console", f"$ {s['command']}", *shown, "```", "", f"Exit status {s['rc']}, {s['seconds']} s."]
    total, load = sum(s["seconds"] for s in sh.steps), os.getloadavg()[0]
    out += ["", f"In all {total:.0f} s of commands ({len(sh.steps)} of them), wall-clock, on {os.cpu_count()} CPU "
                f"cores with a load average of {load:.1f} at the end (whatever else ran shared them).", ""]
    path.write_text("\n".join(out))
