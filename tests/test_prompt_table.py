"""The prompt-table convention (fake ids >= vocab address AV rows) equals direct splicing."""

from __future__ import annotations

import pytest
import torch

from favor import prompt_table
from favor.build import build_model
from favor.prompt import inference_ids


@pytest.fixture
def model(tiny_cfg, tokenizer):
    return build_model(tiny_cfg, pretrained=False, tokenizer=tokenizer).eval()


@pytest.mark.parametrize("left_pad", [True, False])
def test_prompt_table_equals_splice(model, tokenizer, left_pad):
    cfg = model.cfg
    B, W, Nq, D = 3, 4, cfg.qformer.num_queries, cfg.llm.hidden
    av = torch.randn(B, W * Nq, D)
    av_mask = torch.ones(B, W * Nq, dtype=torch.bool)
    av_mask[1, -Nq:] = False  # sample 1 has a padded last window
    av_mask[2, Nq:] = False  # sample 2 has one window
    prompts = [inference_ids(tokenizer, p) for p in ("describe the video", "what sound", "a red circle then")]
    with torch.no_grad():
        spliced = model.llm.splice(prompts, av, av_mask, left_pad=left_pad)
        inputs = prompt_table.build_inputs(prompts, av, av_mask, cfg.llm.vocab_size, cfg.llm.bos_token_id,
                                           cfg.llm.eos_token_id, left_pad=left_pad)
        emb = model.llm.base.get_input_embeddings().weight
        got = prompt_table.embed_with_prompt_table(inputs.ids, emb, inputs.table, inputs.attention_mask)
    assert torch.equal(inputs.attention_mask, spliced.attention_mask)
    assert torch.equal(got, spliced.embeds)  # a gather of the same rows: exact
    # AV positions are exactly the fake ids, and they address the right rows
    is_row = inputs.ids >= cfg.llm.vocab_size
    assert is_row.sum(1).tolist() == av_mask.sum(1).tolist()
    assert inputs.ids[0][is_row[0]].tolist() == [cfg.llm.vocab_size + i for i in range(W * Nq)]
    assert inputs.ids[2][is_row[2]].min() == cfg.llm.vocab_size + 2 * W * Nq  # sample 2's rows start at 2*A


def test_numpy_inputs_match_torch(model):
    emb = torch.randn(11, 6)
    table = torch.randn(4, 6)
    ids = torch.tensor([[1, 11, 12, 3], [14, 0, 2, 13]])
    a = prompt_table.embed_with_prompt_table(ids, emb, table)
    b = prompt_table.embed_with_prompt_table(ids.numpy(), emb.numpy(), table.numpy())
    assert torch.equal(a, b)
    assert torch.equal(a[0, 1], table[0]) and torch.equal(a[1, 0], table[3]) and torch.equal(a[0, 0], emb[1])


def test_out_of_range_ids_rejected():
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 15\)"):
        prompt_table.embed_with_prompt_table(torch.tensor([[15]]), torch.randn(11, 2), torch.randn(4, 2))
    with pytest.raises(ValueError, match="expected 2 prompts"):
        prompt_table.build_inputs([], torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool), 10, 1, 2)


def test_table_sizing():
    # favor-13b streaming: 1 request x 12 windows x 32 queries
    assert prompt_table.max_prompt_table_rows(1, 12, 32) == 384
    assert prompt_table.max_prompt_table_rows(4, 3, 16) == 192
    with pytest.raises(ValueError, match="max_windows"):
        prompt_table.max_prompt_table_rows(1, 0, 32)
