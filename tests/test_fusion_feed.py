"""export.frontend.fusion_feed: the one place the fusion input is built (verify, OrtBundle, every bundle
backend). The feed on the exported wrapper must compute what FavorModel.fuse computes on the unpadded
streams, a missing modality included (what sync.align does with None)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tokenizer

from export.frontend import FusionFrontend, fusion_feed
from favor.build import build_model
from favor.config import get_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(11)
    return build_model(get_config("tiny"), pretrained=False, tokenizer=make_tokenizer()).eval()


def _streams(cfg, Tv: int, Ta: int):
    g = torch.Generator().manual_seed(Tv * 100 + Ta)
    return (torch.randn(1, Tv, cfg.visual.num_query_tokens, cfg.visual_width, generator=g),
            torch.randn(1, Ta, cfg.audio_proj_dim, generator=g))


def test_flags_padding_and_the_missing_audio_stand_in(model):
    cfg, F = model.cfg, model.cfg.timing.frames_per_window
    v, a = _streams(cfg, F - 1, 2 * F * 25)  # the video ended inside the window; audio runs past it
    feed = fusion_feed(cfg, v, None, num_frames=F)
    assert feed["modality_mask"].tolist() == [[1.0, 0.0]] and feed["frame_lengths"].tolist() == [F]
    assert tuple(feed["visual_tokens"].shape) == (1, F, *v.shape[2:])
    assert torch.equal(feed["visual_tokens"][0, :F - 1], v[0])
    # One zero token: it covers a single frame, so it can never make T longer than the window.
    assert tuple(feed["audio_tokens"].shape) == (1, 1, cfg.audio_proj_dim) and not feed["audio_tokens"].any()
    feed = fusion_feed(cfg, None, a, num_frames=F)
    assert feed["modality_mask"].tolist() == [[0.0, 1.0]] and not feed["visual_tokens"].any()
    per_frame = cfg.timing.audio_tokens_per_frame
    assert feed["audio_tokens"].shape[1] == round(F * per_frame)  # audio past the window is cut
    feed = fusion_feed(cfg, v, a[:, :5], modality_mask=torch.tensor([[1.0, 0.0]]))  # masked, not missing
    assert feed["modality_mask"].tolist() == [[1.0, 0.0]] and feed["audio_tokens"].shape[1] == 5
    with pytest.raises(ValueError, match="neither"):
        fusion_feed(cfg, None, None, num_frames=F)


@pytest.mark.parametrize("case", ["both", "no audio", "no video", "window", "window no audio"])
def test_feed_on_the_wrapper_equals_model_fuse(model, case):
    """Bit-exact: padding frames to whole windows and masking them by length, and the zero stand-in
    masked by the modality flag, are exactly what split_windows / sync.align do."""
    cfg, F = model.cfg, model.cfg.timing.frames_per_window
    v, a = _streams(cfg, 2 * F + 1, 3 * F * 25 - 4)
    n = None
    if case == "no audio":
        a = None
    elif case == "no video":
        v = None
    elif case.startswith("window"):
        v, a, n = v[:, : F - 1], a[:, : F * 25 + 3], F  # one streaming window, video ended early
        a = None if case == "window no audio" else a
    with torch.no_grad():
        want = model.fuse(v, a, num_frames=n)
        got = FusionFrontend(model)(**fusion_feed(cfg, v, a, num_frames=n))
    assert torch.equal(got[0], want.embeds) and torch.equal(got[1], want.mask)


@pytest.mark.slow
def test_feed_on_the_onnx_graph_equals_model_fuse_without_audio(model, tmp_path):
    """The exported fusion graph on the feed equals torch fuse(None audio) (fp32 graph: ORT reorders
    reductions; export/verify.py's fp32 tolerance, 1e-4 of the output scale)."""
    from export.bundle import ExportOptions, export_bundle
    from export.ort_inference import OrtBundle

    export_bundle(model, tmp_path / "b", ExportOptions(stages=("fusion",), targets=("onnx",)))
    bundle = OrtBundle(tmp_path / "b")
    cfg, F = model.cfg, model.cfg.timing.frames_per_window
    v, _ = _streams(cfg, F - 1, 1)
    with torch.no_grad():
        want = model.fuse(v, None, num_frames=F)
    embeds, mask = bundle.fuse(v, None, num_frames=F)
    torch.testing.assert_close(embeds, want.embeds, rtol=0, atol=1e-4 * float(want.embeds.abs().max()))
    assert torch.equal(mask, want.mask)
