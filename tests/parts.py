"""Frozen parts for tests, saved the way the real ones are: a tiny shapes world and its tokenizer, a random tiny LLaMA
(a transformers folder) and tiny CLIP weights (a file), and the config that loads them.

The full scale's weights, small: a tiny LLaMA in the files and conventions of Meta's LLaMA-3-8B-Instruct
(`llama3_folder`) laid out in an HF hub cache as huggingface_hub lays it out (`hub_cache_snapshot`), and random
weights of an open_clip architecture saved as open_clip saves them (`open_clip_weights`). The public data sources
`anymal prepare` fetches have their stand-ins in `tests/sources.py`.

Also `run_cli`, the `anymal` command in a fresh process. Test helpers, not part of the library: tests import them as
`from parts import tiny_parts, run_cli`."""
from __future__ import annotations
import hashlib, os, subprocess, sys
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

CLI = [sys.executable, "-c", "import sys; from anymal.cli import main; sys.exit(main(sys.argv[1:]))"]  # `anymal`


def cli_env(env=None) -> dict:
    "The environment of an `anymal` process in a test: this checkout's anymal, one thread, warnings off."
    return dict(os.environ if env is None else env, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=str(REPO))


def run_cli(*args, env=None, timeout=180, cwd=REPO) -> subprocess.CompletedProcess:
    "The `anymal` console entry point in a fresh process (this checkout's anymal, one thread, warnings off)."
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=cli_env(env),
                          timeout=timeout)


# ---- released weights as the hub and open_clip save them, tiny (tests/test_prepare.py, tests/test_full_scale.py)

LLAMA3_REPO = "meta-llama/Meta-Llama-3-8B-Instruct"


def hub_cache_snapshot(src: Path, repo: str, cache: Path, rev: str = "0" * 40) -> Path:
    "Lay `src`'s files out in the HF hub cache as huggingface_hub's downloads do: blobs, snapshots/<rev>, refs/main."
    base = cache / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / rev
    snap.mkdir(parents=True)
    (base / "blobs").mkdir()
    for f in src.iterdir():
        blob = base / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(rev)
    return snap


def llama3_folder(d: Path, lcfg, texts) -> Path:
    """A `LlamaForCausalLM` checkpoint of the shape `lcfg` (an `LLMConfig`) in the files and conventions of
    LLaMA-3-8B-Instruct: bf16 safetensors in several shards with their index, a generation config ending on
    <|end_of_text|> or <|eot_id|>, and a byte-level BPE (trained on `texts`) with LLaMA-3's special tokens, its chat
    template, <|eot_id|> as eos and no pad token."""
    from transformers import LlamaForCausalLM
    from anymal.llm import llama_config
    from anymal.tokenizer import BOS, END, EOT
    tok = train_tokenizer(texts, lcfg.vocab_size)
    tok.pad_token = None  # Meta's tokenizer has none: the loader must pick one
    tok.save_pretrained(d, save_jinja_files=False)  # the chat template inside tokenizer_config.json, as in Meta's repo
    c = llama_config(lcfg)
    c.bos_token_id, c.eos_token_id = tok.convert_tokens_to_ids(BOS), tok.convert_tokens_to_ids([END, EOT])
    torch.manual_seed(0)
    LlamaForCausalLM(c).to(torch.bfloat16).save_pretrained(d, max_shard_size="100KB")  # shards, as the real 4 x 5 GB
    return d


def open_clip_weights(path: Path, model: str) -> Path:
    "Random weights of open_clip architecture `model` (QuickGELU, as OpenAI's), saved as open_clip's hub files are."
    import open_clip
    from safetensors.torch import save_file
    torch.manual_seed(0)
    m = open_clip.create_model(model, pretrained=None, force_quick_gelu=True)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    return path
