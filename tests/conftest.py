"""Shared fixtures: seeding, the tiny config, a tiny word-level tokenizer built here (no hub)."""

from __future__ import annotations

import pytest
import torch

from favor.config import get_config

WORDS = ("a red green blue yellow circle square triangle appears disappears then chime tone beep noise "
         "the word is spoken what after before yes no describe video audio sound picture one two three "
         "seven , . ? : user assistant < > / img "
         # the rest of the synthetic world's words (training/window_words.py), appended: earlier ids stay
         "white orange purple diamond low high burst zero four five six eight nine cat dog sun stop go tree").split()


def sigint_at_default() -> None:
    """Popen preexec_fn for a child the test interrupts: SIGINT back at its default (a shell or a CI
    runner may start jobs with it ignored, and Python then never turns it into KeyboardInterrupt)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def tiny_gqa_model():
    """The tiny preset with grouped-query attention (3 heads over 1 KV head: the ORT GenAI builder's GQA
    path) and non-zero LoRA B (peft starts it at zero), so merging LoRA matters; eval mode."""
    from favor.build import build_model

    torch.manual_seed(0)
    cfg = get_config("tiny").replace(**{"llm.heads": 3, "llm.kv_heads": 1})
    m = build_model(cfg, pretrained=False, tokenizer=make_tokenizer()).eval()
    for name, p in m.llm.model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    return m


def make_tokenizer(vocab_size: int = 101):
    """A real PreTrainedTokenizerFast (word-level) sized to the tiny LLM vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]  # ids 0, 1 (bos), 2 (eos): the LLMConfig defaults
    vocab = {w: i for i, w in enumerate(specials + list(dict.fromkeys(WORDS)))}
    assert len(vocab) <= vocab_size
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="</s>")


def demo_clip_windows(timing) -> int:
    """Cues favor-rt gives the committed demo clip: one per window of ``timing`` (the model's config).
    The 20-s clip is sampled at 0, 0.5, ..., 20.0 s: 41 frames at 2 FPS, so 9 windows of 5 frames."""
    from training.synth.generate import DEMO_SECONDS

    return timing.num_windows(round(DEMO_SECONDS * timing.video_fps) + 1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _bundle_cache(tmp_path_factory):
    """Checkpoints run by `auto` are exported into a per-session bundle cache, never ~/.cache (the
    base-weight cache, $FAVOR_CACHE, stays shared)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FAVOR_BUNDLE_CACHE", str(tmp_path_factory.mktemp("bundle-cache")))
    yield
    mp.undo()


@pytest.fixture
def tiny_cfg():
    return get_config("tiny")


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A self-contained tiny checkpoint (random weights) with its tokenizer beside it."""
    from favor.build import build_model
    from favor.checkpoint import checkpoint_from_model, save_checkpoint

    d = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    model = build_model(get_config("tiny"), pretrained=False, tokenizer=make_tokenizer())
    path = save_checkpoint(checkpoint_from_model(model, self_contained=True, hash_base_models=False),
                           d / "tiny.safetensors")
    model.tokenizer.save_pretrained(d / "tiny.tokenizer")
    return path
