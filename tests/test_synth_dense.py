"""Extra questions on a written split (training.synth.dense): every template once, the other matching answer."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from training.synth import SceneOptions, generate, load_manifest, make_scene
from training.synth.dense import write_dense
from training.synth.tasks import audio_signature, temporal_questions

SEED, NUM_CLIPS = 3, 6
OPTS = dict(min_seconds=4.0, max_seconds=7.0)


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("split")
    generate(out, NUM_CLIPS, SEED, speech_cache=tmp_path_factory.mktemp("speech"), **OPTS)
    write_dense(out)
    return out


def _by_clip(rows: list[dict]) -> dict[int, list[dict]]:
    out = defaultdict(list)
    for r in rows:
        out[r["meta"]["clip"]].append(r)
    return out


def _clip_of(audio: str) -> int:
    return int(re.search(r"-(\d+)\.mp4$", audio).group(1))


def test_rows_point_at_the_splits_files_with_new_ids(split):
    dense = load_manifest(split / "train_dense.jsonl")  # checks every file exists
    ids = [r["id"] for r in load_manifest(split / "train.jsonl")] + [r["id"] for r in dense]
    assert len(ids) == len(set(ids))
    assert {r["task"] for r in dense} == {"temporal_qa", "av_matching"}


def test_every_supported_temporal_template_is_asked_once_with_its_answer(split):
    # OPTS differ from SceneOptions() defaults, so scenes rebuilt without the split's record would not match
    written, dense = (_by_clip(load_manifest(split / f"{name}.jsonl")) for name in ("train", "train_dense"))
    for clip, rows in written.items():
        scene = make_scene(SEED, "train", clip, SceneOptions(**OPTS))
        asked = [r for r in rows + dense[clip] if r["task"] == "temporal_qa"]
        valid = temporal_questions(scene)
        assert sorted(r["meta"]["template"] for r in asked) == sorted(valid)  # each supported template once
        for r in asked:
            question, answer = (turn["value"] for turn in r["conversation"])
            assert (question, answer) in valid[r["meta"]["template"]]


def test_matching_gets_the_other_answer_with_a_different_soundtrack(split):
    written, dense = (_by_clip(load_manifest(split / f"{name}.jsonl")) for name in ("train", "train_dense"))
    options = SceneOptions(**OPTS)
    for clip, rows in written.items():
        pair = [r for r in rows + dense[clip] if r["task"] == "av_matching"]
        assert sorted(r["conversation"][1]["value"] for r in pair) == ["no", "yes"]
        for r in pair:
            own = r["audio"] == r["video"]
            assert r["meta"]["matched"] is own and (r["conversation"][1]["value"] == "yes") is own
            if not own:  # the negative's soundtrack really differs in content
                other = make_scene(SEED, "train", _clip_of(r["audio"]), options)
                assert audio_signature(other) != audio_signature(make_scene(SEED, "train", clip, options))


def test_rewriting_gives_the_same_bytes(split):
    first = (split / "train_dense.jsonl").read_bytes()
    assert write_dense(split).read_bytes() == first
    assert len(first.splitlines()) > NUM_CLIPS  # at least the matching row of each clip and some templates


def test_cli_names_a_directory_without_a_split(tmp_path):
    run = subprocess.run([sys.executable, "-m", "training", "synth-dense", str(tmp_path)],
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert "no generated train split" in run.stderr and str(tmp_path) in run.stderr.replace("\n", "")
