"""The frozen encoders: Whisper for audio, InstructBLIP ViT + instruction-conditioned Q-Former for frames.

Notation:
    B batch, T video frames, Tm mel frames (100 Hz), Ta audio tokens (50 Hz), n_mels mel bins,
    Da Whisper width, S image side, Np patches per frame, Dvit ViT width, Li instruction tokens,
    Qv query tokens per frame, Dv Q-Former width.

    AudioEncoder   mel [B, n_mels, Tm]                              -> [B, Ta, Da]
    VisualEncoder  pixels [B, T, 3, S, S], ids/mask [B, Li]         -> [B, T, Qv, Dv]

Both wrap transformers modules (their parameter names are the checkpoint names) and are built
with random weights; ``from_pretrained`` loads converted checkpoints, checking every shape.
``freeze`` makes one frozen; the model decides whether to call it (cfg.audio.frozen ...).

Dropout is 0 in every config built here: the release runs these encoders frozen in eval mode,
and a later ``model.train()`` must not switch dropout on inside them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import (
    InstructBlipQFormerConfig,
    InstructBlipQFormerModel,
    InstructBlipVisionConfig,
    InstructBlipVisionModel,
    WhisperConfig,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from favor import convert
from favor.config import FavorConfig
from favor.media import DYNAMIC_RANGE, LOG_SCALE, SILENT_MEL

# Attention backend for both encoders: SDPA exports to ONNX (flash-attention ops do not).
ATTN_IMPLEMENTATION = "sdpa"


def freeze(module: nn.Module) -> nn.Module:
    """No gradients, eval mode; returns the module."""
    module.requires_grad_(False)
    return module.eval()


def whisper_silence_level(mel: torch.Tensor) -> torch.Tensor:
    """Normalised log-mel value of digital silence for each clip in ``mel`` [B, n_mels, Tm] -> [B, 1, 1].

    Whisper clamps every value to (peak - 8) in log10 units, so silence is
    max(floor, peak - range) in raw units; in normalised units peak' = (peak + 4) / 4.
    """
    peak = mel.amax(dim=(1, 2), keepdim=True)  # normalised units
    return torch.clamp(peak - DYNAMIC_RANGE / LOG_SCALE, min=SILENT_MEL)


def pad_or_trim_mel(mel: torch.Tensor, frames: int) -> torch.Tensor:
    """Pad ``mel`` [B, n_mels, Tm] with Whisper's silence level, or trim it, to ``frames`` frames.

    Matches padding the waveform with zeros except for the STFT frames that straddle the end of
    the clip (the 25 ms window mixes speech and silence there); pad the waveform in media.py to
    reproduce the release bit for bit.
    """
    length = mel.shape[-1]
    if length >= frames:
        return mel[..., :frames]
    pad = whisper_silence_level(mel).expand(mel.shape[0], mel.shape[1], frames - length)
    return torch.cat([mel, pad.to(mel.dtype)], dim=-1)


def whisper_config(cfg: FavorConfig) -> WhisperConfig:
    """The transformers WhisperConfig for ``cfg.audio`` (only the encoder fields matter here)."""
    a = cfg.audio
    return WhisperConfig(
        d_model=a.d_model, encoder_layers=a.layers, encoder_attention_heads=a.heads,
        encoder_ffn_dim=a.ffn_dim, num_mel_bins=a.n_mels,
        max_source_positions=cfg.timing.whisper_audio_tokens,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        attn_implementation=ATTN_IMPLEMENTATION,
    )


def _load_checked(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``module`` strictly: every name present, every shape equal."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"{source}: missing {len(missing)} tensors, e.g. {missing[:3]}")
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise ValueError(f"{source}: {len(unexpected)} unexpected tensors, e.g. {unexpected[:3]}")
    for name, tensor in own.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{source}: tensor {name} expected shape {tuple(tensor.shape)} for this "
                             f"config, found {tuple(state[name].shape)}")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def _read_hf_weights(path: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors of an HF checkpoint (dir with safetensors, sharded or not, or pytorch_model.bin;
    or one .safetensors file) whose names, after an optional ``model.`` prefix, start with one of
    ``prefixes``. Only the shards and tensors needed are read: an InstructBLIP-13B dir is mostly LLM."""

    def wanted(key: str) -> bool:
        return key.removeprefix("model.").startswith(prefixes)

    def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
        with safe_open(file, framework="pt") as f:
            return {k.removeprefix("model."): f.get_tensor(k) for k in f.keys() if wanted(k)}

    if path.is_file() and path.suffix == ".safetensors":
        return read_safetensors(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        state: dict[str, torch.Tensor] = {}
        for shard in sorted({file for key, file in weight_map.items() if wanted(key)}):
            state.update(read_safetensors(path / shard))
        return state
    if (path / "model.safetensors").is_file():
        return read_safetensors(path / "model.safetensors")
    bin_file = path if path.is_file() else path / "pytorch_model.bin"
    if bin_file.is_file():
        state = torch.load(bin_file, map_location="cpu", weights_only=True)
        return {k.removeprefix("model."): v for k, v in state.items() if wanted(k)}
    raise FileNotFoundError(f"{path}: expected model.safetensors, model.safetensors.index.json or "
                            f"pytorch_model.bin in this transformers checkpoint directory")


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def _check_heads(found: int, expected: int, what: str, source: str) -> None:
    # Head counts do not show in any tensor shape, so they are checked from the metadata.
    if found != expected:
        raise ValueError(f"{source}: {what} is {found}, config expects {expected}")


class AudioEncoder(nn.Module):
    """Whisper encoder over a variable-length mel (no 30 s padding unless cfg.audio.pad_to_30s).

    Ta = ceil(Tm / audio_conv_stride): conv2 (kernel 3, stride 2, padding 1) gives
    floor((Tm + 2 - 3) / 2) + 1 = ceil(Tm / 2) tokens, one per 20 ms. Positions are the first Ta
    rows of the 30 s table, as in whisper_trt and the release's "[Yu] Support variable length".
    """

    def __init__(self, cfg: FavorConfig) -> None:
        super().__init__()
        self.n_mels = cfg.audio.n_mels
        self.max_frames = cfg.timing.whisper_mel_frames  # 30 s of 10 ms hops
        self.pad_to_30s = cfg.audio.pad_to_30s
        self.encoder = WhisperEncoder(whisper_config(cfg))

    @property
    def width(self) -> int:
        return self.encoder.config.d_model

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """mel [B, n_mels, Tm] (Tm <= 30 s of frames) -> [B, Ta, Da]."""
        if mel.dim() != 3 or mel.shape[1] != self.n_mels or mel.shape[2] < 1:
            raise ValueError(f"mel must be [B, {self.n_mels}, Tm >= 1], got {list(mel.shape)}")
        if self.pad_to_30s:
            mel = pad_or_trim_mel(mel, self.max_frames)  # the release: always one 30 s block
        elif mel.shape[-1] > self.max_frames:
            raise ValueError(f"mel has {mel.shape[-1]} frames, more than Whisper's 30 s context "
                             f"({self.max_frames}); split it into windows first")
        enc = self.encoder
        x = nn.functional.gelu(enc.conv1(mel.to(enc.conv1.weight.dtype)))  # x: [B, Da, Tm]
        x = nn.functional.gelu(enc.conv2(x))  # x: [B, Da, Ta]
        x = x.transpose(1, 2)  # x: [B, Ta, Da]
        x = x + enc.embed_positions.weight[: x.shape[1]]
        for layer in enc.layers:
            x = layer(x, None)
        return enc.layer_norm(x)

    @classmethod
    def from_pretrained(cls, cfg: FavorConfig, path: str | Path, *, allow_unknown: bool = False
                        ) -> AudioEncoder:
        """Load Whisper encoder weights from an HF Whisper dir or ``.safetensors`` file, an
        openai-whisper ``.pt`` checkpoint, or a CTranslate2 Whisper dir (model.bin[.partN])."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: Whisper checkpoint not found")
        model = cls(cfg)
        if path.is_dir() and ((path / "model.bin").is_file() or (path / "model.bin.part1").is_file()):
            raw = convert.read_ctranslate2(path)
            if "encoder/num_heads" in raw:
                _check_heads(int(raw["encoder/num_heads"]), cfg.audio.heads, "encoder/num_heads", str(path))
            hf, _ = convert.ct2_whisper_to_hf(raw, allow_unknown=allow_unknown)
        elif path.is_file() and path.suffix == ".pt":
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt:
                raise ValueError(f"{path}: expected an openai-whisper checkpoint with 'dims' and "
                                 f"'model_state_dict', found keys {sorted(ckpt)[:5]}")
            dims = ckpt.get("dims", {})
            if "n_audio_head" in dims:
                _check_heads(int(dims["n_audio_head"]), cfg.audio.heads, "dims.n_audio_head", str(path))
            hf, _ = convert.openai_whisper_to_hf(ckpt["model_state_dict"], allow_unknown=allow_unknown)
        else:
            config_json = path / "config.json"
            if config_json.is_file():
                heads = json.loads(config_json.read_text()).get("encoder_attention_heads")
                if heads is not None:
                    _check_heads(int(heads), cfg.audio.heads, "encoder_attention_heads", str(config_json))
            hf = _read_hf_weights(path, ("encoder.",))
        _load_checked(model.encoder, _strip(hf, "encoder."), str(path))
        return model


# transformers' InstructBlipVisionConfig.initializer_range is 1e-10: made for loading EVA weights, it leaves
# a ViT built from a config all but zero -- a constant function of the pixels whose gradients vanish
# (measured: query outputs differ by 7e-7 between two random images, the gradient to the pixels is 6e-8).
# A ViT trained from scratch starts at timm's / BERT's 0.02; loaded weights overwrite it.
VIT_INIT_STD = 0.02


def instructblip_configs(cfg: FavorConfig) -> tuple[InstructBlipVisionConfig, InstructBlipQFormerConfig]:
    """transformers configs for the ViT and the per-frame Q-Former of ``cfg.visual``."""
    v = cfg.visual
    vision = InstructBlipVisionConfig(
        hidden_size=v.vit_width, intermediate_size=v.vit_mlp_dim, num_hidden_layers=v.vit_layers,
        num_attention_heads=v.vit_heads, image_size=v.image_size, patch_size=v.patch_size,
        layer_norm_eps=v.vit_ln_eps, qkv_bias=True, attention_dropout=0.0,
        attn_implementation=ATTN_IMPLEMENTATION, initializer_range=VIT_INIT_STD,
    )
    qformer = InstructBlipQFormerConfig(
        vocab_size=v.qformer_vocab_size, hidden_size=v.qformer_width,
        num_hidden_layers=v.qformer_layers, num_attention_heads=v.qformer_heads,
        intermediate_size=v.qformer_ffn_dim, cross_attention_frequency=v.qformer_cross_attention_freq,
        encoder_hidden_size=v.vit_width, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation=ATTN_IMPLEMENTATION,
    )
    if v.max_instruction_tokens > qformer.max_position_embeddings:
        raise ValueError(f"max_instruction_tokens ({v.max_instruction_tokens}) exceeds the Q-Former "
                         f"position table ({qformer.max_position_embeddings})")
    return vision, qformer


class VisualEncoder(nn.Module):
    """InstructBLIP per frame: ViT (post_layernorm = LAVIS ln_vision) -> Q-Former with the
    instruction text beside the queries -> the Qv query outputs."""

    def __init__(self, cfg: FavorConfig) -> None:
        super().__init__()
        vision, qformer = instructblip_configs(cfg)
        self.num_queries = cfg.visual.num_query_tokens
        self.image_size = cfg.visual.image_size
        self.max_instruction_tokens = cfg.visual.max_instruction_tokens
        self.vision_model = InstructBlipVisionModel(vision)
        self.qformer = InstructBlipQFormerModel(qformer)
        self.query_tokens = nn.Parameter(torch.zeros(1, self.num_queries, cfg.visual.qformer_width))
        nn.init.normal_(self.query_tokens, std=qformer.initializer_range)  # LAVIS: normal(0, 0.02)

    @property
    def width(self) -> int:
        return self.query_tokens.shape[-1]

    def forward(self, pixels: torch.Tensor, instruction_ids: torch.Tensor,
                instruction_mask: torch.Tensor) -> torch.Tensor:
        """pixels [B, T, 3, S, S], instruction_ids / instruction_mask [B, Li] -> [B, T, Qv, Dv]."""
        s = self.image_size
        if pixels.dim() != 5 or tuple(pixels.shape[2:]) != (3, s, s):
            raise ValueError(f"pixels must be [B, T, 3, {s}, {s}], got {list(pixels.shape)}")
        b, t = pixels.shape[:2]
        if instruction_ids.dim() != 2 or instruction_ids.shape[0] != b:
            raise ValueError(f"instruction_ids must be [{b}, Li], got {list(instruction_ids.shape)}")
        if instruction_mask.shape != instruction_ids.shape:
            raise ValueError(f"instruction_mask shape {list(instruction_mask.shape)} must equal "
                             f"instruction_ids shape {list(instruction_ids.shape)}")
        if instruction_ids.shape[1] > self.max_instruction_tokens:
            raise ValueError(f"instruction has {instruction_ids.shape[1]} tokens, more than "
                             f"max_instruction_tokens ({self.max_instruction_tokens})")
        frames = pixels.reshape(b * t, *pixels.shape[2:])  # frames: [B*T, 3, S, S]
        image = self.vision_model(pixel_values=frames).last_hidden_state  # image: [B*T, Np+1, Dvit]
        # The release repeats the prompt's ids for every frame (b-major, matching `frames`).
        out = self.read(image, instruction_ids.repeat_interleave(t, dim=0),
                        instruction_mask.repeat_interleave(t, dim=0))
        return out.reshape(b, t, self.num_queries, -1)  # [B, T, Qv, Dv]

    def read(self, image: torch.Tensor, instruction_ids: torch.Tensor,
             instruction_mask: torch.Tensor) -> torch.Tensor:
        """The Q-Former alone: ViT tokens [N, Np+1, Dvit] and the instruction [N, Li] -> queries [N, Qv, Dv]."""
        queries = self.query_tokens.expand(image.shape[0], -1, -1)  # queries: [N, Qv, Dv]
        query_mask = torch.ones(queries.shape[:2], dtype=torch.long, device=image.device)
        out = self.qformer(
            input_ids=instruction_ids,
            attention_mask=torch.cat([query_mask, instruction_mask.to(torch.long)], dim=1),  # [N, Qv+Li]
            query_embeds=queries,
            encoder_hidden_states=image,
            encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long, device=image.device),
        ).last_hidden_state  # out: [N, Qv+Li, Dv]
        return out[:, : self.num_queries]

    @classmethod
    def from_pretrained(cls, cfg: FavorConfig, path: str | Path, vit_path: str | Path | None = None, *,
                        allow_unknown: bool = False) -> VisualEncoder:
        """Load from an HF InstructBLIP dir (InstructBlipForConditionalGeneration: vision_model.*,
        qformer.*, query_tokens; the LLM and language_projection are ignored) or a LAVIS ``.pth``
        (``["model"]``) plus, optionally, the EVA ViT-g ``eva_vit_g.pth`` as ``vit_path``."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: InstructBLIP checkpoint not found")
        model = cls(cfg)
        if path.is_file() and path.suffix in (".pth", ".pt"):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            state = ckpt["model"] if isinstance(ckpt, dict) and "model" in ckpt else ckpt
            vit = None
            if vit_path is not None:
                vit_path = Path(vit_path)
                if not vit_path.is_file():
                    raise FileNotFoundError(f"{vit_path}: EVA ViT checkpoint not found")
                vit = torch.load(vit_path, map_location="cpu", weights_only=True)
            hf, _ = convert.lavis_instructblip_to_hf(state, vit, allow_unknown=allow_unknown)
        else:
            if vit_path is not None:
                raise ValueError(f"{path}: vit_path is only for LAVIS .pth checkpoints, got {vit_path}")
            hf = _read_hf_weights(path, ("vision_model.", "qformer.", "query_tokens"))
        _load_checked(model, hf, str(path))
        return model
