"""AVEB converters, each on a tiny fabricated copy of its set's published layout (media made with PyAV)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import av
import numpy as np
import pytest

from favor import media
from training.eval import aveb
from training.manifest import parse_manifest
from training.synth.write import write_mp4, write_png, write_wav

SR = 16_000  # Hz, the fabricated audio's rate
FPS = 10.0  # fabricated video frame rate (16 kHz / 10 = whole samples per frame)


def _tone(seconds: float, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)[None]  # [1, N]


def wav(path: Path, seconds: float = 0.5) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_wav(path, _tone(seconds), SR)
    return path


def flac(path: Path, seconds: float = 0.5) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pcm = np.round(_tone(seconds) * 32767).astype(np.int16)  # [1, N] s16 mono
    with av.open(str(path), "w", format="flac") as c:
        s = c.add_stream("flac", rate=SR)
        s.layout = "mono"
        f = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        f.sample_rate, f.pts = SR, 0
        for p in [*s.encode(f), *s.encode(None)]:
            c.mux(p)
    return path


def image(path: Path, value: int = 120) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    px = np.full((32, 48, 3), value, np.uint8)
    if path.suffix == ".png":
        write_png(path, px)
        return path
    with av.open(str(path), "w", format="image2") as c:  # JPEG through PyAV's mjpeg encoder
        s = c.add_stream("mjpeg")
        s.width, s.height, s.pix_fmt = 48, 32, "yuvj420p"
        for p in [*s.encode(av.VideoFrame.from_ndarray(px, format="rgb24")), *s.encode(None)]:
            c.mux(p)
    return path


def video(path: Path, seconds: float = 1.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = int(seconds * FPS)
    frames = np.stack([np.full((32, 48, 3), 10 * k, np.uint8) for k in range(n)])  # [T, H, W, 3]
    write_mp4(path, frames, _tone(seconds), FPS, SR)
    return path


def rows_of(report: aveb.ConvertReport) -> list[dict]:
    entries = parse_manifest(report.manifest)  # the training loader reads what we wrote
    for e in entries:
        for p in (e.video, e.audio, e.image):
            assert p is None or p.is_file(), p
    return [json.loads(line) for line in report.manifest.read_text().splitlines()]


def test_librispeech(tmp_path):
    root = tmp_path / "LibriSpeech" / "test-clean" / "121" / "123"
    flac(root / "121-123-0000.flac")
    (root / "121-123.trans.txt").write_text("121-123-0000 HELLO WORLD\n121-123-0001 MISSING AUDIO\n")
    rep = aveb.convert("librispeech", tmp_path / "LibriSpeech", tmp_path / "out" / "asr.jsonl")
    (row,) = rows_of(rep)
    assert (row["task"], row["conversation"][1]["value"]) == ("asr", "hello world")
    assert row["audio"].startswith("../") and row["video"] is None
    assert rep.skipped == ["121-123-0001: 121-123-0001.flac missing"]


def test_audiocaps_groups_captions_and_finds_audio_by_stem(tmp_path):
    with open(tmp_path / "test.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["audiocap_id", "youtube_id", "start_time", "caption"])
        w.writerows([[1, "abc", 30, "A dog barks"], [2, "abc", 30, "Barking"], [3, "zzz", 0, "Rain"]])
    wav(tmp_path / "audio" / "abc_30.wav")
    rep = aveb.convert("audiocaps", tmp_path, tmp_path / "ac.jsonl")
    (row,) = rows_of(rep)
    assert row["task"] == "ac" and row["meta"]["references"] == ["A dog barks", "Barking"]
    assert row["audio"] == "audio/abc_30.wav" and len(rep.skipped) == 1


def test_flickr30k_karpathy_test_split(tmp_path):
    image(tmp_path / "flickr30k-images" / "1.jpg")
    image(tmp_path / "flickr30k-images" / "2.jpg")
    data = {"images": [{"filename": "1.jpg", "split": "test", "sentences": [{"raw": "A man."}, {"raw": "A guy."}]},
                       {"filename": "2.jpg", "split": "train", "sentences": [{"raw": "x"}]}]}
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(data))
    (row,) = rows_of(aveb.convert("flickr30k", tmp_path, tmp_path / "ic.jsonl"))
    assert row["task"] == "ic" and row["image"] == "flickr30k-images/1.jpg"
    assert row["meta"]["references"] == ["A man.", "A guy."]
    assert media.load_image(tmp_path / row["image"]).shape == (32, 48, 3)


def test_textvqa_keeps_ten_answers(tmp_path):
    image(tmp_path / "train_images" / "img1.jpg")
    answers = ["stop"] * 7 + ["halt"] * 3
    data = {"data": [{"question_id": 5, "question": "What does the sign say?", "image_id": "img1",
                      "answers": answers}]}
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps(data))
    (row,) = rows_of(aveb.convert("textvqa", tmp_path, tmp_path / "ocr.jsonl"))
    assert row["task"] == "ocr" and row["meta"]["references"] == answers
    assert row["conversation"][0]["value"] == "What does the sign say?"


def test_gqa(tmp_path):
    image(tmp_path / "images" / "n1.png")
    data = {"q1": {"imageId": "n1", "question": "Is it red?", "answer": "no", "fullAnswer": "No, it is blue."},
            "q2": {"imageId": "gone", "question": "?", "answer": "yes"}}
    (tmp_path / "testdev_balanced_questions.json").write_text(json.dumps(data))
    rep = aveb.convert("gqa", tmp_path, tmp_path / "vqa.jsonl")
    (row,) = rows_of(rep)
    assert (row["id"], row["task"], row["conversation"][1]["value"]) == ("gqa-q1", "vqa", "no")
    assert rep.skipped == ["q2: image gone missing"]


def test_nextqa_puts_choices_in_the_prompt(tmp_path):
    video(tmp_path / "NExTVideo" / "0000" / "vid42.mp4")
    (tmp_path / "map_vid_vidorID.json").write_text(json.dumps({"777": "0000/vid42"}))
    with open(tmp_path / "test.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["video", "frame_count", "width", "height", "question", "answer", "qid", "type",
                    "a0", "a1", "a2", "a3", "a4"])
        w.writerow([777, 10, 48, 32, "what does the girl do after bending down", 2, 3, "TN",
                    "sit", "run", "pick up a toy", "cry", "wave"])
    (row,) = rows_of(aveb.convert("nextqa", tmp_path, tmp_path / "videoqa.jsonl"))
    assert row["task"] == "videoqa" and row["conversation"][1]["value"] == "pick up a toy"
    assert row["conversation"][0]["value"] == ("what does the girl do after bending down? Choose one from: "
                                               "sit; run; pick up a toy; cry; wave.")
    assert row["video"] == row["audio"] == "NExTVideo/0000/vid42.mp4"


def test_how2_cuts_segments(tmp_path):
    video(tmp_path / "video" / "vidA.mp4", seconds=2.0)
    data = tmp_path / "data" / "test"
    data.mkdir(parents=True)
    (data / "text").write_text("utt1 HOW TO TIE A KNOT\n")
    (data / "segments").write_text("utt1 vidA 0.5 1.5\n")
    (row,) = rows_of(aveb.convert("how2", tmp_path, tmp_path / "out" / "avsr.jsonl"))
    assert row["task"] == "avsr" and row["conversation"][1]["value"] == "how to tie a knot"
    clip = tmp_path / "out" / row["video"]
    assert row["video"] == "how2_clips/utt1.mp4" and clip.is_file()
    audio = media.load_audio(clip, SR)
    assert abs(audio.shape[0] / SR - 1.0) < 0.1  # the 1 s segment (AAC priming may add a few ms)
    frames, _ = media.load_frames(clip, FPS)
    assert frames.shape[0] == int(1.0 * FPS)
    assert frames[0].float().mean() == pytest.approx(50, abs=6)  # the source frame at 0.5 s has value 50


def test_avsd_last_turn_after_history(tmp_path):
    video(tmp_path / "Charades" / "ABC12.mp4")
    data = {"dialogs": [
        {"image_id": "ABC12", "dialog": [{"question": "is he alone?", "answer": "yes"},
                                         {"question": "what does he hold?", "answer": "a cup"}]},
        {"image_id": "HID99", "dialog": [{"question": "q", "answer": "__UNDISCLOSED__"}]}]}
    (tmp_path / "test_set4DSTC7-AVSD.json").write_text(json.dumps(data))
    rep = aveb.convert("avsd", tmp_path, tmp_path / "avsd.jsonl")
    (row,) = rows_of(rep)
    assert row["conversation"][0]["value"] == "is he alone?\nASSISTANT: yes\n USER: what does he hold?"
    assert row["conversation"][1]["value"] == "a cup" and row["meta"]["question"] == "what does he hold?"
    assert rep.skipped == ["HID99: last answer not disclosed"]


def test_vggss(tmp_path):
    video(tmp_path / "videos" / "clip_000010.mp4")
    (tmp_path / "vggss.json").write_text(json.dumps([{"file": "clip_000010", "class": "dog barking",
                                                      "bbox": [[0.1, 0.1, 0.5, 0.5]]}]))
    (row,) = rows_of(aveb.convert("vggss", tmp_path, tmp_path / "avssd.jsonl"))
    assert (row["task"], row["conversation"][1]["value"]) == ("avssd", "dog barking")


def test_spokencoco_pairs_matched_and_swapped(tmp_path):
    data = {"data": []}
    for k in range(6):
        image(tmp_path / "val2014" / f"COCO_val2014_{k:012d}.jpg", value=20 * k)
        wav(tmp_path / "SpokenCOCO" / "wavs" / "val" / f"{k}.wav")
        data["data"].append({"image": f"val2014/COCO_val2014_{k:012d}.jpg",
                             "captions": [{"text": f"caption {k}", "wav": f"wavs/val/{k}.wav", "speaker": "s"}]})
    (tmp_path / "SpokenCOCO" / "SpokenCOCO_val.json").write_text(json.dumps(data))
    rows = rows_of(aveb.convert("spokencoco", tmp_path, tmp_path / "avm.jsonl"))
    assert len(rows) == 6 and {r["task"] for r in rows} == {"avm"}
    answers = {r["conversation"][1]["value"] for r in rows}
    assert answers == {"yes", "no"}  # seed 0 draws both kinds over 6 images
    for r in rows:
        own = Path(r["image"]).stem.endswith(Path(r["audio"]).stem.zfill(12))
        assert own == r["meta"]["matched"] == (r["conversation"][1]["value"] == "yes")


def test_errors_name_what_was_expected(tmp_path):
    with pytest.raises(ValueError, match="unknown AVEB set 'coco'"):
        aveb.convert("coco", tmp_path, tmp_path / "x.jsonl")
    with pytest.raises(ValueError, match="no TextVQA_0.5.1_val.json"):
        aveb.convert("textvqa", tmp_path, tmp_path / "x.jsonl")
    with pytest.raises(ValueError, match="must be a .jsonl"):
        aveb.convert("gqa", tmp_path, tmp_path / "x.json")
    (tmp_path / "testdev_balanced_questions.json").write_text("{}")
    with pytest.raises(ValueError, match="no sample could be converted"):
        aveb.convert("gqa", tmp_path, tmp_path / "x.jsonl")
    with pytest.raises(ValueError, match="not a directory"):
        aveb.convert("gqa", tmp_path / "absent", tmp_path / "x.jsonl")
