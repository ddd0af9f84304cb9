"""Writes tests/golden/demo_caption_tokens.json: the demo model's greedy caption token ids on the
committed demo clip, as `favor-rt run favor/assets/demo/demo_clip.mp4 --offline --backend torch`
computes them (default prompt, 32 new tokens, one caption of context).

    .venv/bin/python tests/golden/record_demo_tokens.py          # prints; --write overwrites the file

The committed file was recorded at commit da706b4 + H7's OrtBundle edit (223414b), before the issue-14
refactor, by the same stream run with the then ``runtime.stream.caption_tokens`` wrapped instead of
``backend.caption``; tests/test_golden_demo.py recomputes it and must match bit for bit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

GOLDEN = Path(__file__).with_name("demo_caption_tokens.json")
DEMO_CLIP = ROOT / "favor" / "assets" / "demo" / "demo_clip.mp4"
MAX_NEW_TOKENS = 32  # favor-rt run's default
CONTEXT = 1  # favor-rt run's default


def demo_captions() -> list[dict]:
    """One entry per caption: windows, token ids and text, through the runtime's own stream loop."""
    from runtime.backends import make_backend
    from runtime.cli import DEFAULT_PROMPT, default_model_path
    from runtime.scheduler import DeadlineScheduler
    from runtime.sources import MediaSource
    from runtime.stream import StreamingCaptioner

    torch.set_num_threads(2)
    backend = make_backend("torch", default_model_path())
    recorded: list[list[int]] = []
    inner = backend.caption

    def caption(*args, **kwargs):  # records the ids each caption decoded
        out = inner(*args, **kwargs)
        recorded.append(list(out.tokens))
        return out

    backend.caption = caption
    cap = StreamingCaptioner(backend, DEFAULT_PROMPT, MAX_NEW_TOKENS, CONTEXT, incremental=True)
    out = []
    report = cap.run(MediaSource(str(DEMO_CLIP), backend.cfg.timing.sample_rate), False,
                     DeadlineScheduler(None, 1), out.append)
    if report.error is not None:
        raise report.error
    return [{"windows": c.windows, "tokens": ids, "text": c.text} for c, ids in zip(out, recorded, strict=True)]


if __name__ == "__main__":
    entries = demo_captions()
    text = json.dumps({"clip": DEMO_CLIP.name, "max_new_tokens": MAX_NEW_TOKENS, "context": CONTEXT,
                       "captions": entries}, indent=1) + "\n"
    if "--write" in sys.argv:
        GOLDEN.write_text(text)
    print(text)
