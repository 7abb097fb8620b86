"""Frozen parts for tests, saved the way the real ones are: a tiny shapes world and its tokenizer, a random tiny LLaMA
(a transformers folder) and tiny CLIP weights (a file), and the config that loads them.

Also `run_cli`, the `anymal` command in a fresh process. Test helpers, not part of the library: tests import them as
`from parts import tiny_parts, run_cli`."""
from __future__ import annotations
import os, subprocess, sys
from pathlib import Path
import torch
from anymal.config import Config, override, tiny
from anymal.llm import random_llm
from anymal.tokenizer import train_tokenizer
from anymal.vision import build_clip
from anymal.world import generate_world, iter_world_text

def tiny_parts(root: Path, sets=()) -> tuple[Config, object]:
    "`(cfg, tokenizer)`: `tiny()` with `sets`, its world under `root/world`, a LLaMA at `root/llm`, CLIP at `root/clip.pt`."
    cfg = override(tiny(), [f"data.root={root / 'world'}", *sets])
    generate_world(root / "world", cfg)
    tok = train_tokenizer(iter_world_text(root / "world"), cfg.llm.vocab_size, root / "world" / "tokenizer")
    torch.manual_seed(0)
    random_llm(cfg.llm).save_pretrained(root / "llm")
    torch.save(build_clip(cfg.vision).state_dict(), root / "clip.pt")
    return override(cfg, [f"llm.path={root / 'llm'}", f"llm.tokenizer={root / 'world' / 'tokenizer'}",
                          f"vision.pretrained={root / 'clip.pt'}"]), tok


REPO = Path(__file__).resolve().parents[1]

def run_cli(*args, env=None, timeout=180) -> subprocess.CompletedProcess:
    "The `anymal` console entry point in a fresh process (this checkout's anymal, one thread, warnings off)."
    env = dict(os.environ if env is None else env, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=str(REPO))
    code = "import sys; from anymal.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=timeout)
