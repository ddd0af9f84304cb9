"""Start-up costs that must not come back: the realtime warm-up overlaps the capture of the first
window (StreamingCaptioner.run's ``before_first``), and opening a bundle never imports the PyTorch
model stack (favor.model pulls in peft and transformers' model code: seconds before the first caption)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from runtime import sources
from runtime.backends import make_backend
from runtime.scheduler import DeadlineScheduler
from runtime.sources import MediaSource
from runtime.stream import StreamingCaptioner
from runtime.synthclip import write_clip

ROOT = Path(__file__).resolve().parents[1]


def test_warmup_runs_while_the_first_window_is_captured(tiny_ckpt, tmp_path, monkeypatch):
    real_iter = sources.MediaSource.__iter__
    captured: list[float] = []

    def recording(self):
        for item in real_iter(self):
            captured.append(item.t)
            yield item

    monkeypatch.setattr(sources.MediaSource, "__iter__", recording)
    backend = make_backend("torch", tiny_ckpt)
    cap = StreamingCaptioner(backend, "Describe the video.", max_new_tokens=2)
    scheduler = DeadlineScheduler(60.0, 1)
    clip = write_clip(tmp_path / "c.mp4", 1.0)
    seen_during_warmup: list[int] = []

    def warmup():
        deadline = time.monotonic() + 30
        while not captured and time.monotonic() < deadline:  # capture is live before the warm-up
            time.sleep(0.01)
        seen_during_warmup.append(len(captured))
        cap.warmup(scheduler, rounds=1)

    out = []
    report = cap.run(MediaSource(str(clip), backend.cfg.timing.sample_rate), True, scheduler, out.append,
                     before_first=warmup)
    assert seen_during_warmup and seen_during_warmup[0] > 0
    assert report.error is None and len(out) == 4 and not report.dropped_windows  # 1 s at 10 FPS, 3 per window


IMPORTS = """
import sys
import runtime.cli, runtime.selection, runtime.bundle_cache, runtime.backends, runtime.stream
import export.ort_inference, export.threads
from pathlib import Path
from runtime.bundle_cache import Request, key_fields
key_fields(Request(Path("m.safetensors")), "0" * 64)  # the cache key: the export options' defaults
heavy = [m for m in ("favor.model", "favor.llm", "peft", "export.bundle", "export.decoder") if m in sys.modules]
print(",".join(heavy))
"""


OPEN_BUNDLE = """
import json, sys
from pathlib import Path
from runtime.backends import BundleBackend
bundle = Path(sys.argv[1])
b = BundleBackend(bundle, json.loads((bundle / "manifest.json").read_text()))  # config, tokenizers
b.set_instruction("Describe the video.")
heavy = [m for m in ("favor.model", "favor.llm", "favor.build", "peft", "export.bundle") if m in sys.modules]
print(",".join(heavy))
"""


def test_the_bundle_path_does_not_import_the_model_stack(tmp_path, tokenizer):
    r = subprocess.run([sys.executable, "-c", IMPORTS], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""
    # what a warm start does with a bundle before any session: manifest, config, both tokenizers
    import json

    from favor.config import get_config

    tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    (tmp_path / "manifest.json").write_text(json.dumps({"config": get_config("tiny").to_dict()}))
    r = subprocess.run([sys.executable, "-c", OPEN_BUNDLE, str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""
