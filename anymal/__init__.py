"""Build a multimodal LLM (AnyMAL: CLIP + Perceiver Resampler + LLaMA-3) from notebooks, tiny on a laptop CPU or full-size on GPUs

Modules:

- `anymal.demo_av`: The tiny AnyMAL learns to hear the world's tones and see its shapes move: a contrastive audio tower, stage 1 of the audio and video bridges on captions, stage 2 of every bridge and LoRA on images, sound and motion together, and the controls that show each answer comes from its modality."""

__version__ = "0.1.0"

from . import config  # light (the standard library only), and it silences bitsandbytes' harmless kernel notice


def __getattr__(name: str):
    "`anymal.AnyMAL` and `anymal.Assistant` with `from_pretrained`, imported on first use: `import anymal` stays light."
    if name in ("AnyMAL", "Assistant"):
        import importlib
        return getattr(importlib.import_module("anymal.export"), name)
    raise AttributeError(f"module 'anymal' has no attribute {name!r}")
