"""`favor-rt bench` with several backends: one run, the same windows, round-robin (runtime/bench.py)."""

from __future__ import annotations

from runtime import bench
from runtime.backends import make_backend
from runtime.synthclip import write_clip


def test_backends_take_turns_on_the_same_windows(tiny_ckpt, tmp_path, monkeypatch):
    order: list[tuple[str, int]] = []
    real_step = bench._CellRun.step

    def step(self, w):
        order.append((self.cell.backend, w.index))
        real_step(self, w)

    monkeypatch.setattr(bench._CellRun, "step", step)
    clip = write_clip(tmp_path / "c.mp4", 1.2)  # tiny: 10 FPS x 3 frames -> 4 windows
    a, b = make_backend("torch", tiny_ckpt), make_backend("torch", tiny_ckpt)
    cells = bench.run_cells([("first", a), ("second", b)], "tiny", clip, max_new_tokens=3, max_windows=3)
    # window 0: first then second; window 1: second then first (a drift in load favours neither)
    assert order == [("first", 0), ("second", 0), ("second", 1), ("first", 1), ("first", 2), ("second", 2)]
    assert [c.backend for c in cells] == ["first", "second"] and all(c.windows == 3 for c in cells)
    assert [c.engine for c in cells] == ["torch", "torch"]
    # the same weights on the same windows: the same captions, so the same token counts
    assert cells[0].llm_input_tokens == cells[1].llm_input_tokens and cells[0].new_tokens == cells[1].new_tokens
    assert all(c.latency_p50 > 0 and c.throughput > 0 for c in cells)
    # the first token is decided before the caption ends: 0 < time to first token <= latency
    assert all(0 < c.ttft_p50 <= c.latency_p50 and 0 < c.ttft_p95 <= c.latency_max for c in cells)
    md = (tmp_path / "b").with_suffix(".md")
    bench.write_outputs(cells, tmp_path / "b", bench.machine(), clip)
    assert "first token p50 / p95 s" in md.read_text() and "at the end" in md.read_text()
