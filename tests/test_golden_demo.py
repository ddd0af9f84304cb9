"""Behaviour unchanged by the issue-14 refactor: the demo model's greedy caption token ids on the
committed demo clip equal, bit for bit, those recorded before it (tests/golden/demo_caption_tokens.json,
written by tests/golden/record_demo_tokens.py through `favor-rt run --backend torch --offline`'s path)."""

from __future__ import annotations

import json

import pytest
from golden.record_demo_tokens import GOLDEN, demo_captions  # tests/ is on sys.path, as for conftest


@pytest.mark.slow
def test_demo_clip_captions_are_the_recorded_tokens():
    want = json.loads(GOLDEN.read_text())["captions"]
    got = demo_captions()
    assert [c["windows"] for c in got] == [c["windows"] for c in want]
    for g, w in zip(got, want, strict=True):
        assert g["tokens"] == w["tokens"], f"window {w['windows']}: {g['text']!r} != {w['text']!r}"
        assert g["text"] == w["text"]
