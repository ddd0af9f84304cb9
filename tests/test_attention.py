"""The reference block-causal attention: who attends whom, in both orientations."""

import pytest
import torch

from favor.attention import block_causal_mask, reference_attention


def test_mask_past_and_future():
    m = block_causal_mask(6, 2, "past")  # 3 frames x 2 tokens
    frames = torch.arange(6) // 2
    for i in range(6):
        for j in range(6):
            assert m[i, j] == (frames[j] <= frames[i])
    f = block_causal_mask(6, 2, "future")
    assert torch.equal(f, m.T)  # the release's triu is the transpose
    # the release's kron(triu(ones(F, F)), ones(S, S))
    assert torch.equal(f, torch.kron(torch.triu(torch.ones(3, 3)), torch.ones(2, 2)).bool())


@pytest.mark.parametrize("orientation", ["past", "future"])
def test_frame_sees_exactly_allowed_frames(orientation):
    """Perturb one frame's keys/values: only queries allowed to see it may change."""
    N, H, F, S, D = 1, 2, 4, 3, 8
    q, k, v = (torch.randn(N, H, F * S, D, dtype=torch.float64) for _ in range(3))
    base = reference_attention(q, k, v, S, orientation)
    for f in range(F):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, f * S:(f + 1) * S] += 1.0
        v2[:, :, f * S:(f + 1) * S] += 1.0
        out = reference_attention(q, k2, v2, S, orientation)
        changed = (out - base).abs().amax(dim=(0, 1, 3)) > 0  # [L]
        for qf in range(F):
            sees = f <= qf if orientation == "past" else f >= qf
            assert bool(changed[qf * S:(qf + 1) * S].all()) == sees
            assert bool(changed[qf * S:(qf + 1) * S].any()) == sees


def test_padding_mask_and_fully_masked_rows():
    q, k, v = (torch.randn(1, 1, 4, 5) for _ in range(3))
    pad = torch.tensor([[True, True, False, False]])
    out = reference_attention(q, k, v, 2, "future", pad)
    # frame 1 (tokens 2, 3) may only see frames >= 1, all padded: zeros, not NaN
    assert torch.all(out[0, 0, 2:] == 0)
    expect = reference_attention(q[..., :2, :], k[..., :2, :], v[..., :2, :], 2, "future")
    torch.testing.assert_close(out[..., :2, :], expect)


def test_length_must_fit_frames():
    with pytest.raises(ValueError, match="multiple of tokens per frame"):
        block_causal_mask(7, 2, "past")
