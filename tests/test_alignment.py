"""The word-alignment objective (favor/alignment.py) and its window targets (training/window_words.py)."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer

from favor.alignment import TEMPERATURE, word_alignment_loss
from favor.config import get_config
from training.data import scene_of
from training.manifest import Entry
from training.pairing import Plan
from training.window_words import WORLD_WORDS, window_targets, window_words, world_vocab

EVENTS = [  # a 7 s clip: two windows of 5 s at 2 FPS x 10 frames
    {"t": 0.2, "kind": "appear", "what": "purple diamond"},
    {"t": 0.8, "kind": "text", "what": "4"},
    {"t": 2.2, "kind": "sound", "what": "high tone", "source": "purple diamond"},
    {"t": 4.0, "kind": "disappear", "what": "purple diamond"},
    {"t": 5.6, "kind": "appear", "what": "green circle"},
    {"t": 6.0, "kind": "speech", "what": "seven"},
    {"t": 6.1, "kind": "text", "what": "stop"},
]


def test_window_words_seen_and_heard():
    assert window_words(EVENTS, 0, 5, seen=True, heard=True) == {"purple", "diamond", "four", "high", "tone"}
    assert window_words(EVENTS, 5, 10, seen=True, heard=True) == {"green", "circle", "seven", "stop"}
    # the diamond left at 4.0 s: not in the second window; heard-only samples name no shape
    assert window_words(EVENTS, 5, 10, seen=False, heard=True) == {"seven"}
    assert window_words(EVENTS, 0, 5, seen=True, heard=False) == {"purple", "diamond", "four"}


def test_window_targets_rows_follow_the_window_grid():
    cfg = get_config("demo")  # 10 frames at 2 FPS: 5 s windows
    t = window_targets(EVENTS, 7.0, cfg, seen=True, heard=True)
    assert t.shape == (2, len(WORLD_WORDS))
    named = [{WORLD_WORDS[k] for k in row.nonzero().flatten().tolist()} for row in t]
    assert named == [{"purple", "diamond", "four", "high", "tone"}, {"green", "circle", "seven", "stop"}]
    short = dataclasses.replace(cfg, timing=dataclasses.replace(cfg.timing, frames_per_window=4))  # 2 s
    assert window_targets(EVENTS, 7.0, short, seen=True, heard=True).shape[0] == 4


def _plan(audio: str, mask=(1.0, 1.0)) -> Plan:
    entry = Entry(1, "c", "av_caption", Path("c.mp4"), Path("c.mp4"), None, (),
                  {"events": EVENTS, "duration": 7.0})
    return Plan(entry, entry.visual, False, Path(audio), mask, (), "av_caption")


def test_scene_of_an_image_entry_sees_and_hears_nothing():
    # spoken QA: a still of the clip (one instant, not the windows' timeline) and a recorded question
    entry = Entry(1, "c", "spoken_qa", None, Path("q.wav"), Path("still.png"), (), {"events": EVENTS, "duration": 7.0})
    scene = scene_of(Plan(entry, entry.image, True, entry.audio, (1.0, 1.0), (), "spoken_qa"))
    assert scene["seen"] is False and scene["heard"] is False


def test_scene_of_counts_only_the_clips_own_media():
    assert scene_of(_plan("c.mp4"))["heard"] is True
    swapped = scene_of(_plan("other.mp4"))  # AV matching "no" / paired audio: another clip's sounds
    assert swapped["seen"] is True and swapped["heard"] is False
    assert scene_of(_plan("c.mp4", (1.0, 0.0)))["heard"] is False
    bare = dataclasses.replace(_plan("c.mp4"), entry=dataclasses.replace(_plan("c.mp4").entry, meta={}))
    assert scene_of(bare) is None


def test_loss_is_near_zero_when_a_token_is_the_word_and_large_when_another_is():
    K, D = 5, 8
    table = torch.eye(K, D) * 3.0  # orthogonal word embeddings
    targets = torch.zeros(1, 1, K)
    targets[0, 0, 2] = 1.0
    mask = torch.ones(1, 1, dtype=torch.bool)
    right = torch.zeros(1, 1, 3, D)
    right[0, 0, :, K:] = torch.randn(3, D - K)  # the other tokens lie outside every word's direction
    right[0, 0, 1] = table[2] * 7.0  # scale does not matter: cosine
    wrong = right.clone()
    wrong[0, 0, 1] = table[3]
    # right: the positive's cosine is ~1, the negatives' ~0 -> log(1 + (K-1) e^(-1/T)) ~ 2e-6
    assert word_alignment_loss(right, mask, table, targets).item() < 1e-3
    # wrong: the negative word 3 scores 1, the positive ~0 -> about 1/T
    assert word_alignment_loss(wrong, mask, table, targets).item() > 0.9 / TEMPERATURE


def test_loss_equals_formula_and_skips_masked_and_empty_windows():
    torch.manual_seed(0)
    B, W, Nq, D, K = 2, 3, 4, 6, 5
    tokens, table = torch.randn(B, W, Nq, D), torch.randn(K, D)
    targets = torch.zeros(B, W + 1, K)  # one window more than the model made: ignored
    targets[0, 0, [1, 3]] = 1.0
    targets[1, 1, 0] = 1.0
    targets[1, 2, 4] = 1.0  # masked window
    targets[0, 3, 2] = 1.0  # past the model's windows
    mask = torch.tensor([[True, True, True], [True, True, False]])
    cos = torch.nn.functional.cosine_similarity(tokens[..., None, :], table, dim=-1).amax(2) / TEMPERATURE
    expect = []
    for b, w, k in [(0, 0, 1), (0, 0, 3), (1, 1, 0)]:
        neg = [cos[b, w, j] for j in range(K) if targets[b, w, j] == 0]
        expect.append(-math.log(math.exp(cos[b, w, k]) / (math.exp(cos[b, w, k]) + sum(math.exp(x) for x in neg))))
    got = word_alignment_loss(tokens, mask, table, targets)
    assert got.item() == pytest.approx(sum(expect) / len(expect), rel=1e-5)
    assert word_alignment_loss(tokens, mask, table, torch.zeros(B, W, K)).item() == 0.0


def test_gradient_reaches_only_the_best_matching_token():
    table = torch.eye(3, 4)
    tokens = torch.tensor([[[[1.0, 0.1, 0.0, 0.0], [0.0, 0.0, 1.0, 0.2]]]], requires_grad=True)
    targets = torch.tensor([[[1.0, 0.0, 0.0]]])
    word_alignment_loss(tokens, torch.ones(1, 1, dtype=torch.bool), table, targets).backward()
    # token 0 is the best match of the positive word 0 and of the negative word 1; token 1 of the
    # negative word 2 only: both take gradient (pull towards word 0, push from words 1 and 2) ...
    assert tokens.grad[0, 0, 0].abs().sum() > 0 and tokens.grad[0, 0, 1].abs().sum() > 0
    # ... and a token that is nobody's best match takes none
    far = torch.cat([tokens.detach(), torch.tensor([[[[0.0, 0.0, 0.0, 1.0]]]])], dim=2).requires_grad_()
    word_alignment_loss(far, torch.ones(1, 1, dtype=torch.bool), table, targets).backward()
    assert far.grad[0, 0, 2].abs().sum() == 0


@pytest.fixture
def aligned_cfg(tiny_cfg):
    return dataclasses.replace(tiny_cfg, word_alignment_weight=0.5)


def _item(tiny_cfg, scene, T=7):
    S = tiny_cfg.visual.image_size
    return {"mel": torch.randn(tiny_cfg.audio.n_mels, 140), "pixels": torch.randn(T, 3, S, S),
            "is_image": False, "modality_mask": torch.ones(2),
            "conversation": ({"from": "human", "value": "describe the video"},
                             {"from": "gpt", "value": "a purple diamond appears"}),
            "task": "av_caption", "id": "c", "line": 1, "audio_key": None, "visual_key": None, "scene": scene}


def test_collator_builds_targets_and_the_loss_joins_the_total(aligned_cfg, tokenizer):
    from favor.build import build_model
    from training.collate import Collator

    window_s = aligned_cfg.timing.frames_per_window / aligned_cfg.timing.video_fps  # 0.3 s on tiny
    events = [{"t": 0.1, "kind": "appear", "what": "purple diamond"},
              {"t": window_s + 0.05, "kind": "speech", "what": "four"}]
    scene = {"events": events, "duration": 0.7, "seen": True, "heard": True}
    batch = Collator(aligned_cfg, tokenizer)([_item(aligned_cfg, scene), _item(aligned_cfg, None)])
    ww = batch["window_words"]  # [B, Wt, K]
    assert ww.shape == (2, 3, len(WORLD_WORDS)) and ww[1].sum() == 0  # no scene: no target
    names = lambda row: {WORLD_WORDS[k] for k in row.nonzero().flatten().tolist()}  # noqa: E731
    assert names(ww[0, 0]) == {"purple", "diamond"} and names(ww[0, 1]) == {"purple", "diamond", "four"}
    assert tokenizer.convert_ids_to_tokens(batch["alignment_ids"][:2].tolist()) == ["red", "green"]
    model = build_model(aligned_cfg, pretrained=False, tokenizer=tokenizer).eval()
    out = model(batch)
    assert out["alignment"] > 0
    torch.testing.assert_close(out["loss"], out["ce"] + aligned_cfg.diversity_loss_weight * out["diversity"]
                               + 0.5 * out["alignment"])
    batch.pop("window_words")
    assert model(batch)["alignment"] == 0  # no targets, no term


def test_world_vocab_leaves_out_unknown_words_and_refuses_merged_ones(tokenizer):
    words, ids = world_vocab(tokenizer, ("red", "unknownword", "blue"))  # <unk>: no embedding of its own
    assert words == ("red", "blue") and tokenizer.convert_ids_to_tokens(ids.tolist()) == ["red", "blue"]
    merged = make_tokenizer()
    merged.unk_token = None  # a tokenizer without an unknown token of its own: "otherunknown" shares <unk>'s id
    with pytest.raises(ValueError, match="one first token"):
        world_vocab(merged, ("red", "unknownword", "otherunknown"))
