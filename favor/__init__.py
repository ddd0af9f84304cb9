"""FAVOR: fine-grained audio-visual joint representations for LLMs, as an edge-deployable runtime.

Data flows media -> encoders -> sync -> windows -> causal Q-Former -> projector -> LLM -> captions;
each stage is one module here. Public API:

    from favor import get_config, build_model, load_model
    model = load_model("demo.safetensors")            # checkpoint + its base models

    import favor                                       # the runtime (runtime/api.py), imported lazily
    engine = favor.load()                              # the demo model; favor.load("ckpt.safetensors")
    captions = engine.caption("clip.mp4")              # or favor.caption / favor.stream / favor.ask
"""

from favor.config import PRESETS, FavorConfig, get_config

__version__ = "0.1.0"

__all__ = ["PRESETS", "Engine", "FavorConfig", "ask", "build_model", "caption", "get_config", "load",
           "load_model", "stream", "__version__"]


def build_model(*args, **kwargs):
    """favor.build.build_model, imported lazily (transformers is slow to import)."""
    from favor.build import build_model as _build

    return _build(*args, **kwargs)


def load_model(*args, **kwargs):
    """favor.checkpoint.load_model, imported lazily."""
    from favor.checkpoint import load_model as _load

    return _load(*args, **kwargs)


# The runtime API (runtime/api.py), resolved on first use: `import favor` stays cheap (no torch, PyAV).
_API = ("Engine", "load", "caption", "stream", "ask")


def __getattr__(name: str):
    if name in _API:
        from runtime import api

        return getattr(api, name)
    raise AttributeError(f"module 'favor' has no attribute {name!r}")
