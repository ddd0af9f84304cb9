"""The synchrony objective (favor/synchrony.py): rotation, pooling head, loss, which rows train it, wiring."""

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from favor.synchrony import SyncHead, partners, synchrony_loss
from training.manifest import Entry
from training.pairing import MATCH_NO, MATCH_TASK, PairingOptions, Plan, own_soundtrack, pair


def test_partners_pair_own_rows_with_another_recording():
    own = [True, False, True, True, False]
    keys = ["a", "a", "b", "c", None]
    # row 0 skips row 1 (same recording a); row 3 wraps past the keyless row 4 to row 0
    assert partners(own, keys) == [(0, 2), (2, 3), (3, 0)]
    assert partners([True, True], ["a", "a"]) == []  # one recording: no negative
    assert partners([True, False], [None, "b"]) == []  # an own row without a key is left out
    assert partners([False, False], ["a", "b"]) == []


def test_head_ignores_masked_windows():
    torch.manual_seed(0)
    head = SyncHead(6)
    tokens = torch.randn(2, 3, 4, 6)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    before = head(tokens, mask)
    tokens[0, 2] = 100.0  # the masked window of row 0
    after = head(tokens, mask)
    assert after[0] == before[0] and after[1] == before[1]
    tokens[1, 2] = 100.0  # a valid window of row 1 does count
    assert head(tokens, mask)[1] != before[1]


def test_loss_is_log2_at_chance_and_small_when_separated():  # own 1, other 0
    zero = torch.zeros(3)
    torch.testing.assert_close(synchrony_loss(zero, zero), torch.tensor(math.log(2)))
    assert synchrony_loss(torch.full((3,), 9.0), torch.full((3,), -9.0)) < 1e-3
    assert synchrony_loss(torch.full((3,), -9.0), torch.full((3,), 9.0)) > 8  # swapped labels: large


def _entry(task="av_caption", audio="c.mp4", answer="x", image=None, video="c.mp4"):
    conv = ({"from": "human", "value": "q"}, {"from": "gpt", "value": answer})
    return Entry(1, "c", task, Path(video) if video else None, Path(audio), Path(image) if image else None,
                 conv, {})


def _base(entry, mask=(1.0, 1.0)):
    return Plan(entry, entry.visual, entry.image is not None, entry.audio, mask, entry.conversation, entry.task)


def test_own_soundtrack_rows():
    assert own_soundtrack(_base(_entry()))
    assert not own_soundtrack(_base(_entry(), (1.0, 0.0)))  # audio masked: another sample's
    assert own_soundtrack(_base(_entry(MATCH_TASK, answer="yes")))
    assert not own_soundtrack(_base(_entry(MATCH_TASK, audio="other.mp4", answer="no")))  # manifest negative
    still = _entry("spoken_qa", audio="q.wav", image="s.png", video=None)
    assert not own_soundtrack(_base(still))


def test_pairing_swaps_are_not_own_soundtrack():
    entry, other = _entry(), _entry(audio="o.mp4", video="o.mp4")
    always = PairingOptions(av_match_prob=1.0, mismatch_prob=1.0)
    plan = pair(entry, np.random.default_rng(0), [entry, other], always)
    assert plan.conversation[1]["value"] == MATCH_NO and not own_soundtrack(plan)
    kept = pair(entry, np.random.default_rng(0), [entry, other], dataclasses.replace(always, mismatch_prob=0.0))
    assert plan.task == kept.task == MATCH_TASK and own_soundtrack(kept)


@pytest.fixture
def sync_cfg(tiny_cfg):
    return dataclasses.replace(tiny_cfg, sync_loss_weight=0.5)


def _item(cfg, own: bool, frames: int, key: str | None = "a"):
    mel_per_frame = int(cfg.timing.audio_tokens_per_frame * cfg.timing.audio_conv_stride)
    S = cfg.visual.image_size
    return {"mel": torch.randn(cfg.audio.n_mels, frames * mel_per_frame), "pixels": torch.randn(frames, 3, S, S),
            "is_image": False, "modality_mask": torch.ones(2),
            "conversation": ({"from": "human", "value": "describe the video"},
                             {"from": "gpt", "value": "a purple diamond appears"}),
            "task": "av_caption", "id": "c", "line": 1, "audio_key": key, "visual_key": None, "scene": None,
            "own_soundtrack": own}


def test_collated_rows_train_the_head_and_the_loss_joins_the_total(sync_cfg, tokenizer):
    from favor.build import build_model
    from training.collate import Collator

    batch = Collator(sync_cfg, tokenizer)([_item(sync_cfg, True, 7, "a"), _item(sync_cfg, False, 9, "b"),
                                           _item(sync_cfg, True, 5, "a")])
    assert batch["own_soundtrack"].tolist() == [True, False, True]
    torch.manual_seed(0)
    model = build_model(sync_cfg, pretrained=False, tokenizer=tokenizer)
    out = model(batch)
    assert out["synchrony"] > 0
    torch.testing.assert_close(out["loss"], out["ce"] + sync_cfg.diversity_loss_weight * out["diversity"]
                               + 0.5 * out["synchrony"])
    out["loss"].backward()
    assert model.sync_head.proj.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.qformer.parameters())
    assert "sync_head.proj.weight" in model.trainable_state_dict()
    batch["audio_keys"] = ["a", "a", "a"]  # one recording everywhere: no negative, no term
    assert model(batch)["synchrony"] == 0


def test_no_head_without_the_weight(tiny_cfg, tokenizer):
    from favor.build import build_model

    assert build_model(tiny_cfg, pretrained=False, tokenizer=tokenizer).sync_head is None


def test_a_tiny_fusion_learns_to_tell_another_soundtrack(sync_cfg, tokenizer):
    """The objective can be learnt from timing alone: four equally long clips whose picture flashes on
    random frames and whose soundtrack sounds on exactly those frames (features given as the frozen, cached
    encoders would give them: the tiny random encoders wash such inputs out); 30 Adam steps take the
    synchrony loss from chance (log 2) to well below it."""
    from favor.build import build_model
    from training.collate import Collator

    torch.manual_seed(0)
    cfg, frames, B = sync_cfg, 12, 4
    per_frame = int(cfg.timing.audio_tokens_per_frame)
    Qv, Dv, Da = cfg.visual.num_query_tokens, cfg.visual_width, cfg.audio_proj_dim
    model = build_model(cfg, pretrained=False, tokenizer=tokenizer).train()
    batch = Collator(cfg, tokenizer)([_item(cfg, True, frames, str(k)) for k in range(B)])

    def features():
        on = (torch.rand(B, frames) < 0.4).float()  # [B, T] frames that flash and sound
        visual = on[:, :, None, None].expand(B, frames, Qv, Dv).clone()
        audio = on.repeat_interleave(per_frame, 1)[:, :, None].expand(B, frames * per_frame, Da).clone()
        return visual, audio

    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(30):
        step_features = features()  # this step's clips
        model.encode_media = lambda *args, f=step_features: f  # noqa: E731
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()  # CE joins in; the synchrony part is what is checked
        opt.step()
        losses.append(out["synchrony"].item())
    assert np.mean(losses[:5]) > 0.6 and np.mean(losses[-5:]) < 0.35, losses
