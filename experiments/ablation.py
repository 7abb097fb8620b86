"""The bridge ablation of lesson 7 at the demo's full budget: one `anymal demo` per variant, one JSON line each.

    .venv/bin/python experiments/ablation.py --out runs/ablation                    # every variant
    .venv/bin/python experiments/ablation.py --out runs/ablation --variants linear latents=64
    .venv/bin/python experiments/ablation.py --list                                  # the variants and their --set overrides
    .venv/bin/python experiments/ablation.py --set train.steps=100 ...               # extra overrides for every variant

Each variant runs the whole tiny pipeline (world, cached tiny CLIP/LLaMA, stage 1, stage 2, VQA evaluation with the
blank-image control) with the demo's recipe and one bridge setting changed, in `<out>/<variant>/`. The world and the
pretrained parts do not depend on the bridge, so they are built once and found in `$ANYMAL_CACHE` by the other
variants. Not run by the tests: about as long as `make demo` per variant.
"""
from __future__ import annotations
import argparse, json, sys, time
from pathlib import Path

VARIANTS = {  # name -> overrides of the tiny preset (the baseline is the preset itself)
    "perceiver": [],
    "linear": ["resampler.kind=linear"],
    "latents=4": ["resampler.latents=4"],
    "latents=64": ["resampler.latents=64"],
    "layers=1": ["resampler.layers=1"],
    "layers=4": ["resampler.layers=4"],
}


def run(name: str, sets: list[str], out: Path, eval_limit: int | None, progress: bool) -> dict:
    "One demo run of variant `name`; the JSON record of its results."
    import torch
    from anymal.config import tiny, override
    from anymal.demo import demo
    from anymal.resampler import build_bridge
    t0 = time.time()
    res = demo(tiny(), out / name.replace("=", "-"), sets, heldout=False, eval_limit=eval_limit, progress=progress)
    return dict(variant=name, sets=sets, bridge_params=sum(p.numel() for p in build_bridge(override(tiny(), sets)).parameters()),
                vqa_accuracy=res["vqa_accuracy"], blind_vqa_accuracy=res["blind_vqa_accuracy"],
                gain=round(res["vqa_accuracy"] - res["blind_vqa_accuracy"], 2), per_type=res["per_type"],
                blind_per_type=res["blind_per_type"], n_questions=res["n_questions"], seconds=round(time.time() - t0, 1),
                torch_threads=torch.get_num_threads())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/ablation", help="output folder, one subfolder per variant (default runs/ablation)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="NAME", help=f"which variants (default all: {' '.join(VARIANTS)})")
    ap.add_argument("--eval-limit", type=int, default=None, help="evaluate only the first N test questions")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--progress", action="store_true", help="progress bars and phase messages on stderr")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="an override for every variant, before the variant's own (repeatable), e.g. train.steps=100")
    ap.add_argument("--list", action="store_true", help="print the variants and exit")
    args = ap.parse_args(argv)
    if args.list:
        for k, v in VARIANTS.items(): print(f"{k:12s} {' '.join(f'--set {s}' for s in v) or '(the tiny preset)'}")
        return 0
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown: ap.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if not args.progress:
        import transformers
        transformers.utils.logging.disable_progress_bar()  # stdout is for the JSON lines; keep stderr readable too
    out = Path(args.out)
    for name in args.variants:
        print(json.dumps(run(name, [*args.sets, *VARIANTS[name]], out, args.eval_limit, args.progress)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
