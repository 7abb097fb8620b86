"""What each kind of bad input does to `anymal train`: regenerates the table in docs/reliability.md.

    python tools/reliability_table.py            # a few minutes on 2 CPU cores; --out FILE, --only NAME ...

A tiny shapes world (32 training images) and its stand-ins are built once in a temporary folder. For each bad-input
class a fresh copy of the world gets the bad input, and `anymal train` runs in this process (`anymal.cli.main`, its
stdout and stderr captured) for 4 steps of 8 samples, one epoch, so that every record is read, under each of
data.skip_bad {false, true} x train.cache_features {false, true} x data.num_workers {0, 2}. A cell shows the one-line
error the command printed, the skipped records it counted (metrics.jsonl's last `split="skipped"` record), or, for
an exception that escaped the command, `traceback: Type: first line`.
"""
from __future__ import annotations
import argparse, contextlib, gc, io, json, multiprocessing, os, shutil, subprocess, sys, tarfile, tempfile, time
import textwrap, warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's anymal

WORLD = ["data.world_images=32", "data.world_val_images=8", "standins.clip_steps=3", "standins.clip_batch=32",
         "standins.lm_steps=40", "standins.lm_batch=16", "standins.lm_block=160"]
RUN = ["train.steps=4", "train.batch_size=8", "train.log_every=2", "train.eval_every=0", "train.eval_batches=1",
       "train.save_every=0", "train.warmup=1"]
STAGE2 = ["train.allow_random_resampler=true", "train.init_from="]


# ---------------------------------------------------------------- injecting bad input into a copy of the world
def _edit_shard(root: Path, edit):
    "Rewrite the stage-1 training shard, each sample's members `{ext: bytes}` through `edit(i, members)`."
    from anymal.world import add_sample
    shard = root / "captions/train-00000.tar"
    with tarfile.open(shard) as tar:
        samples = {}
        for m in tar.getmembers():
            key, _, ext = m.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, (key, members) in enumerate(samples.items()): add_sample(tar, key, edit(i, dict(members)))

def _sample(n: int, change):
    "An `_edit_shard` edit that applies `change(members)` to sample `n` only."
    return lambda i, m: change(m) if i == n else m

def _edit_llava(root: Path, edit):
    "Rewrite the stage-2 training JSON through `edit(records) -> records`."
    p = root / "llava/llava_instruct_train.json"
    p.write_text(json.dumps(edit(json.loads(p.read_text()))))

def _image(root: Path, n: int = 3) -> Path:
    "The image file of stage-2 training record `n`."
    return root / "images" / json.loads((root / "llava/llava_instruct_train.json").read_text())[n]["image"]

def _png16(png: bytes) -> bytes:
    "The picture as a 16-bit grayscale PNG (mode I;16)."
    import numpy as np
    from PIL import Image
    out = io.BytesIO()
    Image.fromarray(np.asarray(Image.open(io.BytesIO(png)).convert("L")).astype(np.uint16) * 257).save(out, "PNG")
    return out.getvalue()

def _jpeg(png: bytes, mode: str = "RGB", **kw) -> bytes:
    from PIL import Image
    out = io.BytesIO()
    Image.open(io.BytesIO(png)).convert(mode).save(out, "JPEG", **kw)
    return out.getvalue()

def _odd_images(m: dict, i: int) -> dict:
    "Valid images in the modes real data has: RGBA, palette with transparency, CMYK JPEG, EXIF-rotated JPEG."
    from PIL import Image
    im, out = Image.open(io.BytesIO(m["png"])), io.BytesIO()
    if i % 4 == 0: im.convert("RGBA").save(out, "PNG")
    if i % 4 == 1:
        p = im.quantize(8)
        p.save(out, "PNG", transparency=p.getpixel((0, 0)))
    if i % 4 == 2: return {"jpg": _jpeg(m["png"], "CMYK"), "txt": m["txt"], "json": m["json"]}
    if i % 4 == 3:
        exif = Image.Exif()
        exif[0x0112] = 6
        return {"jpg": _jpeg(m["png"], exif=exif), "txt": m["txt"], "json": m["json"]}
    return dict(m, png=out.getvalue())

def _truncate(p: Path):
    p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2])

CASES = {  # name -> (stage, what it does to a copy of the world, what should happen: see `expected`)
    "truncated PNG": (1, lambda r: _edit_shard(r, _sample(3, lambda m: dict(m, png=m["png"][:len(m["png"]) // 2]))),
                      "one record bad"),
    "truncated JPEG": (1, lambda r: _edit_shard(r, _sample(3, lambda m: {"jpg": _jpeg(m["png"])[:300],
                                                                          "txt": m["txt"]})), "one record bad"),
    "garbage bytes as image": (1, lambda r: _edit_shard(r, _sample(3, lambda m: dict(m, png=b"garbage" * 20))),
                               "one record bad"),
    "16-bit PNG": (1, lambda r: _edit_shard(r, _sample(3, lambda m: dict(m, png=_png16(m["png"])))), "trains"),
    "RGBA, palette, CMYK, EXIF-rotated": (1, lambda r: _edit_shard(r, lambda i, m: _odd_images(m, i) if i < 8 else m),
                                          "trains"),
    "empty caption": (1, lambda r: _edit_shard(r, _sample(3, lambda m: dict(m, txt=b"  "))), "one record bad"),
    "non-UTF-8 caption": (1, lambda r: _edit_shard(r, _sample(3, lambda m: dict(m, txt=b"\xff\xfe red"))),
                          "one record bad"),
    "sample without caption": (1, lambda r: _edit_shard(r, _sample(3, lambda m: {"png": m["png"]})), "one record bad"),
    "unreadable shard": (1, lambda r: (r / "captions/train-00001.tar").write_bytes(b"not a tar file" * 100),
                         "one shard bad"),
    "a quarter of the captions empty": (1, lambda r: _edit_shard(r, lambda i, m: dict(m, txt=b"") if i % 4 == 1 else m),
                                        "too many bad"),
    "missing image file": (2, lambda r: _image(r).unlink(), "one image bad"),
    "truncated image file": (2, lambda r: _truncate(_image(r)), "one image bad"),
    "16-bit PNG image file": (2, lambda r: _image(r).write_bytes(_png16(_image(r).read_bytes())), "trains"),
    "malformed LLaVA record": (2, lambda r: _edit_llava(r, lambda recs: [
        *recs[:3], dict(recs[3], conversations=[{"from": "robot", "value": "hi"}]), *recs[4:]]), "one record bad"),
    "question longer than data.max_len": (2, lambda r: _edit_llava(r, lambda recs: [
        *recs[:3], dict(recs[3], conversations=[{"from": "human", "value": "<image>\n" + "Is it red? " * 80},
                                                {"from": "gpt", "value": "no"}]), *recs[4:]]), "too long"),
    "answer longer than data.max_len": (2, lambda r: _edit_llava(r, lambda recs: [
        *recs[:3], dict(recs[3], conversations=[recs[3]["conversations"][0],
                                                {"from": "gpt", "value": "It is red. " * 80}]), *recs[4:]]),
                                        "truncated"),
    "truncated LLaVA JSON file": (2, lambda r: (r / "llava/llava_instruct_train.json").write_text('[{"id": 1, "im'),
                                  "the file bad"),
}


def expected(outcome: str, expect: str, skip_bad: bool) -> bool:
    "Whether a cell's outcome is what its case expects: a valid input trains; a bad one stops, or is skipped."
    error = outcome.startswith(("exit ", "traceback: "))
    if expect == "trains": return outcome == "trains, nothing skipped"
    if expect == "truncated": return outcome == "trains, nothing skipped; truncated 1 of 32 train records"
    if expect == "too long": return outcome == "trains, skipped 1 of 32 train records (too long 1)"  # skip_bad or not
    if expect == "the file bad" or not skip_bad: return error
    if expect == "too many bad": return error and "data.max_skipped" in outcome
    return outcome.startswith("trains, skipped 1 of ") and "val records" not in outcome


# ---------------------------------------------------------------- running one cell
def _world(work: Path) -> tuple[Path, list[str]]:
    "The clean world, and the settings that point a run at its cached stand-ins."
    from anymal.config import override, tiny
    from anymal.standins import with_standins
    from anymal.world import world_main
    root = work / "world"
    with contextlib.redirect_stdout(io.StringIO()):
        world_main(["--out", str(root), "--preset", "tiny", *[a for s in WORLD for a in ("--set", s)]])
    cfg = with_standins(override(tiny(), [*WORLD, f"data.root={root}"]), progress=False)
    # stage 2: one conversation per image (the world has 4), so that 4 steps of 8 are one epoch of 32 records
    _edit_llava(root, lambda recs: list({r["image"]: r for r in reversed(recs)}.values())[::-1])
    return root, [f"vision.pretrained={cfg.vision.pretrained}", f"llm.path={cfg.llm.path}"]

def _outcome(rc: int | None, err: str, out_dir: Path, exc: BaseException | None) -> str:
    "What a run did, in one line."
    if exc is not None:
        lines = str(exc).strip().splitlines() or [""]
        return f"traceback: `{type(exc).__name__}: {lines[0]}`"
    if rc:
        lines = [l for l in err.splitlines() if l.strip()]
        named = [l for l in lines if "error:" in l] or lines[-1:]
        return f"exit {rc}: `{named[-1].strip()}`" if named else f"exit {rc}, nothing printed"
    recs = [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    end = [r for r in recs if r["split"] == "skipped"][-1:]
    kinds = lambda r, k: ", ".join(f"{n} {c}" for n, c in r[f"{k}_kinds"].items())
    parts = [f"{r[k]} of {r[f'{k}_records']} {k} records ({kinds(r, k)})"
             for r in end for k in ("train", "val") if r.get(k)]
    cut = [f"; truncated {r[f'{k}_truncated']} of {r[f'{k}_records']} {k} records"
           for r in end for k in ("train", "val") if r.get(f"{k}_truncated")]
    return ("trains, skipped " + "; ".join(parts) if parts else "trains, nothing skipped") + "".join(cut)

def run_cell(world: Path, stage: int, sets: list[str], out_dir: Path) -> str:
    "`anymal train` in this process; its outcome."
    from anymal.cli import main
    args = ["train", "--stage", str(stage), "--no-progress",
            *[a for s in [*sets, f"train.out_dir={out_dir}", f"data.root={world}"] for a in ("--set", s)]]
    err, rc, exc = io.StringIO(), None, None
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try: rc = main(args)
        except SystemExit as e: rc = e.code if isinstance(e.code, int) else 1
        except Exception as e: exc = e
    # A finished run leaves its training DataLoader's iterator to the garbage collector, whose shutdown of the
    # workers then waits 5 s for each (they do not exit on request; a CLI process is not slowed, it just exits):
    # end them here, then collect
    for p in multiprocessing.active_children():
        p.terminate()
        p.join()
    gc.collect()
    return _outcome(rc, err.getvalue(), out_dir, exc).replace(str(world), "WORLD")


# ---------------------------------------------------------------- the table
def table(work: Path, only=None, log=print) -> tuple[list[dict], float]:
    t0 = time.time()
    clean, standins = _world(work)
    rows = []
    for name, (stage, inject, expect) in CASES.items():
        if only and name not in only: continue
        world = work / f"w{len(rows) // 8:02d}"
        shutil.copytree(clean, world)
        inject(world)
        for skip in (False, True):
            for cache in (False, True):
                for workers in (0, 2):
                    sets = [*WORLD, *RUN, *(STAGE2 if stage == 2 else []), *standins,
                            f"data.skip_bad={str(skip).lower()}", f"train.cache_features={str(cache).lower()}",
                            f"data.num_workers={workers}"]
                    out = work / "runs" / f"{len(rows):03d}"
                    o = run_cell(world, stage, sets, out)
                    rows.append(dict(input=name, stage=stage, skip_bad=skip, cache_features=cache, num_workers=workers,
                                     outcome=o, expected=expected(o, expect, skip)))
                    log(f"{time.time() - t0:6.0f} s  {name} | skip_bad={skip} cache={cache} workers={workers}: {o}"
                        f"{'' if rows[-1]['expected'] else '   <- NOT AS EXPECTED'}")
    return rows, time.time() - t0

def _commit() -> str:
    git = lambda *a: subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True).stdout.strip()
    dirty = git("status", "--porcelain", "anymal", "tools")
    return git("rev-parse", "--short", "HEAD") + (" (with uncommitted changes)" if dirty else "")

def markdown(rows: list[dict], seconds: float) -> str:
    def flag(b): return "true" if b else "false"
    odd = [r for r in rows if not r["expected"]]
    tb = sum(r["outcome"].startswith("traceback:") for r in rows)
    surprises = (f"**{len(odd)} cells are not as the script expects** (marked ✗)" if odd else
                 "Every cell is as the script expects")
    surprises += (" (`expected`: a valid input trains and skips nothing; with `skip_bad=false` a bad one stops the run;"
                  " with `skip_bad=true` it is one counted skip, or past `data.max_skipped` a stop with the counts; a"
                  " conversation longer than `data.max_len` is truncated and counted, or, when not one answer token"
                  " fits, one counted skip whatever `skip_bad` says). "
                  + (f"**{tb} of the {len(rows)} cells stop with a traceback**, not a one-line error."
                     if tb else "No cell ends in a traceback."))
    surprises = textwrap.fill(surprises, 116)
    head = f"""# Bad input: what each kind does to a training run

Generated by `python tools/reliability_table.py` at commit {_commit()} ({len(rows)} runs in {seconds:.0f} s on
{os.cpu_count()} CPU cores); rerun it to regenerate this file.

Each bad input is put into a fresh copy of a tiny shapes world (32 training images, 8 validation images) and
`anymal train --stage N` runs on it for 4 steps of 8 samples (one epoch: every record is read), under each of
`data.skip_bad` × `train.cache_features` × `data.num_workers`. The stage-1 inputs go into the caption shards (32
samples), the stage-2 ones into the LLaVA JSON (32 conversations, one per image) and its image folder. An outcome is

- `exit N: ...`: the command stopped with that one-line message (the record, shard or file is named in it);
- `trains, skipped ...`: the run finished and counted the records it left out, by kind, as printed at the end of each
  epoch and of the run and written to `metrics.jsonl` (`split="skipped"`; counted across DataLoader workers and ranks);
  `truncated N of M`: it trained on N records cut to `data.max_len`, counted in the same report;
- `traceback: Type: message`: an exception escaped the command (a Python traceback, not a one-line error).

Skipping stops once more than `data.max_skipped` (5%) of a dataset's records are known bad ("a quarter of the
captions empty"): one bad record in 32 is 3%. With `skip_bad=false` the first bad record read is the error; with
cached features every image is decoded before the first step, so a bad image is found there whichever record
uses it. A 16-bit PNG decodes to the same picture as its 8-bit copy (`tests/test_data.py`,
`test_images_decode_as_a_viewer_shows_them`), not to a white one. A conversation longer than `data.max_len` is not
bad data (LLaVA-1.5's mix has many): it is truncated as LLaVA truncates, keeping the part of its answer that fits,
and only one whose question alone fills `max_len` is left out, counted as `too long`, in either `skip_bad` mode.

{surprises}

| bad input | stage | skip_bad | cache_features | num_workers | outcome |
|---|---:|---|---|---:|---|
"""
    cell = lambda r: ("" if r["expected"] else "✗ ") + r["outcome"].replace("|", "\\|")
    body = "".join(f"| {r['input']} | {r['stage']} | {flag(r['skip_bad'])} | {flag(r['cache_features'])} | "
                   f"{r['num_workers']} | {cell(r)} |\n" for r in rows)
    return head + body

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs/reliability.md"), help="the markdown file to write")
    ap.add_argument("--only", nargs="*", help="only these bad-input classes (as named in CASES): print, write nothing")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (worlds, runs) and print it")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="anymal-reliability-"))
    os.environ["ANYMAL_CACHE"] = str(work / "cache")  # stand-ins and feature caches of this run only
    try:
        rows, secs = table(work, args.only, log=lambda s: print(s, file=sys.stderr, flush=True))
        if not args.only: Path(args.out).write_text(markdown(rows, secs))
        odd = sum(not r["expected"] for r in rows)
        print(f"{len(rows)} cells in {secs:.0f} s; {odd} not as expected", file=sys.stderr)
    finally:
        if args.keep: print(work, file=sys.stderr)
        else: shutil.rmtree(work, ignore_errors=True)
    return 0

if __name__ == "__main__":
    sys.exit(main())
