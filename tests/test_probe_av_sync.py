"""benchmarks/probe_av_sync.py: the linear probe finds a label that is in the features and not one that is
not, and pairs every picture with its own soundtrack and the next clip's."""

from __future__ import annotations

import torch

from benchmarks.probe_av_sync import features, probe


def test_probe_separates_a_present_label_and_not_an_absent_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=g)
    y = (x[:, 3] > 0).float()  # the label lies along one feature
    train, test = (x[:300], y[:300]), (x[300:], y[300:])
    assert probe(train, test, weight_decay=1e-2)["heldout"] >= 0.9
    noise = (torch.rand(400, generator=g) > 0.5).float()  # a label the features do not hold
    # 100 held-out rows: chance 0.5 with sd 0.05; 0.7 is 4 sd out
    assert probe((x[:300], noise[:300]), (x[300:], noise[300:]), weight_decay=1e-2)["heldout"] < 0.7


class _Fuse:
    """Stands in for FavorModel.fuse: the queries encode which clip's audio came with which picture."""

    def fuse(self, visual, audio):
        q = torch.stack([visual.sum() * torch.ones(4), audio.sum() * torch.ones(4)])  # [W=2, H=4]
        return type("AV", (), {"queries": q[None, :, None, :]})()  # [1, W, Nq=1, H]


def test_every_picture_gets_its_own_soundtrack_and_the_next_ones():
    enc = [(torch.full((1,), float(i)), torch.full((1,), 10.0 * i)) for i in range(3)]
    x, y = features(_Fuse(), enc)
    assert y.tolist() == [1, 0, 1, 0, 1, 0]
    # row 2k: clip k's audio, row 2k+1: clip k+1's (the last clip takes the first's); features = window
    # mean then window max of (picture k, audio 10 j): the max is the audio's unless it is 0
    assert x[:, 4:].amax(1).tolist() == [0.0, 10.0, 10.0, 20.0, 20.0, 2.0]
    assert x[:, :4].amax(1).tolist() == [0.0, 5.0, 5.5, 10.5, 11.0, 1.0]


def test_head_accuracy_scores_other_clip_and_rotated_negatives(monkeypatch):
    import types

    import benchmarks.probe_av_sync as probe_mod

    timing = types.SimpleNamespace(audio_tokens_per_frame=25.0, video_fps=2.0)
    model = types.SimpleNamespace(cfg=types.SimpleNamespace(timing=timing))
    # clip i: picture [i], soundtrack 8 frames of distinct values (a rotation changes it)
    enc = [(torch.tensor([float(i)]), torch.arange(200.0)[:, None] + 1000 * i) for i in range(4)]
    own = {i: a for i, (_, a) in enumerate(enc)}
    judge = lambda m, v, a: 1.0 if torch.equal(a, own[int(v[0])]) else -1.0  # noqa: E731
    monkeypatch.setattr(probe_mod, "head_logit", judge)
    assert probe_mod.head_accuracy(model, enc) == {"other_clip": 1.0, "rotated": 1.0, "rows": 8}
    monkeypatch.setattr(probe_mod, "head_logit", lambda m, v, a: 1.0)  # says "in time" to everything
    assert probe_mod.head_accuracy(model, enc) == {"other_clip": 0.5, "rotated": 0.5, "rows": 8}
