"""The Python API (runtime/api.py, favor.load / caption / stream / ask): what the CLI prints, live
yielding, one-line errors, and the whole-clip answer glue against favor-eval's own answer path."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import wave

import numpy as np
import pytest
import torch
from conftest import make_tokenizer
from typer.testing import CliRunner

import favor
from runtime.cli import app
from runtime.synthclip import write_clip
from runtime.writers import parse_jsonl


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    return favor.load(tiny_ckpt, backend="torch", threads=1)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_import_favor_stays_cheap():
    code = ("import sys, favor; favor.load; "
            "print(sorted(m for m in ('torch', 'av', 'runtime.stream') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # resolving favor.load imports runtime.api only, not the runtime's stack


def test_api_returns_what_the_cli_prints(engine, tiny_ckpt, tmp_path):
    clip = write_clip(tmp_path / "clip.mp4", 1.5, sample_rate=22_050, channels=2)
    caps = engine.caption(str(clip), max_new_tokens=3)
    jsonl = tmp_path / "out.jsonl"
    r = CliRunner().invoke(app, ["run", "--backend", "torch", str(clip), "--model", str(tiny_ckpt), "--no-live",
                                 "--threads", "1", "--max-new-tokens", "3", "--offline", "--jsonl", str(jsonl)])
    assert r.exit_code == 0, r.output
    rows = parse_jsonl(jsonl)
    assert len(caps) == len(rows) == 6
    assert [(c.start, c.end, c.text) for c in caps] == [(x["start"], x["end"], x["text"]) for x in rows]
    printed = [ln for ln in r.stdout.splitlines() if ln.startswith("[")]
    assert [ln.split("] ", 1)[1] for ln in printed] == [c.text for c in caps]
    # the module-level convenience over the same engine: the same captions
    assert [c.text for c in favor.caption(str(clip), model=engine, max_new_tokens=3)] == [c.text for c in caps]


def test_stream_yields_captions_as_they_are_produced(engine):
    seconds = 1.8
    graph = (f"lavfi:testsrc=size=32x24:rate=10:duration={seconds}[out0];"
             f"sine=frequency=440:sample_rate=16000:duration={seconds}[out1]")
    t0 = time.monotonic()
    arrivals = []
    for cap in engine.stream(graph, max_new_tokens=2, max_latency=5.0):
        arrivals.append(time.monotonic() - t0)
        assert cap.latency is not None and cap.text is not None
    assert len(arrivals) >= 4
    # paced like a camera, windows close 0.3 s apart over `seconds`: captions arrive spread over the
    # stream (windows 0 and 5 close 1.5 s apart; a collect-then-return API would hand all at once)
    assert arrivals[-1] - arrivals[0] >= 0.6
    assert arrivals[-1] >= seconds - 0.3


def test_stream_can_be_abandoned(engine):
    graph = "lavfi:testsrc=size=32x24:rate=10:duration=30[out0];sine=sample_rate=16000:duration=30[out1]"
    t0 = time.monotonic()
    it = engine.stream(graph, max_new_tokens=2, max_latency=5.0)
    next(it)
    it.close()  # stops and joins the capture thread: nothing keeps running for the 30 s stream
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("source, expected", [
    ("/nonexistent/clip.mp4", "/nonexistent/clip.mp4: no such file"),
    ("rtsp://127.0.0.1:9/none", "rtsp://127.0.0.1:9/none"),
])
def test_bad_source_is_one_line_value_error(engine, source, expected):
    with pytest.raises(ValueError) as e:
        engine.caption(source, timeout=2.0)
    assert expected in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="no such file"):
        engine.stream("/nonexistent/clip.mp4")  # raised at the call, before iteration


def test_bad_options_are_named(engine, tmp_path):
    clip = write_clip(tmp_path / "clip.mp4", 0.5)
    with pytest.raises(TypeError, match="unexpected option"):
        engine.caption(str(clip), max_new_tokenz=3)
    with pytest.raises(ValueError, match="prompt is too long"):
        engine.caption(str(clip), prompt="word " * 400)
    with pytest.raises(ValueError, match="the question is empty"):
        engine.ask(str(clip), "  ")
    with pytest.raises(ValueError, match="no such media file"):
        engine.ask(str(tmp_path / "none.mp4"), "what?")
    with pytest.raises(ValueError, match="model not found"):
        favor.load(tmp_path / "none.safetensors")


def test_ask_answers_about_the_whole_clip(engine, tmp_path):
    clip = write_clip(tmp_path / "clip.mp4", 1.2)
    answer = engine.ask(str(clip), "what happens?", max_new_tokens=4)
    assert isinstance(answer, str) and answer
    assert engine.ask(str(clip), "what happens?", max_new_tokens=4) == answer  # deterministic
    # the stream's visual instruction survives a question on the same engine
    before = [c.text for c in engine.caption(str(clip), max_new_tokens=3)]
    engine.ask(str(clip), "something else entirely?", max_new_tokens=2)
    assert [c.text for c in engine.caption(str(clip), max_new_tokens=3)] == before


def test_ask_takes_an_eval_sample_s_separate_inputs(engine, tmp_path):
    """ask(video=/image=/audio=): the inputs a manifest sample can have; impossible combinations are one line."""
    from PIL import Image

    clip = str(write_clip(tmp_path / "clip.mp4", 1.2))
    still = tmp_path / "still.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(still)
    tone = tmp_path / "tone.wav"
    rate = 16_000
    with wave.open(str(tone), "wb") as w:  # 1 s of a 300 Hz tone, 16-bit mono
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((np.sin(2 * np.pi * 300 * np.arange(rate) / rate) * 8000).astype("<i2").tobytes())
    q = "what happens?"
    # a clip with its own sound == the same file named as both inputs (how eval passes a video sample)
    assert engine.ask(clip, q, max_new_tokens=4) == engine.ask(question=q, video=clip, audio=clip, max_new_tokens=4)
    for media in ({"image": still, "audio": tone}, {"image": still}, {"audio": clip}, {"video": clip},
                  {"video": clip, "audio": tone}):
        assert isinstance(engine.ask(question=q, max_new_tokens=3, **media), str)
    for media, message in [({"video": clip, "image": still}, "not both"),
                           ({"source": clip, "image": still}, "source is a video with its own sound"),
                           ({}, "no media"),
                           ({"video": tone}, "tone.wav: no video stream"),
                           ({"audio": still}, "still.png: no audio stream")]:
        with pytest.raises(ValueError, match=message) as e:
            engine.ask(question=q, **media)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="ask needs a question"):
        engine.ask(clip)


@pytest.mark.slow
def test_clip_glue_gives_favor_eval_answers(tiny_cfg, tmp_path):
    """runtime.clip on a torch backend gives favor-eval's predictions (and so its scores) for every video
    sample of a synthetic held-out set: same AV embeddings bit for bit, same greedy answers."""
    from favor.build import build_model
    from favor.model import av_inputs
    from runtime.backends import TorchBackend
    from runtime.clip import ask_clip, clip_embeddings, load_clip
    from training.collate import Collator
    from training.data import DataOptions, ManifestDataset
    from training.eval.runner import predict, score_predictions
    from training.pairing import PairingOptions
    from training.synth import generate

    manifest = generate(tmp_path / "synth", 1, 0, split="heldout")
    model = build_model(tiny_cfg, pretrained=False, tokenizer=make_tokenizer())
    records = predict(model, manifest, max_new_tokens=6)  # engine.ask(video=, audio=) per sample
    rows = {r["id"]: r for r in map(json.loads, manifest.read_text().splitlines())}
    own_sound = [i for i, r in rows.items() if r["video"] and r["audio"] == r["video"]]  # a clip with its audio
    videos = [rec for rec in records if rec["id"] in own_sound]
    assert len(videos) >= 3
    backend = TorchBackend(model, merge_lora=False)
    data = ManifestDataset(manifest, tiny_cfg, DataOptions(pairing=PairingOptions(enabled=False)))
    collate = Collator(tiny_cfg, model.tokenizer, model.instruction_tokenizer)
    ask_records = []
    for rec in videos:
        path = manifest.parent / rows[rec["id"]]["video"]
        question = rows[rec["id"]]["conversation"][0]["value"]
        batch = collate([data[next(i for i, e in enumerate(data.entries) if e.id == rec["id"])]])
        with torch.inference_mode():
            want = model.encode_av(**av_inputs(batch)).embeds[0]  # [A, D]
            got = clip_embeddings(backend, load_clip(path, tiny_cfg), question)
        assert torch.equal(got, want)
        ask_records.append({**rec, "prediction": ask_clip(backend, path, question, max_new_tokens=6)})
    assert [r["prediction"] for r in ask_records] == [r["prediction"] for r in videos]
    assert score_predictions(ask_records) == score_predictions(videos)
