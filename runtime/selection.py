"""Which backend runs a bundle, decided from what this machine has (``--backend auto``).

    auto:  TensorRT       the bundle holds built engines AND tensorrt/tensorrt_llm/CUDA are usable
           ONNX Runtime   CUDA execution provider first when onnxruntime-gpu offers it
           ONNX Runtime   CPU execution provider otherwise
    torch / onnxruntime / tensorrt: asked for by name (the caller checks that it can run)

The probes are plain functions (``Probes``) so the order is tested with the machine's answers
replaced (tests/test_selection.py), never with faked results. Nothing here loads a model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
# ORT tries providers in order and places each node on the first that implements it: CPU stays last
# so nodes the CUDA provider lacks still run.
GPU_PROVIDERS = (CUDA_PROVIDER, CPU_PROVIDER)


def tensorrt_unavailable() -> str | None:
    """None when tensorrt, tensorrt_llm and a CUDA device are usable, else what is missing."""
    from runtime.trt_backend import unavailable_reason

    return unavailable_reason()


def ort_providers() -> list[str]:
    """The execution providers this onnxruntime build offers (onnxruntime-gpu adds CUDA)."""
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def has_engines(bundle: Path) -> bool:
    """True when the bundle holds built TensorRT engines for every stage and the TensorRT-LLM decoder."""
    from export.tensorrt import ENGINE_STAGES
    from runtime.trt_backend import ENGINE_DIR, LLM_ENGINE_DIR

    return (all((bundle / ENGINE_DIR / f"{s}.plan").is_file() for s in ENGINE_STAGES)
            and (bundle / LLM_ENGINE_DIR).is_dir())


@dataclass(frozen=True)
class Probes:
    """What the machine offers; replaced in tests (or the module functions monkeypatched: the
    defaults look them up at call time)."""

    tensorrt_unavailable: Callable[[], str | None] = lambda: tensorrt_unavailable()
    ort_providers: Callable[[], list[str]] = lambda: ort_providers()
    has_engines: Callable[[Path], bool] = lambda bundle: has_engines(bundle)


@dataclass(frozen=True)
class Selection:
    backend: str  # "tensorrt" | "onnxruntime" | "torch"
    providers: tuple[str, ...] = field(default=())  # ONNX Runtime execution providers, in order
    reason: str = ""  # why this one, for the status line

    def describe(self) -> str:
        if self.backend != "onnxruntime":
            return self.backend
        return f"onnxruntime ({', '.join(p.removesuffix('ExecutionProvider') for p in self.providers)})"


def onnxruntime_providers(probes: Probes = Probes()) -> tuple[str, ...]:
    """CUDA then CPU when onnxruntime-gpu offers CUDA, else CPU alone."""
    return GPU_PROVIDERS if CUDA_PROVIDER in probes.ort_providers() else (CPU_PROVIDER,)


def select(requested: str, bundle: Path | None, probes: Probes = Probes()) -> Selection:
    """The backend for ``requested`` (auto | torch | onnxruntime | tensorrt) over ``bundle``.

    ``bundle`` is None when only a checkpoint is at hand (``--backend torch``); ``auto`` then needs
    the caller to export one first (runtime/bundle_cache.py)."""
    if requested == "torch":
        return Selection("torch", reason="asked for")
    if requested == "tensorrt":
        return Selection("tensorrt", reason="asked for")
    if requested == "auto" and bundle is not None and probes.has_engines(bundle):
        why = probes.tensorrt_unavailable()
        if why is None:
            return Selection("tensorrt", reason="the bundle holds engines and TensorRT is usable")
        skipped = f"engines present but TensorRT unusable ({why}); "
    else:
        skipped = ""
    providers = onnxruntime_providers(probes)
    where = "onnxruntime-gpu offers CUDA" if providers[0] == CUDA_PROVIDER else "no CUDA provider"
    return Selection("onnxruntime", providers,
                     reason=("asked for; " if requested == "onnxruntime" else skipped) + where)


# -- from a --model path to a running backend ----------------------------------------------------

def _bundle_for(path: Path, fps: float | None, frames_per_window: int | None, policy) -> tuple[Path, bool]:
    """A checkpoint's compiled bundle: (bundle dir, trusted) from the cache, or a fresh temporary export.

    Cache entries were re-hashed when written and are size-checked when read, so they open without
    re-hashing (``trusted``); a bundle directory given directly is always checked."""
    from runtime import bundle_cache

    req = bundle_cache.Request(path, fps, frames_per_window, policy.options, policy.autotune, policy.verbose)
    if not policy.use_cache:
        return bundle_cache.export_uncached(req, policy.say), True
    entry, _ = bundle_cache.ensure_bundle(req, policy.cache_dir, policy.say)
    return entry, True


def open_backend(name: str, model_path: str | Path, fps: float | None = None,
                 frames_per_window: int | None = None, threads=None, policy=None,
                 probes: Probes = Probes()):
    """The backend ``name`` over ``model_path`` (checkpoint or bundle), exporting a checkpoint through
    the bundle cache unless ``name`` is torch. ``threads``: --threads (N or stage=N,...)."""
    import json

    from export.threads import parse_threads, stage_threads
    from runtime import backends as b
    from runtime.bundle_cache import Policy

    if name not in b.BACKENDS:
        raise ValueError(f"backend ({name!r}) must be one of {', '.join(b.BACKENDS)}")
    policy = policy or Policy()
    path = Path(model_path)
    override = parse_threads(threads)
    if name == "torch":
        if b.is_bundle(path):
            raise ValueError(f"{path}: an exported bundle runs on the onnxruntime or tensorrt backend, not torch")
        if set(override) - {"*"}:
            raise ValueError(f"--threads ({threads}): per-stage counts need a compiled bundle; "
                             "the torch backend has one thread pool (pass --threads N)")
        backend = b.TorchBackend(b.load_runtime_model(path, fps, frames_per_window))
        backend.selection = select("torch", None, probes)
        return backend
    if name == "tensorrt":
        why = probes.tensorrt_unavailable()
        if why:
            raise ValueError(f"backend 'tensorrt' is not available ({why}); "
                             "use onnxruntime (an exported bundle) or torch")
        if not b.is_bundle(path):
            raise ValueError(f"{path}: backend 'tensorrt' needs an exported bundle directory with a "
                             "manifest.json and its engines (favor-export --targets tensorrt,trtllm)")
    bundle, trusted = (path, False) if b.is_bundle(path) else _bundle_for(path, fps, frames_per_window, policy)
    sel = select(name, bundle, probes)
    if sel.backend == "tensorrt":
        from runtime.trt_backend import TensorRTBackend

        backend = TensorRTBackend(bundle)
    else:
        manifest = json.loads((bundle / "manifest.json").read_text())
        backend = b.OnnxRuntimeBackend(bundle, threads=stage_threads(manifest, override),
                                       providers=sel.providers, check_hashes=not trusted)
    backend.selection = sel
    return b._check_bundle_timing(backend, bundle, fps, frames_per_window)


def describe(backend) -> str:
    """The status line's backend: 'onnxruntime (CPU; threads audio_encoder 2, decoder 1)'."""
    sel = getattr(backend, "selection", None)
    text = sel.describe() if sel is not None else backend.name
    threads = getattr(getattr(backend, "bundle", None), "threads", None)
    if isinstance(threads, dict) and threads:
        text = text.removesuffix(")") + "; threads " + ", ".join(f"{k} {v}" for k, v in sorted(threads.items())) + ")"
    return text
