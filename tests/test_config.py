import pytest

from favor.config import FavorConfig, get_config


def test_release_timing_is_derived():
    cfg = get_config("favor-13b")
    t = cfg.timing
    assert t.audio_token_rate == 50.0  # 16 kHz / 160 hop / stride 2
    assert t.audio_tokens_per_frame == 25.0  # 0.5 s x 50 Hz
    assert cfg.tokens_per_frame == 32
    assert cfg.tokens_per_window == 320
    assert cfg.fused_width == 1536
    assert t.whisper_audio_tokens == 1500
    assert t.num_windows(60) == 6 and t.num_windows(61) == 7
    assert cfg.llm_tokens(26) == 96  # video only, 13 s: 3 windows x 32 queries (FAVOR-SPEC 3)


def test_non_integer_rates_round_up_the_slot():
    cfg = get_config("favor-13b").replace(**{"timing.video_fps": 4.0})
    assert cfg.timing.audio_tokens_per_frame == 12.5
    assert cfg.timing.max_audio_tokens_per_frame == 13
    slow = get_config("favor-13b").replace(**{"timing.video_fps": 1.0})
    assert slow.tokens_per_frame == 50  # 50 audio tokens outgrow 32 visual ones


@pytest.mark.parametrize("name", ["tiny", "demo", "small", "favor-7b", "favor-13b"])
def test_round_trip(name):
    cfg = get_config(name)
    assert FavorConfig.from_dict(cfg.to_dict()) == cfg


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="orientation"):
        get_config("tiny", **{"qformer.orientation": "sideways"})
    with pytest.raises(KeyError, match="nope"):
        get_config("tiny", **{"timing.nope": 1})
    with pytest.raises(ValueError, match="unknown preset"):
        get_config("huge")
    with pytest.raises(ValueError, match="position table"):
        get_config("tiny", **{"qformer.max_positions": 8})
