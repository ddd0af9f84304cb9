"""favor/encoders.py: variable-length Whisper, per-frame InstructBLIP, and loading real formats.

Every loader test builds a tiny source model, saves it in the source's format, loads it through
``from_pretrained`` and compares outputs with the source model's own forward.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from test_convert import Dims, ct2_bytes, openai_to_ct2, openai_whisper_state
from transformers import (
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    LlamaConfig,
    WhisperForConditionalGeneration,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from favor.config import get_config
from favor.encoders import (
    AudioEncoder,
    VisualEncoder,
    freeze,
    instructblip_configs,
    pad_or_trim_mel,
    whisper_config,
)

# fp32 everywhere; two implementations of the same maths (explicit matmuls vs SDPA, different
# summation order) differ by a few ulps of O(1) activations: measured <= 2e-6.
ATOL = 1e-5


@pytest.fixture
def cfg():
    return get_config("tiny")


def _randomize(module: torch.nn.Module, seed: int, std: float = 0.3) -> None:
    # HF inits some tensors to 0 or 1e-10 (query tokens, ViT positions): make every weight matter.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


# ---------------------------------------------------------------------------------------------
# AudioEncoder


def test_audio_tokens_follow_conv_arithmetic(cfg):
    enc = freeze(AudioEncoder(cfg))
    stride = cfg.timing.audio_conv_stride
    for tm in (1, 2, 7, 74, 333, cfg.timing.whisper_mel_frames):
        out = enc(torch.randn(2, cfg.audio.n_mels, tm))
        assert out.shape == (2, math.ceil(tm / stride), cfg.audio.d_model)
        assert torch.isfinite(out).all()


def test_audio_input_errors(cfg):
    enc = AudioEncoder(cfg)
    with pytest.raises(ValueError, match=r"mel must be \[B, 16, Tm >= 1\], got \[1, 80, 10\]"):
        enc(torch.randn(1, 80, 10))
    with pytest.raises(ValueError, match=r"got \[1, 16, 0\]"):
        enc(torch.randn(1, cfg.audio.n_mels, 0))
    with pytest.raises(ValueError, match=r"3001 frames, more than Whisper's 30 s context \(3000\)"):
        enc(torch.randn(1, cfg.audio.n_mels, cfg.timing.whisper_mel_frames + 1))


def _hf_encoder(enc: AudioEncoder, positions: int | None = None) -> WhisperEncoder:
    """HF's own WhisperEncoder with ``enc``'s weights, optionally a truncated position table."""
    config = whisper_config_like(enc, positions)
    hf = freeze(WhisperEncoder(config))
    state = dict(enc.encoder.state_dict())
    state["embed_positions.weight"] = state["embed_positions.weight"][: config.max_source_positions]
    hf.load_state_dict(state)
    return hf


def whisper_config_like(enc: AudioEncoder, positions: int | None):
    config = enc.encoder.config.__class__.from_dict(enc.encoder.config.to_dict())
    if positions is not None:
        config.max_source_positions = positions
    return config


def test_pad_to_30s_equals_hf_forward_exactly(cfg):
    cfg30 = cfg.replace(**{"audio.pad_to_30s": True})
    enc = freeze(AudioEncoder(cfg30))
    _randomize(enc, 0, std=0.2)
    hf = _hf_encoder(enc)
    full = cfg.timing.whisper_mel_frames
    with torch.no_grad():
        mel = torch.randn(2, cfg.audio.n_mels, full)
        torch.testing.assert_close(enc(mel), hf(mel).last_hidden_state, rtol=0, atol=0)
        short = mel[..., :417]
        out = enc(short)
        assert out.shape == (2, cfg.timing.whisper_audio_tokens, cfg.audio.d_model)
        torch.testing.assert_close(out, hf(pad_or_trim_mel(short, full)).last_hidden_state, rtol=0, atol=0)
        # Longer than 30 s: the release keeps the first 30 s.
        torch.testing.assert_close(enc(torch.cat([mel, mel[..., :9]], -1)), enc(mel), rtol=0, atol=0)


def test_unpadded_equals_hf_forward_with_truncated_positions(cfg):
    enc = freeze(AudioEncoder(cfg))
    _randomize(enc, 1, std=0.2)
    tokens = 37  # HF needs exactly 2 x positions mel frames
    hf = _hf_encoder(enc, positions=tokens)
    mel = torch.randn(3, cfg.audio.n_mels, tokens * cfg.timing.audio_conv_stride)
    with torch.no_grad():
        torch.testing.assert_close(enc(mel), hf(mel).last_hidden_state, rtol=0, atol=ATOL)


def _whisper_log_mel(audio: torch.Tensor, filters: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    # whisper/audio.py::log_mel_spectrogram with a given filterbank.
    stft = torch.stft(audio, n_fft, hop, window=torch.hann_window(n_fft), return_complex=True)
    mel = filters @ stft[..., :-1].abs() ** 2
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.amax(dim=(-2, -1), keepdim=True) - 8.0)
    return (log_spec + 4.0) / 4.0


def test_mel_padding_matches_waveform_padding_away_from_the_edge(cfg):
    t = cfg.timing
    g = torch.Generator().manual_seed(0)
    filters = torch.rand(cfg.audio.n_mels, t.n_fft // 2 + 1, generator=g)
    clip_samples = int(1.3 * t.sample_rate)
    clip = torch.randn(1, clip_samples, generator=g) * 0.1
    padded_audio = F.pad(clip, (0, t.whisper_chunk_seconds * t.sample_rate - clip_samples))
    reference = _whisper_log_mel(padded_audio, filters, t.n_fft, t.hop_length)
    ours = pad_or_trim_mel(_whisper_log_mel(clip, filters, t.n_fft, t.hop_length), t.whisper_mel_frames)
    assert ours.shape == reference.shape
    # Frames whose 25 ms window (n_fft samples, centred) lies wholly in silence are exact.
    first_silent = math.ceil((clip_samples + t.n_fft // 2) / t.hop_length)
    torch.testing.assert_close(ours[..., first_silent:], reference[..., first_silent:], rtol=0, atol=1e-6)


def _save_openai(sd: dict, path, heads: int, mels: int) -> None:
    dims = {"n_mels": mels, "n_audio_head": heads, "n_audio_ctx": sd["encoder.positional_embedding"].shape[0]}
    torch.save({"dims": dims, "model_state_dict": sd}, path)


def _openai_encoder_forward(sd: dict, mel: torch.Tensor, heads: int, layers: int) -> torch.Tensor:
    """openai-whisper's AudioEncoder.forward, written out (q and k each scaled by dh^-1/4)."""
    x = F.gelu(F.conv1d(mel, sd["encoder.conv1.weight"], sd["encoder.conv1.bias"], padding=1))
    x = F.gelu(F.conv1d(x, sd["encoder.conv2.weight"], sd["encoder.conv2.bias"], stride=2, padding=1))
    x = x.permute(0, 2, 1)
    x = x + sd["encoder.positional_embedding"][: x.shape[1]]
    d = x.shape[-1]
    scale = (d // heads) ** -0.25
    for i in range(layers):
        p = f"encoder.blocks.{i}."
        h = F.layer_norm(x, (d,), sd[p + "attn_ln.weight"], sd[p + "attn_ln.bias"])
        q = F.linear(h, sd[p + "attn.query.weight"], sd[p + "attn.query.bias"])
        k = F.linear(h, sd[p + "attn.key.weight"])
        v = F.linear(h, sd[p + "attn.value.weight"], sd[p + "attn.value.bias"])
        b, n, _ = q.shape
        q = q.view(b, n, heads, -1).permute(0, 2, 1, 3) * scale
        k = k.view(b, n, heads, -1).permute(0, 2, 3, 1) * scale
        v = v.view(b, n, heads, -1).permute(0, 2, 1, 3)
        o = ((q @ k).softmax(-1) @ v).permute(0, 2, 1, 3).flatten(2)
        x = x + F.linear(o, sd[p + "attn.out.weight"], sd[p + "attn.out.bias"])
        h = F.layer_norm(x, (d,), sd[p + "mlp_ln.weight"], sd[p + "mlp_ln.bias"])
        x = x + F.linear(F.gelu(F.linear(h, sd[p + "mlp.0.weight"], sd[p + "mlp.0.bias"])),
                         sd[p + "mlp.2.weight"], sd[p + "mlp.2.bias"])
    return F.layer_norm(x, (d,), sd["encoder.ln_post.weight"], sd["encoder.ln_post.bias"])


def test_from_openai_pt_and_ctranslate2_match_openai_forward(cfg, tmp_path):
    a = cfg.audio
    dims = Dims(d=a.d_model, heads=a.heads, ffn=a.ffn_dim, mels=a.n_mels, ctx=cfg.timing.whisper_audio_tokens,
                enc_layers=a.layers)
    sd = openai_whisper_state(dims, std=0.3)  # std 0.3 keeps activations O(1) through random layers
    ct2 = openai_to_ct2(sd, dims, dtype=torch.float32)
    _save_openai(sd, tmp_path / "tiny.pt", cfg.audio.heads, cfg.audio.n_mels)
    (tmp_path / "ct2").mkdir()
    data = ct2_bytes({k: (v.half() if v.is_floating_point() else v) for k, v in ct2.items()})
    cut = len(data) // 3
    (tmp_path / "ct2" / "model.bin.part1").write_bytes(data[:cut])
    (tmp_path / "ct2" / "model.bin.part2").write_bytes(data[cut:])

    mel = torch.randn(2, cfg.audio.n_mels, 123)
    reference = _openai_encoder_forward(sd, mel, cfg.audio.heads, cfg.audio.layers)
    with torch.no_grad():
        from_pt = freeze(AudioEncoder.from_pretrained(cfg, tmp_path / "tiny.pt"))(mel)
        torch.testing.assert_close(from_pt, reference, rtol=0, atol=ATOL)
        # The CT2 copy is fp16: compare with the reference run on the same fp16-rounded weights.
        sd16 = {k: v.half().float() for k, v in sd.items()}
        reference16 = _openai_encoder_forward(sd16, mel, cfg.audio.heads, cfg.audio.layers)
        from_ct2 = freeze(AudioEncoder.from_pretrained(cfg, tmp_path / "ct2"))(mel)
        torch.testing.assert_close(from_ct2, reference16, rtol=0, atol=ATOL)


def _tiny_hf_whisper(cfg) -> WhisperForConditionalGeneration:
    config = whisper_config(cfg)
    config.update({"decoder_layers": 1, "decoder_attention_heads": cfg.audio.heads,
                   "decoder_ffn_dim": 11, "vocab_size": 13, "max_target_positions": 8,
                   "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1})
    model = WhisperForConditionalGeneration(config).eval()
    _randomize(model.model.encoder, 2, std=0.2)
    return model


def test_from_hf_dir_matches_hf_encoder(cfg, tmp_path):
    model = _tiny_hf_whisper(cfg)
    model.save_pretrained(tmp_path)
    enc = freeze(AudioEncoder.from_pretrained(cfg, tmp_path))
    mel = torch.randn(1, cfg.audio.n_mels, cfg.timing.whisper_mel_frames)
    with torch.no_grad():
        torch.testing.assert_close(enc(mel), model.model.encoder(mel).last_hidden_state, rtol=0, atol=0)


def test_from_pretrained_shape_and_head_mismatch(cfg, tmp_path):
    _tiny_hf_whisper(cfg).save_pretrained(tmp_path / "hf")
    wider = cfg.replace(**{"audio.d_model": 30, "audio.heads": 3})
    with pytest.raises(ValueError, match=r"tensor conv1.weight expected shape \(30, 16, 3\) for this config, "
                                         r"found \(24, 16, 3\)"):
        AudioEncoder.from_pretrained(wider, tmp_path / "hf")
    with pytest.raises(ValueError, match=r"encoder_attention_heads is 3, config expects 4"):
        AudioEncoder.from_pretrained(cfg.replace(**{"audio.heads": 4}), tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match=r"nope.pt: Whisper checkpoint not found"):
        AudioEncoder.from_pretrained(cfg, tmp_path / "nope.pt")


@pytest.mark.slow
def test_audio_encoder_onnx_export_dynamic_length(cfg, tmp_path):
    import onnxruntime as ort

    enc = freeze(AudioEncoder(cfg))
    _randomize(enc, 3, std=0.2)
    frames = torch.export.Dim("mel_frames", min=2, max=cfg.timing.whisper_mel_frames)
    path = tmp_path / "audio.onnx"
    torch.onnx.export(enc, (torch.randn(1, cfg.audio.n_mels, 64),), str(path), dynamo=True,
                      input_names=["mel"], output_names=["audio_tokens"],
                      dynamic_shapes={"mel": {2: frames}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for tm in (37, 300):  # odd and even lengths, neither the traced one
        mel = torch.randn(1, cfg.audio.n_mels, tm)
        (got,) = session.run(None, {"mel": mel.numpy()})
        with torch.no_grad():
            # ORT's fused kernels reorder fp32 sums: measured max error ~1e-6.
            torch.testing.assert_close(torch.from_numpy(got), enc(mel), rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# VisualEncoder


def test_a_visual_encoder_built_from_a_config_sees_its_pixels():
    """From scratch (no weights loaded) the ViT starts at std 0.02, not transformers' 1e-10: at 1e-10 the
    query outputs of two random frames differ by 7e-7 and the gradient to the pixels is ~6e-8."""
    torch.manual_seed(0)
    enc = VisualEncoder(get_config("demo"))
    s = enc.image_size
    pixels = torch.randn(2, 1, 3, s, s, requires_grad=True)
    queries = enc(pixels, torch.tensor([[5, 6, 7]] * 2), torch.ones(2, 3, dtype=torch.long))
    assert (queries[0] - queries[1]).abs().max() > 1e-2  # measured 0.10; 7e-7 at std 1e-10
    (queries[0] * torch.randn_like(queries[0])).sum().backward()  # a plain sum of LayerNorm'd outputs is constant
    assert pixels.grad[0].abs().max() > 1e-4  # measured 0.026; 6e-8 at std 1e-10


def _inputs(cfg, b: int = 2, t: int = 3, li: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = cfg.visual.image_size
    pixels = torch.randn(b, t, 3, s, s, generator=g)
    ids = torch.randint(1, cfg.visual.qformer_vocab_size, (b, li), generator=g)
    mask = torch.ones(b, li, dtype=torch.long)
    mask[1, 4:] = 0  # second prompt is shorter (right padding)
    return pixels, ids, mask


def test_visual_shapes_frame_independence_and_padding(cfg):
    enc = freeze(VisualEncoder(cfg))
    _randomize(enc, 4)
    pixels, ids, mask = _inputs(cfg)
    with torch.no_grad():
        out = enc(pixels, ids, mask)
        assert out.shape == (2, 3, cfg.visual.num_query_tokens, cfg.visual.qformer_width)
        # Each frame is encoded on its own, with the same instruction.
        one = enc(pixels[:, 1:2], ids, mask)
        torch.testing.assert_close(one[:, 0], out[:, 1], rtol=0, atol=ATOL)
        # Masked instruction tokens do not matter.
        ids2 = ids.clone()
        ids2[1, 4:] = 7
        torch.testing.assert_close(enc(pixels, ids2, mask), out, rtol=0, atol=ATOL)
        # The instruction does matter.
        assert (enc(pixels, (ids + 1) % cfg.visual.qformer_vocab_size, mask) - out).abs().max() > 1e-3


def test_visual_input_errors(cfg):
    enc = VisualEncoder(cfg)
    pixels, ids, mask = _inputs(cfg)
    with pytest.raises(ValueError, match=r"pixels must be \[B, T, 3, 28, 28\], got \[2, 3, 3, 27, 27\]"):
        enc(pixels[..., :27, :27], ids, mask)
    with pytest.raises(ValueError, match=r"instruction_ids must be \[2, Li\], got \[1, 6\]"):
        enc(pixels, ids[:1], mask[:1])
    long_ids = torch.ones(2, cfg.visual.max_instruction_tokens + 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"17 tokens, more than max_instruction_tokens \(16\)"):
        enc(pixels, long_ids, torch.ones_like(long_ids))


def _tiny_hf_instructblip(cfg) -> InstructBlipForConditionalGeneration:
    vision, qformer = instructblip_configs(cfg)
    text = LlamaConfig(hidden_size=16, intermediate_size=20, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=50)
    config = InstructBlipConfig(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                                text_config=text.to_dict(), num_query_tokens=cfg.visual.num_query_tokens)
    model = InstructBlipForConditionalGeneration(config).eval()
    for i, part in enumerate((model.vision_model, model.qformer)):
        _randomize(part, 10 + i)
    with torch.no_grad():
        model.query_tokens.normal_(0, 0.3)
    return model


def _hf_reference(model, pixels, ids, mask) -> torch.Tensor:
    b, t = pixels.shape[:2]
    with torch.no_grad():
        out = model.get_image_features(pixel_values=pixels.flatten(0, 1), qformer_input_ids=ids.repeat_interleave(t, 0),
                                       qformer_attention_mask=mask.repeat_interleave(t, 0))
    q = model.config.num_query_tokens
    return out.qformer_outputs.last_hidden_state[:, :q].reshape(b, t, q, -1)


@pytest.mark.parametrize("shard", [None, "40KB"])
def test_visual_from_hf_dir_matches_instructblip(cfg, tmp_path, shard):
    model = _tiny_hf_instructblip(cfg)
    if shard is None:
        model.save_pretrained(tmp_path)
    else:  # a sharded checkpoint, read through model.safetensors.index.json
        model.save_pretrained(tmp_path, max_shard_size=shard)
        assert (tmp_path / "model.safetensors.index.json").is_file()
    enc = freeze(VisualEncoder.from_pretrained(cfg, tmp_path))
    pixels, ids, mask = _inputs(cfg)
    with torch.no_grad():
        torch.testing.assert_close(enc(pixels, ids, mask), _hf_reference(model, pixels, ids, mask),
                                   rtol=0, atol=ATOL)


def hf_to_lavis(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of transformers' convert_instructblip_original_to_pytorch.py (its rename list, the
    Qformer.bert / attention.self replacements and read_in_q_v_bias), run backwards."""
    renames = [
        (r"^vision_model\.embeddings\.class_embedding$", "visual_encoder.cls_token"),
        (r"^vision_model\.embeddings\.position_embedding$", "visual_encoder.pos_embed"),
        (r"^vision_model\.embeddings\.patch_embedding\.", "visual_encoder.patch_embed.proj."),
        (r"^vision_model\.post_layernorm\.", "ln_vision."),
        (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"visual_encoder.blocks.\1.norm\2."),
        (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.weight", r"visual_encoder.blocks.\1.attn.qkv.weight"),
        (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.", r"visual_encoder.blocks.\1.attn.proj."),
        (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"visual_encoder.blocks.\1.mlp."),
        (r"^qformer\.embeddings\.layernorm\.", "Qformer.bert.embeddings.LayerNorm."),
        (r"^qformer\.", "Qformer.bert."),
        (r"attention\.attention\.", "attention.self."),
        (r"^language_projection\.", "llm_proj."),
    ]
    out = {}
    for key, value in hf.items():
        if key.startswith("language_model."):
            continue  # the 'trimmed' LAVIS checkpoint carries no LLM
        m = re.match(r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias$", key)
        if m:
            q, _, v = value.chunk(3)
            out[f"visual_encoder.blocks.{m.group(1)}.attn.q_bias"] = q
            out[f"visual_encoder.blocks.{m.group(1)}.attn.v_bias"] = v
            continue
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def test_visual_from_lavis_pth_with_separate_eva_file(cfg, tmp_path):
    model = _tiny_hf_instructblip(cfg)
    lavis = hf_to_lavis(model.state_dict())
    lavis["Qformer.bert.embeddings.position_ids"] = torch.arange(512)[None]
    lavis["Qformer.cls.predictions.bias"] = torch.zeros(cfg.visual.qformer_vocab_size)
    assert "llm_proj.weight" in lavis
    eva = {k.removeprefix("visual_encoder."): v for k, v in lavis.items() if k.startswith("visual_encoder.")}
    trimmed = {k: v for k, v in lavis.items() if not k.startswith("visual_encoder.")}
    torch.save({"model": lavis}, tmp_path / "full.pth")
    torch.save({"model": trimmed}, tmp_path / "instruct_blip_trimmed.pth")
    torch.save(eva, tmp_path / "eva_vit_g.pth")

    pixels, ids, mask = _inputs(cfg, seed=5)
    reference = _hf_reference(model, pixels, ids, mask)
    with torch.no_grad():
        for enc in (VisualEncoder.from_pretrained(cfg, tmp_path / "full.pth"),
                    VisualEncoder.from_pretrained(cfg, tmp_path / "instruct_blip_trimmed.pth",
                                                  tmp_path / "eva_vit_g.pth")):
            # The HF model's random key-bias chunk is lost in LAVIS form (EVA has no key bias);
            # softmax ignores it, so outputs agree to fp32 rounding.
            torch.testing.assert_close(freeze(enc)(pixels, ids, mask), reference, rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match=r"missing .* tensors"):  # ViT absent and not given
        VisualEncoder.from_pretrained(cfg, tmp_path / "instruct_blip_trimmed.pth")
    lavis["visual_encoder.head.weight"] = torch.zeros(3)
    torch.save({"model": lavis}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"1 unknown keys \(visual_encoder.head.weight\)"):
        VisualEncoder.from_pretrained(cfg, tmp_path / "extra.pth")
    VisualEncoder.from_pretrained(cfg, tmp_path / "extra.pth", allow_unknown=True)


def test_freeze():
    enc = freeze(VisualEncoder(get_config("tiny")))
    assert not enc.training and not any(m.training for m in enc.modules())
    assert not any(p.requires_grad for p in enc.parameters())
