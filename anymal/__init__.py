__version__ = "0.1.0"

from . import config  # light (the standard library only), and it silences bitsandbytes' harmless kernel notice


def __getattr__(name: str):
    "`anymal.AnyMAL` and `anymal.Assistant` with `from_pretrained`, imported on first use: `import anymal` stays light."
    if name in ("AnyMAL", "Assistant"):
        import importlib
        return getattr(importlib.import_module("anymal.export"), name)
    raise AttributeError(f"module 'anymal' has no attribute {name!r}")
