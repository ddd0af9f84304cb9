"""AVEB: converters from the paper's test sets, in their published layouts, to our JSONL manifest.

For users who hold the data locally; nothing is downloaded. Each converter reads the annotation files of
one set under ``root``, finds the media by file stem anywhere below ``root`` (users' download scripts
differ), and writes ``out`` (a .jsonl) with media paths relative to the manifest's directory. Samples whose
media are missing are skipped and counted (partial downloads are the norm for YouTube-based sets).

    set           AVEB task  annotation file (default)             media
    librispeech   asr        */*/*.trans.txt (test-clean)          {utt}.flac
    audiocaps     ac         test.csv                              {youtube_id}[_{start}].wav|flac|...
    flickr30k     ic         dataset_flickr30k.json (Karpathy)     {filename}
    textvqa       ocr        TextVQA_0.5.1_val.json                {image_id}.jpg
    gqa           vqa        testdev_balanced_questions.json       {imageId}.jpg
    nextqa        videoqa    test.csv + map_vid_vidorID.json       {vidorID}.mp4
    how2          avsr       text + segments (Kaldi, data/test)    {video}.mp4, cut per segment
    avsd          avsd       test_set4DSTC7-AVSD.json              {image_id}.mp4 (Charades)
    vggss         avssd      vggss.json                            {file}.mp4
    spokencoco    avm        SpokenCOCO_val.json                   image + caption wav

ISQA (image + spoken question) has no public release; write its manifest by hand (image, audio, answer).
The reference answer is the gpt turn; tasks with several references keep all in ``meta.references``.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from favor.config import TimingConfig
from favor.prompt import chat_prompt

AVEB_TASKS = ("asr", "ac", "ic", "ocr", "vqa", "videoqa", "avsr", "avsd", "isqa", "avm", "avssd")
AUDIO_EXTS = (".wav", ".flac", ".mp3", ".ogg", ".m4a", ".opus")
VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov")
IMAGE_EXTS = (".jpg", ".jpeg", ".png")

# Prompts: the paper's examples (Table 6) where it gives one.
PROMPTS = {
    "asr": "Transcribe the speech into text.",
    "ac": "Please describe the audio.",
    "ic": "Describe this image in one short sentence.",
    "avsr": "Transcribe the speech into text, paying attention to both audio and video.",
    "avssd": "What is the source of the sound?",
    "avm": "Is the speech describing the image? Answer yes or no.",
}
CLIP_FPS = 10.0  # frames/s kept in cut How2 clips: above every preset's video_fps; 16 kHz / 10 = whole samples


@dataclass
class ConvertReport:
    manifest: Path
    written: int
    skipped: list[str] = field(default_factory=list)  # one reason per skipped sample


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ValueError(f"{path}: {what} not found (expected the set's published layout under its root)")
    return path


def _find_one(root: Path, name: str, what: str) -> Path:
    """The annotation file ``name`` at root or anywhere below it."""
    if (root / name).is_file():
        return root / name
    hits = sorted(root.rglob(name))
    if not hits:
        raise ValueError(f"{root}: no {name} ({what}) under this directory")
    return hits[0]


def index_media(root: Path, exts: Iterable[str]) -> dict[str, Path]:
    """Stem -> path for every media file below root (first in sorted order wins)."""
    exts = tuple(exts)
    out: dict[str, Path] = {}
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in exts and p.is_file():
            out.setdefault(p.stem, p)
    return out


class _Writer:
    """Collects rows with manifest-relative paths; writes the JSONL at the end."""

    def __init__(self, out: Path | str):
        self.out = Path(out)
        if self.out.suffix != ".jsonl":
            raise ValueError(f"{self.out}: the manifest must be a .jsonl file")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self.skipped: list[str] = []

    def rel(self, path: Path | None) -> str | None:
        return None if path is None else os.path.relpath(Path(path).resolve(), self.out.parent.resolve())

    def add(self, sample_id: str, task: str, prompt: str, answer: str, /, *, video=None, audio=None,
            image=None, **meta) -> None:
        self.rows.append({"id": sample_id, "task": task, "video": self.rel(video), "audio": self.rel(audio),
                          "image": self.rel(image),
                          "conversation": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}],
                          "meta": meta})

    def skip(self, reason: str) -> None:
        self.skipped.append(reason)

    def finish(self, limit: int | None) -> ConvertReport:
        rows = self.rows[:limit] if limit else self.rows
        if not rows:
            raise ValueError(f"{self.out}: no sample could be converted ({len(self.skipped)} skipped, first: "
                             f"{self.skipped[0] if self.skipped else 'none found'})")
        tmp = self.out.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, self.out)
        return ConvertReport(self.out, len(rows), self.skipped)


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def _csv(path: Path, required: tuple[str, ...]) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    missing = [c for c in required if rows and c not in rows[0]]
    if not rows or missing:
        raise ValueError(f"{path}: expected CSV columns {list(required)}, missing {missing or 'all rows'}")
    return rows


# ------------------------------------------------------------------------------------------ converters


def librispeech(root: Path, out: Path, limit: int | None = None) -> ConvertReport:
    """LibriSpeech (test-clean): ``{spk}-{chap}.trans.txt`` lines "UTT-ID TRANSCRIPT" beside UTT-ID.flac."""
    root, w = Path(root), _Writer(out)
    trans = sorted(root.rglob("*.trans.txt"))
    if not trans:
        raise ValueError(f"{root}: no *.trans.txt transcripts (expected LibriSpeech/test-clean/SPK/CHAP/)")
    for t in trans:
        for line in t.read_text(encoding="utf-8").splitlines():
            utt, _, text = line.strip().partition(" ")
            if not utt:
                continue
            audio = t.parent / f"{utt}.flac"
            if not audio.is_file():
                w.skip(f"{utt}: {audio.name} missing")
                continue
            w.add(f"librispeech-{utt}", "asr", PROMPTS["asr"], text.lower(), audio=audio)
    return w.finish(limit)


def audiocaps(root: Path, out: Path, limit: int | None = None, csv_name: str = "test.csv") -> ConvertReport:
    """AudioCaps: ``audiocap_id,youtube_id,start_time,caption`` (5 captions per clip in test)."""
    root, w = Path(root), _Writer(out)
    rows = _csv(_find_one(root, csv_name, "AudioCaps annotations"), ("youtube_id", "start_time", "caption"))
    media = index_media(root, AUDIO_EXTS + VIDEO_EXTS)
    clips: dict[str, list[dict]] = {}
    for r in rows:
        clips.setdefault(r["youtube_id"], []).append(r)
    for yid, rs in clips.items():
        start = rs[0]["start_time"]
        names = [yid, f"Y{yid}", f"{yid}_{start}", f"{yid}_{int(float(start))}", f"Y{yid}_{start}",
                 *(r.get("audiocap_id", "") for r in rs)]
        audio = next((media[n] for n in names if n in media), None)
        if audio is None:
            w.skip(f"{yid}: no audio file named like {names[:3]}")
            continue
        refs = [r["caption"].strip() for r in rs]
        w.add(f"audiocaps-{yid}", "ac", PROMPTS["ac"], refs[0], audio=audio, references=refs)
    return w.finish(limit)


def flickr30k(root: Path, out: Path, limit: int | None = None, split: str = "test",
              json_name: str = "dataset_flickr30k.json") -> ConvertReport:
    """Flickr30k, Karpathy split: {"images": [{"filename", "split", "sentences": [{"raw"}]}]}."""
    root, w = Path(root), _Writer(out)
    data = _json(_find_one(root, json_name, "Karpathy split"))
    media = index_media(root, IMAGE_EXTS)
    for im in data.get("images", []):
        if im.get("split") != split:
            continue
        stem = Path(im["filename"]).stem
        if stem not in media:
            w.skip(f"{im['filename']} missing")
            continue
        refs = [s["raw"].strip() for s in im["sentences"]]
        w.add(f"flickr30k-{stem}", "ic", PROMPTS["ic"], refs[0], image=media[stem], references=refs)
    return w.finish(limit)


def textvqa(root: Path, out: Path, limit: int | None = None,
            json_name: str = "TextVQA_0.5.1_val.json") -> ConvertReport:
    """TextVQA: {"data": [{"question_id", "question", "image_id", "answers": [10 strings]}]} (val: the
    test answers are hidden)."""
    root, w = Path(root), _Writer(out)
    data = _json(_find_one(root, json_name, "TextVQA questions"))
    media = index_media(root, IMAGE_EXTS)
    for q in data.get("data", []):
        if q["image_id"] not in media:
            w.skip(f"{q['question_id']}: image {q['image_id']} missing")
            continue
        if not q.get("answers"):
            w.skip(f"{q['question_id']}: no answers (test split?)")
            continue
        w.add(f"textvqa-{q['question_id']}", "ocr", q["question"], q["answers"][0], image=media[q["image_id"]],
              references=list(q["answers"]))
    return w.finish(limit)


def gqa(root: Path, out: Path, limit: int | None = None,
        json_name: str = "testdev_balanced_questions.json") -> ConvertReport:
    """GQA: {qid: {"imageId", "question", "answer", "fullAnswer"}}."""
    root, w = Path(root), _Writer(out)
    data = _json(_find_one(root, json_name, "GQA questions"))
    media = index_media(root, IMAGE_EXTS)
    for qid, q in data.items():
        if q["imageId"] not in media:
            w.skip(f"{qid}: image {q['imageId']} missing")
            continue
        w.add(f"gqa-{qid}", "vqa", q["question"], q["answer"], image=media[q["imageId"]],
              full_answer=q.get("fullAnswer"))
    return w.finish(limit)


def nextqa_prompt(question: str, choices: list[str]) -> str:
    """The paper's in-context multiple choice: the options follow the question."""
    return f"{question.strip().rstrip('?')}? Choose one from: {'; '.join(c.strip() for c in choices)}."


def nextqa(root: Path, out: Path, limit: int | None = None, csv_name: str = "test.csv",
           map_name: str = "map_vid_vidorID.json") -> ConvertReport:
    """NExT-QA multiple choice: ``video,question,answer,qid,type,a0..a4`` + video id -> "dir/vidorID"."""
    root, w = Path(root), _Writer(out)
    choices = tuple(f"a{k}" for k in range(5))
    rows = _csv(_find_one(root, csv_name, "NExT-QA questions"), ("video", "question", "answer", "qid", *choices))
    vid_map = _json(_find_one(root, map_name, "NExT-QA video map"))
    media = index_media(root, VIDEO_EXTS)
    for r in rows:
        stem = Path(str(vid_map.get(r["video"], r["video"]))).name
        if stem not in media:
            w.skip(f"{r['video']}-{r['qid']}: video {stem} missing")
            continue
        opts = [r[c] for c in choices]
        answer = opts[int(r["answer"])]
        w.add(f"nextqa-{r['video']}-{r['qid']}", "videoqa", nextqa_prompt(r["question"], opts), answer,
              video=media[stem], audio=media[stem], type=r.get("type"), choices=opts)
    return w.finish(limit)


def cut_clip(src: Path, dst: Path, start: float, end: float,
             sample_rate: int = TimingConfig.sample_rate) -> None:
    """Write [start, end) s of ``src`` (video at CLIP_FPS + mono audio) to the mp4 ``dst``."""
    import math

    from favor import media
    from training.synth.write import write_mp4

    frames, _ = media.load_frames(src, CLIP_FPS, max_frames=max(1, math.ceil((end - start) * CLIP_FPS)),
                                  start=start)  # [T, H, W, 3]
    audio = media.load_audio(src, sample_rate)[int(start * sample_rate): int(end * sample_rate)]
    frames = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]  # yuv420p needs even sides
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(dst, frames.numpy(), audio.numpy()[None], CLIP_FPS, sample_rate)


def how2(root: Path, out: Path, limit: int | None = None, split_dir: str = "test") -> ConvertReport:
    """How2 AVSR: Kaldi ``text`` ("utt words") and ``segments`` ("utt video start end") of ``split_dir``;
    each segment is cut from its video into ``{out dir}/how2_clips/{utt}.mp4``."""
    root, w = Path(root), _Writer(out)
    text_file = next((p for p in sorted(root.rglob("text")) if p.parent.name == split_dir), None)
    if text_file is None:
        raise ValueError(f"{root}: no {split_dir}/text (Kaldi transcripts of the How2 {split_dir} split)")
    seg_file = _need(text_file.parent / "segments", "How2 segments file")
    text = dict(line.strip().split(" ", 1) for line in text_file.read_text(encoding="utf-8").splitlines()
                if " " in line.strip())
    media = index_media(root, VIDEO_EXTS)
    clips = w.out.parent / "how2_clips"
    for line in seg_file.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) != 4:
            continue
        utt, video, start, end = parts[0], parts[1], float(parts[2]), float(parts[3])
        if utt not in text:
            continue
        if video not in media:
            w.skip(f"{utt}: video {video} missing")
            continue
        if limit and len(w.rows) >= limit:
            break
        dst = clips / f"{utt}.mp4"
        if not dst.is_file():
            cut_clip(media[video], dst, start, end)
        w.add(f"how2-{utt}", "avsr", PROMPTS["avsr"], text[utt].lower(), video=dst, audio=dst,
              source=video, start=start, end=end)
    return w.finish(limit)


UNDISCLOSED = "__UNDISCLOSED__"  # DSTC7 test answers withheld from the dialog file


def avsd(root: Path, out: Path, limit: int | None = None,
         json_name: str = "test_set4DSTC7-AVSD.json") -> ConvertReport:
    """AVSD: {"dialogs": [{"image_id", "dialog": [{"question", "answer"}]}]}; one sample per dialog, its last
    turn asked after the history (the release's multi-turn prompt)."""
    root, w = Path(root), _Writer(out)
    data = _json(_find_one(root, json_name, "AVSD dialogs"))
    media = index_media(root, VIDEO_EXTS)
    for d in data.get("dialogs", []):
        vid, turns = d["image_id"], d.get("dialog", [])
        if not turns or not turns[-1].get("answer") or turns[-1]["answer"] == UNDISCLOSED:
            w.skip(f"{vid}: last answer not disclosed")
            continue
        if vid not in media:
            w.skip(f"{vid}: video missing")
            continue
        history = [(t["question"], t["answer"]) for t in turns[:-1]]
        question = turns[-1]["question"]
        w.add(f"avsd-{vid}", "avsd", chat_prompt(question, history), turns[-1]["answer"], video=media[vid],
              audio=media[vid], question=question)
    return w.finish(limit)


def vggss(root: Path, out: Path, limit: int | None = None, json_name: str = "vggss.json") -> ConvertReport:
    """VGG-SS: [{"file", "class", "bbox"}]; the reference is the sounding object's class."""
    root, w = Path(root), _Writer(out)
    data = _json(_find_one(root, json_name, "VGG-SS annotations"))
    media = index_media(root, VIDEO_EXTS)
    for item in data:
        stem = Path(item["file"]).stem
        if stem not in media:
            w.skip(f"{stem}: video missing")
            continue
        w.add(f"vggss-{stem}", "avssd", PROMPTS["avssd"], item["class"], video=media[stem], audio=media[stem],
              question=PROMPTS["avssd"])
    return w.finish(limit)


def spokencoco(root: Path, out: Path, limit: int | None = None, json_name: str = "SpokenCOCO_val.json",
               seed: int = 0) -> ConvertReport:
    """SpokenCOCO AVM: {"data": [{"image", "captions": [{"text", "wav"}]}]} (paths relative to the json's
    directory, images possibly elsewhere under root). Each image gets its own first spoken caption
    ("yes") or, with probability 1/2 from ``seed``, another image's ("no")."""
    root, w = Path(root), _Writer(out)
    meta_file = _find_one(root, json_name, "SpokenCOCO captions")
    data = _json(meta_file).get("data", [])
    images = index_media(root, IMAGE_EXTS)
    usable = []
    for d in data:
        stem = Path(d["image"]).stem
        wav = meta_file.parent / d["captions"][0]["wav"] if d.get("captions") else None
        if stem not in images or wav is None or not wav.is_file():
            w.skip(f"{stem}: image or caption audio missing")
            continue
        usable.append((stem, images[stem], wav, d["captions"][0]["text"]))
    rng = np.random.default_rng(seed)
    for i, (stem, image, _, _) in enumerate(usable):
        matched = len(usable) < 2 or rng.random() >= 0.5
        j = i if matched else (i + 1 + int(rng.integers(len(usable) - 1))) % len(usable)
        w.add(f"spokencoco-{stem}", "avm", PROMPTS["avm"], "yes" if matched else "no", image=image,
              audio=usable[j][2], matched=matched, caption=usable[j][3])
    return w.finish(limit)


CONVERTERS: dict[str, Callable[..., ConvertReport]] = {
    "librispeech": librispeech, "audiocaps": audiocaps, "flickr30k": flickr30k, "textvqa": textvqa, "gqa": gqa,
    "nextqa": nextqa, "how2": how2, "avsd": avsd, "vggss": vggss, "spokencoco": spokencoco,
}


def convert(name: str, root: Path | str, out: Path | str, limit: int | None = None) -> ConvertReport:
    """Run the converter of one AVEB set (see CONVERTERS)."""
    if name not in CONVERTERS:
        raise ValueError(f"unknown AVEB set {name!r}; expected one of {sorted(CONVERTERS)}")
    if not Path(root).is_dir():
        raise ValueError(f"{root}: not a directory (expected the local copy of {name})")
    return CONVERTERS[name](Path(root), Path(out), limit=limit)
