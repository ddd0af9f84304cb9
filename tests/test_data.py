"""training.data: manifest parsing, bad media, pairing rules, sampler order, collate masks."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from favor.prompt import CAPTION_PROMPT, stream_prompt
from favor.sync import audio_frames
from training.collate import Collator, normalise_answer
from training.data import DataOptions, ManifestDataset, StreamSampler
from training.manifest import Entry, parse_manifest
from training.pairing import (
    IMAGE_PREFIX,
    MATCH_NO,
    MATCH_QUESTIONS,
    MATCH_TASK,
    MATCH_YES,
    STREAM_TASK,
    PairingOptions,
    join_qa,
    pair,
)

CLIP_SIZE = 32  # pixels; even, as mpeg4 needs
FILE_FPS = 10  # frames/s written; the tiny preset also samples at 10 FPS
SAMPLE_RATE = 16_000  # Hz


# ------------------------------------------------------------------------------------------ media helpers


def write_clip(path: Path, seconds: float = 0.6, video: bool = True, audio: bool = True, seed: int = 0,
               freq: float = 440.0) -> Path:
    """A tiny mp4 (mpeg4 + aac) or wav (pcm) with flat colour frames and a sine tone."""
    rng = np.random.default_rng(seed)
    c = av.open(str(path), "w")
    vs = aus = None
    if video:
        vs = c.add_stream("mpeg4", rate=FILE_FPS)
        vs.width = vs.height = CLIP_SIZE
        vs.pix_fmt = "yuv420p"
    if audio:
        aus = c.add_stream("aac" if video else "pcm_s16le", rate=SAMPLE_RATE)
        aus.layout = "mono"
    if video:
        for i in range(round(seconds * FILE_FPS)):
            img = np.full((CLIP_SIZE, CLIP_SIZE, 3), rng.integers(0, 255, 3), np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            for p in vs.encode(frame):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
    if audio:
        n = int(seconds * SAMPLE_RATE)
        x = (0.3 * np.sin(2 * np.pi * freq * np.arange(n) / SAMPLE_RATE)).astype(np.float32)
        block = 1024  # aac frame size
        for i in range(0, n, block):
            frame = av.AudioFrame.from_ndarray(x[None, i:i + block], format="flt", layout="mono")
            frame.sample_rate, frame.pts = SAMPLE_RATE, i
            for p in aus.encode(frame):
                c.mux(p)
        for p in aus.encode():
            c.mux(p)
    c.close()
    return path


def write_image(path: Path, colour=(200, 30, 30)) -> Path:
    c = av.open(str(path), "w", format="image2")
    s = c.add_stream("png", rate=1)
    s.width = s.height = CLIP_SIZE
    s.pix_fmt = "rgb24"
    for p in s.encode(av.VideoFrame.from_ndarray(np.full((CLIP_SIZE, CLIP_SIZE, 3), colour, np.uint8),
                                                 format="rgb24")):
        c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    return path


def qa(q: str, a: str) -> list[dict]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def write_manifest(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_world(root: Path, n_av: int = 3) -> Path:
    """A small manifest with every modality combination; returns its path."""
    root.mkdir(parents=True, exist_ok=True)
    colours = ["red", "green", "blue", "yellow"]
    rows = []
    for i in range(n_av):
        write_clip(root / f"av{i}.mp4", seed=i, freq=300.0 + 100 * i)
        rows.append({"id": f"av{i}", "task": "av_caption", "video": f"av{i}.mp4", "audio": f"av{i}.mp4",
                     "conversation": qa("describe the video .", f"a {colours[i % 4]} circle then chime")})
    write_clip(root / "v0.mp4", audio=False, seed=7, seconds=0.4)
    rows.append({"id": "v0", "task": "temporal_qa", "video": "v0.mp4",
                 "conversation": qa("what appears ?", "a square")})
    write_clip(root / "a0.wav", video=False, seconds=0.5, freq=880.0)
    rows.append({"id": "a0", "task": "sound_description", "audio": "a0.wav", "image": None,
                 "conversation": qa("what is the sound ?", "a beep")})
    write_image(root / "i0.png")
    rows.append({"id": "i0", "task": "av_caption", "image": "i0.png",
                 "conversation": qa("what colour is the picture ?", "red"), "meta": {"k": 1}})
    return write_manifest(root / "manifest.jsonl", rows)


# ------------------------------------------------------------------------------------------------- tests


def test_parse_manifest_resolves_paths_and_modalities(tmp_path):
    m = make_world(tmp_path)
    entries = parse_manifest(m)
    assert [e.id for e in entries] == ["av0", "av1", "av2", "v0", "a0", "i0"]
    assert entries[0].video == tmp_path / "av0.mp4" and entries[0].audio == tmp_path / "av0.mp4"
    assert entries[3].audio is None and entries[4].video is None and entries[4].image is None
    assert entries[5].image == tmp_path / "i0.png" and entries[5].meta == {"k": 1}
    assert entries[5].line == 6


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('{"task": "asr", "conversation": []}', "no media"),
    ('{"task": "asr", "audio": "a.wav", "conversation": [{"from": "gpt", "value": "x"}, '
     '{"from": "human", "value": "q"}]}', "turn 0 must be"),
    ('{"task": "asr", "audio": "a.wav", "conversation": [{"from": "human", "value": "q"}]}',
     "at least one human and one gpt"),
    ('{"audio": "a.wav", "conversation": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}',
     "'task'"),
    ('{"task": "x", "video": "v.mp4", "image": "i.png", "conversation": []}', "not both"),
    ('{"task": "x", "audio": 3, "conversation": []}', "'audio' must be a path"),
])
def test_parse_manifest_errors_name_the_line(tmp_path, line, message):
    good = json.dumps({"task": "asr", "audio": "a.wav", "conversation": qa("q", "a")})
    m = tmp_path / "m.jsonl"
    m.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"m\.jsonl:3: .*{message}"):
        parse_manifest(m)


def test_bad_media_raises_naming_the_line_or_is_skipped_and_counted(tmp_path, tiny_cfg):
    m = make_world(tmp_path)
    rows = [json.loads(x) for x in m.read_text().splitlines()]
    rows.insert(1, {"id": "gone", "task": "asr", "audio": "missing.wav", "conversation": qa("q", "a")})
    (tmp_path / "junk.mp4").write_bytes(b"this is not a video")
    rows.append({"id": "junk", "task": "asr", "video": "junk.mp4", "conversation": qa("q", "a")})
    rows.append({"id": "silent", "task": "asr", "audio": "v0.mp4", "conversation": qa("q", "a")})
    write_manifest(m, rows)
    with pytest.raises(ValueError, match=r"manifest\.jsonl:2: audio: .*missing\.wav: no such file"):
        ManifestDataset(m, tiny_cfg)
    ds = ManifestDataset(m, tiny_cfg, DataOptions(skip_bad=True, min_audio_seconds=0.0))
    assert len(ds) == 6
    assert [line for line, _ in ds.skipped] == [2, 8, 9]
    assert "no audio stream" in ds.skipped[2][1]


def test_tasks_option_keeps_one_curriculum_stage(tmp_path, tiny_cfg):
    m = make_world(tmp_path)
    ds = ManifestDataset(m, tiny_cfg, DataOptions(tasks=("av_caption", "sound_description")))
    assert [e.id for e in ds.entries] == ["av0", "av1", "av2", "a0", "i0"]
    assert [e.id for e in ds.audio_pool] == ["av0", "av1", "av2", "a0"]  # negatives come from the stage too
    with pytest.raises(ValueError, match=r"manifest\.jsonl: no samples of task\(s\) asr \(it has av_caption, "):
        ManifestDataset(m, tiny_cfg, DataOptions(tasks=("asr", "av_caption")))


def test_decode_failure_after_validation_is_counted_by_the_collator(tmp_path, tiny_cfg, tokenizer):
    m = make_world(tmp_path)
    strict = ManifestDataset(m, tiny_cfg, DataOptions(min_audio_seconds=0.0))
    lenient = ManifestDataset(m, tiny_cfg, DataOptions(skip_bad=True, min_audio_seconds=0.0))
    (tmp_path / "av1.mp4").write_bytes(b"truncated")  # broken after the dataset was built
    with pytest.raises(ValueError, match=r"manifest\.jsonl:2: .*av1\.mp4"):
        strict[1]
    assert lenient[1] is None
    batch = Collator(tiny_cfg, tokenizer)([lenient[0], lenient[1], lenient[2]])
    assert batch["num_skipped"] == 1 and batch["size"] == 2 and batch["ids"] == ["av0", "av2"]
    assert Collator(tiny_cfg, tokenizer)([None])["size"] == 0


def _entries(tmp_path):
    return {e.id: e for e in parse_manifest(make_world(tmp_path))}


def test_pairing_video_with_audio_and_av_matching(tmp_path):
    e = _entries(tmp_path)
    pool = [x for x in e.values() if x.audio is not None]
    opts = PairingOptions(av_match_prob=0.3)
    plans = [pair(e["av0"], np.random.default_rng(i), pool, opts) for i in range(2000)]
    match = [p for p in plans if p.task == MATCH_TASK]
    assert 0.25 < len(match) / len(plans) < 0.35
    for p in plans:
        assert p.modality_mask == (1.0, 1.0) and p.visual == e["av0"].video
    for p in match:
        assert p.conversation[0]["value"] in MATCH_QUESTIONS
        answer = p.conversation[1]["value"]
        assert answer == (MATCH_YES if p.audio == e["av0"].audio else MATCH_NO)
    no = sum(p.conversation[1]["value"] == MATCH_NO for p in match)
    assert 0.4 < no / len(match) < 0.6
    untouched = [p for p in plans if p.task != MATCH_TASK]
    assert all(p.audio == e["av0"].audio and p.conversation == e["av0"].conversation for p in untouched)


def test_pairing_video_without_audio(tmp_path):
    e = _entries(tmp_path)
    pool = [x for x in e.values() if x.audio is not None]
    plans = [pair(e["v0"], np.random.default_rng(i), pool, PairingOptions()) for i in range(2000)]
    assert all(p.audio is not None and p.audio != e["v0"].video for p in plans)
    joined = [p for p in plans if p.modality_mask == (1.0, 1.0)]
    kept = [p for p in plans if p.modality_mask == (1.0, 0.0)]
    assert len(joined) + len(kept) == len(plans)
    assert 0.17 < len(joined) / len(plans) < 0.23  # release: 20 % combined
    assert all(p.conversation == e["v0"].conversation for p in kept)
    p = joined[0]
    assert p.conversation[0]["value"].startswith("what appears, and ")
    assert p.conversation[1]["value"].startswith("a square, and ")


def test_pairing_image_is_always_paired_with_audio(tmp_path):
    e = _entries(tmp_path)
    pool = [x for x in e.values() if x.audio is not None]
    plans = [pair(e["i0"], np.random.default_rng(i), pool, PairingOptions()) for i in range(2000)]
    assert all(p.is_image and p.modality_mask == (1.0, 1.0) and p.audio is not None for p in plans)
    combined = [p for p in plans if "+" in p.task]
    assert 0.45 < len(combined) / len(plans) < 0.55
    qs = [p.conversation[0]["value"] for p in combined]
    first = Counter(q.startswith(IMAGE_PREFIX) for q in qs)
    assert 0.4 < first[True] / len(qs) < 0.6  # order shuffled
    assert all("in the image, what colour is the picture" in q.lower() for q in qs)
    single = [p for p in plans if "+" not in p.task]
    own = sum(p.conversation == e["i0"].conversation for p in single)
    assert 0.4 < own / len(single) < 0.6  # one task's Q/A kept at random


def test_pairing_audio_only_and_disabled(tmp_path):
    e = _entries(tmp_path)
    pool = [x for x in e.values() if x.audio is not None]
    p = pair(e["a0"], np.random.default_rng(0), pool, PairingOptions())
    assert p.modality_mask == (0.0, 1.0) and p.visual is None
    off = PairingOptions(enabled=False)
    assert pair(e["v0"], np.random.default_rng(0), pool, off).modality_mask == (1.0, 0.0)
    assert pair(e["i0"], np.random.default_rng(0), pool, off).audio is None


def _windows(tmp_path) -> list[Entry]:
    """Two streamed windows of one clip and one of another, as training/synth/windows.py writes them."""
    av = _entries(tmp_path)["av0"]
    answers = ["A red circle appears.", "A beep sounds.", "A blue square appears."]
    previous = [[], answers[:1], []]
    return [Entry(i + 1, f"w{i}", STREAM_TASK, av.video, av.audio, None,
                  tuple(qa(stream_prompt(CAPTION_PROMPT, prev), a)), {"prompt": CAPTION_PROMPT, "previous": prev})
            for i, (a, prev) in enumerate(zip(answers, previous, strict=True))]


def test_streamed_window_context_swapped_and_instruction_bare(tmp_path):
    windows = _windows(tmp_path)
    captions = [w.conversation[1]["value"] for w in windows]
    off = PairingOptions(av_match_prob=0.0)
    for w in windows:  # no noise: the question as written; the visual encoder gets the bare prompt
        plan = pair(w, np.random.default_rng(0), [], off, captions)
        assert plan.conversation == w.conversation and plan.instruction == CAPTION_PROMPT
    second = windows[1]
    noisy = [pair(second, np.random.default_rng(i), [], PairingOptions(av_match_prob=0.0, context_noise_prob=0.5),
                  captions) for i in range(600)]
    contexts = Counter(p.conversation[0]["value"] for p in noisy)
    swapped = sum(n for q, n in contexts.items() if q != second.conversation[0]["value"])
    # swapped half the time, to one of the other captions (1/3 of draws pick its own context back)
    assert 0.5 * 2 / 3 - 0.06 < swapped / len(noisy) < 0.5 * 2 / 3 + 0.06
    assert set(contexts) == {stream_prompt(CAPTION_PROMPT, [c]) for c in captions}
    assert all(p.conversation[1] == second.conversation[1] for p in noisy)  # the answer is the window's own
    first = windows[0]  # no context at the stream's start: none is invented
    assert all(pair(first, np.random.default_rng(i), [], PairingOptions(context_noise_prob=1.0), captions)
               .conversation == first.conversation for i in range(20))


def test_collator_gives_the_visual_encoder_the_plan_instruction(tmp_path, tiny_cfg, tokenizer):
    w = _windows(tmp_path)[1]
    ds = ManifestDataset(make_world(tmp_path), tiny_cfg, DataOptions(pairing=PairingOptions(enabled=False)))
    item = ds._decode(pair(w, np.random.default_rng(0), [], PairingOptions(enabled=False), []))
    collate = Collator(tiny_cfg, tokenizer)
    bare = collate([{**item, "conversation": qa(CAPTION_PROMPT, "x"), "instruction": None}])
    batch = collate([item])
    assert batch["questions"] == [w.conversation[0]["value"]]  # the LLM is asked with the context ...
    assert torch.equal(batch["instruction_ids"], bare["instruction_ids"])  # ... the visual encoder without


def test_join_qa_format():
    a = tuple(qa("What colour is it?", "Red."))
    b = tuple(qa("What Sound plays?", "A chime."))
    q, ans = join_qa(a, b)
    assert q["value"] == "What colour is it, and what Sound plays?"
    assert ans["value"] == "Red, and a chime."


def test_pairing_is_keyed_by_stream_position(tmp_path, tiny_cfg):
    ds = ManifestDataset(make_world(tmp_path), tiny_cfg, DataOptions(min_audio_seconds=0.0), seed=3)
    assert ds.plan((17, 3)) == ds.plan((17, 3))
    assert len({ds.plan((p, 3)).audio for p in range(40)}) > 1  # different draws at other positions


def test_stream_sampler_is_deterministic_resumable_and_sharded():
    s = StreamSampler(7, 3, seed=5)
    it = iter(s)
    seq = [next(it) for _ in range(6)]  # 18 positions: crosses two epoch boundaries
    flat = [i for batch in seq for _, i in batch]
    assert sorted(flat[:7]) == list(range(7)) and sorted(flat[7:14]) == list(range(7))
    assert flat[:7] != flat[7:14]  # a new permutation each epoch
    assert [p for batch in seq for p, _ in batch] == list(range(18))
    resumed = iter(StreamSampler(7, 3, seed=5, position=9))
    assert [next(resumed) for _ in range(3)] == seq[3:]
    r0 = iter(StreamSampler(7, 2, seed=5, rank=0, world=2))
    r1 = iter(StreamSampler(7, 2, seed=5, rank=1, world=2))
    both = [x for _ in range(3) for x in next(r0) + next(r1)]
    single = iter(StreamSampler(7, 2, seed=5))
    assert both == [x for _ in range(6) for x in next(single)]


def test_collate_masks_lengths_and_padding(tmp_path, tiny_cfg, tokenizer):
    ds = ManifestDataset(make_world(tmp_path), tiny_cfg,
                         DataOptions(min_audio_seconds=0.0, pairing=PairingOptions(enabled=False)))
    items = [ds[i] for i in (0, 3, 4)]  # video+audio, video only (0.4 s), audio only (0.5 s)
    batch = Collator(tiny_cfg, tokenizer)(items)
    mel, px = batch["mel"], batch["pixels"]
    n0, n2 = items[0]["mel"].shape[-1], items[2]["mel"].shape[-1]
    assert mel.shape == (3, tiny_cfg.audio.n_mels, max(n0, n2))
    assert batch["mel_lengths"].tolist() == [n0, 0, n2]
    assert batch["audio_lengths"].tolist() == [-(-n0 // 2), 0, -(-n2 // 2)]  # 20 ms per token
    assert torch.equal(mel[0], items[0]["mel"])
    assert torch.equal(mel[2, :, :n2], items[2]["mel"])
    assert torch.all(mel[2, :, n2:] == mel[2, :, n2:][0, 0])  # one silence level in the padding
    assert torch.equal(batch["modality_mask"], torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]))
    assert px.shape == (3, 6, 3, tiny_cfg.visual.image_size, tiny_cfg.visual.image_size)
    assert batch["visual_lengths"].tolist() == [6, 4, 0]
    assert torch.all(px[1, 4:] == 0) and torch.all(px[2] == 0)
    assert batch["is_image"] is False
    assert batch["instruction_ids"].shape[0] == 3 and batch["instruction_mask"].sum(1).min() > 0
    assert batch["prompts"][2].labels[-1] == tiny_cfg.llm.eos_token_id
    assert batch["answers"] == ["a red circle then chime", "a square", "a beep"]


def test_collate_images(tmp_path, tiny_cfg, tokenizer):
    ds = ManifestDataset(make_world(tmp_path), tiny_cfg, DataOptions(min_audio_seconds=0.0), seed=0)
    image = next(ds[(p, 5)] for p in range(50) if ds.plan((p, 5)).audio == tmp_path / "a0.wav")
    batch = Collator(tiny_cfg, tokenizer)([image, ds[(0, 4)]])  # image + paired audio, audio only
    assert batch["is_image"] is True and batch["pixels"].shape[1] == 1
    frames = audio_frames(int(batch["audio_lengths"][0]), tiny_cfg)
    assert batch["visual_lengths"].tolist() == [frames, 0]  # the repeated image is valid over its audio
    mixed = Collator(tiny_cfg, tokenizer)([image, ds[(0, 0)]])  # image + video: image becomes a video
    assert mixed["is_image"] is False
    assert mixed["visual_lengths"].tolist() == [frames, 6]
    assert torch.equal(mixed["pixels"][0, frames - 1], mixed["pixels"][0, 0])


def test_collated_batch_runs_through_the_model(tmp_path, tiny_cfg, tokenizer):
    from favor.build import build_model

    ds = ManifestDataset(make_world(tmp_path), tiny_cfg, DataOptions(min_audio_seconds=0.0), seed=1)
    model = build_model(tiny_cfg, pretrained=False, tokenizer=tokenizer)
    for keys in ([(0, 0), (1, 3), (2, 4)], [(3, 5), (4, 4)]):
        out = model(Collator(tiny_cfg, tokenizer)([ds[k] for k in keys]))
        assert torch.isfinite(out["loss"])


def test_min_audio_seconds_pads(tmp_path, tiny_cfg):
    ds = ManifestDataset(make_world(tmp_path), tiny_cfg, DataOptions(min_audio_seconds=1.0))
    mel = ds[4]["mel"]  # 0.5 s of audio padded to 1 s
    assert mel.shape[-1] == tiny_cfg.timing.sample_rate // tiny_cfg.timing.hop_length


def test_normalise_answer():
    assert normalise_answer("  A Red,  circle!") == "a red circle"
