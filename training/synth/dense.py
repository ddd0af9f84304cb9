"""More questions on clips already written: every temporal template once, and the other matching answer.

A generated split asks one temporal question per clip, its template drawn uniformly among those the scene
supports (tasks._pick). Templates that fewer scenes support get few samples: in the 1,200-clip demo split,
"What word was spoken after the chime?" has 68 and "What appeared after the chime?" 105, against 428 for
"What sound played after ... appeared?", and the session-12 model answered the two rare ones right 2 and
0 times in 9 held-out clips each (benchmarks/RESULTS.md 1j). Its av_matching answers lean "yes" (55 of 58
matches found, 23 of 42 mismatches). So for every clip of a split this writes

    one instance of each temporal template the scene supports, besides the one the split already asks;
    the av_matching sample with the other answer (own soundtrack <-> another clip's, as generate pairs them).

A scene is a pure function of (seed, split, index, options) (scene.make_scene), so nothing is rendered:
every row points at the split's own mp4 files, and their cached audio features are reused in training.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from .generate import GENERATE_SPLITS, clip_partner, scene_options
from .manifest import load_manifest, write_manifest
from .scene import STREAM_DENSE, Scene, clip_rng, make_scene
from .tasks import make_sample, pick_prompt, temporal_questions


def dense_samples(scene: Scene, written: dict[str, dict], partner_video: str | None,
                  rng: np.random.Generator) -> list[dict]:
    """The extra rows of one clip. ``written`` maps task -> the split's row of that task for this clip;
    ``partner_video`` is the other clip whose audio makes a negative (None: no negative exists)."""
    video = written["temporal_qa"]["video"]
    asked = written["temporal_qa"]["meta"]["template"]
    out = []
    for template, pairs in sorted(temporal_questions(scene).items()):
        if template == asked:
            continue
        question, answer = pairs[int(rng.integers(len(pairs)))]
        out.append(make_sample(scene, "temporal_qa", question, answer, "phrase", id_suffix=f"-{template}",
                               video=video, audio=video, template=template))
    matched = bool(written["av_matching"]["meta"]["matched"])
    if matched and partner_video is None:
        return out  # a one-clip split: no other soundtrack to swap in
    audio = partner_video if matched else video
    answer = "no" if matched else "yes"
    out.append(make_sample(scene, "av_matching", pick_prompt(rng, "av_matching"), answer, "yes_no",
                           id_suffix=f"-{answer}", video=video, audio=audio, matched=not matched))
    return out


def write_dense(out_dir: Path | str, split: str = "train") -> Path:
    """Write OUT_DIR/{split}_dense.jsonl for the split generate() wrote under OUT_DIR; returns its path."""
    if split not in GENERATE_SPLITS:
        raise ValueError(f"split ({split!r}) must be one of {list(GENERATE_SPLITS)}")
    out = Path(out_dir)
    info_path, manifest = out / f"{split}.json", out / f"{split}.jsonl"
    if not info_path.is_file() or not manifest.is_file():
        raise ValueError(f"{out}: no generated {split} split ({info_path.name} and {manifest.name} are needed)")
    info = json.loads(info_path.read_text())
    seed, num_clips, options = int(info["seed"]), int(info["num_clips"]), scene_options(**info["scene_options"])
    by_clip: dict[int, dict[str, dict]] = defaultdict(dict)
    for row in load_manifest(manifest, check_files=False):
        by_clip[int(row["meta"]["clip"])][row["task"]] = row

    rows = []
    for index, written in sorted(by_clip.items()):
        scene = make_scene(seed, split, index, options)
        # the split's own negative already names its partner; only a positive needs one found
        partner = clip_partner(scene, num_clips, options) if written["av_matching"]["meta"]["matched"] else None
        video = None if partner is None else partner[1]
        rows.extend(dense_samples(scene, written, video, clip_rng(seed, split, index, STREAM_DENSE)))
    return write_manifest(out / f"{split}_dense.jsonl", rows)
