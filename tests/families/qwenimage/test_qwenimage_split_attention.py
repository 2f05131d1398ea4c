"""The shared split image attention with a text key mask (Qwen-Image, Chroma): the image-keys part once, each branch's
masked text-keys part, LSE-merged and NAG-combined, equals one masked attention per branch over the joined keys (in
either token order), then the combine."""

from __future__ import annotations

import math

import pytest
import torch

from nag_kernels.integrations.guided import NAGForward
from nag_kernels.integrations.split_attention import image_attention, masked_attention_with_lse
from nag_kernels.reference import nag_reference

B, N, T, H, D = 2, 12, 5, 2, 8


def masked_attention(q, k, v, keep):  # one softmax over all keys; [R, S, H, D], keep [R, S_k]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~keep[:, None, None, :], float("-inf"))
    return (torch.softmax(scores, -1) @ v).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("text_first", [True, False], ids=["text-image", "image-text"])
def test_masked_split_attention_equals_one_masked_attention_over_the_joined_keys(text_first):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, N, H, D, generator=g, dtype=torch.float64) for _ in range(3))
    tk, tv = (torch.randn(2 * B, T, H, D, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    nag = NAGForward(B, T, 4.0, 1.5, 0.5, "l1", "torch")
    out = image_attention(q, k, v, tk, tv, nag, text_mask=mask)

    def joined(text, image):
        both = torch.cat([image, image])
        return torch.cat([text, both], 1) if text_first else torch.cat([both, text], 1)

    ones = torch.ones(2 * B, N, dtype=torch.bool)
    keep = torch.cat([mask, ones], 1) if text_first else torch.cat([ones, mask], 1)
    per_branch = masked_attention(torch.cat([q, q]), joined(tk, k), joined(tv, v), keep)  # [2B, N, C]
    expected = nag_reference(per_branch[:B], per_branch[B:], 4.0, 1.5, 0.5, norm="l1")
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    # an all-ones mask is the unmasked split attention
    torch.testing.assert_close(image_attention(q, k, v, tk, tv, nag, text_mask=torch.ones(2 * B, T, dtype=torch.bool)),
                               image_attention(q, k, v, tk, tv, nag), rtol=0, atol=1e-12)


def test_all_masked_keys_are_an_empty_part_and_bad_masks_are_refused():
    q, k, v = (torch.randn(1, 3, H, D) for _ in range(3))
    out, lse = masked_attention_with_lse(q, k, v, torch.zeros(1, 3, dtype=torch.bool))
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all() and lse.shape == (1, 3, H)
    nag = NAGForward(1, T, 4.0, 1.5, 0.5, "l1", "torch")
    with pytest.raises(ValueError, match=r"text_mask must have shape \(2, 5\)"):
        image_attention(q, k, v, torch.randn(2, T, H, D), torch.randn(2, T, H, D), nag, text_mask=torch.ones(2, 4))
