"""favor/convert.py: the CTranslate2 reader and the Whisper / InstructBLIP weight maps.

Source checkpoints are fabricated here in each source's own layout (a CT2 writer following the
documented byte layout, openai-whisper names, LAVIS names derived with transformers' own
conversion rules), so a wrong table entry cannot cancel out against its inverse.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest
import torch
from transformers import WhisperConfig, WhisperModel

from favor import convert

CT2_DTYPE_IDS = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.float16: 4,
                 torch.bfloat16: 5}


def _ct2_string(s: str) -> bytes:
    b = s.encode() + b"\0"
    return struct.pack("<H", len(b)) + b


def ct2_bytes(variables: dict[str, torch.Tensor], aliases: dict[str, str] | None = None,
              version: int = 6) -> bytes:
    """A CTranslate2 model.bin as documented in reference/OFFLINE-WEIGHTS.md."""
    buf = bytearray(struct.pack("<I", version) + _ct2_string("WhisperSpec") + struct.pack("<I", 3))
    buf += struct.pack("<I", len(variables))
    for name, t in variables.items():
        raw = t.contiguous().view(torch.int16 if t.dtype == torch.bfloat16 else t.dtype).numpy().tobytes()
        buf += _ct2_string(name) + struct.pack("<B", t.dim()) + struct.pack(f"<{t.dim()}I", *t.shape)
        buf += struct.pack("<BI", CT2_DTYPE_IDS[t.dtype], len(raw)) + raw
    aliases = aliases or {}
    buf += struct.pack("<I", len(aliases))
    for alias, target in aliases.items():
        buf += _ct2_string(alias) + _ct2_string(target)
    return bytes(buf)


@dataclass(frozen=True)
class Dims:
    """A tiny Whisper in openai-whisper terms (odd sizes)."""

    d: int = 12
    heads: int = 3
    ffn: int = 19
    mels: int = 5
    ctx: int = 11
    enc_layers: int = 2
    dec_layers: int = 1
    vocab: int = 17
    text_ctx: int = 7


TINY = Dims()


def openai_whisper_state(dims: Dims = TINY, seed: int = 0, std: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    D, FFN = dims.d, dims.ffn

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    sd = {"encoder.conv1.weight": r(D, dims.mels, 3), "encoder.conv1.bias": r(D),
          "encoder.conv2.weight": r(D, D, 3), "encoder.conv2.bias": r(D),
          "encoder.positional_embedding": r(dims.ctx, D), "encoder.ln_post.weight": r(D),
          "encoder.ln_post.bias": r(D), "decoder.token_embedding.weight": r(dims.vocab, D),
          "decoder.positional_embedding": r(dims.text_ctx, D), "decoder.ln.weight": r(D),
          "decoder.ln.bias": r(D)}
    for side, n in (("encoder", dims.enc_layers), ("decoder", dims.dec_layers)):
        for i in range(n):
            p = f"{side}.blocks.{i}."
            for attn in ("attn", "cross_attn") if side == "decoder" else ("attn",):
                for proj in ("query", "key", "value", "out"):
                    sd[p + f"{attn}.{proj}.weight"] = r(D, D)
                    if proj != "key":
                        sd[p + f"{attn}.{proj}.bias"] = r(D)
                sd[p + f"{attn}_ln.weight"], sd[p + f"{attn}_ln.bias"] = r(D), r(D)
            sd[p + "mlp_ln.weight"], sd[p + "mlp_ln.bias"] = r(D), r(D)
            sd[p + "mlp.0.weight"], sd[p + "mlp.0.bias"] = r(FFN, D), r(FFN)
            sd[p + "mlp.2.weight"], sd[p + "mlp.2.bias"] = r(D, FFN), r(D)
    return sd


def openai_to_ct2(sd: dict[str, torch.Tensor], dims: Dims = TINY, dtype: torch.dtype = torch.float16
                  ) -> dict[str, torch.Tensor]:
    """What ctranslate2's Whisper converter writes: fused q,k,v (zero key bias), fused cross k,v."""
    out: dict[str, torch.Tensor] = {
        "encoder/conv1/weight": sd["encoder.conv1.weight"], "encoder/conv1/bias": sd["encoder.conv1.bias"],
        "encoder/conv2/weight": sd["encoder.conv2.weight"], "encoder/conv2/bias": sd["encoder.conv2.bias"],
        "encoder/position_encodings/encodings": sd["encoder.positional_embedding"],
        "encoder/layer_norm/gamma": sd["encoder.ln_post.weight"],
        "encoder/layer_norm/beta": sd["encoder.ln_post.bias"],
        "decoder/embeddings/weight": sd["decoder.token_embedding.weight"],
        "decoder/position_encodings/encodings": sd["decoder.positional_embedding"],
        "decoder/layer_norm/gamma": sd["decoder.ln.weight"], "decoder/layer_norm/beta": sd["decoder.ln.bias"],
    }
    for side, n in (("encoder", dims.enc_layers), ("decoder", dims.dec_layers)):
        for i in range(n):
            s, c = f"{side}.blocks.{i}.", f"{side}/layer_{i}/"
            zero = torch.zeros(dims.d)
            out[c + "self_attention/linear_0/weight"] = torch.cat(
                [sd[s + "attn.query.weight"], sd[s + "attn.key.weight"], sd[s + "attn.value.weight"]])
            out[c + "self_attention/linear_0/bias"] = torch.cat(
                [sd[s + "attn.query.bias"], zero, sd[s + "attn.value.bias"]])
            out[c + "self_attention/linear_1/weight"] = sd[s + "attn.out.weight"]
            out[c + "self_attention/linear_1/bias"] = sd[s + "attn.out.bias"]
            out[c + "self_attention/layer_norm/gamma"] = sd[s + "attn_ln.weight"]
            out[c + "self_attention/layer_norm/beta"] = sd[s + "attn_ln.bias"]
            if side == "decoder":
                out[c + "attention/linear_0/weight"] = sd[s + "cross_attn.query.weight"]
                out[c + "attention/linear_0/bias"] = sd[s + "cross_attn.query.bias"]
                out[c + "attention/linear_1/weight"] = torch.cat(
                    [sd[s + "cross_attn.key.weight"], sd[s + "cross_attn.value.weight"]])
                out[c + "attention/linear_1/bias"] = torch.cat([zero, sd[s + "cross_attn.value.bias"]])
                out[c + "attention/linear_2/weight"] = sd[s + "cross_attn.out.weight"]
                out[c + "attention/linear_2/bias"] = sd[s + "cross_attn.out.bias"]
                out[c + "attention/layer_norm/gamma"] = sd[s + "cross_attn_ln.weight"]
                out[c + "attention/layer_norm/beta"] = sd[s + "cross_attn_ln.bias"]
            out[c + "ffn/layer_norm/gamma"] = sd[s + "mlp_ln.weight"]
            out[c + "ffn/layer_norm/beta"] = sd[s + "mlp_ln.bias"]
            out[c + "ffn/linear_0/weight"], out[c + "ffn/linear_0/bias"] = sd[s + "mlp.0.weight"], sd[s + "mlp.0.bias"]
            out[c + "ffn/linear_1/weight"], out[c + "ffn/linear_1/bias"] = sd[s + "mlp.2.weight"], sd[s + "mlp.2.bias"]
    out = {k: v.to(dtype) for k, v in out.items()}
    out["encoder/num_heads"] = torch.tensor(dims.heads, dtype=torch.int16)
    out["decoder/num_heads"] = torch.tensor(dims.heads, dtype=torch.int16)
    out["decoder/pre_norm"] = torch.tensor(1, dtype=torch.int8)
    return out


# ---------------------------------------------------------------------------------------------


def test_read_ctranslate2_dtypes_scalars_aliases_and_parts(tmp_path):
    variables = {
        "a/f32": torch.randn(3, 5), "a/f16": torch.randn(7).half(), "a/bf16": torch.randn(2, 3).bfloat16(),
        "a/i32": torch.arange(6, dtype=torch.int32).reshape(2, 3), "num_heads": torch.tensor(8, dtype=torch.int16),
        "flag": torch.tensor(-1, dtype=torch.int8),
    }
    data = ct2_bytes(variables, {"a/alias": "a/f16"})
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "model.bin").write_bytes(data)
    # Two parts cut inside a variable's bytes: the reader must concatenate before parsing.
    (tmp_path / "two").mkdir()
    cut = len(data) // 2 + 3
    (tmp_path / "two" / "model.bin.part1").write_bytes(data[:cut])
    (tmp_path / "two" / "model.bin.part2").write_bytes(data[cut:])
    for source in (tmp_path / "one", tmp_path / "one" / "model.bin", tmp_path / "two",
                   [tmp_path / "two" / "model.bin.part1", tmp_path / "two" / "model.bin.part2"]):
        got = convert.read_ctranslate2(source)
        assert set(got) == set(variables) | {"a/alias"}
        for name, t in variables.items():
            assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
        assert torch.equal(got["a/alias"], variables["a/f16"])
        assert got["num_heads"].dim() == 0 and int(got["num_heads"]) == 8


def test_read_ctranslate2_rejects_bad_files(tmp_path):
    good = ct2_bytes({"x": torch.randn(4)})
    (tmp_path / "v5.bin").write_bytes(ct2_bytes({"x": torch.randn(4)}, version=5))
    with pytest.raises(ValueError, match=r"v5.bin: CTranslate2 format version 5, expected 6"):
        convert.read_ctranslate2(tmp_path / "v5.bin")
    (tmp_path / "short.bin").write_bytes(good[:-6])
    with pytest.raises(ValueError, match=r"short.bin: truncated"):
        convert.read_ctranslate2(tmp_path / "short.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"expected model.bin or model.bin.part1"):
        convert.read_ctranslate2(tmp_path / "empty")


def test_ct2_whisper_roundtrips_to_openai_names(tmp_path):
    sd = openai_whisper_state()
    (tmp_path / "model.bin").write_bytes(ct2_bytes(openai_to_ct2(sd, dtype=torch.float32),
                                                   {"decoder/projection/weight": "decoder/embeddings/weight"}))
    got, report = convert.ct2_whisper_to_openai(convert.read_ctranslate2(tmp_path))
    assert set(got) == set(sd)
    for k in sd:
        assert torch.equal(got[k], sd[k]), k
    assert not report.unknown
    assert {"encoder/num_heads", "decoder/projection/weight", "decoder/pre_norm"} <= set(report.dropped)


def test_openai_whisper_to_hf_loads_strictly_into_transformers():
    hf, report = convert.openai_whisper_to_hf(openai_whisper_state())
    assert not report.unknown and not report.dropped
    t = TINY
    model = WhisperModel(WhisperConfig(
        d_model=t.d, encoder_layers=t.enc_layers, decoder_layers=t.dec_layers, encoder_attention_heads=t.heads,
        decoder_attention_heads=t.heads, encoder_ffn_dim=t.ffn, decoder_ffn_dim=t.ffn, num_mel_bins=t.mels,
        max_source_positions=t.ctx, max_target_positions=t.text_ctx, vocab_size=t.vocab, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1))
    result = model.load_state_dict(hf, strict=True)  # raises on any missing/unexpected/shape error
    assert not result.missing_keys and not result.unexpected_keys


def test_unknown_keys_are_an_error_unless_allowed():
    sd = openai_whisper_state()
    sd["encoder.blocks.0.attn.rotary.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"openai-whisper: 1 unknown keys \(encoder.blocks.0.attn.rotary"):
        convert.openai_whisper_to_hf(sd)
    _, report = convert.openai_whisper_to_hf(sd, allow_unknown=True)
    assert report.unknown == ["encoder.blocks.0.attn.rotary.weight"]


def test_split_and_chunk_entries():
    state = {"fused.3.w": torch.arange(6.0).reshape(6, 1), "q.3.b": torch.ones(2), "v.3.b": 2 * torch.ones(2)}
    weight_map = {"fused.{i}.w": ("a.{i}", None, "c.{i}"), "q.{i}.b": convert.Chunk("qkv.{i}", 0, 3),
                  "v.{i}.b": convert.Chunk("qkv.{i}", 2, 3)}
    out, report = convert.apply_map(state, weight_map, "test")
    assert torch.equal(out["a.3"], torch.tensor([[0.0], [1.0]]))
    assert torch.equal(out["c.3"], torch.tensor([[4.0], [5.0]]))
    assert torch.equal(out["qkv.3"], torch.tensor([1.0, 1.0, 0.0, 0.0, 2.0, 2.0]))
    assert sorted(report.used) == sorted(state)
    with pytest.raises(ValueError, match=r"dim 0 \(5\) does not split into 3 equal parts"):
        convert.apply_map({"fused.0.w": torch.zeros(5)}, weight_map, "test")


def test_lavis_map_covers_every_instructblip_name():
    # Every target the LAVIS map can produce for 2 ViT blocks / 2 Q-Former layers, against the
    # names a real transformers InstructBlip model has (vision_model, qformer, query_tokens).
    from favor.config import get_config
    from favor.encoders import VisualEncoder

    cfg = get_config("tiny")
    own = set(VisualEncoder(cfg).state_dict())
    produced = set()
    for dst in convert.LAVIS_INSTRUCTBLIP_MAP.values():
        if dst is None:
            continue
        target = dst.target if isinstance(dst, convert.Chunk) else dst
        for i in range(2):
            produced.add(target.replace("{i}", str(i)))
    # Layer 1 has no cross-attention at cross_attention_freq 2, so the map may produce more.
    assert own <= produced
