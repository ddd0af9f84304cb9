"""model.lm_loss_weight: the LM loss's weight, and at 0 a fusion warm-up that never runs the LLM."""

import dataclasses

import pytest
import torch
from test_synchrony import _item as av_item  # a collatable clip item with its own soundtrack

from favor.config import FavorConfig


def _model_and_batch(cfg, tokenizer):
    from favor.build import build_model
    from training.collate import Collator

    batch = Collator(cfg, tokenizer)([av_item(cfg, True, 7, "a"), av_item(cfg, True, 5, "b"),
                                     av_item(cfg, True, 9, "c")])
    torch.manual_seed(0)
    return build_model(cfg, pretrained=False, tokenizer=tokenizer).train(), batch


def test_a_warmup_never_runs_the_llm_and_trains_only_the_fusion(tiny_cfg, tokenizer, monkeypatch):
    cfg = dataclasses.replace(tiny_cfg, lm_loss_weight=0.0, sync_loss_weight=0.5)
    model, batch = _model_and_batch(cfg, tokenizer)

    def refuse(*args, **kwargs):
        raise AssertionError("the LLM ran in a fusion warm-up")

    monkeypatch.setattr(model.llm, "forward", refuse)
    out = model(batch)
    assert out["ce"] == 0 and out["synchrony"] > 0
    torch.testing.assert_close(out["loss"], cfg.diversity_loss_weight * out["diversity"] + 0.5 * out["synchrony"])
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.qformer.parameters())
    lora = [p for n, p in model.llm.named_parameters() if "lora" in n]
    assert lora and all(p.grad is None for p in lora)  # AdamW leaves parameters without a grad untouched


def test_the_weight_scales_the_lm_loss(tiny_cfg, tokenizer):
    one, batch = _model_and_batch(tiny_cfg, tokenizer)
    two, _ = _model_and_batch(dataclasses.replace(tiny_cfg, lm_loss_weight=2.5), tokenizer)
    one.eval(), two.eval()  # same seed, same weights, no dropout: every term is equal but the weighting
    out1, out2 = one(batch), two(batch)
    assert out1["ce"] > 0
    torch.testing.assert_close(out2["ce"], out1["ce"])
    torch.testing.assert_close(out2["loss"] - 2.5 * out2["ce"], out1["loss"] - out1["ce"])


def test_a_warmup_stage_continues_into_an_lm_stage(tiny_cfg):
    # a loss-term weight: train.init_from may change it between curriculum stages (FavorConfig.weights_dict)
    assert dataclasses.replace(tiny_cfg, lm_loss_weight=0.0).weights_dict() == tiny_cfg.weights_dict()
    with pytest.raises(ValueError, match="lm_loss_weight"):
        FavorConfig.from_dict({**tiny_cfg.to_dict(), "lm_loss_weight": -1.0})
