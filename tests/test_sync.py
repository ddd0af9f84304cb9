"""Hand-built timelines: every slot value is checked exactly."""

import torch

from favor import sync, windows
from favor.config import get_config


def _cfg():
    # 10 FPS: 5 audio tokens per frame; Qv = 5 -> S = 5; widths Dv = Da = 20.
    return get_config("tiny")


def _marked_streams(cfg, Tv, Ta):
    Dv, Da, Qv = cfg.visual_width, cfg.audio_proj_dim, cfg.visual.num_query_tokens
    vis = torch.zeros(1, Tv, Qv, Dv)
    for t in range(Tv):
        for j in range(Qv):
            vis[0, t, j, 0] = 100 * (t + 1) + j  # value encodes (frame, token)
    aud = torch.zeros(1, Ta, Da)
    aud[0, :, 0] = torch.arange(1, Ta + 1).float()  # audio token i carries i + 1
    return vis, aud


def test_slot_layout_matches_spec():
    cfg = _cfg()
    Dv = cfg.visual_width
    vis, aud = _marked_streams(cfg, Tv=3, Ta=15)
    x = sync.align(vis, aud, cfg)  # [1, 3, 5, 40]
    assert x.shape == (1, 3, 5, 40)
    for t in range(3):
        for j in range(5):
            assert x[0, t, j, 0] == 100 * (t + 1) + j
            assert x[0, t, j, Dv] == 5 * t + j + 1  # audio token 5t + j


def test_shorter_stream_is_zero_padded():
    cfg = _cfg()
    Dv = cfg.visual_width
    vis, aud = _marked_streams(cfg, Tv=2, Ta=17)  # audio covers ceil(17/5) = 4 frames
    x = sync.align(vis, aud, cfg)
    assert x.shape[1] == 4
    assert torch.all(x[0, 2:, :, :Dv] == 0)  # no video for frames 2, 3
    assert x[0, 3, 1, Dv] == 17 and torch.all(x[0, 3, 2:, Dv] == 0)  # tokens 15, 16 then padding


def test_release_rates_25_audio_rows_plus_7_zero_rows():
    cfg = get_config("favor-13b")
    Dv = cfg.visual_width
    aud = torch.arange(1, 51).float()[None, :, None].expand(1, 50, 768).contiguous()
    vis = torch.ones(1, 2, 32, 768)
    x = sync.align(vis, aud, cfg)
    assert x.shape == (1, 2, 32, 1536)
    assert torch.equal(x[0, 1, :25, Dv], torch.arange(26, 51).float())
    assert torch.all(x[0, :, 25:, Dv:] == 0)


def test_uneven_rate_alternates_counts():
    cfg = get_config("favor-13b").replace(**{"timing.video_fps": 4.0})
    starts = sync.audio_frame_starts(4, cfg)
    assert starts.tolist() == [0, 12, 25, 37, 50]  # 12.5 tokens per frame


def test_modality_mask_zeroes_a_stream():
    cfg = _cfg()
    Dv = cfg.visual_width
    vis, aud = _marked_streams(cfg, 3, 15)
    x = sync.align(vis, aud, cfg, modality_mask=torch.tensor([[1.0, 0.0]]))
    assert torch.all(x[..., Dv:] == 0) and x[0, 0, 0, 0] == 100
    x = sync.align(vis, aud, cfg, modality_mask=torch.tensor([[0.0, 1.0]]))
    assert torch.all(x[..., :Dv] == 0) and x[0, 0, 0, Dv] == 1


def test_image_repeated_over_audio():
    cfg = _cfg()
    vis, aud = _marked_streams(cfg, 1, 12)
    rep = sync.repeat_image(vis, sync.audio_frames(12, cfg))
    assert rep.shape[1] == 3 and torch.equal(rep[0, 2], vis[0, 0])


def test_windows_split_and_pad():
    x = torch.randn(2, 7, 5, 4)
    lengths = torch.tensor([7, 4])
    win, mask = windows.split_windows(x, 3, sync.frame_mask(lengths, 7))
    assert win.shape == (2, 3, 15, 4) and mask.shape == (2, 3, 15)
    assert mask[0].sum() == 7 * 5 and mask[1].sum() == 4 * 5
    assert torch.equal(mask[1, 1], torch.tensor([True] * 5 + [False] * 10))
    assert torch.all(win[0, 2, 5:] == 0)  # frames 7, 8 are padding
    assert torch.equal(win[0, 1, 5:10], x[0, 4])  # frame 4 = window 1, slot 1
    # every real frame f sits at window f // F, rows (f % F) * S ... : frame-major, nothing lost
    for f in range(7):
        assert torch.equal(win[:, f // 3, (f % 3) * 5:(f % 3 + 1) * 5], x[:, f])
