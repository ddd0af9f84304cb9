"""FAVOR: fine-grained audio-visual joint representations for LLMs, as an edge-deployable runtime.

Data flows media -> encoders -> sync -> windows -> causal Q-Former -> projector -> LLM -> captions;
each stage is one module here. Public API:

    from favor import get_config, build_model, load_model
    model = load_model("demo.safetensors")            # checkpoint + its base models
"""

from favor.config import PRESETS, FavorConfig, get_config

__version__ = "0.1.0"

__all__ = ["PRESETS", "FavorConfig", "build_model", "get_config", "load_model", "__version__"]


def build_model(*args, **kwargs):
    """favor.build.build_model, imported lazily (transformers is slow to import)."""
    from favor.build import build_model as _build

    return _build(*args, **kwargs)


def load_model(*args, **kwargs):
    """favor.checkpoint.load_model, imported lazily."""
    from favor.checkpoint import load_model as _load

    return _load(*args, **kwargs)
