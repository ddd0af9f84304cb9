"""favor.media: decoding, resampling, down-mix, PTS frame sampling, preprocessing and Whisper log-mel.

All media are generated here with PyAV into tmp directories (no committed assets).
"""

from __future__ import annotations

import math
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from favor.config import TimingConfig, get_config
from favor.media import (
    CLIP_MEAN,
    CLIP_STD,
    MediaError,
    MediaInfo,
    load_audio,
    load_frames,
    load_image,
    log_mel_spectrogram,
    media_info,
    pad_or_trim,
    preprocess_frames,
)

TIMING = TimingConfig()
SR = TIMING.sample_rate  # 16 kHz target rate
VIDEO_CODEC = "libx264" if "libx264" in av.codecs_available else "mpeg4"
AAC_FRAME_SAMPLES = 1024  # samples per AAC frame at the source rate
# Solid colours of the 2-s test clip, one per 0.5 s (RGB).
COLOURS = [(200, 30, 40), (20, 180, 60), (30, 50, 210), (128, 128, 128)]
SOURCE_FPS = 25
CLIP_SECONDS = 2


# ------------------------------------------------------------------------------------ media writers


def _tone(freq: float, seconds: float, rate: int, amp: float) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _amplitude(x: np.ndarray, freq: float, rate: int) -> float:
    """Least-squares amplitude of a sinusoid at freq in x (edges dropped: resampler transients)."""
    x = x[rate // 10 : -rate // 10].astype(np.float64)
    t = np.arange(len(x)) / rate
    basis = np.stack([np.sin(2 * np.pi * freq * t), np.cos(2 * np.pi * freq * t)], axis=1)
    coef, *_ = np.linalg.lstsq(basis, x, rcond=None)
    return float(np.hypot(*coef))


def _write_audio(path, channels: np.ndarray, rate: int, codec: str, fmt: str = "s16") -> None:
    """channels: float32 [C, n] in [-1, 1]."""
    layout = {1: "mono", 2: "stereo"}[channels.shape[0]]
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=rate, layout=layout)
        chunk = s.codec_context.frame_size or 4096
        for k in range(0, channels.shape[1], chunk):
            part = channels[:, k : k + chunk]
            if fmt == "s16":  # packed int16: [1, n * C]
                data = np.round(part.T * 32767).astype(np.int16).reshape(1, -1)
            else:  # planar float: [C, n]
                data = np.ascontiguousarray(part)
            frame = av.AudioFrame.from_ndarray(data, format=fmt, layout=layout)
            frame.sample_rate, frame.pts = rate, k
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)


def _write_video(path, frames_rgb: list[np.ndarray], pts_ms: list[int] | None = None,
                 stereo: np.ndarray | None = None, audio_rate: int = 44100, options=None) -> None:
    """Video (libx264 or mpeg4) with optional AAC stereo track; pts_ms set = variable frame rate."""
    h, w, _ = frames_rgb[0].shape
    with av.open(str(path), "w", options=options or {}) as c:
        if pts_ms is None:
            v = c.add_stream(VIDEO_CODEC, rate=SOURCE_FPS)
        else:
            v = c.add_stream(VIDEO_CODEC, rate=1000)
            v.codec_context.time_base = Fraction(1, 1000)
        v.width, v.height, v.pix_fmt = w, h, "yuv420p"
        v.codec_context.gop_size = SOURCE_FPS  # a keyframe every second at 25 FPS (seek test)
        v.options = {"crf": "1"} if VIDEO_CODEC == "libx264" else {"qscale": "1"}
        a = c.add_stream("aac", rate=audio_rate, layout="stereo") if stereo is not None else None
        for i, rgb in enumerate(frames_rgb):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            if pts_ms is None:
                frame.pts = i
            else:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            for p in v.encode(frame):
                c.mux(p)
        if a is not None:
            for k in range(0, stereo.shape[1], AAC_FRAME_SAMPLES):
                af = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(stereo[:, k : k + AAC_FRAME_SAMPLES]), format="fltp", layout="stereo"
                )
                af.sample_rate, af.pts = audio_rate, k
                for p in a.encode(af):
                    c.mux(p)
        for s in (v, a):
            if s is not None:
                for p in s.encode(None):
                    c.mux(p)


def _solid(rgb, h=64, w=96) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, np.uint8), (h, w, 3)).copy()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """One set of generated files shared by the tests of this module."""
    d = tmp_path_factory.mktemp("media")
    n_frames = CLIP_SECONDS * SOURCE_FPS
    # Colour k starts at the frame that the 2 FPS target k * 0.5 s picks (frames 0, 12, 25, 37).
    firsts = [math.floor(k * n_frames / len(COLOURS)) for k in range(len(COLOURS))]
    frames = [_solid(COLOURS[sum(f <= i for f in firsts) - 1]) for i in range(n_frames)]
    left = _tone(440.0, CLIP_SECONDS, 44100, 0.5)
    right = _tone(1000.0, CLIP_SECONDS, 44100, 0.3)
    paths = {k: d / v for k, v in dict(
        av="clip.mp4", silent="silent.mp4", vfr="vfr.mkv", wav="right.wav", flac="right.flac",
        mono16k="mono16k.wav", m4a="tones.m4a", mp3="tones.mp3", corrupt="random.mp4",
        truncated="truncated.mp4", png="solid.png", jpg="solid.jpg",
    ).items()}
    _write_video(paths["av"], frames, stereo=np.stack([left, right]))
    _write_video(paths["silent"], frames)
    # 48 kHz stereo with a tone in the right channel only.
    silent_left = np.zeros(48000, np.float32)
    right_only = np.stack([silent_left, _tone(440.0, 1.0, 48000, 0.8)])
    _write_audio(paths["wav"], right_only, 48000, "pcm_s16le")
    _write_audio(paths["flac"], right_only, 48000, "flac")
    _write_audio(paths["mono16k"], _tone(300.0, 0.7, SR, 0.6)[None], SR, "pcm_s16le")
    _write_audio(paths["m4a"], np.stack([left, right]), 44100, "aac", fmt="fltp")
    _write_audio(paths["mp3"], np.stack([left, right]), 44100, "libmp3lame", fmt="fltp")
    paths["corrupt"].write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, np.uint8).tobytes())
    whole = paths["av"].read_bytes()
    paths["truncated"].write_bytes(whole[: len(whole) // 2])  # moov atom (at the end) is lost
    for key, codec, pix in (("png", "png", "rgb24"), ("jpg", "mjpeg", "yuvj444p")):
        with av.open(str(paths[key]), "w", format="image2") as c:
            s = c.add_stream(codec, rate=1)
            s.width, s.height, s.pix_fmt = 37, 23, pix
            frame = av.VideoFrame.from_ndarray(_solid((250, 120, 5), 23, 37), format="rgb24")
            for p in list(s.encode(frame)) + list(s.encode(None)):
                c.mux(p)
    return paths


VFR_PTS_MS = [30, 40, 200, 230, 600, 1010, 1500]  # irregular; starts after t = 0
VFR_LEVELS = [10, 50, 90, 130, 170, 210, 250]  # one grey level per frame, to identify it


@pytest.fixture(scope="module")
def vfr(tmp_path_factory):
    path = tmp_path_factory.mktemp("vfr") / "vfr.mkv"
    _write_video(path, [_solid((g, g, g)) for g in VFR_LEVELS], pts_ms=VFR_PTS_MS)
    return path


def test_encoders_used_here_exist():
    # The brief asks for h264 and AAC; if libx264 vanished the clip falls back to mpeg4, visibly.
    assert "aac" in av.codecs_available
    assert VIDEO_CODEC == "libx264", sorted(c for c in av.codecs_available if "264" in c or "mpeg4" in c)


# ------------------------------------------------------------------------------------------- audio


def test_audio_track_of_mp4_length_and_downmix(media):
    audio = load_audio(media["av"], SR)
    assert audio.dtype == torch.float32 and audio.dim() == 1
    # AAC pads the last frame: the decoded length exceeds 2 s by less than one AAC frame.
    assert abs(audio.numel() - CLIP_SECONDS * SR) <= math.ceil(AAC_FRAME_SAMPLES * SR / 44100)
    x = audio.numpy()
    # Left 440 Hz at 0.5 and right 1 kHz at 0.3 both survive at half amplitude (mean of channels).
    # 3% covers AAC's quantisation at its default bit rate on pure tones.
    assert _amplitude(x, 440.0, SR) == pytest.approx(0.25, rel=0.03)
    assert _amplitude(x, 1000.0, SR) == pytest.approx(0.15, rel=0.03)


@pytest.mark.parametrize("key", ["wav", "flac"])
def test_right_only_tone_survives_at_half_amplitude(media, key):
    audio = load_audio(media[key], SR)
    assert audio.numel() == SR  # 1 s at 48 kHz -> exactly 16000 samples
    # 0.8 / 2 = 0.4 (channel 0 would give 0, ffmpeg's unnormalised mono matrix 0.8 / sqrt(2) = 0.566).
    # 1e-3 covers int16 quantisation (3e-5) and the resampler's passband ripple at 440 Hz.
    assert _amplitude(audio.numpy(), 440.0, SR) == pytest.approx(0.4, abs=1e-3)


@pytest.mark.parametrize("key", ["m4a", "mp3"])
def test_audio_only_containers(media, key):
    audio = load_audio(media[key], SR)
    # Encoder priming / padding adds at most a couple of codec frames (mp3: 1152 samples each).
    assert abs(audio.numel() - CLIP_SECONDS * SR) <= 2 * math.ceil(1152 * SR / 44100)
    # Lossy codecs at default bit rates: 5% on pure tones.
    assert _amplitude(audio.numpy(), 440.0, SR) == pytest.approx(0.25, rel=0.05)
    assert audio.abs().max() <= 1.0


def test_mono_16k_passes_through_exactly(media):
    # Same rate, one channel: no filtering at all, so samples are exactly int16 / 32768.
    with av.open(str(media["mono16k"])) as c:
        raw = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    audio = load_audio(media["mono16k"], SR)
    torch.testing.assert_close(audio, torch.from_numpy(raw.astype(np.float32) / 32768), rtol=0, atol=0)


def test_resample_to_other_rate(media):
    rate = 22050  # odd ratio to 48 kHz
    audio = load_audio(media["wav"], rate)
    assert audio.numel() == rate
    assert _amplitude(audio.numpy(), 440.0, rate) == pytest.approx(0.4, abs=1e-3)


# ------------------------------------------------------------------------------------------- video


def test_media_info(media):
    info = media_info(media["av"])
    assert isinstance(info, MediaInfo)
    assert (info.has_audio, info.has_video) == (True, True)
    assert info.video_fps == pytest.approx(SOURCE_FPS)
    assert (info.width, info.height) == (96, 64)
    assert (info.audio_sample_rate, info.audio_channels) == (44100, 2)
    assert info.duration == pytest.approx(CLIP_SECONDS, abs=0.05)  # container rounding + AAC padding
    assert media_info(media["silent"]).has_audio is False
    wav = media_info(media["wav"])
    assert (wav.has_video, wav.audio_sample_rate, wav.audio_channels) == (False, 48000, 2)
    assert wav.duration == pytest.approx(1.0, abs=1e-3)


def test_solid_colours_survive_decode(media):
    frames, times = load_frames(media["av"], TIMING.video_fps)
    assert frames.dtype == torch.uint8 and frames.shape == (CLIP_SECONDS * 2, 64, 96, 3)
    # Targets 0, 0.5, 1, 1.5 s pick the latest frames at or before them: 0, 12, 25, 37 (x 1/25 s).
    torch.testing.assert_close(times, torch.tensor([0, 12, 25, 37], dtype=torch.float64) / SOURCE_FPS)
    # Tolerance 6 levels: RGB -> limited-range yuv420p -> RGB rounding (chroma of saturated colours
    # moves by up to ~4) plus near-lossless crf 1 coding.
    for frame, colour in zip(frames, COLOURS, strict=True):
        err = (frame.float() - torch.tensor(colour, dtype=torch.float32)).abs().max().item()
        assert err <= 6, (colour, frame[0, 0].tolist())


def test_sampling_at_source_rate_and_above(media):
    frames, times = load_frames(media["av"], float(SOURCE_FPS))
    n = CLIP_SECONDS * SOURCE_FPS
    assert frames.shape[0] == n  # every frame once; the grid stops where the last frame ends (2 s)
    torch.testing.assert_close(times, torch.arange(n, dtype=torch.float64) / SOURCE_FPS)
    frames2, times2 = load_frames(media["av"], 2.0 * SOURCE_FPS)
    assert frames2.shape[0] == 2 * n  # each frame shown for two targets
    torch.testing.assert_close(times2, times.repeat_interleave(2))
    assert torch.equal(frames2[::2], frames) and torch.equal(frames2[1::2], frames)


def test_max_frames_and_start(media):
    frames, times = load_frames(media["av"], 2.0, max_frames=3)
    assert frames.shape[0] == 3
    # start=0.3 at 4 FPS: targets 0.3, 0.55, 0.8, ... -> latest frames at 0.28, 0.52, 0.8 (1/25 s grid).
    _, times = load_frames(media["av"], 4.0, start=0.3)
    expected = [math.floor((0.3 + i / 4.0) * SOURCE_FPS + 1e-9) / SOURCE_FPS for i in range(len(times))]
    torch.testing.assert_close(times, torch.tensor(expected, dtype=torch.float64))
    assert len(times) == 7  # targets 0.3 .. 1.8 < 2.0 s


def _latest_at_or_before(pts: list[float], t: float) -> int:
    """Brute-force oracle of the sampling rule: index of the largest pts <= t (first frame if none)."""
    idx = [i for i, p in enumerate(pts) if p <= t + 1e-9]
    return idx[-1] if idx else 0


@pytest.mark.parametrize("fps,start", [(10.0, 0.0), (3.0, 0.0), (10.0, 0.55), (7.0, 1.2)])
def test_variable_frame_rate_follows_pts(vfr, fps, start):
    # Stream time: a video-only file's clock starts at its first frame (favor.media.stream_origin).
    pts = [(p - VFR_PTS_MS[0]) / 1000 for p in VFR_PTS_MS]
    n = int((pts[-1] - start) * fps) + 1  # targets up to the last frame's pts; the tail is checked below
    frames, times = load_frames(vfr, fps, max_frames=n, start=start)
    picks = [_latest_at_or_before(pts, start + i / fps) for i in range(n)]
    torch.testing.assert_close(times, torch.tensor([pts[k] for k in picks], dtype=torch.float64))
    # Grey level identifies the frame; 3 levels covers yuv420p rounding of greys.
    levels = frames.float().mean(dim=(1, 2, 3))
    torch.testing.assert_close(levels, torch.tensor([float(VFR_LEVELS[k]) for k in picks]), rtol=0, atol=3.0)


def test_variable_frame_rate_tail_hand_checked(vfr):
    # Worked example at 10 FPS. Stream time 0 is the first frame (container 0.03 s: a video-only
    # file's origin), so the frames sit at 0, 0.01, 0.17, 0.2, 0.57, 0.98, 1.47 s of stream time, and
    # targets 0.0, 0.1, ..., 1.4 (first 15) pick:
    _, times = load_frames(vfr, 10.0, max_frames=15)
    expected = [0.0, 0.01, 0.2, 0.2, 0.2, 0.2, 0.57, 0.57, 0.57, 0.57, 0.98, 0.98, 0.98, 0.98, 0.98]
    torch.testing.assert_close(times, torch.tensor(expected, dtype=torch.float64))
    # Without a cap, the last frame (1.47 s) is held until it ends, 1 ms later in this file (Matroska
    # gives each frame one tick of its 1-ms time base): before target 1.5, so no target picks it, and
    # nothing is picked past the stream's end.
    _, times = load_frames(vfr, 10.0)
    assert len(times) == 15 and times[-1].item() == pytest.approx(0.98)
    assert len(times) <= 15 + math.ceil(media_info(vfr).duration * 10)


def test_seek_matches_decode_from_start(tmp_path):
    # 4 s with a keyframe every second: start=2.3 seeks to the keyframe at 2.0, then decodes forward.
    path = tmp_path / "long.mp4"
    _write_video(path, [_solid((i * 2, 255 - i * 2, 100)) for i in range(4 * SOURCE_FPS)])
    part, part_t = load_frames(path, 5.0, start=2.3, max_frames=4)
    # Targets 2.3, 2.5, 2.7, 2.9 -> frames 57, 62, 67, 72 of the 25 FPS stream.
    picks = torch.tensor([57, 62, 67, 72])
    torch.testing.assert_close(part_t, picks.double() / SOURCE_FPS)
    every, every_t = load_frames(path, float(SOURCE_FPS))  # full decode from 0, no seek
    torch.testing.assert_close(every_t[picks], part_t)
    assert torch.equal(every[picks], part)


def test_images(media):
    png = load_image(media["png"])
    assert png.shape == (23, 37, 3) and png.dtype == torch.uint8
    assert torch.equal(png, torch.from_numpy(_solid((250, 120, 5), 23, 37)))  # png is lossless
    jpg = load_image(media["jpg"])
    assert jpg.shape == (23, 37, 3)
    # JPEG at default quality on a flat colour: a few levels of YCbCr rounding.
    assert (jpg.float() - torch.tensor([250.0, 120.0, 5.0])).abs().max() <= 4


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("loader", [
    lambda p: load_audio(p, SR), lambda p: load_frames(p, 2.0), load_image, media_info,
], ids=["audio", "frames", "image", "info"])
def test_unreadable_files_raise_naming_the_file(media, tmp_path, loader):
    for path in (tmp_path / "missing.mp4", media["corrupt"], media["truncated"], tmp_path):
        with pytest.raises(MediaError, match=str(path).replace("\\", "\\\\")) as err:
            loader(path)
        assert isinstance(err.value, ValueError) and "\n" not in str(err.value)


def test_missing_streams_raise(media):
    with pytest.raises(MediaError, match=rf"{media['silent']}: no audio stream \(streams: video\)"):
        load_audio(media["silent"], SR)
    with pytest.raises(MediaError, match=rf"{media['wav']}: no video stream \(streams: audio\)"):
        load_frames(media["wav"], 2.0)
    with pytest.raises(MediaError, match="no video stream"):
        load_image(media["mp3"])


def test_truncated_faststart_audio_is_a_decode_error(tmp_path):
    # moov first: the file opens, and the cut shows up while decoding.
    path = tmp_path / "fs.mp4"
    stereo = np.stack([_tone(440.0, CLIP_SECONDS, 44100, 0.5)] * 2)
    _write_video(path, [_solid(c) for c in COLOURS for _ in range(12)], stereo=stereo,
                 options={"movflags": "faststart"})
    data = path.read_bytes()
    cut = tmp_path / "fs_cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match=rf"{cut}: audio decode error after \d"):
        load_audio(cut, SR)


def test_argument_errors(media):
    with pytest.raises(ValueError, match="sample_rate"):
        load_audio(media["wav"], 16000.0)
    with pytest.raises(ValueError, match="fps must be > 0"):
        load_frames(media["av"], 0.0)
    with pytest.raises(ValueError, match="max_frames"):
        load_frames(media["av"], 2.0, max_frames=0)
    past_end = rf"{media['av']}: start \(5.0 s\) is at or past the end of the video \(2.000 s\)"
    with pytest.raises(MediaError, match=past_end):
        load_frames(media["av"], 2.0, start=5.0)


# ------------------------------------------------------------------------------------ preprocessing


def test_preprocess_constant_image_exact():
    size = 29  # odd, and a downscale of a non-square 41 x 53 source
    colour = torch.tensor([13, 200, 77], dtype=torch.uint8)
    frames = colour.expand(5, 41, 53, 3).contiguous()
    out = preprocess_frames(frames, size)
    assert out.shape == (5, 3, size, size) and out.dtype == torch.float32
    expected = (colour.double() / 255 - torch.tensor(CLIP_MEAN, dtype=torch.float64)) / torch.tensor(
        CLIP_STD, dtype=torch.float64)
    # Bicubic weights sum to 1 up to float32 rounding: a constant stays constant to ~1e-6.
    torch.testing.assert_close(out, expected.float().view(1, 3, 1, 1).expand_as(out), rtol=0, atol=2e-6)


def test_preprocess_matches_release_formula_and_single_image():
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (37, 30, 22, 3), dtype=torch.uint8, generator=g)  # T > one chunk
    size = get_config("tiny").visual.image_size
    out = preprocess_frames(frames, size)
    x = frames.permute(0, 3, 1, 2).float() / 255.0
    ref = F.interpolate(x, size=(size, size), mode="bicubic")
    ref = (ref - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # same ops, chunking must not change anything
    single = preprocess_frames(frames[3], size)
    assert single.shape == (1, 3, size, size)
    torch.testing.assert_close(single, out[3:4], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"uint8 \[T, H, W, 3\]"):
        preprocess_frames(frames.float(), size)


# ------------------------------------------------------------------------------------------ log-mel


def test_pad_or_trim():
    x = torch.arange(1, 8, dtype=torch.float32)
    assert torch.equal(pad_or_trim(x, 4), x[:4])
    assert torch.equal(pad_or_trim(x, 9), torch.cat([x, torch.zeros(2)]))
    assert pad_or_trim(torch.ones(2, 5), 3).shape == (2, 3)


def _speechy(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    x = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.05 * rng.standard_normal(n)
    return x.astype(np.float32)


@pytest.mark.parametrize("n_mels", [80, 128, get_config("tiny").audio.n_mels])
def test_log_mel_matches_whisper_feature_extractor(n_mels):
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=n_mels)
    audio = _speechy(3.7, seed=n_mels)
    n30 = TIMING.whisper_chunk_seconds * SR
    ours = log_mel_spectrogram(torch.from_numpy(audio), n_mels, TIMING, pad_to_samples=n30)
    assert ours.shape == (n_mels, TIMING.whisper_mel_frames)
    ref_torch = fe(audio, sampling_rate=SR, return_tensors="np").input_features[0]
    # Same float32 torch ops in the same order as the extractor's torch path: bit-equal here (measured
    # max diff 0); 1e-5 leaves room for another BLAS summing the mel matmul in a different order.
    np.testing.assert_allclose(ours.numpy(), ref_torch, rtol=0, atol=1e-5)
    # The float64 numpy path (what the extractor uses without torch): float32 STFT rounding is ~1e-7 of
    # the peak magnitude, which near the -80 dB floor is ~1e-4 relative power, i.e. ~1e-5 after log10
    # and the /4 scaling; measured max 5.6e-5 (128 mels), so 2e-4 is a 3.5x margin.
    ref_np = fe._np_extract_fbank_features(np.pad(audio, (0, n30 - audio.size))[None], "cpu")[0]
    np.testing.assert_allclose(ours.numpy(), ref_np, rtol=0, atol=2e-4)


def test_log_mel_batched_is_per_example_and_unpadded_length():
    a, b = _speechy(1.23, 1), 0.01 * _speechy(1.23, 2)  # very different levels: per-example floor
    n_mels = 80
    batch = log_mel_spectrogram(torch.from_numpy(np.stack([a, b])), n_mels, TIMING)
    assert batch.shape == (2, n_mels, a.size // TIMING.hop_length)
    for i, x in enumerate((a, b)):
        torch.testing.assert_close(batch[i], log_mel_spectrogram(torch.from_numpy(x), n_mels, TIMING),
                                   rtol=0, atol=1e-6)  # batched matmul may sum in another order
    with pytest.raises(ValueError, match=r"\[n\] or \[B, n\]"):
        log_mel_spectrogram(torch.zeros(1, 2, 3000), n_mels, TIMING)
    with pytest.raises(ValueError, match="more than 200 samples"):
        log_mel_spectrogram(torch.zeros(100), n_mels, TIMING)
